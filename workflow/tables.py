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
    ]
)
# Columns a runs.parquet written before them may lack: read as null.
RUNS_OPTIONAL = ("chance",)
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
    ]
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


def read_runs_table(path: str | Path) -> pd.DataFrame:
    """Read runs.parquet, checking it has the schema's columns (null where an optional one is
    missing)."""
    table = pq.read_table(path)
    missing = set(RUNS_SCHEMA.names) - set(table.column_names) - set(RUNS_OPTIONAL)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; expected {RUNS_SCHEMA.names}")
    frame = table.to_pandas()
    for column in RUNS_OPTIONAL:
        if column not in frame:
            frame[column] = np.nan
    return frame
