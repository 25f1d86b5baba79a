"""Plan a run before paying for it: the size N and multiplier M the fitted laws recommend.

Given a training budget C (FLOPs) and optionally the tokens the model will serve in its life,
the planner fits the laws on the runs this project has already trained (as the fit stage does,
with its bootstrap), and picks the N that minimises the predicted loss under

    6 N D + 2 N I = budget       (training, plus inference at 2N FLOPs per served token),

so D = (budget - 2 N I) / 6N and M = D / N. Without inference the answer is the law's own
compute-optimal multiplier M* = (b/a)^(1/(2 eta)); serving many tokens pushes towards smaller,
over-trained models, which is the trade-off the paper's over-training laws make computable.
The loss and error at the recommendation are predicted as the fit stage predicts a target,
with its calibrated 95% intervals (``workflow.calibration``), and the report says how far the
recommendation lies beyond the fit points (an extrapolation); M's interval is the bootstrap's
spread of the recommendation itself.

    python -m workflow.plan --budget 1e21 [--inference-tokens 1e12] [--configfile CONFIG]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from workflow import laws
from workflow.atomic import write_json
from workflow.config import ConfigError, load_config_file, validate_config
from workflow.errors import FitError
from workflow.forms import ERROR, EXPONENTIAL, LOSS, PAPER
from workflow.intervals import percentile_interval
from workflow.ladder import FAILED, OK, fit_ladder
from workflow.paths import Layout
from workflow.predict import finished, ladder_predictions
from workflow.resources import cost_table
from workflow.settings import FitSettings, SettingsError, fit_settings, measured_elsewhere
from workflow.tables import read_runs_table

# The size name of the recommended run among the predictions.
PLANNED = "planned"
# Inference FLOPs per served token: one forward pass.
INFERENCE_FLOPS_PER_TOKEN_PER_PARAMETER = 2.0


@dataclass(frozen=True)
class Plan:
    """A recommended run and what the laws predict for it (intervals: 2.5 and 97.5 %)."""

    dataset: str
    eval: str
    budget: float
    inference_tokens: float
    N: float
    D: float
    M: float
    loss_params: tuple[float, ...]
    loss: float
    loss_ci: tuple[float, float]
    error_group: str | None
    error: float | None
    error_ci: tuple[float, float] | None
    error_status: str | None  # the error law's fit: ok, degenerate, implausible or failed
    error_clipped: str | None  # 'prediction' or 'interval' where [0, 1] cut it
    M_ci: tuple[float, float]
    compute_over_largest_fit: float
    fit_multipliers: tuple[float, float]


def tokens_for(n_params: np.ndarray, budget: float, inference_tokens: float) -> np.ndarray:
    """Training tokens D that spend what is left of ``budget`` after serving at size N."""
    inference = INFERENCE_FLOPS_PER_TOKEN_PER_PARAMETER * n_params * inference_tokens
    return laws.tokens_for_compute(n_params, budget - inference)


def best_size(loss_params: np.ndarray, budget: float, inference_tokens: float) -> float:
    """The N minimising the paper-form loss under the budget (1-D search in log N).

    Without inference this is the closed form N = sqrt(C / 6 M*); the search handles both.
    """
    if inference_tokens == 0:
        return laws.params_for_compute(budget, laws.optimal_multiplier(*loss_params[1:]))
    # N at which serving alone spends the budget: no training tokens are left beyond it.
    ceiling = budget / (INFERENCE_FLOPS_PER_TOKEN_PER_PARAMETER * inference_tokens)
    largest = math.log(ceiling) - 1e-9  # the search's upper bound, in log N
    if largest <= 0:
        raise FitError(
            f"serving {inference_tokens:g} tokens alone costs more than {budget:g} FLOPs, "
            "even with one parameter"
        )

    def predicted(log_n: float) -> float:
        n_params = math.exp(log_n)
        tokens = tokens_for(np.array(n_params), budget, inference_tokens)
        if tokens <= 0:
            return math.inf
        return float(PAPER.predict((n_params, tokens), loss_params))

    result = minimize_scalar(predicted, bounds=(math.log(1.0), largest), method="bounded")
    return math.exp(result.x)


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% interval of replicates' predictions (NaN without any)."""
    low, high = percentile_interval(values)
    return (float(low), float(high))


