"""Ingest stage: the paper's released testbed (its ``exp_data`` directory) as runs.parquet.

The fit stage cannot tell these 104 models from our own: each becomes the final checkpoint of
one run, with one 'loss' row per validation set, one 'accuracy' row per downstream task and
two 'error' rows, the paper's plain means of 1 - accuracy over all 46 tasks (``avg46``) and over
its 17-task split (``avg17``). A task's ``chance`` is its random baseline in eval_metadata.csv
(percent, as a fraction); an average's is the mean of its tasks' errors at chance, 1 - chance.

The 17 tasks are derived from the data with the paper's rule -- a task is kept when some
0.154B model (any multiplier, any dataset) is at least 10 points above the task's random
baseline in eval_metadata.csv -- rather than copied, so the rule is checked, not trusted. The
task lists are written as JSON to ``--groups``.

``python -m workflow.released --exp-data DIR --out RUNS_PARQUET --groups JSON``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

from workflow.atomic import write_json
from workflow.tables import write_runs_table

DATASET_NAMES = {"c4_original": "c4", "rpj": "redpajama", "rw_original": "refinedweb"}
SIZE_NAMES = {
    "d=96_l=8_h=4": "0.011B",
    "d=512_l=8_h=4": "0.079B",
    "d=576_l=24_h=8": "0.154B",
    "d=1024_l=24_h=8": "0.411B",
    "open_lm_1b": "1.4B",
    "open_lm_7b": "6.9B",
}
SUBSET_SIZE = "0.154B"
SUBSET_MARGIN = 10.0  # accuracy points above the random baseline
# The released parser names a validation set by its folder, except German C4, whose folder
# (de-en) is shared; that one is named by its file stem (val_de-en_100).
NAMED_BY_STEM = {"de-en"}


class ReleasedDataError(ValueError):
    """The directory is not laid out like the released exp_data; the message names the file."""


def eval_name(val_data: str) -> str:
    """Validation-set name from its path, as the paper's code derives it."""
    path = PurePosixPath(val_data)
    return path.name.split(".")[0] if path.parent.name in NAMED_BY_STEM else path.parent.name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReleasedDataError(f"cannot read {path}: {error}") from None


def read_model(model_file: Path, evals_dir: Path) -> tuple[dict, list[dict], dict[str, float]]:
    """One released model: its run identity, its loss evaluations and its task accuracies."""
    try:
        return _read_model(model_file, evals_dir)
    except KeyError as missing:
        raise ReleasedDataError(
            f"{model_file} (or its evaluations) lacks the key {missing}"
        ) from None


def _read_model(model_file: Path, evals_dir: Path) -> tuple[dict, list[dict], dict[str, float]]:
    model = _read_json(model_file)
    hyper = model["hyperparameters"]
    architecture = PurePosixPath(hyper["model"]).stem
    if model["dataset_name"] not in DATASET_NAMES or architecture not in SIZE_NAMES:
        raise ReleasedDataError(
            f"{model_file}: unknown dataset {model['dataset_name']!r} or model {architecture!r}; "
            f"known: {sorted(DATASET_NAMES)}, {sorted(SIZE_NAMES)}"
        )
    n_params, tokens = int(hyper["params"]), int(hyper["tokens"])
    run = {
        "dataset": DATASET_NAMES[model["dataset_name"]],
        "size": SIZE_NAMES[architecture],
        "N": n_params,
        "M": tokens / n_params,
        "D": tokens,
        "step": None,
        "tokens": tokens,
        "final": True,
    }
    losses = [
        {
            "metric": "loss",
            "eval": eval_name(result["val_data"][0]),
            "value": result["loss"],
            "ci_low": result["loss_sequences_lower_95"],
            "ci_high": result["loss_sequences_upper_95"],
            "n_examples": result["sequences"],
        }
        for result in model["results"]
    ]
    evals_file = evals_dir / f"evaluation_{model_file.stem}_heavy.json"
    if not evals_file.exists():
        raise ReleasedDataError(f"{model_file.name} has no downstream evaluations: {evals_file}")
    accuracies = _read_json(evals_file)["eval_metrics"]["icl"]
    return run, losses, accuracies


