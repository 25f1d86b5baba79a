"""Cluster resources derived from a run: exact arithmetic, growth with size, retries, and the
profile that sends them to Slurm."""

from __future__ import annotations

import copy
import math
import re
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, load_config, snakemake

from workflow.config import ConfigError, validate_config
from workflow.resources import (
    BASE_MEMORY_MB,
    RESOURCE_NAMES,
    cost_table,
    downstream_resources,
    evaluate_resources,
    gpu_hours,
    job_gpus,
    job_tokens,
    launch_command,
    rule_resources,
    train_resources,
    training_priority,
    trunk_resources,
)
from workflow.runs import find_run, find_trunk, trained_runs, trunks

GPU_RULES = ("train", "evaluate_loss", "evaluate_downstream")


def validated(config: dict) -> dict:
    return validate_config(copy.deepcopy(config))


@pytest.fixture
def config(tiny_config) -> dict:
    return validated(tiny_config)


def test_every_job_gets_whole_numbers_for_every_resource(config):
    for run in trained_runs(config):
        for derive in (train_resources, evaluate_resources, downstream_resources):
            resources = derive(config, run)
            assert tuple(resources) == RESOURCE_NAMES
            assert all(isinstance(value, int) for value in resources.values())
            assert resources["runtime"] >= config["cluster"]["runtime_overhead"]
            assert resources["mem_mb"] >= BASE_MEMORY_MB and resources["mem_mb"] % 1024 == 0
            assert resources["gpu"] == 1


def test_runtime_is_the_token_budget_over_the_measured_throughput(tiny_config):
    tiny_config["cluster"] = {
        "tokens_per_second": {"xs": 1000},
        "runtime_margin": 1.5,
        "runtime_overhead": 7,
    }
    config = validated(tiny_config)
    run = find_run(config, "wiki_en", "xs", 20)
    assert train_resources(config, run)["runtime"] == 7 + math.ceil(run.tokens * 1.5 / 60_000)
    evaluated = config["validation"]["max_tokens"] * len(config["validation"]["sets"])
    expected = 7 + math.ceil(evaluated * 1.5 / (3 * 60_000))
    assert evaluate_resources(config, run)["runtime"] == expected
    downstream = config["downstream"]
    tokens = len(downstream["tasks"]) * downstream["examples"] * 8 * 64  # context 64
    expected = 7 + math.ceil(tokens * 1.5 / (3 * 60_000))
    assert downstream_resources(config, run)["runtime"] == expected


def test_without_a_measurement_runtime_follows_compute_6nd(tiny_config):
    tiny_config["cluster"] = {"flops_per_gpu": 1.0e6, "runtime_margin": 1, "runtime_overhead": 0}
    config = validated(tiny_config)
    for run in trained_runs(config):
        assert train_resources(config, run)["runtime"] == math.ceil(run.compute / 6e7)
    by_compute = sorted(trained_runs(config), key=lambda run: run.compute)
    runtimes = [train_resources(config, run)["runtime"] for run in by_compute]
    assert runtimes == sorted(runtimes) and runtimes[0] < runtimes[-1]


def test_memory_grows_with_the_parameter_count(tiny_config):
    tiny_config["sizes"]["big"] = {
        **tiny_config["sizes"]["l"],
        "d_model": 1024,
        "n_layers": 12,
        "n_heads": 16,
    }
    tiny_config["grid"]["wiki_en"]["big"] = [20]
    config = validated(tiny_config)
    small, big = find_run(config, "wiki_en", "xs", 20), find_run(config, "wiki_en", "big", 20)
    for derive in (train_resources, evaluate_resources):
        assert derive(config, big)["mem_mb"] > derive(config, small)["mem_mb"]
    # training holds optimizer state on top of the weights evaluation loads
    assert train_resources(config, big)["mem_mb"] > evaluate_resources(config, big)["mem_mb"]
    assert train_resources(config, big)["mem_mb"] >= BASE_MEMORY_MB + 16 * big.n_params / 2**20


def test_a_retry_asks_for_attempt_times_the_time_and_memory(config):
    run = find_run(config, "wiki_en", "m", 20)
    first, third = train_resources(config, run, 1), train_resources(config, run, 3)
    assert third["runtime"] == 3 * first["runtime"] and third["mem_mb"] == 3 * first["mem_mb"]
    assert third["gpu"] == first["gpu"]


def test_training_on_cpu_asks_for_no_gpu(tiny_config):
    tiny_config["train"]["device"] = "cpu"
    config = validated(tiny_config)
    run = find_run(config, "wiki_en", "s", 20)
    assert train_resources(config, run)["gpu"] == 0
    assert evaluate_resources(config, run)["gpu"] == 0
    assert downstream_resources(config, run)["gpu"] == 0