def _row(predictions: pd.DataFrame, quantity: str, form: str, eval_name: str) -> pd.Series:
    chosen = predictions[
        (predictions["quantity"] == quantity)
        & (predictions["form"] == form)
        & (predictions["eval"] == eval_name)
    ]
    return chosen.iloc[0]


def _interval_of(row: pd.Series) -> tuple[float, float]:
    return (float(row["ci_low"]), float(row["ci_high"]))


def plan(
    runs_table: pd.DataFrame,
    settings: FitSettings,
    dataset: str,
    eval_name: str,
    budget: float,
    inference_tokens: float = 0.0,
) -> Plan:
    """Fit the laws on ``dataset``'s final runs and recommend (N, M) for ``budget``; the loss
    is ``eval_name``'s, and the error law is fitted on it, so the chain is one. The plan is
    the paper's chain: its loss form (whose compute-optimal M* is closed-form), then its
    error law."""
    if not (budget > 0 and inference_tokens >= 0):
        raise FitError(
            f"a plan needs a positive budget and no negative served tokens; got --budget "
            f"{budget:g}, --inference-tokens {inference_tokens:g}"
        )
    final = runs_table[runs_table["final"].astype(bool) & (runs_table["dataset"] == dataset)]
    if final.empty:
        datasets = sorted(runs_table["dataset"].unique())
        raise FitError(f"no final runs of dataset {dataset!r}; datasets: {datasets}")
    with contextlib.redirect_stdout(io.StringIO()):  # the fit stage's log, not the plan's
        ladder = fit_ladder(dataset, final, replace(settings, loss_eval=eval_name))
    fitted = ladder.of(PAPER, eval_name)
    if fitted.status == FAILED:
        raise FitError(
            f"{dataset}: the paper form's loss law on {eval_name} could not be fitted "
            f"({fitted.warnings}); the plan is that form's optimum"
        )

    n_params = best_size(fitted.params, budget, inference_tokens)
    if not np.isfinite(n_params):
        raise FitError(
            f"{dataset}: the paper form's loss law on {eval_name} ({fitted.status}"
            f"{': ' + fitted.warnings if fitted.warnings else ''}) has no finite optimum at "
            f"{budget:g} FLOPs"
        )
    tokens = float(tokens_for(np.array(n_params), budget, inference_tokens))
    converged = fitted.replicates[np.isfinite(fitted.replicates).all(axis=1)]
    replicate_m = np.array(
        [
            float(tokens_for(np.array(n), budget, inference_tokens)) / n
            for n in (best_size(p, budget, inference_tokens) for p in converged)
        ]
    )
    # The recommendation predicted as the fit stage predicts a target: calibrated intervals.
    planned = {"dataset": dataset, "size": PLANNED, "N": round(n_params), "D": round(tokens)}
    planned["M"] = planned["D"] / planned["N"]
    uncalibrated = ladder_predictions(ladder, [planned], eval_name)
    predictions = finished(uncalibrated, eval_name, settings.run_sd)
    mine = predictions[predictions["size"] == PLANNED]
    loss_row = _row(mine, LOSS, PAPER.chain_label(), eval_name)

    group, error, error_ci, error_status, error_clipped = None, None, None, None, None
    groups = ladder.measurements.evals(EXPONENTIAL.predicts)
    if groups:
        group = groups[0]
        error_row = _row(mine, ERROR, EXPONENTIAL.chain_label(PAPER), group)
        error, error_ci = float(error_row["predicted"]), _interval_of(error_row)
        error_status = ladder.of(EXPONENTIAL, group).status
        error_clipped = None if pd.isna(error_row["clipped"]) else error_row["clipped"]

    fit_points = ladder.measurements.table[ladder.points[PAPER.predicts]]
    largest_fit = float(laws.compute(fit_points["N"], fit_points["D"]).max())
    return Plan(
        dataset=dataset,
        eval=eval_name,
        budget=budget,
        inference_tokens=inference_tokens,
        N=n_params,
        D=tokens,
        M=tokens / n_params,
        loss_params=tuple(float(value) for value in fitted.params),
        loss=float(loss_row["predicted"]),
        loss_ci=_interval_of(loss_row),
        error_group=group,
        error=error,
        error_ci=error_ci,
        error_status=error_status,
        error_clipped=error_clipped,
        M_ci=interval(replicate_m),
        compute_over_largest_fit=float(laws.compute(n_params, tokens)) / largest_fit,
        fit_multipliers=(float(fit_points["M"].min()), float(fit_points["M"].max())),
    )


