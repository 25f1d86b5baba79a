"""Plot stage: the fitted laws against the runs, in the style of the paper's Figure 1.

One column per training dataset. The top panel is reducible loss (L - E) against compute on
log axes, where the law is a straight line per token multiplier M: one colour per M, solid
where it interpolates its fit points and dashed where it extrapolates. Filled markers are fit
points, open ones are targets (thin lines: the loss along training, where runs.parquet has
checkpoints). Targets larger than every fit point carry the prediction with its 95% interval
and every chain's relative errors. Below, one panel per task group: error against loss with the
forms of the loss fitted on it (the paper's exponential and the sigmoid; a degenerate fit is
named as such and drawn as the line it is), each large target predicted from its predicted
loss.

``python -m workflow.plots --runs RUNS --predictions PRED --fits FITS --loss-eval NAME --out PNG``
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, ScalarFormatter

from workflow import forms, laws
from workflow.atomic import atomic_path
from workflow.forms import ERROR, EXPONENTIAL, LOSS, PAPER, Form, chain_labels
from workflow.ladder import DEGENERATE, FAILED
from workflow.tables import (
    TableError,
    read_fits_table,
    read_predictions_table,
    read_runs_table,
)

MARKERS = "^sdpP*Xo"
COLOURS = plt.get_cmap("plasma")
LAW_COLOURS = ("grey", "tab:blue", "tab:green")  # each form of the loss, in registry order


class Style:
    """What every panel shares: a colour per multiplier, a marker per size."""

    def __init__(self, predictions: pd.DataFrame):
        self.sizes = predictions.drop_duplicates("size").sort_values("N")["size"].tolist()
        self.marker = {size: MARKERS[i % len(MARKERS)] for i, size in enumerate(self.sizes)}
        self.multipliers = sorted(predictions["M"].unique())
        self.norm = LogNorm(vmin=min(self.multipliers), vmax=max(self.multipliers))

    def colour(self, multiplier):
        return COLOURS(self.norm(multiplier))

    def points(self, axis, rows: pd.DataFrame, x: str, y: pd.Series) -> None:
        """Measured runs: filled with a black edge for fit points, open for targets."""
        for (size, role), group in rows.groupby(["size", "role"]):
            colours = self.colour(group["M"].to_numpy())
            is_fit = role == "fit"
            axis.scatter(
                group[x],
                y[group.index],
                marker=self.marker[size],
                s=55 if is_fit else 42,
                c=colours if is_fit else "white",
                edgecolors="black" if is_fit else colours,
                linewidths=0.6 if is_fit else 1.3,
                zorder=3,
            )


def _fit(fits: pd.DataFrame, dataset: str, form: Form, eval_name: str) -> tuple:
    """``form``'s parameters in the paper's chain, fitted on ``eval_name``, its status and
    the factor its law's values are multiplied by."""
    rows = fits[
        (fits["dataset"] == dataset)
        & (fits["form"] == form.chain_label(PAPER))
        & (fits["law"] == form.predicts)
        & (fits["eval"] == eval_name)
    ]
    values = rows.set_index("param")["value"]
    scale = forms.chance_error(form.predicts, rows["chance"].iloc[0]) if form.of_chance else 1.0
    return np.array([values[name] for name in form.params]), rows["status"].iloc[0], scale


def headline(predictions: pd.DataFrame) -> pd.DataFrame:
    """(N, M) of the targets with more parameters than every fit point of the loss law: the
    extrapolations the paper reports."""
    loss = predictions[predictions["quantity"] == LOSS]
    largest_fit = loss.loc[loss["role"] == "fit", "N"].max()
    targets = loss.loc[(loss["role"] == "target") & (loss["N"] > largest_fit), ["N", "M"]]
    return targets.drop_duplicates()


def _percent(value: float, predicted: float) -> str:
    """A relative error; 'no fit' where the form predicted nothing, 'not trained' where the
    target has no measurement."""
    if np.isfinite(value):
        return f"{value:.2%}"
    return "not trained" if np.isfinite(predicted) else "no fit"


