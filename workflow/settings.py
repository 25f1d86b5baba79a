"""Typed settings of each stage, built once from the validated config and passed as JSON.

The JSON Schema is the only place a default is written; the config that reaches these
builders has been validated and filled in (``workflow.config.validate_config``), so the
dataclasses below have no defaults of their own. A rule passes ``to_json()`` as one argument
and the stage reads it back with ``from_json``. Building them imports nothing heavier than
the standard library, because Snakemake builds them while it parses the workflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Self

from workflow.runs import Run, Trunk, model_shape, untrained_targets


class SettingsError(ValueError):
    """Settings a stage cannot read; the message names what is missing."""


@dataclass(frozen=True)
class JsonSettings:
    """Round trip through one JSON object (what a rule passes on a stage's command line)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise SettingsError(f"{cls.__name__}: not JSON: {error}") from None
        return cls.from_dict(payload)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Self:
        names = {field.name for field in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(payload)), sorted(set(payload) - names)
        if missing or unknown:
            raise SettingsError(
                f"{cls.__name__}: missing {missing}, unknown {unknown}; expected {sorted(names)}"
            )
        return cls(**payload)


@dataclass(frozen=True)
class FitSettings(JsonSettings):
    """What the fit stage (and the planner) needs: fit points, the error law's x, the
    bootstrap, and the untrained runs to predict."""

    loss_points: dict[str, list[float]]
    error_points: dict[str, list[float]]
    loss_eval: str
    starts: int
    bootstrap: int
    seed: int
    extra_targets: list[dict[str, Any]]
    run_sd: float


def measured_elsewhere(config: dict) -> bool:
    """Whether the runs come as results (the released testbed, a results table) rather than
    being trained here."""
    return bool(config["released_dir"] or config["results_table"])


def error_loss_eval(config: dict) -> str:
    """The validation set whose loss the error law is fitted on (and the plot shows)."""
    chosen = config["fit"]["error"]["loss_eval"]
    if chosen:
        return chosen
    if config["released_dir"]:
        return "c4_val"  # the released testbed's C4 validation loss, the one the paper fits on
    if config["results_table"]:
        return next(iter(config["columns"]["losses"]))  # the config check makes sure of it
    return config["validation"]["sets"][0]


def fit_settings(config: dict) -> FitSettings:
    """The fit stage's settings; one builder for the fit rule and the planner."""
    fit = config["fit"]
    extra_targets = (
        []  # a table of results has no runs to predict beyond its own
        if measured_elsewhere(config)
        else [
            {
                "dataset": run.dataset,
                "size": run.size,
                "N": run.n_params,
                "M": run.multiplier,
                "D": run.tokens,
            }
            for run in untrained_targets(config)
        ]
    )
    return FitSettings(
        loss_points=fit["loss"]["points"],
        error_points=fit["error"]["points"],
        loss_eval=error_loss_eval(config),
        starts=fit["loss"]["starts"],
        bootstrap=fit["bootstrap"],
        seed=fit["seed"],
        extra_targets=extra_targets,
        run_sd=fit["run_sd"],
    )


@dataclass(frozen=True)
class IngestSettings(JsonSettings):
    """What the ingest of a results table needs: its layout (``columns`` for the wide one,
    None for the long one) and the fit points it must hold."""

    columns: dict[str, Any] | None
    loss_points: dict[str, list[float]]
    error_points: dict[str, list[float]]
    loss_eval: str


def ingest_settings(config: dict) -> IngestSettings:
    fit = config["fit"]
    return IngestSettings(
        columns=config["columns"],
        loss_points=fit["loss"]["points"],
        error_points=fit["error"]["points"],
        loss_eval=error_loss_eval(config),
    )


@dataclass(frozen=True)
class Recipe(JsonSettings):
    """What a size trains with, apart from how long and how it ends: the model's shape and
    the optimizer's settings; a run and its trunk (train.schedule: wsd) share it."""

    shape: dict[str, Any]
    n_params: int
    batch_size: int
    micro_batch_size: int | None
    lr: float
    warmup: int
    weight_decay: float
    z_loss: float
    beta1: float
    beta2: float
    grad_clip: float
    seed: int
    device: str
    data_order: str

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.shape["context_length"]


@dataclass(frozen=True)
class RunSpec(Recipe):
    """Everything that determines a training run's result; a change to it re-runs that run
    (and what depends on it) only."""

    run: str
    tokens: int
    checkpoint_steps: list[int]
    min_lr: float

    @property
    def steps(self) -> int:
        """Optimizer steps: the last one is cut short so that exactly D tokens are predicted."""
        return math.ceil(self.tokens / self.tokens_per_step)


# The settings of a size and of ``train`` that a run and its trunk (train.schedule: wsd) share.
RECIPE_SIZE_KEYS = ("batch_size", "micro_batch_size", "lr", "warmup", "weight_decay")
RECIPE_TRAIN_KEYS = ("z_loss", "beta1", "beta2", "grad_clip", "seed", "device", "data_order")


def recipe(config: dict, size: str) -> dict[str, Any]:
    """A size's ``Recipe`` fields from the config, all but N (a run's or trunk's own)."""
    return {
        "shape": model_shape(config, size),
        **{key: config["sizes"][size][key] for key in RECIPE_SIZE_KEYS},
        **{key: config["train"][key] for key in RECIPE_TRAIN_KEYS},
    }


def run_spec(config: dict, run: Run) -> RunSpec:
    return RunSpec(
        run=run.key,
        n_params=run.n_params,
        tokens=run.tokens,
        checkpoint_steps=list(run.checkpoint_steps),
        min_lr=config["sizes"][run.size]["min_lr"],
        **recipe(config, run.size),
    )


@dataclass(frozen=True)
class TrunkSpec(Recipe):
    """What determines a trunk's states (train.schedule: wsd): a run's spec without its
    length, checkpoints and floor. Its branch points are not part of it: a trunk extended for a
    new multiplier is the same trunk, continued, so adding a run never restarts it."""

    trunk: str

    @property
    def run(self) -> str:
        """The trunk's name in messages, where a run's spec has its key."""
        return f"{self.trunk}/trunk"

    @classmethod
    def of_run(cls, spec: RunSpec, trunk: str) -> TrunkSpec:
        """The trunk a run of ``spec`` branches from: its spec's settings, named ``trunk``."""
        shared = {field.name for field in dataclasses.fields(cls)} - {"trunk"}
        return cls(trunk=trunk, **{name: getattr(spec, name) for name in shared})


def trunk_spec(config: dict, trunk: Trunk) -> TrunkSpec:
    return TrunkSpec(trunk=trunk.key, n_params=trunk.n_params, **recipe(config, trunk.size))


@dataclass(frozen=True)
class Cooldown(JsonSettings):
    """How a warmup-stable-decay run leaves its size's trunk: from the trunk's state after
    ``branch_step`` steps it decays (``decay``: linear, cosine or 1-sqrt) to its ``min_lr`` at
    its last step. Part of the run's identity beside its ``RunSpec``."""

    trunk: str
    branch_step: int
    decay: str


def cooldown(config: dict, run: Run) -> Cooldown | None:
    """The run's cooldown under train.schedule wsd; None under cosine (it trains alone)."""
    if run.branch_step is None:
        return None
    return Cooldown(
        trunk=run.trunk_key, branch_step=run.branch_step, decay=config["train"]["decay"]
    )


@dataclass(frozen=True)
class EngineSettings(JsonSettings):
    """How a run is computed and reported (speed, memory, how often it logs and saves), apart
    from what determines its result: a killed run resumes under other values of these, and
    changing them re-runs nothing. ``log_every`` spaces the curve's rows, each the mean loss
    since the previous one; the weights do not depend on it."""

    activation_checkpointing: bool
    parallelism: str
    compile: bool
    peak_tflops: float | None
    resume_every: int
    log_every: int


def engine_settings(config: dict, run: Run | Trunk) -> EngineSettings:
    size = config["sizes"][run.size]
    train = config["train"]
    return EngineSettings(
        activation_checkpointing=size["activation_checkpointing"],
        parallelism=size["parallelism"],
        compile=train["compile"],
        peak_tflops=train["peak_tflops"],
        resume_every=train["resume_every"],
        log_every=train["log_every"],
    )
