"""Report figure: every run's training curve, so a reader can see each run trained well.

A law fitted on a run that diverged, or whose schedule ended early, extrapolates nonsense;
the curves are where that shows. One panel per (dataset, size), training loss against tokens
seen on log axes, one line per token multiplier in the colours of the scaling figure
(workflow/plots.py). The lines are the train stage's own curve tables (curve.parquet), a
rolling median over a few logged steps to take out batch-to-batch noise.

``python -m workflow.curves --runs JSON --out PNG`` where JSON lists
``{"dataset", "size", "N", "M", "curve"}`` per run (the rule builds it from the config).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.ticker import ScalarFormatter

from workflow.plots import COLOURS, save_figure

# Logged points the rolling median spans: enough to smooth, few enough to keep the warm-up.
SMOOTHING_WINDOW = 5


def read_curves(runs: Sequence[dict]) -> pd.DataFrame:
    """One long table: each run's identity columns beside its curve's rows."""
    tables = [
        pd.read_parquet(run["curve"], columns=["tokens", "loss"]).assign(
            dataset=run["dataset"], size=run["size"], N=int(run["N"]), M=float(run["M"])
        )
        for run in runs
    ]
    return pd.concat(tables, ignore_index=True)


def plot_curves(curves: pd.DataFrame, out: str) -> None:
    """Write the grid of training-curve panels to ``out`` (PNG), atomically."""
    datasets = sorted(curves["dataset"].unique())
    sizes = curves.drop_duplicates("size").sort_values("N")["size"].tolist()
    multipliers = sorted(curves["M"].unique())
    norm = LogNorm(vmin=min(multipliers), vmax=max(multipliers) * (1 + 1e-9))
    figure, axes = plt.subplots(
        len(datasets),
        len(sizes),
        figsize=(max(8.0, 3.2 * len(sizes)), 2.9 * len(datasets) + 0.8),
        squeeze=False,
        sharex=True,
        sharey="row",
        layout="constrained",
    )
    for row, dataset in enumerate(datasets):
        for column, size in enumerate(sizes):
            axis = axes[row, column]
            runs = curves[(curves["dataset"] == dataset) & (curves["size"] == size)]
            # The longest (most over-trained) first, so the shorter runs stay visible on top.
            for multiplier, run in reversed(list(runs.groupby("M"))):
                smooth = run["loss"].rolling(SMOOTHING_WINDOW, min_periods=1, center=True)
                axis.plot(
                    run["tokens"],
                    smooth.median(),
                    color=COLOURS(norm(multiplier)),
                    linewidth=1.2,
                    label=f"M = {multiplier:g}",
                )
            axis.set_xscale("log")
            axis.set_yscale("log")
            for ticks in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
                ticks(ScalarFormatter())
            axis.grid(True, which="both", alpha=0.25)
            n_params = runs["N"].iloc[0] if len(runs) else None
            title = f"{dataset}, {size}" + (f" (N = {n_params:,})" if n_params else "")
            axis.set_title(title, fontsize=9)
            if len(runs):
                axis.legend(fontsize=7, frameon=False)
            if row == len(datasets) - 1:
                axis.set_xlabel("tokens seen")
            if column == 0:
                axis.set_ylabel("training loss")
    figure.suptitle(
        "Training curves: loss against tokens, one line per multiplier M (rolling median of "
        f"{SMOOTHING_WINDOW} logged steps)",
        fontsize=10,
    )
    save_figure(figure, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="JSON list of runs with their curve path")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    plot_curves(read_curves(json.loads(args.runs)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