def test_rule_resources_are_callables_of_the_jobs_wildcards_and_attempt(config):
    def run_of(wildcards):
        return find_run(config, wildcards.dataset, wildcards.size, wildcards.multiplier)

    callables = rule_resources(train_resources, config, run_of)
    assert tuple(callables) == RESOURCE_NAMES
    run = find_run(config, "wiki_en", "l", 20)
    wildcards = SimpleNamespace(**run.wildcards)
    for attempt in (1, 2):
        expected = train_resources(config, run, attempt)
        assert {name: fn(wildcards, attempt) for name, fn in callables.items()} == expected


def test_a_wrong_cluster_setting_names_its_key(tiny_config):
    tiny_config["cluster"] = {"tokens_per_second": {"xs": "fast"}}
    with pytest.raises(ConfigError, match=r"cluster\.tokens_per_second\.xs"):
        validated(tiny_config)
    tiny_config["cluster"] = {"flops_per_second": 1.0e14}
    with pytest.raises(ConfigError, match="flops_per_gpu"):
        validated(tiny_config)


def test_the_profile_comments_every_key_and_routes_real_rules_to_the_gpu_partition():
    text = (REPO / "slurm" / "config.yaml").read_text()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.match(r"\s*[\w-]+:", line):
            assert "#" in line or lines[index - 1].lstrip().startswith("#"), line
    profile = yaml.safe_load(text)
    assert profile["executor"] == "slurm"
    rules = "\n".join(path.read_text() for path in (REPO / "rules").glob("*.smk"))
    assert set(profile["set-resources"]) <= set(re.findall(r"^\s*rule (\w+):", rules, re.M))
    gpu_partitions = {profile["set-resources"][rule]["slurm_partition"] for rule in GPU_RULES}
    assert len(gpu_partitions) == 1
    assert gpu_partitions != {profile["default-resources"]["slurm_partition"]}


def test_the_defaults_reach_a_config_without_a_cluster_section():
    config = validated(load_config("tests/configs/tiny.yaml"))
    assert set(config["cluster"]) == {
        "flops_per_gpu",
        "tokens_per_second",
        "gpus",
        "runtime_margin",
        "runtime_overhead",
    }


def test_the_cost_table_sums_every_runs_compute_over_the_gpu_rate(tiny_config):
    config = validated(tiny_config)
    runs = trained_runs(config)
    table = cost_table(config).set_index("size")
    flops_per_hour = config["cluster"]["flops_per_gpu"] * 3600
    assert table.loc["total", "runs"] == len(runs)
    assert table.loc["total", "gpu_hours_cosine"] == pytest.approx(
        sum(run.compute for run in runs) / flops_per_hour
    )
    for run in runs:
        assert gpu_hours(config, run) == pytest.approx(run.compute / flops_per_hour)


def test_a_size_trained_on_several_gpus_divides_its_runtime_but_evaluates_on_one(tiny_config):
    tiny_config["cluster"] = {"flops_per_gpu": 1.0e6, "runtime_margin": 1, "runtime_overhead": 0}
    one = validated(tiny_config)
    tiny_config["cluster"]["gpus"] = {"l": 4}
    four = validated(tiny_config)
    run = find_run(four, "wiki_en", "l", 20)
    assert train_resources(four, run)["gpu"] == 4
    assert evaluate_resources(four, run)["gpu"] == 1
    single, parallel = train_resources(one, run)["runtime"], train_resources(four, run)["runtime"]
    assert parallel == math.ceil(run.compute / 1.0e6 / 4 / 60)
    assert single == math.ceil(run.compute / 1.0e6 / 60)
    assert gpu_hours(four, run) == pytest.approx(gpu_hours(one, run))


def test_launch_command_starts_one_process_per_gpu():
    assert launch_command(0) == "python"
    assert launch_command(1) == "python"
    assert launch_command(4) == "torchrun --standalone --nproc_per_node 4"


@pytest.mark.parametrize(
    ("resources", "gpus"),
    [
        ({"gpu": 2}, 2),
        ({"gpu": 0}, 0),
        ({"gpu": 0, "gres": "gpu:4"}, 4),
        ({"gpu": 0, "gres": "gpu:a100:2"}, 2),
        ({"gpu": 0, "gres": "gpu:a100"}, 1),
        ({"gpu": 0, "gres": "tmpdisk:100,gpu:3"}, 3),
        ({"gres": "tmpdisk:100"}, 0),
    ],
)
def test_a_job_launches_one_process_per_gpu_however_the_profile_asks_for_them(resources, gpus):
    assert job_gpus(resources) == gpus


