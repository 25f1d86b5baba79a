"""The forms of downstream error and accuracy: whatever the loss, every prediction and both
ends of its interval lie in [0, 1]; a degenerate exponential says so rather than printing its
constants; the bounded forms stay between 0 and chance; every task gets its own law and a flag
saying whether its fit points can predict it; chance reaches runs.parquet from every source."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from test_fit import GRID, STRAIGHT_POINTS, settings, straight_ladder, synthetic_runs

from workflow import aggregate, fit, forms, laws, plots
from workflow.forms import ACCURACY, ERROR, EXPONENTIAL, LOSS, SIGMOID
from workflow.ingest import ingest
from workflow.settings import IngestSettings
from workflow.tables import RUNS_SCHEMA, write_runs_table

POINTS = {"xs": [20, 320], "s": [20], "m": [20], "l": [20], "xl": [20]}
# Runs far beyond the fit points: losses low enough that the exponential's line leaves [0, 1].
FAR = [
    {"dataset": "toy", "size": name, "N": n_params, "M": 20.0, "D": 20 * n_params}
    for name, n_params in (("10B", 10**10), ("1T", 10**12), ("100T", 10**14))
]
CHANCE = 0.25  # every synthetic task's accuracy at chance
ITEMS = 2000  # every synthetic task's items


def downstream_runs(error_of_loss, tasks: dict, seed: int = 1) -> pd.DataFrame:
    """The synthetic ladder's loss rows, plus an error average 'avg' (``error_of_loss`` of the
    measured loss, with noise) and an accuracy row per task (``tasks``: name -> accuracy as a
    function of the loss), each with CHANCE and binomial noise of ITEMS items."""
    runs = synthetic_runs([*GRID, ("xl", 20)], noise=1e-3, seed=5)
    rng = np.random.default_rng(seed)
    rows = []
    for _, run in runs.iterrows():
        loss, base = run["value"], run.drop(["metric", "eval", "value", "ci_low", "ci_high"])
        error = error_of_loss(loss) + 3e-3 * rng.standard_normal()
        rows.append({**base, "metric": ERROR, "eval": "avg", "value": error,
                     "n_examples": None, "chance": 1 - CHANCE})  # fmt: skip
        for task, accuracy_of_loss in tasks.items():
            accuracy = rng.binomial(ITEMS, accuracy_of_loss(loss)) / ITEMS
            rows.append({**base, "metric": ACCURACY, "eval": task, "value": accuracy,
                         "n_examples": ITEMS, "chance": CHANCE})  # fmt: skip
    return pd.concat([runs, pd.DataFrame(rows, columns=RUNS_SCHEMA.names)], ignore_index=True)


def nearly_linear(loss):
    """The embedded default's case: error a straight line in the loss over the fit points."""
    return 0.2 + 0.27 * (loss - 2.75)


def rising(loss):
    """A task well above chance that improves as the loss falls."""
    return CHANCE + (1 - CHANCE) * laws.logistic(4.0 - 1.5 * loss)


TASKS = {"at_chance": lambda loss: CHANCE, "rising": rising}


@pytest.fixture(scope="module")
def degenerate_fit():
    runs = downstream_runs(nearly_linear, TASKS)
    return fit.fit_table(runs, settings(error_points=POINTS, extra_targets=FAR, bootstrap=30))


def test_a_degenerate_exponential_is_reported_as_such(degenerate_fit, capsys):
    _, fits = degenerate_fit
    exponential = fits[(fits["form"] == "paper") & (fits["law"] == ERROR)]
    assert (exponential["status"] == "degenerate").all()
    assert (fits.loc[fits["law"] == LOSS, "status"] == "ok").all()
    fit.fit_table(downstream_runs(nearly_linear, TASKS), settings(error_points=POINTS))
    log = capsys.readouterr().out
    assert "error law on avg (exponential form, x: val loss) is degenerate: a straight line" in log
    assert "toy exponential avg: degenerate" in log


def test_every_downstream_prediction_and_interval_lies_in_0_1(degenerate_fit):
    predictions, _ = degenerate_fit
    downstream = predictions[predictions["quantity"] != LOSS]
    assert set(downstream["quantity"]) == {ERROR, ACCURACY}
    for column in ("predicted", "ci_low", "ci_high"):
        assert downstream[column].between(0, 1).all(), column
    # The exponential's line leaves [0, 1] at the far runs' losses: clipped, and said so.
    far = downstream[(downstream["quantity"] == ERROR) & (downstream["size"] == "100T")]
    clipped = far.set_index("form")["clipped"]
    assert clipped["paper"] == "prediction" and far.set_index("form")["predicted"]["paper"] == 0
    assert pd.isna(clipped["paper+sigmoid"]) and pd.isna(clipped["direct"])
    assert predictions.loc[predictions["quantity"] == LOSS, "clipped"].isna().all()


def test_the_bounded_forms_stay_between_0_and_chance_for_any_loss(degenerate_fit):
    _, fits = degenerate_fit
    loss = np.linspace(0.0, 50.0, 501)
    for form in forms.predicting(ERROR):
        if not form.of_chance:
            continue
        for label in {link.label for link in forms.links() if link.form is form}:
            rows = fits[(fits["form"] == label) & (fits["eval"] == "avg")]
            params = rows.set_index("param")["value"][list(form.params)].to_numpy()
            ceiling = forms.chance_error(ERROR, rows["chance"].iloc[0])
            source = (loss,) if form.source == LOSS else (np.geomspace(1e15, 1e30, 501), 20.0)
            predicted = ceiling * form.predict(source, params)
            assert ((predicted >= 0) & (predicted <= 1 - CHANCE)).all(), label


