"""Report table: every trained target run, its prediction against what it measured.

This is the number the project exists for (how far off an extrapolation was, and whether its
interval said so), so the report shows it as tables rather than leaving it to be read off a
figure. A coverage table counts, over every evaluation, the targets whose actual value lies
inside the 95% interval. Rows are the targets of predictions.parquet that have an actual
value, for the loss of the validation set the laws are plotted on and for every task group's
error, every form (and chain) side by side; the worst relative error per (dataset, quantity,
form) is summarised above the table. The tasks' accuracies, one row per task and chain in
predictions.parquet, are summarised instead, split by the predictability flag of fits.parquet,
with each task's flag per dataset. A target whose form predicted
nothing (its fit `failed`) is left out of every table; the list of fits that are not ok names
that fit. Written as one self-contained HTML file, which Snakemake's report embeds as it is.

``python -m workflow.targets --predictions PRED --fits FITS --loss-eval NAME --out HTML``
"""

from __future__ import annotations

import argparse
import html
import sys
from collections.abc import Sequence

import pandas as pd

from workflow.atomic import atomic_path
from workflow.forms import ACCURACY
from workflow.ladder import OK, SIGNAL_SDS
from workflow.tables import TableError, read_fits_table, read_predictions_table

STYLE = """
body { font-family: sans-serif; font-size: 13px; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eee; }
td:nth-child(-n+4) { text-align: left; }
"""


def measured_targets(predictions: pd.DataFrame) -> pd.DataFrame:
    """The targets with both a measurement and a prediction."""
    return predictions[
        (predictions["role"] == "target")
        & predictions["actual"].notna()
        & predictions["predicted"].notna()
    ]


def target_rows(predictions: pd.DataFrame, loss_eval: str) -> pd.DataFrame:
    """The measured targets of the plotted loss and of every error group, largest last."""
    measured = measured_targets(predictions)
    shown = (measured["quantity"] == "error") | (measured["eval"] == loss_eval)
    rows = measured[shown].sort_values(["dataset", "quantity", "eval", "form", "C", "M"])
    return rows.reset_index(drop=True)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and worst relative error per (dataset, quantity, eval, form)."""
    grouped = rows.groupby(["dataset", "quantity", "eval", "form"])["relative_error"]
    return grouped.agg(targets="size", mean="mean", worst="max").reset_index()


def coverage(predictions: pd.DataFrame) -> pd.DataFrame:
    """How often the 95% interval held the actual value, per (dataset, quantity, form), over
    every measured target of every evaluation; with the median interval width against the
    median absolute error (a calibrated normal error gives 5.8; far more means the interval
    covers by being wide)."""
    measured = measured_targets(predictions)
    measured = measured.assign(
        width=measured["ci_high"] - measured["ci_low"],
        miss=(measured["predicted"] - measured["actual"]).abs(),
        inside=measured["inside"].astype(float),
    )
    grouped = measured.groupby(["dataset", "quantity", "form"])
    table = grouped.agg(
        targets=("inside", "size"), inside=("inside", "sum"), coverage=("inside", "mean")
    )
    table["width / |error|"] = grouped["width"].median() / grouped["miss"].median()
    return table.reset_index()


def task_summary(predictions: pd.DataFrame, fits: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, form, predictable): the tasks, and over their measured targets the median
    |predicted - actual| in accuracy points and the intervals' coverage."""
    measured = measured_targets(predictions)
    measured = measured[measured["quantity"] == ACCURACY]
    measured = measured.merge(task_flags(fits)[["dataset", "eval", "predictable"]])
    measured = measured.assign(
        points=100 * (measured["predicted"] - measured["actual"]).abs(),
        inside=measured["inside"].astype(float),
    )
    grouped = measured.groupby(["dataset", "form", "predictable"])
    return grouped.agg(
        tasks=("eval", "nunique"),
        targets=("points", "size"),
        median_points=("points", "median"),
        coverage=("inside", "mean"),
    ).reset_index()


