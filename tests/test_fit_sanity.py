"""Fit inputs that cannot be fitted stop the stage naming the run; fits that make no sense are
written flagged (status ``implausible``, with warnings); tables that are not what they claim
are named with the command that rebuilds them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from test_fit import GRID, SIZES, settings, synthetic_runs

from workflow import fit, sanity
from workflow.errors import FitError
from workflow.tables import TableError, read_runs_table, write_runs_table
from workflow.targets import flagged_section


def one_run(rows: pd.DataFrame, size: str, multiplier: float) -> pd.Series:
    return (rows["size"] == size) & np.isclose(rows["M"], multiplier)


def test_a_nan_loss_at_a_fit_point_is_named_with_its_row():
    rows = synthetic_runs(GRID)
    rows.loc[one_run(rows, "xs", 20), "value"] = np.nan
    with pytest.raises(FitError) as failure:
        fit.fit_table(rows, settings())
    message = str(failure.value)
    assert message.startswith("toy: loss law on val: fit point xs M=20 has loss nan")
    assert "runs.parquet row dataset=toy, size=xs, M=20, metric=loss, eval=val" in message


def test_a_non_positive_size_at_a_fit_point_is_named():
    rows = synthetic_runs(GRID)
    rows.loc[one_run(rows, "s", 20), "N"] = 0
    with pytest.raises(FitError, match=r"fit point s M=\S+ has N 0 \(not positive\)"):
        fit.fit_table(rows, settings())


def test_all_equal_losses_are_named():
    rows = synthetic_runs(GRID)
    rows["value"] = 3.8
    with pytest.raises(FitError, match=r"every fit point's loss is within its noise of 3\.8"):
        fit.fit_table(rows, settings())


def test_a_diverged_fit_point_is_flagged_naming_that_run():
    """The lr: 50 case: one fit point's loss 40% above the trend."""
    rows = synthetic_runs(GRID, noise=1e-3, seed=3)
    rows.loc[one_run(rows, "s", 20), "value"] *= 1.4
    _, fits = fit.fit_table(rows, settings())
    loss = fits[fits["law"] == "loss"].drop_duplicates("form")
    assert (loss["status"] == "implausible").any()
    flagged = loss[loss["status"] == "implausible"]
    assert flagged["warnings"].str.contains("s M=20").any(), flagged["warnings"].tolist()


def test_a_fit_point_whose_training_diverged_is_named_in_every_fit_of_it():
    """A run that diverged late may still sit near the trend; its train.json says so, and
    runs.parquet's ``diverged`` carries that to the fits."""
    rows = synthetic_runs(GRID, noise=1e-3, seed=3)
    rows["diverged"] = one_run(rows, "m", 20)
    _, fits = fit.fit_table(rows, settings())
    flagged = fits.drop_duplicates(["law", "form", "eval"])
    assert (flagged["status"] == "implausible").all()
    assert flagged["warnings"].str.contains("fit point m M=20 diverged in training").all()
    rows["diverged"] = False
    _, clean = fit.fit_table(rows, settings())
    assert not clean["warnings"].fillna("").str.contains("diverged in training").any()


def test_a_negative_irreducible_loss_and_a_wild_exponent_are_flagged():
    found = sanity.implausibility(
        np.array([-22654.0, 1.0, 1.0, 3.0]), ("E", "a", "b", "eta"), ("eta",), "E"
    )
    assert found[0].startswith("E = -2.265e+04 < 0") and "eta = 3 outside (0, 2)" in found[1]
    assert sanity.implausibility(np.array([1.8, 2.0, 3.0, 0.13]), ("E", "a", "b", "eta"),
                                 ("eta",), "E") == []  # fmt: skip
    assert "A = inf is not finite" in sanity.implausibility(np.array([np.inf]), ("A",))


def test_a_wild_target_prediction_is_named():
    found = sanity.wild_targets(["xs M=20", "xl M=20"], np.array([3.5, 0.5]), np.array([3, 4.0]))
    assert len(found) == 1 and "xl M=20 (0.5)" in found[0] and "xs" not in found[0]


def test_a_clean_ladder_is_ok_with_no_warnings():
    _, fits = fit.fit_table(synthetic_runs(GRID, noise=1e-3, seed=1), settings())
    assert (fits["status"] == "ok").all() and fits["warnings"].isna().all()


def test_the_report_lists_fits_that_are_not_ok():
    fits = pd.DataFrame(
        [{"dataset": "d", "form": "paper", "law": "loss", "eval": "val", "param": "E",
          "value": -3.0, "status": "implausible", "chance": None, "predictable": None,
          "warnings": "E = -3 < 0 (a negative irreducible loss)"}]
    )  # fmt: skip
    page = flagged_section(fits)
    assert "Fits that are not ok" in page and "a negative irreducible loss" in page


@pytest.mark.parametrize("damage", ["garbage", "columns"])
def test_a_damaged_runs_table_is_named_with_the_command_that_rebuilds_it(tmp_path, damage):
    path = tmp_path / "runs.parquet"
    if damage == "garbage":
        path.write_bytes(b"not parquet at all")
    else:
        pd.DataFrame({"dataset": ["toy"], "loss": [3.0]}).to_parquet(path)
    with pytest.raises(TableError) as failure:
        read_runs_table(path)
    message = str(failure.value)
    assert str(path) in message and "snakemake --forcerun aggregate" in message
    assert "ingest_released" in message and "ingest_table" in message
    result = subprocess.run(
        [sys.executable, "-m", "workflow.fit", "--runs", str(path), "--settings",
         settings().to_json(), "--predictions", str(tmp_path / "p.parquet"),
         "--fits", str(tmp_path / "f.parquet")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"fit: {path}") and len(result.stderr.splitlines()) == 1


def test_the_report_stages_name_a_damaged_fits_table(tmp_path):
    write_runs_table(synthetic_runs(GRID[:3]).to_dict("records"), tmp_path / "runs.parquet")
    (tmp_path / "p.parquet").write_bytes(b"PAR1 truncated")
    for stage, extra in (("targets", []), ("plots", ["--runs", str(tmp_path / "runs.parquet")])):
        result = subprocess.run(
            [sys.executable, "-m", f"workflow.{stage}", "--predictions",
             str(tmp_path / "p.parquet"), "--fits", str(tmp_path / "p.parquet"),
             "--loss-eval", "val", "--out", str(tmp_path / "out"), *extra],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "snakemake --forcerun fit" in result.stderr


def test_sizes_is_the_grid_of_the_fit_tests():
    assert set(SIZES) >= {size for size, _ in GRID}
