"""Shared pieces of the rules: config validation and the functions that map config to paths.

Rules never build paths inline; they call the functions here, which read the run list that
``workflow.runs`` derives from the validated config.
"""

import json
import sys

from workflow.config import unusual_cost, validate_config
from workflow.paths import (
    RUN_PATTERN,
    STEP_PATTERN,
    TRUNK_PATTERN,
    Layout,
    checkpoint_name,
    trunk_state_steps,
)
from workflow.resources import (
    downstream_resources,
    evaluate_resources,
    job_gpus,
    launch_command,
    rule_resources,
    train_resources,
    training_priority,
    trunk_resources,
)
from workflow.runs import find_run, find_trunk, trained_runs
from workflow.settings import (
    JsonSettings,
    cooldown,
    engine_settings,
    error_loss_eval,
    fit_settings,
    ingest_settings,
    measured_elsewhere,
    run_spec,
    trunk_spec,
)

validate_config(config)
layout = Layout(config["results_dir"])
if note := unusual_cost(config):
    print(note, file=sys.stderr)


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.\-]+",
    size=r"[A-Za-z0-9_.\-]+",
    multiplier=r"[0-9]+(\.[0-9]+)?",
    split="train|val",
    step=r"[0-9]{6}[0-9]*",  # zero-padded to six digits; paper-scale runs take millions of steps


RUN_DIR = RUN_PATTERN
TRUNK_DIR = TRUNK_PATTERN
STEP = STEP_PATTERN


def as_json(payload):
    """Params travel to the stage as one JSON argument (quoted with :q in the shell line);
    typed settings (workflow.settings) as their own JSON."""
    if isinstance(payload, JsonSettings):
        return payload.to_json()
    return json.dumps(payload, sort_keys=True)


def run_of(wildcards):
    """The Run a job's {dataset}/{size}/M{multiplier} wildcards name."""
    return find_run(config, wildcards.dataset, wildcards.size, wildcards.multiplier)


def validation_sets():
    """Names of the datasets every checkpoint's loss is measured on."""
    return config["validation"]["sets"]


def loss_eval_files():
    """Every (run, checkpoint, validation set) loss JSON of the grid."""
    return [
        layout.loss_eval(run.key, step, valset)
        for run in trained_runs(config)
        for step in run.checkpoint_steps
        for valset in validation_sets()
    ]


def suite_name():
    """The downstream suite (config downstream.suite); 'none' runs no downstream evaluation."""
    return config["downstream"]["suite"]


def suite_dir():
    """The suite's task files and manifest (rule build_suite)."""
    return layout.suite(suite_name())


def hf_home():
    """lm-eval's dataset cache, inside the results (the paper suite's downloads land here)."""
    return layout.hf_home()


def suite_sources():
    """Dataset -> held-out documents the offline suite's tasks are built from."""
    if suite_name() != "offline":
        return {}
    return {
        task["source"]: layout.corpus_split(task["source"], "val")
        for task in config["downstream"]["tasks"].values()
    }


def suite_settings():
    """Everything the build_suite stage needs from config, as one JSON argument."""
    downstream = config["downstream"]
    return as_json(
        {
            "suite": suite_name(),
            "tasks": downstream["tasks"],
            "sources": suite_sources(),
            "examples": downstream["examples"],
            "seed": downstream["seed"],
        }
    )


def downstream_eval_files():
    """Every (run, checkpoint) downstream summary of the grid; none without a suite."""
    if suite_name() == "none":
        return []
    every = config["downstream"]["checkpoints"] == "all"
    return [
        layout.downstream_summary(run.key, step, suite_name())
        for run in trained_runs(config)
        for step in (run.checkpoint_steps if every else [run.steps])
    ]


def final_targets():
    """What `snakemake` with no target builds: the predictions and what a reader looks at, and
    every run's checkpoints, so that a deleted checkpoint folder is retrained rather than
    silently missing (Snakemake would not rebuild an intermediate whose users are done)."""
    figures = [layout.plot(name) for name in ("scaling.png", "targets.html", "calibration.png")]
    checkpoints = []
    if not measured_elsewhere(config):
        figures.append(layout.plot("curves.png"))
        checkpoints = [layout.checkpoints(run.key) for run in trained_runs(config)]
    return [layout.predictions(), layout.fits(), *figures, *checkpoints]


def curve_runs():
    """Each trained run's identity and curve table, for the training-curves figure."""
    return as_json(
        [
            {
                "dataset": run.dataset,
                "size": run.size,
                "N": run.n_params,
                "M": run.multiplier,
                "curve": curve_file,
            }
            for run, curve_file in zip(trained_runs(config), curve_files(), strict=True)
        ]
    )


def curve_files():
    """Every trained run's training curve (the report's curves figure reads them)."""
    return [layout.curve(run.key) for run in trained_runs(config)]


def train_spec(run):
    """Everything that determines a run's result; a change to it re-runs that run only."""
    return run_spec(config, run)


def train_engine(run):
    """How a run (or trunk) is computed (speed and memory), apart from train_spec, which holds
    what determines its result; a killed run resumes under other values of these."""
    return engine_settings(config, run)


def train_cooldown(run):
    """Under train.schedule wsd, how the run leaves its trunk (branch step, decay)."""
    return cooldown(config, run)


def training_identity(run):
    """What a run's result depends on, as JSON: its spec (and under wsd its cooldown). The
    evaluations record it, so that a change re-runs them even when the new training failed."""
    spec = train_spec(run)
    if run.branch_step is None:
        return as_json(spec)
    return as_json({"spec": spec.to_json(), "cooldown": train_cooldown(run).to_json()})


def trunk_of(wildcards):
    """The Trunk (train.schedule wsd) a job's {dataset}/{size} wildcards name."""
    return find_trunk(config, wildcards.dataset, wildcards.size)


def train_trunk_spec(trunk):
    """What determines a trunk's states: its size's settings, not how far it trains."""
    return trunk_spec(config, trunk)


def trunk_branch_steps(wildcards):
    """The branch points of every run of a job's trunk, as JSON."""
    return as_json(list(trunk_of(wildcards).branch_steps))


def cooldown_resources(config, run, attempt=1):
    """A wsd run's job: its cooldown, plus the trunk it grows first if its trunk keeps no
    state at its branch point yet (Snakemake asks again once the trunk job has run)."""
    kept = trunk_state_steps(layout.trunk_states(run.trunk_key))
    return train_resources(config, run, attempt, kept)


def checkpoint_identity(run, step):
    """The columns that say which run and checkpoint an evaluation belongs to."""
    return {
        "dataset": run.dataset,
        "size": run.size,
        "N": run.n_params,
        "M": run.multiplier,
        "D": run.tokens,
        "step": step,
        "tokens": min(step * run.tokens_per_step, run.tokens),
        "final": step == run.steps,
    }


def tokenizer_inputs(wildcards):
    """The corpus a trained tokenizer learns from; none for a named pretrained one."""
    train_on = config["tokenizer"]["train_on"]
    return [layout.corpus_split(train_on, "train")] if train_on else []


def tokenizer_command(wildcards, input):
    """workflow.tokenization's subcommand: train on the corpus, or load the named tokenizer."""
    if config["tokenizer"]["train_on"]:
        return f"train --corpus {input[0]}"
    return f"pretrained --name {config['tokenizer']['pretrained']}"


def ingest_settings_json():
    """What the ingest of a results table needs from config, as one JSON argument."""
    return ingest_settings(config).to_json()


def fit_settings_json():
    """Everything the fit stage needs from config, as one JSON argument."""
    return fit_settings(config).to_json()
