"""Every file name of the pipeline, in one place: the rules and the stages both ask here.

A path is built from the results directory, a run's key (``{dataset}/{size}/M{multiplier}``,
or that pattern itself when a rule declares its wildcards) and a checkpoint step (an int, or
``STEP_PATTERN``, the ``{step}`` wildcard). Stages are handed their output paths by the rules;
the names a stage needs on its own inside a folder it was handed (a checkpoint's folder, a
lock, a resume state, a trunk's spec and states, the files of a prepared corpus) come from
this module's functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_PATTERN = "{dataset}/{size}/M{multiplier}"
TRUNK_PATTERN = "{dataset}/{size}"
STEP_PATTERN = "{step}"


def preset_file(name: str) -> Path:
    """A config shipped in the repository's ``presets/`` folder, by its name."""
    return Path(__file__).resolve().parents[1] / "presets" / f"{name}.yaml"


def corpus_file(corpus_dir: str | Path, split: str) -> str:
    """A prepared dataset's ``train.jsonl`` or ``val.jsonl`` inside its corpus folder."""
    return str(Path(corpus_dir, f"{split}.jsonl"))


def corpus_manifest(corpus_dir: str | Path) -> str:
    """A prepared dataset's manifest (sources, versions, hashes) inside its corpus folder."""
    return str(Path(corpus_dir, "manifest.json"))


def checkpoint_name(step: int | str) -> str:
    """A checkpoint's folder name: ``step`` zero-padded to six digits, or the step wildcard."""
    return f"step{step:06d}" if isinstance(step, int) else f"step{step}"


def checkpoint_path(checkpoints: str | Path, step: int | str) -> str:
    """One checkpoint's folder inside a run's checkpoints folder."""
    return str(Path(checkpoints, checkpoint_name(step)))


def lock_file(folder: str | Path) -> Path:
    """The lock its one writer holds on a work or states folder (``workflow.resume``)."""
    return Path(folder, "lock")


def resume_state_file(folder: str | Path) -> Path:
    """Where an unfinished run or trunk continues from, inside its work or states folder."""
    return Path(folder, "resume.pt")


def unfinished_checkpoints(work: str | Path) -> Path:
    """A run's checkpoints so far, inside its work folder, until the run finishes."""
    return Path(work, "checkpoints")


def trunk_spec_file(states: str | Path) -> Path:
    """The trunk spec a trunk's states belong to, inside its states folder."""
    return Path(states, "spec.json")


def trunk_state_path(states: str | Path, step: int) -> str:
    """A trunk's full training state after ``step`` steps, inside its states folder."""
    return str(Path(states, f"{checkpoint_name(step)}.pt"))


def trunk_state_steps(states: str | Path) -> list[int]:
    """The steps of the trunk states in ``states`` (``trunk_state_path``'s names), ascending."""
    directory = Path(states)
    if not directory.is_dir():
        return []
    names = (path.name for path in directory.iterdir())
    return sorted(
        int(name[4:-3])
        for name in names
        if name.startswith("step") and name.endswith(".pt") and name[4:-3].isdigit()
    )


@dataclass(frozen=True)
class Layout:
    """The files under one results directory (config ``results_dir``)."""

    results_dir: str

    def path(self, *parts: str) -> str:
        return str(Path(self.results_dir, *parts))

    # Data
    def corpus(self, dataset: str) -> str:
        """A prepared dataset's folder (prepare writes it whole)."""
        return self.path("corpus", dataset)

    def corpus_split(self, dataset: str, split: str) -> str:
        return corpus_file(self.corpus(dataset), split)

    def corpus_manifest(self, dataset: str) -> str:
        return corpus_manifest(self.corpus(dataset))

    def sources_cache(self) -> str:
        return self.path("sources")

    def tokenizer(self) -> str:
        return self.path("tokenizer")

    def tokens(self, dataset: str, split: str) -> str:
        """A split's token shard folder (tokenize)."""
        return self.path("tokens", dataset, split)

    # Training
    def checkpoints(self, run_key: str) -> str:
        return self.path("runs", run_key, "checkpoints")

    def checkpoint(self, run_key: str, step: int | str) -> str:
        """One checkpoint's folder among a run's checkpoints."""
        return checkpoint_path(self.checkpoints(run_key), step)

    def curve(self, run_key: str) -> str:
        return self.path("runs", run_key, "curve.parquet")

    def train_summary(self, run_key: str) -> str:
        return self.path("runs", run_key, "train.json")

    def train_work(self, run_key: str) -> str:
        """Where an unfinished run keeps its resume state and checkpoints until it finishes."""
        return self.path("runs", run_key, "work")

    # Trunks (train.schedule: wsd), keyed ``{dataset}/{size}``
    def trunk_summary(self, trunk_key: str) -> str:
        """What the trunk job trained (its rule's output)."""
        return self.path("trunks", trunk_key, "trunk.json")

    def trunk_states(self, trunk_key: str) -> str:
        """The trunk's full states at its branch points, its resume state and its lock; kept
        across runs of the pipeline, so that a trunk extended for a new multiplier continues
        from them."""
        return self.path("trunks", trunk_key, "states")

    # Evaluation
    def loss_eval(self, run_key: str, step: int | str, validation_set: str) -> str:
        return self.path("eval", run_key, checkpoint_name(step), f"loss-{validation_set}.json")

    def downstream_summary(self, run_key: str, step: int | str, suite: str) -> str:
        return self.path("eval", run_key, checkpoint_name(step), f"downstream-{suite}.json")

    def lm_eval_results(self, run_key: str, step: int | str, suite: str) -> str:
        return self.path("eval", run_key, checkpoint_name(step), f"lm-eval-{suite}.json")

    def suite(self, suite: str) -> str:
        """A downstream suite's task files and manifest (build_suite)."""
        return self.path("suites", suite)

    def hf_home(self) -> str:
        """lm-eval's dataset cache (the paper suite's downloads land here)."""
        return self.path("hf_home")

    # Tables, fits and figures
    def runs_table(self) -> str:
        return self.path("runs.parquet")

    def error_groups(self) -> str:
        return self.path("error_groups.json")

    def predictions(self) -> str:
        return self.path("predictions.parquet")

    def fits(self) -> str:
        return self.path("fits.parquet")

    def plot(self, name: str) -> str:
        return self.path("plots", name)

    # Logs and benchmarks
    def log(self, stage: str, *parts: str) -> str:
        """``logs/<stage>.log``, or ``logs/<stage>/<parts>.log`` for a job per wildcard."""
        return self._per_job("logs", stage, parts, ".log")

    def benchmark(self, stage: str, *parts: str) -> str:
        return self._per_job("benchmarks", stage, parts, ".tsv")

    def _per_job(self, kind: str, stage: str, parts: tuple[str, ...], suffix: str) -> str:
        if not parts:
            return self.path(kind, stage + suffix)
        return self.path(kind, stage, *parts[:-1], parts[-1] + suffix)
