"""Ingest stage: anyone's ladder results (a CSV or Parquet table) as runs.parquet.

Users have ladders already: a W&B export, a paper's table, a colleague's runs. Two layouts
are read, and both end as the long layout the fit stage reads (``workflow.tables``):

- long: one row per (run, checkpoint, evaluation), the columns of runs.parquet. ``dataset``,
  ``N``, ``D``, ``metric`` (loss, accuracy or error), ``eval`` and ``value`` are required;
  ``size`` (default: a name derived from N), ``M`` (D / N), ``tokens`` (D), ``step``,
  ``final`` (the row of a run with the most tokens), ``ci_low``, ``ci_high``,
  ``n_examples``, ``chance`` (a task's accuracy at chance, an average's error at chance)
  and ``diverged`` (whether the run's training diverged) are optional.
- wide: one row per run or checkpoint and one column per evaluation, read through the
  config's ``columns`` mapping (which column holds N, D or tokens, which hold losses,
  accuracies or error averages). Accuracies also give their average error under
  ``columns.error_average``, as the paper's task averages do.

A table that cannot be fitted fails here, before any fit, with the file, the row and the
column: a missing column, a non-numeric or non-positive N or D, a missing value, two rows for
one (run, checkpoint, evaluation), or a fit point that the table does not hold.

``python -m workflow.ingest --table PATH --settings JSON --out RUNS_PARQUET``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from workflow.settings import IngestSettings
from workflow.tables import runs_at, write_runs_table

METRICS = ("loss", "accuracy", "error")
LONG_REQUIRED = ("dataset", "N", "D", "metric", "eval", "value")
LONG_OPTIONAL = (
    "size", "M", "tokens", "step", "final", "ci_low", "ci_high", "n_examples", "chance",
    "diverged",
)  # fmt: skip
# Rows are numbered as a reader of the file counts them: the first data row is row 1.
FIRST_ROW = 1


class ResultsTableError(ValueError):
    """A results table that cannot be fitted; the message names the file, row and column."""


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame (by its suffix)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        if path.suffix.lower() in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except (OSError, ValueError) as error:
        raise ResultsTableError(f"{path}: cannot be read: {error}") from None
    raise ResultsTableError(
        f"{path}: unknown format {path.suffix!r}; allowed: .csv, .tsv, .parquet"
    )


def size_name(n_params: int) -> str:
    """A size's name from its parameter count: 190M, 1.3B, 6.9B."""
    if n_params >= 1e9:
        return f"{n_params / 1e9:.3g}B"
    return f"{n_params / 1e6:.3g}M"


def _fail(source: str, row: int, column: str, problem: str) -> ResultsTableError:
    return ResultsTableError(f"{source}: row {row + FIRST_ROW}, column {column!r}: {problem}")


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], source: str, why: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ResultsTableError(
            f"{source}: missing column(s) {missing} ({why}); the table has {list(frame.columns)}"
        )


def _numbers(frame: pd.DataFrame, column: str, source: str, positive: bool) -> np.ndarray:
    """A column as floats; a non-numeric, missing or (when ``positive``) non-positive cell
    fails naming its row."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(float)
    for row in np.flatnonzero(~np.isfinite(values)):
        cell = frame[column].iloc[row]
        problem = "missing value" if pd.isna(cell) else f"{cell!r} is not a finite number"
        raise _fail(source, frame.index[row], column, problem)
    if positive:
        for row in np.flatnonzero(values <= 0):
            raise _fail(source, frame.index[row], column, f"{values[row]:g} must be positive")
    return values


def wide_to_long(
    frame: pd.DataFrame, columns: dict, default_dataset: str, source: str
) -> pd.DataFrame:
    """One row per (run, evaluation) from a table with one column per evaluation."""
    evaluations = {
        metric: dict(columns.get(key) or {})
        for metric, key in (("loss", "losses"), ("accuracy", "accuracies"), ("error", "errors"))
    }
    identity = {
        name: columns[name]
        for name in ("dataset", "size", "N", "D", "tokens", "step")
        if columns.get(name)
    }
    measured = [column for group in evaluations.values() for column in group.values()]
    _require_columns(frame, [*identity.values(), *measured], source, "named in `columns`")
    for column in measured:
        _numbers(frame, column, source, positive=False)
    base = pd.DataFrame(index=frame.index)
    for name, column in identity.items():
        base[name] = frame[column]
    if "dataset" not in base:
        base["dataset"] = default_dataset
    if "D" not in base:
        base["D"] = base["tokens"]
    long = []
    for metric, evals in evaluations.items():
        for eval_name, column in evals.items():
            long.append(base.assign(metric=metric, eval=eval_name, value=frame[column]))
    accuracies = evaluations["accuracy"]
    if accuracies and columns.get("error_average"):
        accuracy = pd.DataFrame(
            {column: _numbers(frame, column, source, False) for column in accuracies.values()},
            index=frame.index,
        )
        average = (1.0 - accuracy).mean(axis=1)
        long.append(base.assign(metric="error", eval=columns["error_average"], value=average))
    return pd.concat(long)


def normalise(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The long layout checked and completed with runs.parquet's optional columns."""
    _require_columns(frame, LONG_REQUIRED, source, "required in the long layout")
    unknown = sorted(set(frame.columns) - set(LONG_REQUIRED) - set(LONG_OPTIONAL))
    if unknown:
        raise ResultsTableError(
            f"{source}: unknown column(s) {unknown}; allowed: "
            f"{list(LONG_REQUIRED) + list(LONG_OPTIONAL)} (a table with one column per "
            "evaluation is the wide layout: name its columns under `columns` in the config)"
        )
    table = pd.DataFrame(index=frame.index)
    for column in ("dataset", "eval", "metric"):
        for row in np.flatnonzero(frame[column].isna().to_numpy()):
            raise _fail(source, frame.index[row], column, "missing value")
        table[column] = frame[column].astype(str)
    for row in np.flatnonzero(~table["metric"].isin(METRICS).to_numpy()):
        raise _fail(
            source, frame.index[row], "metric", f"{table['metric'].iloc[row]!r}; allowed: {METRICS}"
        )
    n_params = _numbers(frame, "N", source, positive=True)
    tokens_trained = _numbers(frame, "D", source, positive=True)
    table["N"] = np.round(n_params).astype(np.int64)
    table["D"] = np.round(tokens_trained).astype(np.int64)
    table["value"] = _numbers(frame, "value", source, positive=False)
    if "size" in frame:
        table["size"] = frame["size"].astype(str)
    else:
        table["size"] = [size_name(n) for n in table["N"]]
    table["M"] = _numbers(frame, "M", source, True) if "M" in frame else tokens_trained / n_params
    table["tokens"] = (
        np.round(_numbers(frame, "tokens", source, True)).astype(np.int64)
        if "tokens" in frame
        else table["D"]
    )
    table["step"] = pd.array(frame["step"] if "step" in frame else [None] * len(frame), "Int64")
    for column in ("ci_low", "ci_high", "chance"):
        table[column] = pd.to_numeric(frame[column]) if column in frame else np.nan
    table["n_examples"] = pd.array(
        frame["n_examples"] if "n_examples" in frame else [None] * len(frame), "Int64"
    )
    table["diverged"] = pd.array(
        frame["diverged"] if "diverged" in frame else [None] * len(frame), "boolean"
    )
    _check_runs(table, source)
    if "final" in frame:
        table["final"] = frame["final"].astype(bool)
    else:
        most = table.groupby(["dataset", "size", "D"])["tokens"].transform("max")
        table["final"] = table["tokens"] == most
    return table