def test_every_task_is_predicted_for_every_run_with_an_interval(degenerate_fit):
    predictions, fits = degenerate_fit
    accuracy = predictions[predictions["quantity"] == ACCURACY]
    runs = len(GRID) + 1 + len(FAR)
    assert accuracy.groupby(["form", "eval"]).size().to_dict() == {
        (label, task): runs for label in forms.chain_labels(ACCURACY) for task in TASKS
    }
    assert accuracy[["predicted", "ci_low", "ci_high"]].notna().all().all()
    assert set(fits.loc[fits["law"] == ACCURACY, "eval"]) == set(TASKS)


def test_a_task_at_chance_at_every_fit_point_is_flagged_unpredictable(degenerate_fit):
    _, fits = degenerate_fit
    flags = fits[fits["law"] == ACCURACY].drop_duplicates("eval").set_index("eval")
    assert flags.loc["at_chance", "predictable"] == False  # noqa: E712 (a nullable bool)
    assert flags.loc["rising", "predictable"] == True  # noqa: E712
    assert (flags["chance"] == CHANCE).all()
    # An error average without items or intervals has no noise to weigh its signal against.
    assert fits.loc[fits["law"] == ERROR, "predictable"].isna().all()


def test_a_rising_task_is_predicted_where_it_goes(degenerate_fit):
    predictions, _ = degenerate_fit
    task = predictions[(predictions["eval"] == "rising") & (predictions["role"] == "target")]
    sigmoid = task[task["form"] == SIGMOID.chain_label(forms.PAPER)].dropna(subset="actual")
    assert ((sigmoid["predicted"] - sigmoid["actual"]).abs() < 0.03).all()


def test_the_figure_names_a_degenerate_fit_instead_of_its_constants(
    degenerate_fit, monkeypatch, tmp_path
):
    predictions, fits = degenerate_fit
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, out: drawn.update(figure=figure))
    runs = downstream_runs(nearly_linear, TASKS).assign(final=True)
    plots.plot(runs, predictions, fits, "val", str(tmp_path / "scaling.png"))
    texts = [
        text.get_text().replace("\n", " ") for axis in drawn["figure"].axes for text in axis.texts
    ]
    box = next(text for text in texts if text.startswith(f"{EXPONENTIAL.name}:"))
    assert "degenerate" in box and "a straight line over the fit points, Err =" in box
    assert "exp(" not in box and f"{SIGMOID.name}: Err = 0.750 sigma(" in box
    plots.plt.close(drawn["figure"])


def test_chance_reaches_runs_parquet_from_a_downstream_summary():
    run = {"dataset": "d", "size": "xs", "N": 10, "M": 20.0, "D": 200, "step": 1,
           "tokens": 200, "final": True}  # fmt: skip
    task = {"accuracy": 0.5, "interval": [0.4, 0.6], "n_examples": 100}
    summary = {
        "run": run,
        "suite": "offline",
        "tasks": {"two": {**task, "chance": 0.5}, "four": {**task, "chance": 0.25}},
        "average_error": 0.5,
        "average_error_interval": [0.45, 0.55],
    }
    rows = {row["eval"]: row for row in aggregate.summary_rows(summary)}
    assert rows["two"]["chance"] == 0.5 and rows["four"]["chance"] == 0.25
    assert rows["offline"]["chance"] == pytest.approx(0.625)  # mean of 1 - chance
    summary["tasks"]["four"]["chance"] = None  # varies per item
    assert aggregate.summary_rows(summary)[-1]["chance"] is None


def test_chance_is_an_optional_column_of_a_long_results_table(tmp_path):
    runs = downstream_runs(nearly_linear, TASKS)
    runs = runs[["dataset", "size", "N", "D", "metric", "eval", "value", "chance"]]
    chosen = IngestSettings(columns=None, loss_points=POINTS, error_points=POINTS, loss_eval="val")
    runs.to_csv(tmp_path / "with.csv", index=False)
    table = ingest(tmp_path / "with.csv", chosen, tmp_path / "with.parquet")
    assert (table.loc[table["metric"] == ACCURACY, "chance"] == CHANCE).all()
    runs.drop(columns="chance").to_csv(tmp_path / "without.csv", index=False)
    assert ingest(tmp_path / "without.csv", chosen, tmp_path / "o.parquet")["chance"].isna().all()


def test_the_figure_draws_measured_losses_where_the_paper_form_could_not_be_fitted(
    monkeypatch, tmp_path
):
    runs = straight_ladder()
    write_runs_table(runs.to_dict("records"), tmp_path / "runs.parquet")
    chosen = settings(loss_points=STRAIGHT_POINTS, error_points=STRAIGHT_POINTS, bootstrap=5)
    fit.main(["--runs", str(tmp_path / "runs.parquet"), "--settings", chosen.to_json(),
              "--predictions", str(tmp_path / "p.parquet"),
              "--fits", str(tmp_path / "f.parquet")])  # fmt: skip
    predictions, fits = (pd.read_parquet(tmp_path / name) for name in ("p.parquet", "f.parquet"))
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, out: drawn.update(figure=figure))
    plots.plot(runs, predictions, fits, "val", str(tmp_path / "scaling.png"))
    loss_axis = drawn["figure"].axes[0]
    texts = [text.get_text().replace("\n", " ") for text in loss_axis.texts]
    assert any("the paper form could not be fitted (failed)" in text for text in texts)
    assert any("xl, M=46: no fit / " in text for text in texts)
    assert loss_axis.get_ylabel() == "loss L, val (nats)"
    points = [c for c in loss_axis.collections if isinstance(c, PathCollection)]
    measured = np.concatenate([collection.get_offsets()[:, 1] for collection in points])
    assert len(measured) == len(runs) and measured.min() > 3  # the losses themselves, not L - E
    plots.plt.close(drawn["figure"])
