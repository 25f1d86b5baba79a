"""Every Parquet table the pipeline writes: its schema, its one atomic writer, and a reader.

``runs.parquet`` is written by our own aggregate stage and by the ingest of the paper's
released testbed alike, so the fit stage cannot tell them apart; ``predictions.parquet`` and
``fits.parquet`` are the fit stage's. Columns are typed explicitly with pyarrow: pandas would
otherwise infer object columns for all-null intervals or steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workflow.atomic import atomic_path

RUNS_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("size", pa.string(), nullable=False),
        pa.field("N", pa.int64(), nullable=False),
        pa.field("M", pa.float64(), nullable=False),
        pa.field("D", pa.int64(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("final", pa.bool_(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("eval", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("n_examples", pa.int64()),
        pa.field("chance", pa.float64()),
        # Whether the run's training diverged (its train.json); null for results measured
        # elsewhere that do not say.
        pa.field("diverged", pa.bool_()),
    ]
)
# Columns a runs.parquet written before them may lack: read as null.
RUNS_OPTIONAL = ("chance", "diverged")
SORT_KEYS = ["dataset", "N", "M", "tokens", "metric", "eval"]

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("N", pa.int64(), nullable=False),
        pa.field("M", pa.float64(), nullable=False),
        pa.field("D", pa.int64(), nullable=False),
        pa.field("C", pa.float64(), nullable=False),
        pa.field("quantity", pa.string(), nullable=False),
        pa.field("eval", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("predicted", pa.float64()),
        pa.field("actual", pa.float64()),
        pa.field("relative_error", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("inside", pa.bool_()),
        pa.field("clipped", pa.string()),
        pa.field("size", pa.string(), nullable=False),
    ]
)
FITS_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("law", pa.string(), nullable=False),
        pa.field("eval", pa.string(), nullable=False),
        pa.field("param", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("chance", pa.float64()),
        pa.field("predictable", pa.bool_()),
        pa.field("warnings", pa.string()),
    ]
)
# Columns a fits.parquet written before them may lack: read as null.
FITS_OPTIONAL = ("warnings",)

# How each table is rebuilt, for the message that finds it unreadable.
REBUILD_RUNS = (
    "rebuild it: `snakemake --forcerun aggregate` for a trained ladder, "
    "`snakemake --forcerun ingest_released` (the released testbed) or "
    "`snakemake --forcerun ingest_table` (a results table)"
)
REBUILD_FIT = "rebuild it: `snakemake --forcerun fit`"


class TableError(ValueError):
    """A table that cannot be read or lacks its schema's columns; the message names the file,
    what is wrong and the command that rebuilds it."""


# A configured M matches a run's M = D / N to this relative tolerance: D is a whole number of
# tokens, so D / N is the multiplier it was trained at only to about 1 / D.
MULTIPLIER_RTOL = 1e-6


def runs_at(sizes: pd.Series, multipliers: pd.Series, size: str, multiplier: float) -> np.ndarray:
    """Which rows of runs.parquet's ``size`` and ``M`` columns are the run (size, multiplier)."""
    return (sizes == size).to_numpy() & np.isclose(
        multipliers.to_numpy(float), float(multiplier), rtol=MULTIPLIER_RTOL
    )


def write_table(frame: pd.DataFrame, schema: pa.Schema, path: str | Path) -> None:
    """Write ``frame``'s columns of ``schema`` as Parquet, typed by it, atomically."""
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def write_runs_table(records: Iterable[dict], path: str | Path) -> pd.DataFrame:
    """Write records (dicts with RUNS_SCHEMA's keys) as runs.parquet, sorted, atomically."""
    frame = pd.DataFrame.from_records(list(records), columns=RUNS_SCHEMA.names)
    frame = frame.sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)
    write_table(frame, RUNS_SCHEMA, path)
    return frame


def read_checked(
    path: str | Path, schema: pa.Schema, optional: Iterable[str] = (), rebuild: str = REBUILD_FIT
) -> pd.DataFrame:
    """Read a table the pipeline wrote, verified rather than trusted: a file that is not Parquet,
    lacks a column of ``schema`` (null where an ``optional`` one is missing) or holds one of a
    type that does not cast to it raises one TableError saying so and how to rebuild it."""
    optional = tuple(optional)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise TableError(f"{path} is not a readable Parquet table ({error}); {rebuild}") from None
    missing = set(schema.names) - set(table.column_names) - set(optional)
    if missing:
        raise TableError(
            f"{path} lacks columns {sorted(missing)} (expected {schema.names}); {rebuild}"
        )
    for field in schema:
        if field.name not in table.column_names:
            continue
        column = table.column(field.name)
        try:
            column.cast(field.type)
        except (pa.ArrowException, ValueError):
            raise TableError(
                f"{path}: column {field.name!r} holds {column.type}, not {field.type}; {rebuild}"
            ) from None
    frame = table.to_pandas()
    for column in optional:
        if column not in frame:
            frame[column] = np.nan if schema.field(column).type == pa.float64() else None
    return frame


def read_runs_table(path: str | Path) -> pd.DataFrame:
    """runs.parquet, checked (``read_checked``)."""
    return read_checked(path, RUNS_SCHEMA, RUNS_OPTIONAL, REBUILD_RUNS)


def read_predictions_table(path: str | Path) -> pd.DataFrame:
    """predictions.parquet, checked (``read_checked``)."""
    return read_checked(path, PREDICTIONS_SCHEMA)


def read_fits_table(path: str | Path) -> pd.DataFrame:
    """fits.parquet, checked (``read_checked``; ``warnings`` null in one written before it)."""
    return read_checked(path, FITS_SCHEMA, FITS_OPTIONAL)
