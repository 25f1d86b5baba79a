"""Turn the validated config into the list of training runs and their exact token budgets.

Everything here is arithmetic on the config (no torch), because Snakemake calls it while
building the DAG: the paper preset's 104 runs must plan in well under a second.

N counts every parameter of ``workflow.model.ScalingLM``: both embedding matrices, the
gain-only LayerNorms and the blocks. Our qk-LayerNorm has no learnable gain, so this equals
the paper's count exactly (the released N leaves the qk gains out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workflow import laws


def ffn_hidden_size(d_model: int, multiple_of: int) -> int:
    """SwiGLU hidden width: 8/3 of d_model rounded up to ``multiple_of`` (open_lm's rule)."""
    return multiple_of * math.ceil(int(8 * d_model / 3) / multiple_of)


def count_parameters(d_model: int, n_layers: int, vocab_size: int, ffn_hidden: int) -> int:
    """Parameters of the model: untied input and output embeddings, blocks, final norm."""
    embeddings = 2 * vocab_size * d_model
    attention = 4 * d_model * d_model
    swiglu = 3 * d_model * ffn_hidden
    norms = 2 * d_model
    return embeddings + n_layers * (attention + swiglu + norms) + d_model


def format_multiplier(multiplier: float) -> str:
    """Multiplier as it appears in paths: ``20`` for 20.0, ``0.5`` for 0.5."""
    return str(int(multiplier)) if float(multiplier).is_integer() else repr(float(multiplier))


def run_key(dataset: str, size: str, multiplier: float) -> str:
    """A run's key and relative path, ``{dataset}/{size}/M{multiplier}``, as its training
    summary names it."""
    return f"{dataset}/{size}/M{format_multiplier(multiplier)}"


@dataclass(frozen=True)
class Run:
    """One training run: a model size trained on ``tokens`` = M x N tokens of one dataset."""

    dataset: str
    size: str
    multiplier: float
    n_params: int
    tokens: int
    tokens_per_step: int
    checkpoint_steps: tuple[int, ...]
    trained: bool = True
    # Under train.schedule wsd: the last step the run shares with its size's trunk.
    branch_step: int | None = None

    @property
    def steps(self) -> int:
        return self.checkpoint_steps[-1]

    @property
    def compute(self) -> float:
        """Training FLOPs by the paper's estimate C = 6ND."""
        return float(laws.compute(self.n_params, self.tokens))

    @property
    def key(self) -> str:
        """The run's relative path: ``{dataset}/{size}/M{multiplier}``."""
        return run_key(self.dataset, self.size, self.multiplier)

    @property
    def trunk_key(self) -> str:
        """The key of the size's trunk (train.schedule: wsd): ``{dataset}/{size}``."""
        return f"{self.dataset}/{self.size}"

    @property
    def wildcards(self) -> dict[str, str]:
        return {
            "dataset": self.dataset,
            "size": self.size,
            "multiplier": format_multiplier(self.multiplier),
        }


@dataclass(frozen=True)
class Trunk:
    """Under train.schedule wsd, the constant-learning-rate stretch every run of one
    (dataset, size) shares: it keeps its full state at each run's ``branch_steps``."""

    dataset: str
    size: str
    n_params: int
    tokens_per_step: int
    branch_steps: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.size}"

    @property
    def steps(self) -> int:
        """Its furthest branch point: as far as it trains."""
        return self.branch_steps[-1]

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def wildcards(self) -> dict[str, str]:
        return {"dataset": self.dataset, "size": self.size}


def model_shape(config: dict, size: str) -> dict:
    """Architecture of a named size, with the settings every size shares."""
    spec = config["sizes"][size]
    model = config["model"]
    return {
        "d_model": spec["d_model"],
        "n_layers": spec["n_layers"],
        "n_heads": spec["n_heads"],
        "ffn_hidden": ffn_hidden_size(spec["d_model"], model["ffn_multiple_of"]),
        "vocab_size": config["tokenizer"]["vocab_size"],
        "context_length": spec["context_length"],
        "rope_theta": model["rope_theta"],
        "norm_eps": model["norm_eps"],
    }