def task_flags(fits: pd.DataFrame) -> pd.DataFrame:
    """Each task's chance and predictability flag, per dataset ('unknown' where its noise is)."""
    tasks = fits[fits["law"] == ACCURACY].drop_duplicates(["dataset", "eval"])
    flag = tasks["predictable"].map({True: "yes", False: "no"}).fillna("unknown")
    return tasks[["dataset", "eval", "chance"]].assign(predictable=flag.to_numpy())


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def render(
    rows: pd.DataFrame,
    loss_eval: str,
    covered: pd.DataFrame,
    fits: pd.DataFrame | None = None,
    predictions: pd.DataFrame | None = None,
) -> str:
    """The page: the coverage and summary tables, then one row per target; with ``fits`` and
    ``predictions``, the tasks' accuracies by predictability and each task's flag."""
    detail = pd.DataFrame(
        {
            "dataset": rows["dataset"],
            "quantity": rows["quantity"],
            "eval": rows["eval"],
            "form": rows["form"],
            "size": rows["size"],
            "N": rows["N"].map("{:,}".format),
            "M": rows["M"].map("{:g}".format),
            "C (FLOPs)": rows["C"].map("{:.3g}".format),
            "predicted": rows["predicted"].map("{:.4f}".format),
            "95% interval": rows["ci_low"].map("{:.4f}".format)
            + " - "
            + rows["ci_high"].map("{:.4f}".format),
            "actual": rows["actual"].map("{:.4f}".format),
            "relative error": rows["relative_error"].map(_percent),
            "inside": rows["inside"].map({True: "yes", False: "no"}),
        }
    )
    covered = covered.assign(
        inside=covered["inside"].astype(int),
        coverage=covered["coverage"].map(_percent),
        **{"width / |error|": covered["width / |error|"].map("{:.1f}".format)},
    )
    totals = summary(rows)
    for column in ("mean", "worst"):
        totals[column] = totals[column].map(_percent)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Prediction errors of the target runs</title><style>{STYLE}</style></head><body>"
        "<h3>Coverage of the 95% intervals, per dataset, quantity and form</h3>"
        "<p>Every measured target of every evaluation: how many actual values lie inside "
        "their interval, and the median interval width against the median absolute error "
        "(5.8 for a calibrated normal error).</p>"
        + covered.to_html(index=False, border=0)
        + "<h3>Relative error of the extrapolations, per dataset, quantity and form</h3>"
        f"<p>Loss on <code>{html.escape(loss_eval)}</code> and each task group's average "
        "top-1 error (a chain's predicted from its predicted loss, a form of the size's from "
        "N and M); relative error is "
        "|predicted - actual| / actual.</p>"
        + totals.to_html(index=False, border=0)
        + _tasks(fits, predictions)
        + flagged_section(fits)
        + "<h3>Every target run</h3>"
        + detail.to_html(index=False, border=0)
        + "</body></html>\n"
    )


def flagged_section(fits: pd.DataFrame | None) -> str:
    """The section listing the loss and error-average fits whose status is not ok, with why,
    and how many tasks' fits are not (empty where every fit is ok)."""
    if fits is None:
        return ""
    laws = fits.drop_duplicates(["dataset", "form", "law", "eval"])
    laws = laws[laws["status"] != OK]
    tasks = laws[laws["law"] == ACCURACY]
    shown = laws[laws["law"] != ACCURACY]
    if laws.empty:
        return ""
    counts = ", ".join(
        f"{count} {status}" for status, count in tasks["status"].value_counts().items()
    )
    return (
        "<h3>Fits that are not ok</h3>"
        "<p>Written, but flagged: <code>degenerate</code> (constants meaningless apart), "
        "<code>implausible</code> (parameters or residuals that make no sense), "
        "<code>failed</code> (no fit). Their predictions are not results.</p>"
        + (
            shown[["dataset", "form", "law", "eval", "status", "warnings"]].to_html(
                index=False, border=0, na_rep=""
            )
            if not shown.empty
            else ""
        )
        + (f"<p>Tasks' fits: {counts} (see fits.parquet).</p>" if counts else "")
    )


def _tasks(fits: pd.DataFrame | None, predictions: pd.DataFrame | None) -> str:
    """The tasks' section of the page (empty without task fits)."""
    if fits is None or predictions is None or not (fits["law"] == ACCURACY).any():
        return ""
    summary = task_summary(predictions, fits).assign(
        median_points=lambda frame: frame["median_points"].map("{:.2f}".format),
        coverage=lambda frame: frame["coverage"].map(_percent),
    )
    flags = task_flags(fits).pivot(
        index=["eval", "chance"], columns="dataset", values="predictable"
    )
    flags.columns.name = None
    return (
        "<h3>Tasks: accuracy by predictability</h3>"
        "<p>A task is predictable when its accuracy at the fit point with the most compute is "
        f"above chance by more than {SIGNAL_SDS:g} sds of its binomial noise (see the README). "
        "Median |predicted - actual| over the measured targets, in accuracy points, and the "
        "share of them inside their 95% interval.</p>"
        + summary.rename(columns={"median_points": "median |error| (points)"}).to_html(
            index=False, border=0
        )
        + "<h3>Each task's predictability</h3>"
        + flags.reset_index().to_html(index=False, border=0, na_rep="")
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="predictions.parquet")
    parser.add_argument("--fits", required=True, help="fits.parquet (the tasks' flags)")
    parser.add_argument("--loss-eval", required=True, help="validation set of the loss rows")
    parser.add_argument("--out", required=True, help="HTML to write")
    args = parser.parse_args(argv)
    try:
        predictions = read_predictions_table(args.predictions)
        fits = read_fits_table(args.fits)
    except TableError as error:
        sys.exit(f"targets: {error}")
    rows = target_rows(predictions, args.loss_eval)
    with atomic_path(args.out) as temporary:
        temporary.write_text(render(rows, args.loss_eval, coverage(predictions), fits, predictions))
    print(f"wrote {args.out}: {len(rows)} target rows")


if __name__ == "__main__":
    main()