def _check_runs(table: pd.DataFrame, source: str) -> None:
    """One N per size, and one row per (run, checkpoint, evaluation)."""
    sizes = table.groupby(["dataset", "size"])["N"].nunique()
    for (dataset, size), count in sizes[sizes > 1].items():
        rows = table[(table["dataset"] == dataset) & (table["size"] == size)]
        raise _fail(
            source,
            rows.index[0],
            "N",
            f"size {size!r} of {dataset!r} has {count} different N: {sorted(rows['N'].unique())}",
        )
    key = ["dataset", "size", "D", "tokens", "metric", "eval"]
    duplicated = table.duplicated(key, keep=False)
    if duplicated.any():
        rows = table[duplicated]
        first = rows.iloc[0]
        same = rows[(rows[key] == first[key]).all(axis=1)].index + FIRST_ROW
        raise ResultsTableError(
            f"{source}: rows {list(same)} are the same evaluation ({first['metric']} "
            f"{first['eval']!r} of {first['dataset']} {first['size']} D={first['D']} at "
            f"{first['tokens']} tokens); keep one"
        )


def check_fit_points(table: pd.DataFrame, settings: IngestSettings, source: str) -> None:
    """Every configured fit point is a final run of every dataset, and the error law's x is
    one of the table's losses."""
    final = table[table["final"]]
    for dataset, rows in final.groupby("dataset"):
        runs = rows[["size", "M"]].drop_duplicates()
        held = ", ".join(f"{size} M={m:g}" for size, m in zip(runs["size"], runs["M"], strict=True))
        for law, points in (("loss", settings.loss_points), ("error", settings.error_points)):
            for size, multipliers in points.items():
                for multiplier in multipliers:
                    if not runs_at(runs["size"], runs["M"], size, multiplier).any():
                        raise ResultsTableError(
                            f"{source}: fit.{law}.points: {size} M={multiplier:g} is not a run of "
                            f"dataset {dataset!r}; its runs: {held}"
                        )
        losses = sorted(rows.loc[rows["metric"] == "loss", "eval"].unique())
        downstream = rows["metric"].isin(["error", "accuracy"]).any()
        if downstream and settings.loss_eval not in losses:
            raise ResultsTableError(
                f"{source}: fit.error.loss_eval: {settings.loss_eval!r} is not a loss of dataset "
                f"{dataset!r}; its losses: {losses}"
            )


def ingest(table_path: str | Path, settings: IngestSettings, out: str | Path) -> pd.DataFrame:
    """Read, check and write one results table as runs.parquet."""
    source = str(table_path)
    frame = read_table(table_path).reset_index(drop=True)
    if settings.columns:
        frame = wide_to_long(frame, settings.columns, Path(table_path).stem, source)
    table = normalise(frame, source)
    check_fit_points(table, settings, source)
    return write_runs_table(table.to_dict("records"), out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True, help="the results table (CSV or Parquet)")
    parser.add_argument("--settings", required=True, help="IngestSettings as JSON")
    parser.add_argument("--out", required=True, help="runs.parquet to write")
    args = parser.parse_args(argv)
    try:
        frame = ingest(args.table, IngestSettings.from_json(args.settings), args.out)
    except ResultsTableError as error:
        sys.exit(f"ingest: {error}")
    runs = frame[frame["final"]][["dataset", "size", "M"]].drop_duplicates()
    print(f"wrote {len(frame)} rows of {len(runs)} runs from {args.table} to {args.out}")


if __name__ == "__main__":
    main()