def _annotate(
    axis, quantity: str, rows: pd.DataFrame, targets: pd.DataFrame, x: str, y: str, corner
) -> None:
    """Label each headline target, and list the relative errors of every chain predicting
    ``quantity`` in ``corner`` (axes coordinates of the box's lower edge and its horizontal
    alignment)."""
    labels = chain_labels(quantity)
    lines = [f"relative error ({' / '.join(labels)})"]
    for index, (_, target) in enumerate(targets.iterrows()):
        name = f"{target['size']}, M={target['M']:g}"
        axis.annotate(
            name,
            (target[x], target[y]),
            xytext=(-7, 7 * (index % 3 - 1)),  # staggered: neighbouring targets sit close
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=7.5,
        ).set_in_layout(False)
        same = rows[(rows["N"] == target["N"]) & (rows["M"] == target["M"])]
        error, predicted = (
            same.set_index("form")[column] for column in ("relative_error", "predicted")
        )
        shown = " / ".join(
            _percent(error.get(label, np.nan), predicted.get(label, np.nan)) for label in labels
        )
        lines.append(f"{name}: {shown}")
    x_corner, align = corner
    axis.text(
        x_corner,
        0.03,
        "\n".join(lines),
        transform=axis.transAxes,
        fontsize=8,
        ha=align,
        va="bottom",
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "lightgrey"},
    )


def _prediction(axis, x: float, y: float, low: float, high: float) -> None:
    axis.errorbar(
        x, y, yerr=[[y - low], [high - y]], fmt="o", ms=4, color="black", capsize=3, zorder=4
    )


def _loss_panel(
    axis: plt.Axes,
    runs: pd.DataFrame,
    predictions: pd.DataFrame,
    fits: pd.DataFrame,
    dataset: str,
    loss_eval: str,
    style: Style,
) -> None:
    """Loss vs compute C = 6ND: one fitted curve per M (solid over the fit points, dashed
    beyond), the runs' measured losses and each target's prediction with its interval. Where
    the paper form could not be fitted, the measured losses themselves, without curves."""
    params, status, _ = _fit(fits, dataset, PAPER, loss_eval)
    drawn = bool(np.isfinite(params).all())
    E, a, b, eta = params if drawn else (0.0, *params[1:])
    rows = predictions[(predictions["quantity"] == LOSS) & (predictions["eval"] == loss_eval)]
    paper = rows[rows["form"] == PAPER.chain_label()]
    fit_points = paper[paper["role"] == "fit"]
    right = paper["C"].max() * 3
    for multiplier in style.multipliers if drawn else []:
        lowest = paper.loc[paper["M"] == multiplier, "C"].min() / 2
        if not np.isfinite(lowest):
            continue
        fitted = fit_points.loc[fit_points["M"] == multiplier, "C"].max()
        split = fitted if np.isfinite(fitted) else lowest
        for start, end, line in ((lowest, split, "-"), (split, right, "--")):
            compute = np.geomspace(start, end, 40)
            axis.plot(
                compute,
                laws.loss(compute, multiplier, E, a, b, eta) - E,
                line,
                color=style.colour(multiplier),
                lw=1.1,
                alpha=0.85,
            )
    curves = runs[(runs["metric"] == LOSS) & (runs["eval"] == loss_eval)]
    for (multiplier, _), checkpoints in curves.groupby(["M", "N"]):
        if len(checkpoints) > 1:
            checkpoints = checkpoints.sort_values("tokens")
            compute = laws.compute(checkpoints["N"], checkpoints["tokens"])
            axis.plot(
                compute, checkpoints["value"] - E, color=style.colour(multiplier), lw=0.6, alpha=0.4
            )
    measured = paper[paper["actual"].notna()]
    style.points(axis, measured, "C", measured["actual"] - E)
    targets = paper.merge(headline(predictions)).assign(
        shown=lambda frame: frame["actual"].fillna(frame["predicted"]) - E
    )
    for _, target in targets.iterrows():
        _prediction(
            axis, target["C"], target["predicted"] - E, target["ci_low"] - E, target["ci_high"] - E
        )
    _annotate(axis, LOSS, rows, targets, "C", "shown", (0.03, "left"))
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(plt.NullFormatter())
    axis.set_xlabel("compute C = 6ND (FLOPs)")
    axis.set_ylabel(f"{'reducible loss L - E' if drawn else 'loss L'}, {loss_eval} (nats)")
    axis.set_title(f"{dataset}: loss", fontsize=11)
    _formula_box(
        axis,
        f"L = {E:.3f} + ({a:.0f} M^{eta:.3f} + {b:.0f} M^-{eta:.3f}) C^-{eta:.3f}\n"
        f"compute-optimal M* = {laws.optimal_multiplier(a, b, eta):.1f}"
        if drawn
        else f"the paper form could not be fitted ({status}): no curves, no E",
    )