def describe(recommended: Plan) -> str:
    """The recommendation as a person reads it."""
    p = recommended
    lines = [
        f"{p.dataset}: budget {p.budget:.3g} FLOPs"
        + (f", serving {p.inference_tokens:.3g} tokens" if p.inference_tokens else ""),
        f"  recommended N = {p.N:,.0f} parameters, D = {p.D:,.0f} tokens, "
        f"M = D/N = {p.M:.1f} (95%: {p.M_ci[0]:.1f} - {p.M_ci[1]:.1f})",
        f"  predicted {p.eval} loss {p.loss:.4f} (95%: {p.loss_ci[0]:.4f} - {p.loss_ci[1]:.4f})",
    ]
    if p.error is not None:
        notes = [f"the error law is {p.error_status}"] if p.error_status != OK else []
        notes += [f"{p.error_clipped} clipped to [0, 1]"] if p.error_clipped else []
        lines.append(
            f"  predicted {p.error_group} error {p.error:.4f} "
            f"(95%: {p.error_ci[0]:.4f} - {p.error_ci[1]:.4f})"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    low, high = p.fit_multipliers
    lines.append(
        f"  training compute is {p.compute_over_largest_fit:.3g}x the largest fit run; the fit "
        f"points span M = {low:g} - {high:g}"
        + ("" if low <= p.M <= high else " (M is outside them: an extrapolation in M too)")
    )
    return "\n".join(lines)


def ladder_cost(config: dict) -> str:
    """What the config's own ladder costs under each schedule (workflow.resources)."""
    total = cost_table(config).iloc[-1]
    return (
        f"  the ladder itself ({int(total['runs'])} runs): {total['tokens_cosine']:.3g} training "
        f"tokens, {total['gpu_hours_cosine']:,.1f} GPU-hours under cosine; "
        f"{total['tokens_wsd']:.3g} tokens, {total['gpu_hours_wsd']:,.1f} GPU-hours under wsd "
        f"(train.schedule; `python -m workflow.resources` for the table per size)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, required=True, help="training FLOPs (6ND)")
    parser.add_argument(
        "--inference-tokens",
        type=float,
        default=0.0,
        help="tokens the model will serve; each costs 2N FLOPs from the same budget",
    )
    parser.add_argument("--configfile", default="config.yaml", help="the config that was run")
    parser.add_argument(
        "--released-dir", help="the released testbed's directory, for a released-mode config"
    )
    parser.add_argument("--dataset", help="training dataset (default: the only or first one)")
    parser.add_argument("--eval", help="validation set (default: fit.error.loss_eval's)")
    parser.add_argument("--json", help="also write the plan here as JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config_file(args.configfile)
        if args.released_dir:
            config["released_dir"] = args.released_dir
        validate_config(config)
        settings = fit_settings(config)
        runs_path = Path(Layout(config["results_dir"]).runs_table())
        if not runs_path.exists():
            sys.exit(f"plan: {runs_path} does not exist; run `snakemake {runs_path}` first")
        runs_table = read_runs_table(runs_path)
        dataset = args.dataset or sorted(runs_table["dataset"].unique())[0]
        recommended = plan(
            runs_table,
            settings,
            dataset,
            args.eval or settings.loss_eval,
            args.budget,
            args.inference_tokens,
        )
    except (ConfigError, FitError, SettingsError) as error:
        sys.exit(f"plan: {error}")
    print(describe(recommended))
    if not measured_elsewhere(config):
        print(ladder_cost(config))
    if args.json:
        write_json(args.json, asdict(recommended))


if __name__ == "__main__":
    main()
