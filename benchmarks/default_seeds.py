"""What anyone gets from the embedded default: run it under several seeds and thread counts, and
print the README's seed table.

Each run is the default exactly as a user runs it (``snakemake --cores C``), from a fresh
results folder, with only ``train.seed`` (and, for the perturbation, ``train.threads``)
changed in a copy of config.yaml. Training on a CPU is deterministic on one machine but rounds
differently on another, so a number worth printing is a median with its spread: the
thread-count run changes the order of floating-point reductions the way another CPU does.

    python benchmarks/default_seeds.py --out seeds --seeds 0 1 2 --threads 2

takes about 15 minutes a run on 2 cores. ``--summarize`` re-reads the folders of an earlier
call. ``--set sizes.xs.lr=0.012 ...`` runs a variant of the default (dotted config keys, YAML
values), so a recipe change is measured the same way as the default itself.

It prints, per run of the grid, the final in-distribution validation loss under each seed,
their spread (max - min, as % of the median), the thread-count run's distance from seed
0, and how far the training curve's last 20% rises above its lowest point (row by row, and
averaged over 5% of the run's tokens); per target, the relative error of each loss and
error-average prediction (median and range over seeds) and whether the 95% interval held the
actual; and each run's wall time with the job time per stage from ``results/benchmarks/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from workflow.forms import ERROR, LOSS
from workflow.ladder import OK

REPO = Path(__file__).resolve().parents[1]
# The share of a run's training steps whose curve is checked for rises (issue: "the last 20%").
TAIL = 0.2
# The share of a run's tokens the curve is averaged over before its rises are measured: a row
# (train.log_every steps, 40,960 tokens in the default) has about 1% of sampling noise.
SMOOTHING = 0.05


def with_overrides(config: dict, overrides: list[str]) -> dict:
    """``config`` with each ``dotted.key=value`` of ``overrides`` set (the value read as YAML);
    a key that is not in the config is an error, so a typo cannot run the default unchanged."""
    for override in overrides:
        key, sep, value = override.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not sep or not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"--set {override!r}: not KEY=VALUE with KEY in config.yaml")
        node[leaf] = yaml.safe_load(value)
    return config


def run_default(
    folder: Path, seed: int, threads: int | None, cores: int, overrides: list[str]
) -> float:
    """One run of the default into ``folder``; its wall time in seconds. The config is the
    default with ``overrides``, ``results_dir``, ``train.seed`` (and ``train.threads``)
    replaced, given with ``--configfile`` (which replaces config.yaml). A run whose fit stage
    fails (a variant's loss law may not converge) keeps its runs.parquet for the summary."""
    config = with_overrides(yaml.safe_load((REPO / "config.yaml").read_text()), overrides)
    config["results_dir"] = str(folder)
    config["train"]["seed"] = seed
    if threads is not None:
        config["train"]["threads"] = threads
    folder.mkdir(parents=True, exist_ok=True)
    configfile = folder.with_name(f"{folder.name}.yaml")
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    subprocess.run(
        [
            "snakemake",
            "--cores",
            str(cores),
            "--quiet",
            "--rerun-incomplete",
            "--keep-going",
            "--configfile",
            str(configfile),
        ],
        cwd=REPO,
    )
    wall = time.perf_counter() - started
    (folder / "wall_s.txt").write_text(f"{wall:.1f}\n")
    if not (folder / "runs.parquet").exists():
        raise SystemExit(f"{folder}: the run stopped before runs.parquet; see {folder}/logs")
    return wall


def tail_rise(curve: pd.DataFrame, window_share: float = 0.0) -> float:
    """How far the curve's last TAIL of steps rises above its lowest point so far, as a
    fraction of that point. Each row is the mean loss of ``log_every`` steps; with
    ``window_share`` > 0 the rows are first averaged (weighted by tokens) over windows holding
    that share of the run's tokens, so that a row's sampling noise is not counted as a rise."""
    weights = curve["tokens"].diff().fillna(curve["tokens"].iloc[0]).to_numpy()
    loss = curve["loss"].to_numpy()
    window = max(1, int(np.searchsorted(np.cumsum(weights[::-1]), window_share * weights.sum())))
    kernel = np.ones(window)
    smoothed = np.convolve(loss * weights, kernel, "valid") / np.convolve(weights, kernel, "valid")
    steps = curve["step"].to_numpy()[window - 1 :]
    last = smoothed[steps > (1 - TAIL) * steps.max()]
    lowest = np.minimum.accumulate(last)
    return float(np.max((last - lowest) / lowest))


def final_losses(folder: Path, eval_name: str) -> pd.DataFrame:
    runs = pd.read_parquet(folder / "runs.parquet")
    final = runs[runs["final"] & (runs["metric"] == LOSS) & (runs["eval"] == eval_name)]
    return final.set_index(["size", "M"])["value"]


def curve_rises(folder: Path, window_share: float) -> pd.Series:
    rises = {}
    for path in sorted((folder / "runs").glob("*/*/M*/curve.parquet")):
        size, multiplier = path.parent.parent.name, float(path.parent.name[1:])
        rises[(size, multiplier)] = tail_rise(pd.read_parquet(path), window_share)
    return pd.Series(rises)


def stage_times(folder: Path) -> pd.Series:
    """Job seconds per stage (the first folder under benchmarks/, or the file's name)."""
    seconds: dict[str, float] = {}
    for path in (folder / "benchmarks").rglob("*.tsv"):
        stage = path.relative_to(folder / "benchmarks").parts[0].removesuffix(".tsv")
        seconds[stage] = seconds.get(stage, 0.0) + float(pd.read_csv(path, sep="\t")["s"].iloc[0])
    return pd.Series(seconds).sort_values(ascending=False)


def summarize(folders: dict[str, Path], eval_name: str) -> str:
    seeds = {name: folder for name, folder in folders.items() if name.startswith("seed")}
    losses = pd.DataFrame({name: final_losses(path, eval_name) for name, path in folders.items()})
    seed_losses = losses[list(seeds)]
    table = seed_losses.round(4)
    spread = seed_losses.max(axis=1) - seed_losses.min(axis=1)
    table["spread %"] = 100 * spread / seed_losses.median(axis=1)
    for name in folders:
        if name.startswith("threads"):
            table[f"{name} vs seed-0 %"] = (
                100 * (losses[name] - losses["seed-0"]).abs() / losses["seed-0"]
            )
    for label, share in (("per row", 0.0), (f"over {SMOOTHING:.0%} of tokens", SMOOTHING)):
        rises = pd.DataFrame({name: curve_rises(path, share) for name, path in folders.items()})
        table[f"tail rise % ({label})"] = 100 * rises.max(axis=1)
    lines = [f"## Final {eval_name} loss per run", "", table.round(3).to_markdown(), ""]

    fitted = {name: folder for name, folder in seeds.items() if has_fits(folder)}
    for name in sorted(seeds.keys() - fitted.keys()):
        lines += [f"{name}: no predictions, its fit stage failed ({seeds[name]}/logs/fit.log)", ""]
    if fitted:
        lines += target_errors(fitted)

    walls = {name: float((folder / "wall_s.txt").read_text()) for name, folder in folders.items()}
    stages = pd.DataFrame({name: stage_times(folder) for name, folder in folders.items()})
    stages.loc["wall (snakemake)"] = pd.Series(walls)
    lines += ["## Seconds: wall time and job time per stage", "", stages.round(0).to_markdown()]
    return "\n".join(lines)


def target_errors(fitted: dict[str, Path]) -> list[str]:
    """Lines of the targets' relative errors over the seeds in ``fitted`` and of their fits
    that are not ok."""
    predictions = []
    for name, folder in fitted.items():
        frame = pd.read_parquet(folder / "predictions.parquet")
        targets = frame[(frame["role"] == "target") & frame["quantity"].isin([LOSS, ERROR])]
        predictions.append(targets.assign(seed=name))
    targets = pd.concat(predictions)
    targets = targets[targets["predicted"].notna()]  # a failed fit predicts nothing
    grouped = targets.groupby(["form", "quantity", "eval", "size", "M"])
    errors = grouped["relative_error"].agg(["median", "min", "max"]) * 100
    errors["inside"] = grouped["inside"].agg(lambda inside: f"{int(inside.sum())}/{len(inside)}")
    errors["seeds"] = grouped["seed"].agg(", ".join)
    errors["C / largest fit C"] = grouped["C"].first() / fit_compute(targets, fitted)
    return [
        "## Targets: relative error % over seeds", "", errors.round(2).to_markdown(), "",
        "## Loss and error fits not ok (their predictions stand on a flagged fit)", "",
        flagged_fits(fitted).to_markdown(), "",
    ]  # fmt: skip


def has_fits(folder: Path) -> bool:
    """Whether the fit stage finished in ``folder``."""
    return (folder / "predictions.parquet").exists() and (folder / "fits.parquet").exists()


def flagged_fits(seeds: dict[str, Path]) -> pd.DataFrame:
    """Per (form, law, eval), the seeds whose loss or error fit is not ``ok``, with its status."""
    flagged = []
    for name, folder in seeds.items():
        fits = pd.read_parquet(folder / "fits.parquet")
        fits = fits[fits["law"].isin([LOSS, ERROR]) & (fits["status"] != OK)]
        flagged.append(fits.drop_duplicates(["form", "law", "eval"]).assign(seed=name))
    frame = pd.concat(flagged)
    if frame.empty:
        return pd.DataFrame({"status": ["every fit ok"]})
    label = frame["seed"] + " (" + frame["status"] + ")"
    return frame.assign(seeds=label).groupby(["form", "law", "eval"])[["seeds"]].agg(", ".join)


def fit_compute(targets: pd.DataFrame, seeds: dict[str, Path]) -> float:
    """The largest compute among the loss law's fit points (the same in every seed)."""
    frame = pd.read_parquet(next(iter(seeds.values())) / "predictions.parquet")
    return float(frame[(frame["role"] == "fit") & (frame["quantity"] == LOSS)]["C"].max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs' results")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument(
        "--threads", type=int, nargs="*", default=[2], help="thread counts to run seed 0 under"
    )
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--eval", default="docs_en", help="the in-distribution validation set")
    parser.add_argument("--summarize", action="store_true", help="only re-read the folders")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config changes for a variant of the default, e.g. sizes.xs.lr=0.012",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    folders = {f"seed-{seed}": out / f"seed-{seed}" for seed in args.seeds}
    folders |= {f"threads-{count}": out / f"threads-{count}" for count in args.threads}
    if not args.summarize:
        for name, folder in folders.items():
            seed = int(name.split("-")[1]) if name.startswith("seed") else 0
            threads = int(name.split("-")[1]) if name.startswith("threads") else None
            wall = run_default(folder, seed, threads, args.cores, args.set)
            print(f"{name}: {wall:.0f} s", file=sys.stderr, flush=True)
    print(summarize(folders, args.eval))


if __name__ == "__main__":
    main()
