"""Warmup-stable-decay (train.schedule wsd): one trunk per size, a cooldown per multiplier.

What must hold: a run branched from its trunk is bit for bit the run trained alone on the same
schedule (same data order, same state at the branch point); a trunk is trained once and only
extended; the cosine path is untouched; and Snakemake re-runs only what changed (a new
multiplier: one new run and no trunk job; a size's hyperparameters: that size's trunk and runs).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math

import pandas as pd
import pytest
import torch
from conftest import snakemake
from test_train import (
    TOKENS_PER_STEP,
    checkpoint_weights,
    data,  # noqa: F401 (a fixture)
    make_engine,
    make_spec,
    run_outputs,
)

from workflow.config import validate_config
from workflow.paths import trunk_state_steps
from workflow.resume import load_state, spec_hash
from workflow.runs import branch_step, trained_runs, trunks
from workflow.settings import Cooldown, RunSpec, TrunkSpec, cooldown, run_spec, trunk_spec
from workflow.step import DECAYS, learning_rate, wsd_learning_rate
from workflow.train import train
from workflow.trunk import TrunkStates, grow

TRUNK = "toy/xs"
ENGINE = make_engine(log_every=7, resume_every=50)
CURVE = ["step", "tokens", "loss", "lr"]


def wsd_run(steps: int, branch: int, decay: str = "1-sqrt") -> tuple[RunSpec, Cooldown]:
    """A run of ``steps`` steps (its last one short) that leaves the trunk after ``branch``
    steps, with a checkpoint a few steps into its cooldown and one at its end."""
    spec = make_spec(steps * TOKENS_PER_STEP - 11, run=f"toy/xs/M{steps}")
    spec = dataclasses.replace(spec, checkpoint_steps=[branch + 5, steps])
    return spec, Cooldown(trunk=TRUNK, branch_step=branch, decay=decay)


def train_wsd(spec, run_cooldown, data, run_dir, states: TrunkStates | None) -> dict:  # noqa: F811
    return train(
        spec,
        ENGINE,
        data["tokens"],
        data["tokenizer"],
        run_outputs(run_dir),
        threads=1,
        cooldown=run_cooldown,
        trunk=states,
    )


def assert_same_run(run_dir, reference_dir) -> None:
    """Every checkpoint and the curve's step, tokens, loss and lr, bitwise."""
    weights, expected = checkpoint_weights(run_dir), checkpoint_weights(reference_dir)
    assert list(weights) == list(expected)
    for step, tensors in expected.items():
        for name, tensor in tensors.items():
            assert torch.equal(weights[step][name], tensor), (step, name)
    pd.testing.assert_frame_equal(
        pd.read_parquet(run_dir / "curve.parquet")[CURVE],
        pd.read_parquet(reference_dir / "curve.parquet")[CURVE],
        check_exact=True,
    )


def grow_trunk(data, states: TrunkStates, tmp_path, spec: RunSpec | None = None) -> dict:  # noqa: F811
    trunk = TrunkSpec.of_run(spec or make_spec(TOKENS_PER_STEP), TRUNK)
    return grow(trunk, ENGINE, data["tokens"], states, tmp_path / "trunk.json", threads=1)


