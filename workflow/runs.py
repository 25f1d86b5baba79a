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
        return f"{self.dataset}/{self.size}/M{format_multiplier(self.multiplier)}"

    @property
    def wildcards(self) -> dict[str, str]:
        return {
            "dataset": self.dataset,
            "size": self.size,
            "multiplier": format_multiplier(self.multiplier),
        }


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


def make_run(config: dict, dataset: str, size: str, multiplier: float, trained: bool) -> Run:
    """The Run of (dataset, size, M): its D = M x N tokens, steps and checkpoint steps."""
    n_params = size_parameters(config, size)
    spec = config["sizes"][size]
    tokens_per_step = spec["batch_size"] * spec["context_length"]
    tokens = round(multiplier * n_params)
    total_steps = math.ceil(tokens / tokens_per_step)
    return Run(
        dataset=dataset,
        size=size,
        multiplier=float(multiplier),
        n_params=n_params,
        tokens=tokens,
        tokens_per_step=tokens_per_step,
        checkpoint_steps=checkpoint_steps(total_steps, config["train"]["checkpoints"]),
        trained=trained,
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


def untrained_targets(config: dict) -> list[Run]:
    """Runs to predict without training them (``fit.predict``), for every trained dataset."""
    trained = {(run.dataset, run.size, run.multiplier) for run in trained_runs(config)}
    return [
        make_run(config, dataset, size, multiplier, trained=False)
        for dataset in config["grid"]
        for size, multipliers in config["fit"].get("predict", {}).items()
        for multiplier in multipliers
        if (dataset, size, float(multiplier)) not in trained
    ]