def _formula_box(axis, text: str) -> None:
    """The fitted law, top right of a panel, over a light grid (both panels show one)."""
    axis.text(
        0.97,
        0.97,
        text,
        transform=axis.transAxes,
        ha="right",
        va="top",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    axis.grid(which="major", alpha=0.3)


def _error_panel(
    axis: plt.Axes,
    predictions: pd.DataFrame,
    fits: pd.DataFrame,
    dataset: str,
    group: str,
    loss_eval: str,
    style: Style,
) -> None:
    """A task group's average error vs the loss of ``loss_eval``: each form of the loss fitted
    on it, the runs' measurements and the targets' errors predicted from their predicted loss
    (by the paper's exponential)."""
    errors = predictions[(predictions["quantity"] == ERROR) & (predictions["eval"] == group)]
    losses = predictions[(predictions["quantity"] == LOSS) & (predictions["eval"] == loss_eval)]
    paper = errors[errors["form"] == EXPONENTIAL.chain_label(PAPER)].merge(
        losses[losses["form"] == PAPER.chain_label()][["N", "M", "actual", "predicted"]],
        on=["N", "M"],
        suffixes=("", "_loss"),
    )
    fitted = paper.loc[paper["role"] == "fit", "actual_loss"]
    span = paper["actual_loss"].max() - paper["actual_loss"].min()
    formulas = []
    for form, colour in zip(_of_loss(), LAW_COLOURS, strict=False):
        params, status, scale = _fit(fits, dataset, form, group)
        if status == FAILED:
            formulas.append(f"{form.name}: could not be fitted")
            continue
        for start, end, line in (
            (paper["actual_loss"].min() - 0.1 * span, fitted.min(), "--"),
            (fitted.min(), fitted.max(), "-"),
            (fitted.max(), paper["actual_loss"].max() + 0.05 * span, "--"),
        ):
            loss = np.linspace(start, end, 60)
            curve = np.clip(scale * form.predict((loss,), params), 0.0, 1.0)
            axis.plot(loss, curve, line, color=colour, lw=1.5)
        formulas.append(
            f"{form.name}: degenerate, {form.degenerate((fitted.to_numpy(),), params)}"
            if status == DEGENERATE
            else f"{form.name}: {form.formula(params, scale)}"
        )
    measured = paper[paper["actual"].notna()]
    style.points(axis, measured, "actual_loss", measured["actual"])
    targets = paper.merge(headline(predictions)).assign(
        shown_loss=lambda frame: frame["actual_loss"].fillna(frame["predicted_loss"]),
        shown=lambda frame: frame["actual"].fillna(frame["predicted"]),
    )
    for _, target in targets.iterrows():
        _prediction(
            axis, target["predicted_loss"], target["predicted"], target["ci_low"], target["ci_high"]
        )
    _annotate(axis, ERROR, errors, targets, "shown_loss", "shown", (0.97, "right"))
    axis.set_xlabel(f"loss, {loss_eval} (nats)")
    axis.set_ylabel(f"top-1 error, mean over {group}")
    axis.set_title(f"{dataset}: error ({group}) from loss", fontsize=11)
    _formula_box(axis, "\n".join(textwrap.fill(text, 64) for text in formulas))


def _of_loss() -> list[Form]:
    """The forms of the error drawn against the loss."""
    return [form for form in forms.predicting(ERROR) if form.source == LOSS]


def _legend(figure, style: Style, columns: int) -> None:
    handles = (
        [
            Line2D([], [], marker=style.marker[size], ls="", color="grey", label=f"N = {size}")
            for size in style.sizes
        ]
        + [
            Line2D(
                [],
                [],
                marker="o",
                ls="",
                markerfacecolor="grey",
                markeredgecolor="black",
                label="fit point",
            ),
            Line2D(
                [],
                [],
                marker="o",
                ls="",
                markerfacecolor="white",
                markeredgecolor="grey",
                label="target, measured",
            ),
            Line2D([], [], marker="o", ls="", color="black", label="prediction, 95% interval"),
            Line2D([], [], ls="-", color="grey", label="fitted law"),
            Line2D([], [], ls="--", color="grey", label="extrapolated"),
        ]
        + [
            Line2D([], [], ls="-", color=colour, label=f"error law: {form.name}")
            for form, colour in zip(_of_loss(), LAW_COLOURS, strict=False)
        ]
    )
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 3 * columns),
        fontsize=9,
        frameon=False,
    )