def test_under_wsd_a_run_asks_for_its_cooldown_and_a_trunk_for_its_furthest_branch(tiny_config):
    tiny_config["cluster"] = {"flops_per_gpu": 1.0e6, "runtime_margin": 1, "runtime_overhead": 0}
    tiny_config["train"]["schedule"] = "wsd"
    config = validated(tiny_config)
    for run in trained_runs(config):
        seconds_per_token = 6 * run.n_params / 1.0e6
        cooldown = run.tokens - run.branch_step * run.tokens_per_step
        assert 0.15 < cooldown / run.tokens < 0.25
        expected = math.ceil(cooldown * seconds_per_token / 60)
        assert (
            train_resources(config, run, kept_trunk_steps=[run.branch_step])["runtime"] == expected
        )
    trunk = find_trunk(config, "wiki_en", "xs")
    assert trunk.branch_steps == (77, 309, 1235)
    expected = math.ceil(1235 * trunk.tokens_per_step * 6 * trunk.n_params / 1.0e6 / 60)
    assert trunk_resources(config, trunk)["runtime"] == expected
    assert trunk_resources(config, trunk, 2)["mem_mb"] == 2 * train_resources(config, run)["mem_mb"]
    callables = rule_resources(trunk_resources, config, lambda w: find_trunk(config, **vars(w)))
    wildcards = SimpleNamespace(**trunk.wildcards)
    assert {name: fn(wildcards, 1) for name, fn in callables.items()} == trunk_resources(
        config, trunk
    )


def test_a_run_added_after_its_trunk_asks_for_the_trunk_it_grows(tiny_config):
    """Its job grows the trunk from the furthest kept state before its branch point."""
    tiny_config["train"]["schedule"] = "wsd"
    config = validated(tiny_config)
    run = find_run(config, "wiki_en", "xs", 80)
    tokens_per_step = run.tokens_per_step
    cooldown = run.tokens - run.branch_step * tokens_per_step
    assert job_tokens(run, [77, 309, 1235]) == cooldown
    assert job_tokens(run, [77, 309]) == cooldown + (1235 - 309) * tokens_per_step
    assert job_tokens(run, []) == run.tokens
    cosine = find_run(validated(load_config("tests/configs/tiny.yaml")), "wiki_en", "xs", 80)
    assert job_tokens(cosine, [77]) == cosine.tokens


def test_the_cost_table_prices_both_schedules(default_config):
    """The default's xs at M = 20, 80 and 160 trains 0.8 x 160 + 0.2 x (20 + 80 + 160) = 180
    units of N tokens under wsd instead of 260; a size with one multiplier costs the same."""
    default_config["cluster"] = {"flops_per_gpu": 1.0e12}
    config = validated(default_config)
    table = cost_table(config).set_index("size")
    xs = table.loc["xs"]
    assert xs["tokens_cosine"] == sum(run.tokens for run in trained_runs(config)[:3])
    assert xs["tokens_wsd"] / xs["N"] == pytest.approx(180, abs=0.2)
    assert xs["tokens_cosine"] / xs["N"] == pytest.approx(260, abs=0.01)
    assert xs["gpu_hours_wsd"] / xs["gpu_hours_cosine"] == pytest.approx(180 / 260, rel=1e-3)
    assert table.loc["s", "tokens_wsd"] == table.loc["s", "tokens_cosine"]
    total = table.loc["total"]
    default_config["train"]["schedule"] = "wsd"
    wsd = validated(default_config)
    cooldowns = sum(run.tokens - run.branch_step * run.tokens_per_step for run in trained_runs(wsd))
    assert total["tokens_wsd"] == sum(trunk.tokens for trunk in trunks(wsd)) + cooldowns
    assert total["tokens_cosine"] == sum(run.tokens for run in trained_runs(config))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_snakemake_starts_the_longest_training_job_first(default_config, tmp_path, schedule):
    """Every train (and trunk) job of the planned DAG carries its compute's priority, so the
    default's largest run no longer starts last and trains alone."""
    default_config["train"]["schedule"] = schedule
    config = validated(default_config)
    planned = snakemake("-n", config=default_config, workdir=tmp_path).stdout
    priorities = {}
    for block in planned.split("\nrule ")[1:]:
        rule = block.split(":")[0]
        if rule not in ("train", "trunk"):
            assert "priority:" not in block, block
            continue
        wildcards = dict(
            re.findall(r"(\w+)=([^,\s]+)", block.split("wildcards: ")[1].split("\n")[0])
        )
        job = (
            find_trunk(config, wildcards["dataset"], wildcards["size"])
            if rule == "trunk"
            else find_run(config, wildcards["dataset"], wildcards["size"], wildcards["multiplier"])
        )
        priorities[(rule, job.key)] = float(re.search(r"priority: (\S+)", block).group(1))
        assert priorities[(rule, job.key)] == pytest.approx(training_priority(job))
    runs = trained_runs(config)
    assert len(priorities) == len(runs) + (len(trunks(config)) if schedule == "wsd" else 0)
    largest = max(runs, key=lambda run: run.compute)
    first = max(priorities, key=priorities.get)
    assert first == (("trunk", largest.trunk_key) if schedule == "wsd" else ("train", largest.key))
