"""The report's table and training-curves figure, on small hand-made inputs."""

from __future__ import annotations

import matplotlib.image
import pandas as pd
import pytest

from workflow.curves import plot_curves, read_curves
from workflow.targets import coverage, render, summary, target_rows


def prediction(**columns) -> dict:
    row = {
        "dataset": "d",
        "form": "paper",
        "size": "s",
        "N": 1000,
        "M": 20.0,
        "D": 20000,
        "C": 1.2e8,
        "quantity": "loss",
        "eval": "val",
        "role": "target",
        "predicted": 3.0,
        "actual": 3.1,
        "ci_low": 2.9,
        "ci_high": 3.05,
    }
    row.update(columns)
    row["inside"] = row["ci_low"] <= row["actual"] <= row["ci_high"] if row["actual"] else None
    row["relative_error"] = (
        abs(row["predicted"] - row["actual"]) / row["actual"] if row["actual"] else None
    )
    return row


@pytest.fixture
def predictions() -> pd.DataFrame:
    return pd.DataFrame(
        [
            prediction(),
            prediction(form="chinchilla", predicted=3.2),
            prediction(M=80.0, C=4.8e8, predicted=2.5, actual=2.6),
            prediction(role="fit"),  # a fit point: not a target
            prediction(eval="ood"),  # another validation set: not the plotted one
            prediction(actual=None),  # predicted, never trained
            prediction(quantity="error", eval="offline", predicted=0.30, actual=0.25),
        ]
    )


def test_the_table_holds_the_measured_targets_of_the_plotted_loss_and_every_error(predictions):
    rows = target_rows(predictions, "val")
    assert len(rows) == 4
    assert set(rows["eval"]) == {"val", "offline"} and (rows["role"] == "target").all()
    totals = summary(rows).set_index(["quantity", "form"])
    assert totals.loc[("loss", "paper"), "targets"] == 2
    assert totals.loc[("loss", "paper"), "worst"] == pytest.approx(0.1 / 2.6)
    assert totals.loc[("error", "paper"), "worst"] == pytest.approx(0.2)


def test_the_page_shows_each_relative_error(predictions):
    page = render(target_rows(predictions, "val"), "val", coverage(predictions))
    assert page.startswith("<!DOCTYPE html>") and page.count("<table") == 3
    assert "3.85%" in page  # 0.1 / 2.6, the over-trained target
    assert "20.00%" in page and "3.23%" in page  # the error row; paper form at M = 20


def test_curves_draw_one_panel_per_dataset_and_size(tmp_path):
    runs = []
    for size, n_params in (("xs", 100), ("s", 400)):
        for multiplier in (20.0, 80.0):
            path = tmp_path / f"{size}-{multiplier}.parquet"
            tokens = [1000 * step for step in range(1, 11)]
            pd.DataFrame(
                {"tokens": tokens, "loss": [8.0 / step**0.3 for step in range(1, 11)]}
            ).to_parquet(path)
            runs.append(
                {"dataset": "d", "size": size, "N": n_params, "M": multiplier, "curve": str(path)}
            )
    curves = read_curves(runs)
    assert len(curves) == 40 and set(curves["size"]) == {"xs", "s"}
    out = tmp_path / "curves.png"
    plot_curves(curves, str(out))
    height, width, _ = matplotlib.image.imread(out).shape
    assert width > height > 100  # two panels side by side