def derive_subset(accuracies: pd.DataFrame, baselines: pd.Series) -> list[str]:
    """The paper's 17-task split: tasks where some 0.154B model beats chance by 10 points.

    ``accuracies`` has one row per model (columns: size and one per task, in [0, 1]);
    ``baselines`` is the random baseline per task in percent.
    """
    best = accuracies[accuracies["size"] == SUBSET_SIZE].drop(columns="size").max()
    margin = 100.0 * best - baselines.reindex(best.index)
    return sorted(margin.index[margin >= SUBSET_MARGIN])


def ingest(exp_data: str | Path, out: str | Path, groups_out: str | Path) -> pd.DataFrame:
    """Write runs.parquet and the task groups (JSON) of a released exp_data directory."""
    exp_data = Path(exp_data)
    model_files = sorted((exp_data / "models").glob("*.json"))
    if not model_files:
        raise ReleasedDataError(f"no model JSONs in {exp_data / 'models'}")
    try:
        metadata = pd.read_csv(exp_data / "eval_metadata.csv")
    except OSError as error:
        raise ReleasedDataError(f"cannot read {exp_data / 'eval_metadata.csv'}: {error}") from None
    metadata = metadata.set_index("Eval Task")
    models = [read_model(path, exp_data / "evals") for path in model_files]
    tasks = sorted(models[0][2])
    missing = sorted(set(tasks) - set(metadata.index))
    if missing:
        raise ReleasedDataError(f"tasks without a random baseline in eval_metadata.csv: {missing}")
    accuracies = pd.DataFrame([{"size": run["size"], **scores} for run, _, scores in models])
    groups = {
        "avg46": tasks,
        "avg17": derive_subset(accuracies, metadata["Random baseline"]),
    }
    chance = metadata["Random baseline"] / 100.0
    chance_error = {
        group: float(sum(1.0 - chance[task] for task in members) / len(members))
        for group, members in groups.items()
    }
    records = []
    for run, losses, scores in models:
        if sorted(scores) != tasks:
            raise ReleasedDataError(f"{run['dataset']} {run['size']}: tasks differ from {tasks}")
        records += [{**run, **loss, "chance": None} for loss in losses]
        records += [
            {
                **run,
                "metric": "accuracy",
                "eval": task,
                "value": scores[task],
                "ci_low": None,
                "ci_high": None,
                "n_examples": int(metadata.loc[task, "#datapoints"]),
                "chance": float(chance[task]),
            }
            for task in tasks
        ]
        records += [
            {
                **run,
                "metric": "error",
                "eval": group,
                "value": sum(1.0 - scores[task] for task in members) / len(members),
                "ci_low": None,
                "ci_high": None,
                "n_examples": None,
                "chance": chance_error[group],
            }
            for group, members in groups.items()
        ]
    frame = write_runs_table(records, out)
    write_json(
        groups_out,
        {
            "rule": (
                f"avg17: tasks on which some {SUBSET_SIZE} model is at least {SUBSET_MARGIN:g} "
                "points above the random baseline of eval_metadata.csv; avg46: every task"
            ),
            "groups": groups,
        },
    )
    return frame


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp-data", required=True, help="released exp_data directory")
    parser.add_argument("--out", required=True, help="runs.parquet to write")
    parser.add_argument("--groups", required=True, help="task groups JSON to write")
    args = parser.parse_args(argv)
    try:
        frame = ingest(args.exp_data, args.out, args.groups)
    except ReleasedDataError as error:
        raise SystemExit(f"released: {error}") from None
    runs = frame[["dataset", "size", "M"]].drop_duplicates()
    print(f"wrote {len(frame)} rows of {len(runs)} runs to {args.out}")
    print(f"task groups to {args.groups}")


if __name__ == "__main__":
    main()
