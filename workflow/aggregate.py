"""Aggregate stage: every per-checkpoint evaluation into one typed Parquet table.

Loss evaluations are one row each; a downstream summary gives one accuracy row per task and
the suite's average-error row, named after the suite (see ``workflow.downstream``). A task's
``chance`` is its summary's (a uniform guess's accuracy); the average's is the mean of its
tasks' errors at chance, 1 - chance, or null where a task's is unknown. Every row of a run
carries its training summary's ``diverged`` (``workflow.telemetry``), so a fit can name a
diverged fit point.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from workflow.runs import run_key
from workflow.tables import RUNS_OPTIONAL, RUNS_SCHEMA, write_runs_table


class AggregateError(ValueError):
    """An input file that is not an evaluation record; the message names the file."""


def _checked(record: dict, path: str | Path) -> dict:
    missing = set(RUNS_SCHEMA.names) - set(record) - set(RUNS_OPTIONAL)
    if missing:
        raise AggregateError(f"{path} lacks keys {sorted(missing)} of the runs table")
    return {name: record.get(name) for name in RUNS_SCHEMA.names}


def summary_rows(summary: dict) -> list[dict]:
    """The rows of a downstream summary: one accuracy per task, the suite's average error."""
    rows = [
        {
            **summary["run"],
            "metric": "accuracy",
            "eval": name,
            "value": task["accuracy"],
            "ci_low": task["interval"][0],
            "ci_high": task["interval"][1],
            "n_examples": task["n_examples"],
            "chance": task.get("chance"),
        }
        for name, task in summary["tasks"].items()
    ]
    chances = [task.get("chance") for task in summary["tasks"].values()]
    low, high = summary["average_error_interval"]
    rows.append(
        {
            **summary["run"],
            "metric": "error",
            "eval": summary["suite"],
            "value": summary["average_error"],
            "ci_low": low,
            "ci_high": high,
            "n_examples": sum(task["n_examples"] for task in summary["tasks"].values()),
            "chance": (
                sum(1.0 - chance for chance in chances) / len(chances)
                if None not in chances
                else None
            ),
        }
    )
    return rows


def divergence_by_run(training_files: Sequence[str | Path]) -> dict[str, bool]:
    """Each training summary's run -> whether it diverged."""
    found = {}
    for path in training_files:
        summary = json.loads(Path(path).read_text())
        if "run" not in summary or "diverged" not in summary:
            raise AggregateError(f"{path} is not a training summary (no 'run' or 'diverged')")
        found[summary["run"]] = bool(summary["diverged"])
    return found


def aggregate(
    evaluation_files: Sequence[str | Path],
    out: str | Path,
    downstream_files: Sequence[str | Path] = (),
    training_files: Sequence[str | Path] = (),
) -> pd.DataFrame:
    """Read the loss JSONs (each one row of RUNS_SCHEMA) and the downstream summaries, mark
    each row with its run's ``diverged`` from the training summaries (null for a run with
    none), and write runs.parquet."""
    records = [_checked(json.loads(Path(path).read_text()), path) for path in evaluation_files]
    for path in downstream_files:
        records += [_checked(row, path) for row in summary_rows(json.loads(Path(path).read_text()))]
    diverged = divergence_by_run(training_files)
    for record in records:
        record["diverged"] = diverged.get(run_key(record["dataset"], record["size"], record["M"]))
    return write_runs_table(records, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="runs.parquet to write")
    parser.add_argument("--downstream", nargs="*", default=[], help="downstream summary JSON files")
    parser.add_argument(
        "--training", nargs="*", default=[], help="the runs' training summaries (train.json)"
    )
    parser.add_argument("evaluations", nargs="+", help="loss evaluation JSON files")
    args = parser.parse_args(argv)
    try:
        frame = aggregate(args.evaluations, args.out, args.downstream, args.training)
    except AggregateError as error:
        sys.exit(f"aggregate: {error}")
    files = len(args.evaluations) + len(args.downstream) + len(args.training)
    print(f"wrote {len(frame)} rows from {files} files to {args.out}")


if __name__ == "__main__":
    main()
