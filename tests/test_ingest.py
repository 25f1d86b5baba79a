"""Any ladder in: a results table (long or wide layout) is checked, ingested and fitted with
no training, and a table that cannot be fitted fails before fitting, naming file, row and
column."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, snakemake
from test_released import exp_data

from workflow import forms
from workflow.ingest import ResultsTableError, ingest, size_name
from workflow.settings import IngestSettings

WITHOUT_INTERVALS = [
    "dataset",
    "form",
    "size",
    "N",
    "M",
    "D",
    "quantity",
    "eval",
    "role",
    "predicted",
    "actual",
]
LOSS_POINTS = {"20M": [20, 80], "40M": [20], "80M": [20], "160M": [20]}


def synthetic_ladder() -> pd.DataFrame:
    """A long-layout ladder from the paper's law with a little noise: four sizes at M = 20,
    the smallest over-trained, and two targets beyond them."""
    rng = np.random.default_rng(0)
    rows = []
    for n_params, multiplier in [
        (20e6, 20), (20e6, 80), (40e6, 20), (80e6, 20), (160e6, 20), (640e6, 20), (160e6, 80)
    ]:  # fmt: skip
        tokens = multiplier * n_params
        compute = 6 * n_params * tokens
        loss = 1.8 + (150 * multiplier**0.12 + 250 * multiplier**-0.12) * compute**-0.12
        for eval_name, shift in (("val", 0.0), ("ood", 0.3)):
            rows.append(
                {
                    "dataset": "web",
                    "N": int(n_params),
                    "D": int(tokens),
                    "metric": "loss",
                    "eval": eval_name,
                    "value": loss + shift + rng.normal(0, 0.002),
                }
            )
        rows.append(
            {
                "dataset": "web",
                "N": int(n_params),
                "D": int(tokens),
                "metric": "error",
                "eval": "average",
                "value": 0.9 - 2.0 * np.exp(-0.7 * loss),
            }
        )
    return pd.DataFrame(rows)


def settings(columns: dict | None = None, loss_eval: str = "val") -> IngestSettings:
    return IngestSettings(
        columns=columns, loss_points=LOSS_POINTS, error_points=LOSS_POINTS, loss_eval=loss_eval
    )


def test_size_names_are_derived_from_the_parameter_count():
    assert [size_name(n) for n in (190_000_000, 1_300_000_000, 6_900_000_000, 10_569_312)] == [
        "190M",
        "1.3B",
        "6.9B",
        "10.6M",
    ]


def test_a_long_table_gets_the_optional_columns_derived(tmp_path):
    table = tmp_path / "ladder.csv"
    synthetic_ladder().to_csv(table, index=False)
    runs = ingest(table, settings(), tmp_path / "runs.parquet")
    assert sorted(runs["size"].unique()) == ["160M", "20M", "40M", "640M", "80M"]
    assert np.allclose(runs["M"], runs["D"] / runs["N"])
    assert (runs["tokens"] == runs["D"]).all() and runs["final"].all()
    assert runs["step"].isna().all() and runs["ci_low"].isna().all()


def test_a_checkpoint_table_marks_each_runs_last_checkpoint_final(tmp_path):
    ladder = synthetic_ladder()
    half = ladder.assign(tokens=ladder["D"] // 2, value=ladder["value"] + 0.5)
    table = tmp_path / "ladder.parquet"
    pd.concat([ladder.assign(tokens=ladder["D"]), half]).to_parquet(table)
    runs = ingest(table, settings(), tmp_path / "runs.parquet")
    assert len(runs) == 2 * len(ladder)
    assert (runs.loc[runs["final"], "tokens"] == runs.loc[runs["final"], "D"]).all()
    assert runs["final"].sum() == len(ladder)


def wide_version(ladder: pd.DataFrame) -> pd.DataFrame:
    wide = ladder.pivot_table(index=["N", "D"], columns="eval", values="value").reset_index()
    return wide.rename(columns={"val": "loss_val", "ood": "loss_ood", "average": "avg_err"})


WIDE_COLUMNS = {
    "N": "N",
    "D": "D",
    "losses": {"val": "loss_val", "ood": "loss_ood"},
    "errors": {"average": "avg_err"},
}


def test_the_wide_layout_gives_the_same_table_as_the_long_one(tmp_path):
    ladder = synthetic_ladder()
    ladder.to_csv(tmp_path / "web.csv", index=False)
    wide_version(ladder).to_csv(tmp_path / "web-wide.csv", index=False)
    long = ingest(tmp_path / "web.csv", settings(), tmp_path / "long.parquet")
    wide = ingest(tmp_path / "web-wide.csv", settings(WIDE_COLUMNS), tmp_path / "wide.parquet")
    wide["dataset"] = "web"  # the wide table has no dataset column: it is named after the file
    pd.testing.assert_frame_equal(long, wide, check_exact=True)


def test_accuracy_columns_give_their_average_error(tmp_path):
    wide = pd.DataFrame(
        {
            "params": [1e8, 2e8],
            "tokens": [2e9, 4e9],
            "l": [3.1, 2.9],
            "a": [0.5, 0.6],
            "b": [0.3, 0.5],
        }
    )
    wide.to_csv(tmp_path / "t.csv", index=False)
    columns = {
        "N": "params",
        "tokens": "tokens",
        "losses": {"val": "l"},
        "accuracies": {"task_a": "a", "task_b": "b"},
        "error_average": "avg2",
    }
    no_points = IngestSettings(columns=columns, loss_points={}, error_points={}, loss_eval="val")
    runs = ingest(tmp_path / "t.csv", no_points, tmp_path / "runs.parquet")
    average = runs[runs["eval"] == "avg2"].sort_values("N")["value"].to_numpy()
    assert np.allclose(average, [0.6, 0.45])
    assert set(runs["metric"]) == {"loss", "accuracy", "error"}


def broken(ladder: pd.DataFrame, how: str) -> pd.DataFrame:
    ladder = ladder.astype({"N": object, "D": object})
    if how == "missing column":
        return ladder.drop(columns="value")
    if how == "non-numeric N":
        ladder.loc[3, "N"] = "big"
    if how == "non-positive D":
        ladder.loc[4, "D"] = 0
    if how == "NaN value":
        ladder.loc[5, "value"] = np.nan
    if how == "duplicate rows":
        return pd.concat([ladder, ladder.iloc[[6]]], ignore_index=True)
    return ladder


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing column", r"missing column\(s\) \['value'\]"),
        ("non-numeric N", r"row 4, column 'N': 'big' is not a finite number"),
        ("non-positive D", r"row 5, column 'D': 0 must be positive"),
        ("NaN value", r"row 6, column 'value': missing value"),
        ("duplicate rows", r"rows \[7, 22\] are the same evaluation"),
    ],
)
def test_a_bad_table_fails_naming_the_file_the_row_and_the_column(tmp_path, how, message):
    table = tmp_path / "bad.csv"
    broken(synthetic_ladder(), how).to_csv(table, index=False)
    with pytest.raises(ResultsTableError, match=re.escape(str(table)) + ".*" + message):
        ingest(table, settings(), tmp_path / "runs.parquet")
    assert not (tmp_path / "runs.parquet").exists()


def test_a_fit_point_the_table_lacks_fails_naming_the_runs_it_has(tmp_path):
    table = tmp_path / "ladder.csv"
    synthetic_ladder().to_csv(table, index=False)
    missing = IngestSettings(
        columns=None, loss_points={"20M": [40]}, error_points={}, loss_eval="val"
    )
    points = r"fit\.loss\.points: 20M M=40 is not a run .*20M M=80"
    with pytest.raises(ResultsTableError, match=points):
        ingest(table, missing, tmp_path / "runs.parquet")


def test_a_wide_table_with_a_missing_value_names_its_column(tmp_path):
    wide = wide_version(synthetic_ladder())
    wide.loc[2, "loss_ood"] = np.nan
    wide.to_csv(tmp_path / "w.csv", index=False)
    with pytest.raises(ResultsTableError, match=r"row 3, column 'loss_ood': missing value"):
        ingest(tmp_path / "w.csv", settings(WIDE_COLUMNS), tmp_path / "runs.parquet")


def ladder_config(table, results_dir, **extra) -> dict:
    return {
        "results_table": str(table),
        "results_dir": str(results_dir),
        "fit": {
            "loss": {"points": LOSS_POINTS, "starts": 16},
            "error": {"points": LOSS_POINTS, "loss_eval": "val"},
            "bootstrap": 20,
        },
        **extra,
    }


def test_a_results_table_runs_ingest_fit_and_figures_without_training(tmp_path):
    table = tmp_path / "ladder.csv"
    synthetic_ladder().to_csv(table, index=False)
    snakemake("--cores", "2", config=ladder_config(table, tmp_path / "out"), workdir=tmp_path)
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    targets = predictions[(predictions["role"] == "target") & (predictions["quantity"] == "loss")]
    assert set(targets["size"]) == {"640M", "160M"}
    assert set(targets["form"]) == {"paper", "chinchilla"}
    # The ladder follows the paper's law, so that form extrapolates it closely.
    assert (targets.loc[targets["form"] == "paper", "relative_error"] < 0.01).all()
    for figure in ("scaling.png", "targets.html"):
        assert (tmp_path / "out" / "plots" / figure).stat().st_size > 0
    assert not (tmp_path / "out" / "runs").exists()


def test_a_bad_table_stops_the_workflow_before_fitting(tmp_path):
    table = tmp_path / "ladder.csv"
    broken(synthetic_ladder(), "NaN value").to_csv(table, index=False)
    result = snakemake(
        "--cores", "1", config=ladder_config(table, tmp_path / "out"), workdir=tmp_path, check=False
    )
    assert result.returncode != 0
    log = (tmp_path / "out" / "logs" / "ingest_table.log").read_text()
    assert "row 6, column 'value': missing value" in log
    assert not (tmp_path / "out" / "predictions.parquet").exists()


def test_the_released_testbed_gives_the_same_predictions_as_its_own_table(tmp_path):
    """The paper's released runs through their own ingest, and the same runs as a long CSV
    and as a wide Parquet table through the results-table ingest: identical predictions."""
    preset = yaml.safe_load((REPO / "presets" / "paper-released.yaml").read_text())
    released = {**preset, "released_dir": str(exp_data()), "results_dir": str(tmp_path / "r")}
    for name in ("r", "long", "wide"):
        (tmp_path / name).mkdir()
    snakemake("--cores", "2", config=released, workdir=tmp_path / "r")
    runs = pd.read_parquet(tmp_path / "r" / "runs.parquet")
    long = tmp_path / "long.csv"
    runs.to_csv(long, index=False)
    wide_table = runs.pivot_table(
        index=["dataset", "size", "N", "D"], columns="eval", values="value"
    )
    wide = tmp_path / "wide.parquet"
    wide_table.reset_index().to_parquet(wide)
    kinds = runs.drop_duplicates("eval").set_index("eval")["metric"]
    columns = {
        "dataset": "dataset",
        "size": "size",
        "N": "N",
        "D": "D",
        **{
            key: {name: name for name in kinds.index[kinds == metric]}
            for key, metric in (("losses", "loss"), ("accuracies", "accuracy"), ("errors", "error"))
        },
    }
    expected = pd.read_parquet(tmp_path / "r" / "predictions.parquet")
    for name, extra in (("long", {}), ("wide", {"columns": columns})):
        table = long if name == "long" else wide
        config = {**preset, "results_table": str(table), "results_dir": str(tmp_path / name)}
        snakemake("--cores", "2", config={**config, **extra}, workdir=tmp_path / name)
        got = pd.read_parquet(tmp_path / name / "predictions.parquet")
        # A wide table has no per-point intervals, which the bootstrap draws from, and no
        # chance, which bounds the forms of the error at chance.
        compared = list(expected.columns) if name == "long" else WITHOUT_INTERVALS
        rows = slice(None)
        if name == "wide":
            rows = ~expected["form"].isin(of_chance_chains())
            assert not got.loc[rows, "form"].isin(of_chance_chains()).any()
        pd.testing.assert_frame_equal(
            got.loc[rows, compared], expected.loc[rows, compared], check_exact=True
        )


def of_chance_chains() -> set[str]:
    """The 'form' of every chain that ends in a form of the error at chance."""
    return {link.label for link in forms.links() if link.form.of_chance}
