"""Report figure: every measured target's prediction against its actual value, with its 95%
interval, and the intervals' coverage per dataset and form.

A reader checks an interval by whether it holds what was measured: on this figure a target
whose bar crosses the diagonal was inside its interval. One panel per quantity (the loss the
laws are plotted on, every other loss, every error average and task accuracy), points coloured
by dataset, one marker per form; each panel's legend gives the coverage per dataset and form.

``python -m workflow.calibration_view --predictions PRED --loss-eval NAME --out PNG``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from workflow.forms import LOSS
from workflow.plots import save_figure
from workflow.tables import TableError, read_predictions_table
from workflow.targets import measured_targets

MARKERS = "osD^vP*X"


def panels(predictions: pd.DataFrame, loss_eval: str) -> dict[str, pd.DataFrame]:
    """The measured and predicted targets, split into the figure's panels (empty ones left
    out; a form that could not be fitted predicts nothing to draw)."""
    measured = measured_targets(predictions)
    loss = measured["quantity"] == LOSS
    chosen = {
        f"loss on {loss_eval}": measured[loss & (measured["eval"] == loss_eval)],
        "every other loss": measured[loss & (measured["eval"] != loss_eval)],
        **{
            f"{quantity}": rows for quantity, rows in measured[~loss].groupby("quantity", sort=True)
        },
    }
    return {title: rows for title, rows in chosen.items() if not rows.empty}


def draw(predictions: pd.DataFrame, loss_eval: str, out: str) -> None:
    shown = panels(predictions, loss_eval)
    figure, axes = plt.subplots(
        1, max(len(shown), 1), figsize=(5.2 * max(len(shown), 1), 5.0), squeeze=False
    )
    datasets = sorted(predictions["dataset"].unique())
    forms = list(dict.fromkeys(predictions["form"]))
    colours = dict(zip(datasets, plt.cm.tab10.colors, strict=False))
    for axis, (title, rows) in zip(axes[0], shown.items(), strict=False):
        for (dataset, form), group in rows.groupby(["dataset", "form"], sort=False):
            inside = int(group["inside"].astype(bool).sum())
            axis.errorbar(
                group["actual"],
                group["predicted"],
                yerr=[
                    (group["predicted"] - group["ci_low"]).clip(lower=0),
                    (group["ci_high"] - group["predicted"]).clip(lower=0),
                ],
                fmt=MARKERS[forms.index(form) % len(MARKERS)],
                color=colours[dataset],
                markersize=4,
                elinewidth=0.8,
                alpha=0.75,
                label=f"{dataset} {form}: {inside}/{len(group)} inside",
            )
        # The axes span the values, not the intervals: a wild interval runs off the panel
        # rather than squashing every point into a corner.
        values = rows[["actual", "predicted"]].to_numpy(float)
        low, high = np.nanmin(values), np.nanmax(values)
        margin = 0.1 * (high - low) or 0.1 * abs(high) or 0.1
        axis.plot([low, high], [low, high], color="black", linewidth=0.8)
        limits = (max(low - margin, low / 2) if low > 0 else low - margin, high + margin)
        axis.set_xlim(*limits)
        axis.set_ylim(*limits)
        axis.set_title(title)
        axis.set_xlabel("actual")
        axis.set_ylabel("predicted (95% interval)")
        axis.legend(fontsize=7, loc="upper left")
    figure.suptitle("Predicted against actual for every measured target")
    figure.tight_layout()
    save_figure(figure, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="predictions.parquet")
    parser.add_argument("--loss-eval", required=True, help="the loss the laws are plotted on")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        predictions = read_predictions_table(args.predictions)
    except TableError as error:
        sys.exit(f"calibration_view: {error}")
    draw(predictions, args.loss_eval, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
