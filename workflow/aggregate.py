"""Aggregate stage: every per-checkpoint evaluation JSON into one typed Parquet table."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from workflow.tables import RUNS_SCHEMA, write_runs_table


def aggregate(evaluation_files: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Read the evaluation JSONs (each one row of RUNS_SCHEMA) and write runs.parquet."""
    records = []
    for path in evaluation_files:
        record = json.loads(Path(path).read_text())
        missing = set(RUNS_SCHEMA.names) - set(record)
        if missing:
            raise ValueError(f"{path} lacks keys {sorted(missing)} of the runs table")
        records.append({name: record[name] for name in RUNS_SCHEMA.names})
    return write_runs_table(records, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="runs.parquet to write")
    parser.add_argument("evaluations", nargs="+", help="evaluation JSON files")
    args = parser.parse_args(argv)
    frame = aggregate(args.evaluations, args.out)
    print(f"wrote {len(frame)} rows from {len(args.evaluations)} files to {args.out}")


if __name__ == "__main__":
    main()
