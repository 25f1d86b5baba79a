"""Shared pieces of the rules: config validation and the functions that map config to paths.

Rules never build paths inline; they call the functions here, which read the run list that
``workflow.runs`` derives from the validated config.
"""

import json
import os

from workflow.config import validate_config
from workflow.fit import error_loss_eval, settings_payload
from workflow.resources import (
    downstream_resources,
    evaluate_resources,
    job_gpus,
    launch_command,
    rule_resources,
    train_resources,
)
from workflow.runs import (
    find_run,
    model_shape,
    results_path,
    trained_runs,
)

validate_config(config)


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.\-]+",
    size=r"[A-Za-z0-9_.\-]+",
    multiplier=r"[0-9]+(\.[0-9]+)?",
    split="train|val",
    step=r"[0-9]{6}[0-9]*",  # zero-padded to six digits; paper-scale runs take millions of steps


RUN_DIR = "{dataset}/{size}/M{multiplier}"


def out(*parts):
    """A path under the configured results directory."""
    return results_path(config, *parts)


def as_json(payload):
    """Params travel to the stage as one JSON argument (quoted with :q in the shell line)."""
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
        out("eval", run.key, f"step{step:06d}", f"loss-{valset}.json")
        for run in trained_runs(config)
        for step in run.checkpoint_steps
        for valset in validation_sets()
    ]


def suite_name():
    """The downstream suite (config downstream.suite); 'none' runs no downstream evaluation."""
    return config["downstream"]["suite"]


def suite_dir():
    """The suite's task files and manifest (rule build_suite)."""
    return out("suites", suite_name())


def hf_home():
    """lm-eval's dataset cache, inside the results (the paper suite's downloads land here)."""
    return out("hf_home")


def suite_sources():
    """Dataset -> held-out documents the offline suite's tasks are built from."""
    if suite_name() != "offline":
        return {}
    return {
        task["source"]: out("corpus", task["source"], "val.jsonl")
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
        out("eval", run.key, f"step{step:06d}", f"downstream-{suite_name()}.json")
        for run in trained_runs(config)
        for step in (run.checkpoint_steps if every else [run.steps])
    ]


def final_targets():
    """What `snakemake` with no target builds: the predictions and what a reader looks at."""
    figures = [out("plots", "scaling.png"), out("plots", "targets.html")]
    if not config["released_dir"]:
        figures.append(out("plots", "curves.png"))
    return [out("predictions.parquet"), out("fits.parquet"), *figures]


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
    return [out("runs", run.key, "curve.parquet") for run in trained_runs(config)]


def train_spec(run):
    """Everything that determines a run's result; a change to it re-runs that run only."""
    size = config["sizes"][run.size]
    train = config["train"]
    return {
        "run": run.key,
        "shape": model_shape(config, run.size),
        "n_params": run.n_params,
        "tokens": run.tokens,
        "checkpoint_steps": list(run.checkpoint_steps),
        **{
            key: size[key]
            for key in (
                "batch_size",
                "micro_batch_size",
                "lr",
                "warmup",
                "weight_decay",
                "min_lr",
            )
        },
        **{
            key: train[key]
            for key in (
                "z_loss",
                "beta1",
                "beta2",
                "grad_clip",
                "seed",
                "device",
                "log_every",
            )
        },
    }


def train_engine(run):
    """How a run is computed (speed and memory), apart from train_spec, which holds what
    determines its result; a killed run resumes under other values of these."""
    size = config["sizes"][run.size]
    return {
        "activation_checkpointing": size["activation_checkpointing"],
        "parallelism": size["parallelism"],
        "compile": config["train"]["compile"],
        "peak_tflops": config["train"]["peak_tflops"],
        "resume_every": config["train"]["resume_every"],
    }


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
    return [out("corpus", train_on, "train.jsonl")] if train_on else []


def tokenizer_command(wildcards, input):
    """workflow.tokenizer's subcommand: train on the corpus, or load the named tokenizer."""
    if config["tokenizer"]["train_on"]:
        return f"train --corpus {input[0]}"
    return f"pretrained --name {config['tokenizer']['pretrained']}"


def fit_settings():
    """Everything the fit stage needs from config, as one JSON argument."""
    return as_json(settings_payload(config))