def test_the_learning_rate_warms_up_as_cosine_holds_the_peak_then_decays_to_the_floor():
    steps, peak, warmup, floor, branch = 100, 1e-2, 10, 1e-4, 80
    for decay, halfway in (("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - 0.5**0.5)):
        rates = [
            wsd_learning_rate(step, steps, peak, warmup, floor, branch, decay)
            for step in range(1, steps + 1)
        ]
        # The warmup is the cosine schedule's, to the bit: a trunk starts as a cosine run does.
        assert rates[:warmup] == [
            learning_rate(s, steps, peak, warmup, floor) for s in range(1, 11)
        ]
        assert rates[warmup:branch] == [peak] * (branch - warmup)
        assert rates[-1] == pytest.approx(floor)
        assert rates[89] == pytest.approx(floor + (peak - floor) * halfway)
        assert all(later < earlier for earlier, later in itertools.pairwise(rates[79:]))
    assert set(DECAYS) == {"linear", "cosine", "1-sqrt"}


def test_branch_points_are_the_trunk_share_rounded_to_a_step(tiny_config):
    tiny_config["train"]["schedule"] = "wsd"
    config = validate_config(tiny_config)
    for run in trained_runs(config):
        share = 0.8 * run.tokens / run.tokens_per_step
        assert run.branch_step == round(share) and run.branch_step < run.steps
        # Checkpoints come only from the cooldown: the trunk saves no models.
        assert run.checkpoint_steps == (run.steps,)
    by_size = {trunk.size: trunk.branch_steps for trunk in trunks(config)}
    assert by_size["xs"] == (77, 309, 1235) and by_size["s"] == (493,)
    # Not inside the warmup (10 steps), not at the last step.
    tokens_per_step = 64 * config["sizes"]["xs"]["batch_size"]
    assert branch_step(config, "xs", 11 * tokens_per_step) == 10  # 0.8 x 11 rounds to 9
    config["train"]["cooldown_fraction"] = 1e-6
    assert branch_step(config, "xs", 100 * tokens_per_step) == 99


def test_the_cosine_path_plans_and_hashes_every_run_as_before(tiny_config):
    """The default schedule leaves every run's spec, and so its identity, as it was before
    wsd existed: upgrading retrains nothing. (Hashes recorded from the code before wsd, then
    again when train.data_order joined the spec, which retrains every run once.)"""
    config = validate_config(tiny_config)
    assert config["train"]["schedule"] == "cosine"
    hashes = {run.key: spec_hash(run_spec(config, run)) for run in trained_runs(config)}
    assert hashes == {
        "wiki_en/xs/M5": "300ebcaf0ec198c5",
        "wiki_en/xs/M20": "b117570ad26ca33f",
        "wiki_en/xs/M80": "fcce9f2a1e17a2d0",
        "wiki_en/s/M20": "fc9ac6736cc11a50",
        "wiki_en/m/M20": "e3fedc3340e3226c",
        "wiki_en/l/M20": "39fe7059f88bac98",
    }
    assert all(
        run.branch_step is None and cooldown(config, run) is None for run in trained_runs(config)
    )


def test_a_trunk_spec_leaves_out_the_multipliers_and_holds_the_size(tiny_config):
    tiny_config["train"]["schedule"] = "wsd"
    config = validate_config(copy.deepcopy(tiny_config))
    (xs,) = [trunk for trunk in trunks(config) if trunk.size == "xs"]
    for run in trained_runs(config):
        if run.size == "xs":
            assert TrunkSpec.of_run(run_spec(config, run), xs.key) == trunk_spec(config, xs)
    tiny_config["grid"]["wiki_en"]["xs"].append(160)
    more = validate_config(copy.deepcopy(tiny_config))
    (longer,) = [trunk for trunk in trunks(more) if trunk.size == "xs"]
    assert len(longer.branch_steps) == 4 and trunk_spec(more, longer) == trunk_spec(config, xs)
    tiny_config["sizes"]["xs"]["lr"] /= 2
    changed = validate_config(tiny_config)
    assert trunk_spec(changed, longer).lr == trunk_spec(config, xs).lr / 2


def test_runs_branched_from_one_trunk_equal_the_same_runs_trained_alone(data, tmp_path):  # noqa: F811
    """The trunk trains once to its furthest branch point, keeping its state at each; each
    run decays from its own and ends bitwise where the same wsd run trained from scratch
    does, having predicted exactly D tokens, its curve the whole history."""
    runs = {100: 80, 300: 240}
    states = TrunkStates(tmp_path / "states", tuple(runs.values()))
    summary = grow_trunk(data, states, tmp_path)
    assert summary["trained_steps"] == [[0, 240]]
    assert summary["trained_tokens"] == 240 * TOKENS_PER_STEP
    assert trunk_state_steps(states.directory) == [80, 240]
    assert not states.resume_state.exists()
    for steps, branch in runs.items():
        spec, run_cooldown = wsd_run(steps, branch)
        branched = train_wsd(spec, run_cooldown, data, tmp_path / f"branched-{steps}", states)
        alone = train_wsd(spec, run_cooldown, data, tmp_path / f"alone-{steps}", None)
        assert_same_run(tmp_path / f"branched-{steps}", tmp_path / f"alone-{steps}")
        assert branched["final_loss"] == alone["final_loss"]
        assert branched["tokens"] == spec.tokens and branched["steps"] == steps
        assert (branched["branch_step"], branched["decay"]) == (branch, "1-sqrt")
        curve = pd.read_parquet(tmp_path / f"branched-{steps}" / "curve.parquet")
        assert curve["tokens"].iloc[-1] == spec.tokens
        assert curve["step"].tolist() == [*range(7, steps, 7), steps]  # trunk rows included
        trunk_rows = curve[(curve["step"] > spec.warmup) & (curve["step"] <= branch)]
        assert (trunk_rows["lr"] == spec.lr).all()
        assert curve["lr"].iloc[-1] == pytest.approx(spec.min_lr)
    # Again with the same branch points: every state is kept, nothing is trained.
    assert grow_trunk(data, states, tmp_path)["trained_steps"] == []


def test_a_run_added_later_grows_the_trunk_from_its_nearest_kept_state(data, tmp_path, capfd):  # noqa: F811
    """A new multiplier's job finds no state at its branch point: it grows the trunk from the
    furthest state kept before it (never step 0 when one is kept) and keeps the new one."""
    states = TrunkStates(tmp_path / "states", (80,))
    grow_trunk(data, states, tmp_path)
    capfd.readouterr()
    spec, run_cooldown = wsd_run(300, 240)
    train_wsd(spec, run_cooldown, data, tmp_path / "added", states)
    assert "toy/xs/trunk: training from step 80 to step 240" in capfd.readouterr().err
    assert trunk_state_steps(states.directory) == [80, 240]
    train_wsd(spec, run_cooldown, data, tmp_path / "alone", None)
    assert_same_run(tmp_path / "added", tmp_path / "alone")

    spec, run_cooldown = wsd_run(200, 160)
    capfd.readouterr()
    train_wsd(spec, run_cooldown, data, tmp_path / "between", states)
    assert "toy/xs/trunk: training from step 80 to step 160" in capfd.readouterr().err
    assert trunk_state_steps(states.directory) == [80, 160, 240]


def test_a_trunk_of_other_hyperparameters_starts_over(data, tmp_path, capfd):  # noqa: F811
    states = TrunkStates(tmp_path / "states", (80,))
    grow_trunk(data, states, tmp_path)
    capfd.readouterr()
    summary = grow_trunk(data, states, tmp_path, make_spec(TOKENS_PER_STEP, lr=0.005))
    assert "discarding the states of another trunk spec" in capfd.readouterr().err
    assert summary["trained_steps"] == [[0, 80]]
    state = load_state(states.state(80), lazily=True)
    assert state["spec_hash"] == summary["spec_hash"]
    assert math.isclose(state["progress"]["curve"][-1]["lr"], 0.005)


@pytest.fixture(scope="module")
def finished_wsd(tmp_path_factory):
    """The tiny config under wsd (xs at M 2 and 4, s at M 2; wiki_en only, no downstream),
    trained through every run's train.json by a real ``snakemake`` (about a minute)."""
    from conftest import load_config

    workdir = tmp_path_factory.mktemp("wsd")
    config = copy.deepcopy(load_config("tests/configs/tiny.yaml"))
    config["results_dir"] = "results"
    config["datasets"] = {"wiki_en": config["datasets"]["wiki_en"]}
    config["validation"]["sets"] = ["wiki_en"]
    config["downstream"] = {"suite": "none"}
    config["grid"] = {"wiki_en": {"xs": [2, 4], "s": [2]}}
    config["fit"] = {"loss": {"points": {"xs": [2], "s": [2]}}, "error": {"points": {}}}
    config["train"].update(schedule="wsd", log_every=5)
    snakemake("--cores", "2", *train_targets(config), config=config, workdir=workdir)
    return workdir, config


def train_targets(config: dict) -> list[str]:
    validated = validate_config(copy.deepcopy(config))
    return [f"results/runs/{run.key}/train.json" for run in trained_runs(validated)]


def planned(config: dict, workdir) -> dict[str, int]:
    """Jobs per rule that ``snakemake -n`` plans for the config's training outputs."""
    result = snakemake("-n", *train_targets(config), config=config, workdir=workdir)
    counts = {}
    for line in result.stdout.split("Job stats:")[-1].splitlines()[3:]:
        fields = line.split()
        if len(fields) != 2 or fields[0] == "total":
            break
        counts[fields[0]] = int(fields[1])
    return counts


@pytest.mark.slow
def test_the_pipeline_trains_one_trunk_per_size_and_nothing_twice(finished_wsd):
    workdir, config = finished_wsd
    results = workdir / "results"
    trunk = json.loads((results / "trunks" / "wiki_en" / "xs" / "trunk.json").read_text())
    assert trunk["trained_steps"] == [[0, 62]] and trunk["tokens"] == 62 * 1024
    assert trunk["branch_steps"] == [31, 62]
    for run, branch, steps in (("xs/M2", 31, 39), ("xs/M4", 62, 78), ("s/M2", 49, 62)):
        run_dir = results / "runs" / "wiki_en" / run
        summary = json.loads((run_dir / "train.json").read_text())
        assert (summary["branch_step"], summary["steps"]) == (branch, steps)
        saved = sorted((run_dir / "checkpoints").glob("step*"))
        assert [path.name for path in saved] == [f"step{steps:06d}"]
    assert planned(config, workdir) == {}
    engine_only = copy.deepcopy(config)
    engine_only["train"].update(log_every=3, resume_every=7)
    assert planned(engine_only, workdir) == {}


@pytest.mark.slow
def test_a_new_multiplier_runs_one_new_run_which_grows_the_trunk(finished_wsd):
    """No trunk job, none of the size's finished runs: only the new run, whose job continues
    the trunk from its last kept state."""
    workdir, config = finished_wsd
    added = copy.deepcopy(config)
    added["grid"]["wiki_en"]["xs"] = [2, 4, 6]
    assert planned(added, workdir) == {"train": 1}
    results = workdir / "results" / "runs" / "wiki_en" / "xs"
    before = {run: (results / run / "train.json").stat().st_mtime_ns for run in ("M2", "M4")}
    snakemake("--cores", "2", *train_targets(added), config=added, workdir=workdir)
    log = (workdir / "results" / "logs" / "train" / "wiki_en" / "xs" / "M6.log").read_text()
    assert "wiki_en/xs/trunk: training from step 62 to step 93" in log
    states = workdir / "results" / "trunks" / "wiki_en" / "xs" / "states"
    assert trunk_state_steps(states) == [31, 62, 93]
    assert before == {run: (results / run / "train.json").stat().st_mtime_ns for run in before}
    assert planned(added, workdir) == {}


@pytest.mark.slow
def test_changing_a_size_reruns_its_trunk_and_runs_only(finished_wsd):
    workdir, config = finished_wsd
    changed = copy.deepcopy(config)
    changed["sizes"]["s"]["lr"] /= 2
    assert planned(changed, workdir) == {"trunk": 1, "train": 1}
    decayed = copy.deepcopy(config)
    decayed["train"]["decay"] = "linear"
    assert planned(decayed, workdir) == {"train": 3}
    shorter = copy.deepcopy(config)
    shorter["train"]["cooldown_fraction"] = 0.1
    assert planned(shorter, workdir) == {"train": 3}
