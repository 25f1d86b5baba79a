"""Cosine against warmup-stable-decay on one grid: final losses, fitted laws, targets, cost.

Reads two finished results directories of the same config, one run with
``train.schedule: cosine`` and one with ``wsd`` (README, "A cheaper ladder"), and prints side
by side: each run's final validation loss on every validation set (wsd minus cosine), the
fitted loss-law parameters of each form, every target's relative error, and what each
schedule spent: training tokens (the token-steps of every training job: runs, and under wsd
the trunks) and the training jobs' wall time (from ``benchmarks/``), plus the whole
``snakemake`` wall time when ``--wall`` gives it.

``--write-configs DIR`` writes the two configs the README's measurement ran: the embedded
default's sizes xs at M = 20, 80, 160 and s, m, l at M = 20, one checkpoint per run, no
downstream suite, each schedule in its own results directory:

    python benchmarks/wsd_equivalence.py --write-configs wsd-compare
    snakemake --cores all --configfile wsd-compare/cosine.yaml
    snakemake --cores all --configfile wsd-compare/wsd.yaml
    python benchmarks/wsd_equivalence.py --cosine results/wsd-compare/cosine \
        --wsd results/wsd-compare/wsd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = ("cosine", "wsd")


def final_losses(results: Path) -> pd.DataFrame:
    runs = pd.read_parquet(results / "runs.parquet")
    final = runs[runs["final"] & (runs["metric"] == "loss")]
    return final.set_index(["size", "M", "eval"])["value"]


def training_jobs(results: Path) -> pd.DataFrame:
    """One row per training job (runs, and trunks under wsd): tokens it trained and its wall
    seconds (Snakemake's benchmark; its sampled CPU time misses most of a short job's)."""
    rows = []
    for summary_path in sorted((results / "runs").glob("*/*/M*/train.json")):
        summary = json.loads(summary_path.read_text())
        tokens = summary["tokens"] - summary.get("branch_step", 0) * summary["tokens_per_step"]
        run = summary["run"]
        rows.append({"job": run, "tokens": tokens, **job_time(results, "train", run)})
    for summary_path in sorted((results / "trunks").glob("*/*/trunk.json")):
        summary = json.loads(summary_path.read_text())
        trunk = summary["trunk"]
        rows.append(
            {"job": f"{trunk}/trunk", "tokens": summary["trained_tokens"]}
            | job_time(results, "trunk", trunk)
        )
    return pd.DataFrame(rows)


def job_time(results: Path, rule: str, key: str) -> dict:
    benchmark = pd.read_csv(results / "benchmarks" / rule / f"{key}.tsv", sep="\t")
    return {"wall_s": float(benchmark["s"].iloc[-1])}


def write_configs(directory: Path) -> None:
    """The default config reduced to the compared grid, once per schedule."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["grid"] = {"docs_en": {"xs": [20, 80, 160], "s": [20], "m": [20], "l": [20]}}
    config["train"]["checkpoints"] = 1
    config["downstream"] = {"suite": "none"}
    directory.mkdir(parents=True, exist_ok=True)
    for schedule in SCHEDULES:
        config["train"]["schedule"] = schedule
        config["results_dir"] = f"results/{directory.name}/{schedule}"
        (directory / f"{schedule}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-configs", type=Path, help="write the two configs here and stop")
    parser.add_argument("--cosine", type=Path, help="results_dir of the cosine run")
    parser.add_argument("--wsd", type=Path, help="results_dir of the wsd run")
    parser.add_argument(
        "--wall", nargs=2, type=float, metavar=("COSINE_S", "WSD_S"), help="snakemake wall times"
    )
    args = parser.parse_args()
    if args.write_configs:
        write_configs(args.write_configs)
        return
    if not (args.cosine and args.wsd):
        parser.error("give --cosine and --wsd (or --write-configs)")
    pd.set_option("display.width", 160)

    losses = pd.DataFrame({"cosine": final_losses(args.cosine), "wsd": final_losses(args.wsd)})
    losses["wsd - cosine"] = losses["wsd"] - losses["cosine"]
    print("Final validation loss of each run\n")
    print(losses.unstack("eval").round(4).to_string())
    print(f"\nmean wsd - cosine over runs and sets: {losses['wsd - cosine'].mean():+.4f}")

    fits = {name: pd.read_parquet(getattr(args, name) / "fits.parquet") for name in SCHEDULES}
    table = pd.concat(
        {
            name: fit[fit["law"] == "loss"].set_index(["dataset", "eval", "form", "param"])["value"]
            for name, fit in fits.items()
        },
        axis=1,
    )
    print("\nFitted loss laws\n")
    print(table.to_string(float_format="{:.4g}".format))

    targets = {}
    for name in SCHEDULES:
        predictions = pd.read_parquet(getattr(args, name) / "predictions.parquet")
        measured = predictions[(predictions["role"] == "target") & predictions["actual"].notna()]
        targets[name] = measured.set_index(["size", "M", "quantity", "eval", "form"])[
            "relative_error"
        ]
    print("\nRelative error of each target's prediction\n")
    print(pd.concat(targets, axis=1).to_string(float_format="{:.2%}".format))

    print("\nTraining jobs\n")
    spent = {name: training_jobs(getattr(args, name)) for name in SCHEDULES}
    for name, jobs in spent.items():
        print(f"{name}:\n{jobs.to_string(index=False)}\n")
    summary = pd.DataFrame({name: jobs[["tokens", "wall_s"]].sum() for name, jobs in spent.items()})
    if args.wall:
        summary.loc["snakemake_wall_s"] = args.wall
    summary["wsd / cosine"] = summary["wsd"] / summary["cosine"]
    print(summary.to_string(float_format="{:,.3f}".format))


if __name__ == "__main__":
    main()