def save_figure(figure, out: str) -> None:
    """Write ``figure`` to ``out`` as PNG, atomically, and free it."""
    with atomic_path(out) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def plot(
    runs: pd.DataFrame, predictions: pd.DataFrame, fits: pd.DataFrame, loss_eval: str, out: str
) -> None:
    """Write the figure to ``out`` (PNG), atomically."""
    style = Style(predictions)
    datasets = sorted(predictions["dataset"].unique())
    groups = sorted(predictions.loc[predictions["quantity"] == ERROR, "eval"].unique())
    figure, axes = plt.subplots(
        1 + len(groups),
        len(datasets),
        figsize=(max(8.0, 6 * len(datasets)), 4.8 * (1 + len(groups))),
        squeeze=False,
        layout="constrained",
    )
    for column, dataset in enumerate(datasets):
        mine = predictions[predictions["dataset"] == dataset]
        trained = runs[runs["dataset"] == dataset]
        _loss_panel(axes[0, column], trained, mine, fits, dataset, loss_eval, style)
        for row, group in enumerate(groups, start=1):
            _error_panel(axes[row, column], mine, fits, dataset, group, loss_eval, style)
    colourbar = figure.colorbar(
        plt.cm.ScalarMappable(norm=style.norm, cmap=COLOURS), ax=axes, fraction=0.02, pad=0.01
    )
    colourbar.set_label("token multiplier M = D/N")
    colourbar.set_ticks(style.multipliers, labels=[f"{m:g}" for m in style.multipliers])
    colourbar.minorticks_off()
    _legend(figure, style, len(datasets))
    figure.suptitle(
        "Fitted on small runs (filled), extrapolated to larger and over-trained ones (open);\n"
        "relative errors of the paper's form and the Chinchilla form",
        fontsize=11,
    )
    save_figure(figure, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="runs.parquet")
    parser.add_argument("--predictions", required=True, help="predictions.parquet")
    parser.add_argument("--fits", required=True, help="fits.parquet")
    parser.add_argument("--loss-eval", required=True, help="validation set whose loss to show")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        runs = read_runs_table(args.runs)
        predictions = read_predictions_table(args.predictions)
        fits = read_fits_table(args.fits)
    except TableError as error:
        sys.exit(f"plots: {error}")
    plot(runs, predictions, fits, args.loss_eval, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
