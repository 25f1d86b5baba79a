"""Fit stage: the scaling laws on the final checkpoints, every run predicted, 95% intervals.

Every registered law form (``workflow.forms``) is fitted on each dataset's ladder of runs with
its bootstrap replicates (``workflow.ladder``, ``workflow.bootstrap``), and every run, trained
or only configured, is predicted along each chain of laws (``workflow.predict``). Datasets are
independent, so several are fitted at once.

``python -m workflow.fit --runs RUNS --settings JSON --predictions OUT --fits OUT [--workers N]``
where JSON is ``workflow.settings.FitSettings``'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import pandas as pd

from workflow.errors import FitError
from workflow.predict import dataset_tables
from workflow.settings import FitSettings, SettingsError
from workflow.tables import (
    FITS_SCHEMA,
    PREDICTIONS_SCHEMA,
    TableError,
    read_runs_table,
    write_table,
)


def fit_table(
    runs: pd.DataFrame, settings: FitSettings, workers: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predictions and parameters of every dataset in runs.parquet (final checkpoints only),
    ``workers`` datasets at a time."""
    final = runs[runs["final"].astype(bool)]
    if final.empty:
        raise FitError("runs.parquet has no final checkpoints (final == True) to fit")
    names = sorted(final["dataset"].unique())
    unknown = {target["dataset"] for target in settings.extra_targets} - set(names)
    if unknown:
        raise FitError(
            f"extra_targets name datasets without runs: {sorted(unknown)}; datasets: {names}"
        )
    frames = [final[final["dataset"] == name] for name in names]
    if workers > 1 and len(names) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(names))) as pool:
            results = list(pool.map(dataset_tables, names, frames, [settings] * len(names)))
    else:
        results = [dataset_tables(*job, settings) for job in zip(names, frames, strict=True)]
    predictions = pd.concat([result[0] for result in results], ignore_index=True)
    predictions = predictions.sort_values(
        ["dataset", "form", "quantity", "eval", "N", "M"], kind="stable"
    ).reset_index(drop=True)
    return predictions, pd.concat([result[1] for result in results], ignore_index=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="runs.parquet (aggregated evaluations)")
    parser.add_argument("--settings", required=True, help="FitSettings as JSON")
    parser.add_argument("--predictions", required=True, help="predictions.parquet to write")
    parser.add_argument("--fits", required=True, help="fits.parquet to write")
    parser.add_argument("--workers", type=int, default=1, help="datasets fitted in parallel")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        predictions, fits = fit_table(
            read_runs_table(args.runs), FitSettings.from_json(args.settings), args.workers
        )
    except (FitError, SettingsError, TableError) as error:
        sys.exit(f"fit: {error}")
    write_table(predictions, PREDICTIONS_SCHEMA, args.predictions)
    write_table(fits, FITS_SCHEMA, args.fits)
    seconds = time.perf_counter() - started
    print(f"wrote {len(predictions)} predictions and {len(fits)} parameters in {seconds:.1f} s")


if __name__ == "__main__":
    main()