def size_parameters(config: dict, size: str) -> int:
    """N of a size: every parameter of its shape, both embedding matrices included."""
    shape = model_shape(config, size)
    return count_parameters(
        shape["d_model"], shape["n_layers"], shape["vocab_size"], shape["ffn_hidden"]
    )


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> tuple[int, ...]:
    """Evenly spaced steps at which a run saves its model; the last one is the final step."""
    count = max(1, min(n_checkpoints, total_steps))
    return tuple(sorted({math.ceil(total_steps * k / count) for k in range(1, count + 1)}))


def branch_step(config: dict, size: str, tokens: int) -> int:
    """Where a warmup-stable-decay run of ``tokens`` leaves its trunk: after (1 - f) x D
    tokens (f = train.cooldown_fraction), rounded to a step; not inside the warmup, and at
    least one step before the run's end (which wins for a run that ends inside its warmup).
    Planned whatever the schedule (the cost table compares both)."""
    spec = config["sizes"][size]
    tokens_per_step = spec["batch_size"] * spec["context_length"]
    steps = math.ceil(tokens / tokens_per_step)
    shared = round((1 - config["train"]["cooldown_fraction"]) * tokens / tokens_per_step)
    return min(max(shared, spec["warmup"]), steps - 1)


def make_run(config: dict, dataset: str, size: str, multiplier: float, trained: bool) -> Run:
    """The Run of (dataset, size, M): its D = M x N tokens, steps and checkpoint steps.

    Under train.schedule wsd the run keeps only the checkpoint steps after its branch point:
    the trunk does not save models, and a step it has passed cannot be saved for a multiplier
    added later.
    """
    n_params = size_parameters(config, size)
    spec = config["sizes"][size]
    tokens_per_step = spec["batch_size"] * spec["context_length"]
    tokens = round(multiplier * n_params)
    total_steps = math.ceil(tokens / tokens_per_step)
    saved = checkpoint_steps(total_steps, config["train"]["checkpoints"])
    branch = None
    if config["train"]["schedule"] == "wsd":
        branch = branch_step(config, size, tokens)
        saved = tuple(step for step in saved if step > branch)
    return Run(
        dataset=dataset,
        size=size,
        multiplier=float(multiplier),
        n_params=n_params,
        tokens=tokens,
        tokens_per_step=tokens_per_step,
        checkpoint_steps=saved,
        trained=trained,
        branch_step=branch,
    )


def trained_runs(config: dict) -> list[Run]:
    """Every run of the grid, in config order."""
    return [
        make_run(config, dataset, size, multiplier, trained=True)
        for dataset, sizes in config["grid"].items()
        for size, multipliers in sizes.items()
        for multiplier in multipliers
    ]


def find_run(config: dict, dataset: str, size: str, multiplier: str | float) -> Run:
    """The trained run named by Snakemake wildcards."""
    for run in trained_runs(config):
        if (run.dataset, run.size) == (dataset, size) and run.multiplier == float(multiplier):
            return run
    raise KeyError(f"no run {dataset}/{size}/M{multiplier} in config 'grid'")


def trunks(config: dict) -> list[Trunk]:
    """The trunk of every (dataset, size) of the grid under train.schedule wsd, with the
    branch points of its runs."""
    branches: dict[tuple[str, str], set[int]] = {}
    runs = {}
    for run in trained_runs(config):
        runs[run.dataset, run.size] = run
        branches.setdefault((run.dataset, run.size), set()).add(
            branch_step(config, run.size, run.tokens)
        )
    return [
        Trunk(
            dataset=dataset,
            size=size,
            n_params=runs[dataset, size].n_params,
            tokens_per_step=runs[dataset, size].tokens_per_step,
            branch_steps=tuple(sorted(steps)),
        )
        for (dataset, size), steps in branches.items()
    ]


def find_trunk(config: dict, dataset: str, size: str) -> Trunk:
    """The trunk named by Snakemake wildcards."""
    for trunk in trunks(config):
        if (trunk.dataset, trunk.size) == (dataset, size):
            return trunk
    raise KeyError(f"no trunk {dataset}/{size}: the size is not trained on it in config 'grid'")


def untrained_targets(config: dict) -> list[Run]:
    """Runs to predict without training them (``fit.predict``), for every trained dataset."""
    trained = {(run.dataset, run.size, run.multiplier) for run in trained_runs(config)}
    return [
        make_run(config, dataset, size, multiplier, trained=False)
        for dataset in config["grid"]
        for size, multipliers in config["fit"]["predict"].items()
        for multiplier in multipliers
        if (dataset, size, float(multiplier)) not in trained
    ]
