"""Training throughput and MFU of the pipeline's training step for a list of model shapes.

Each shape is trained as a pipeline run of the project's config would be: the config
(``config.yaml``, the preset's, or ``--config``) is validated, which fills in the schema's
defaults, one of its sizes (``--size``, or its first) gets the benchmarked shape, and
``workflow.settings`` builds the run's ``RunSpec`` and ``EngineSettings`` from it. The
trainer is ``workflow.step.build_trainer``'s and the timed step ``workflow.step.train_step``
(fused output loss, AdamW, clipping, bf16 autocast on CUDA, and the engine's options), on
random token ids, so the numbers are what a pipeline run gets minus data loading. FLOPs per
token are ``workflow.device.flops_per_token``: ``6 N + 12 L d T`` (N = every parameter, as
the paper counts it; the second term is attention's score and value products), and MFU is
the achieved rate over the peak (``--peak-tflops``, the config's ``train.peak_tflops``, or
the GPU's known by its name; none on CPU unless given). On CUDA it also prints each shape's
peak GPU memory (``torch.cuda.max_memory_allocated``).

    python benchmarks/train_throughput.py --shapes cpu --device cpu --threads 1
    python benchmarks/train_throughput.py --shapes paper --device cuda --compile
    python benchmarks/train_throughput.py --shapes d64/L2/H2,d128/L4/H4 --vocab 2048
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import yaml

from workflow.config import validate_config
from workflow.device import flops_per_token, peak_tflops, resolve_device
from workflow.distributed import SINGLE_PROCESS
from workflow.runs import make_run
from workflow.settings import EngineSettings, RunSpec, engine_settings, run_spec
from workflow.step import Batch, build_trainer, train_step

REPO = Path(__file__).resolve().parents[1]
# name -> (d_model, n_layers, n_heads), and the config whose vocabulary, context, SwiGLU
# rounding and hyperparameters they are measured with (unless --config names another).
PRESETS = {
    "paper": {
        "config": "presets/paper.yaml",
        "shapes": {
            "0.011B": (96, 8, 4),
            "0.079B": (512, 8, 4),
            "0.154B": (576, 24, 8),
            "0.411B": (1024, 24, 8),
            "1.4B": (2048, 24, 16),
        },
    },
    "cpu": {
        "config": "config.yaml",
        "shapes": {
            "d32/L2/H2": (32, 2, 2),
            "d64/L2/H2": (64, 2, 2),
            "d96/L3/H3": (96, 3, 3),
            "d128/L4/H4": (128, 4, 4),
        },
    },
}


def parse_shapes(text: str) -> dict[str, tuple[int, int, int]]:
    """A preset name, or comma-separated ``d{d_model}/L{n_layers}/H{n_heads}`` shapes."""
    if text in PRESETS:
        return PRESETS[text]["shapes"]
    shapes = {}
    for item in text.split(","):
        d_model, n_layers, n_heads = (int(part[1:]) for part in item.split("/"))
        shapes[item] = (d_model, n_layers, n_heads)
    return shapes


def benchmark_config(args: argparse.Namespace) -> tuple[dict, str]:
    """The validated config with the command line's overrides, and the size to reshape."""
    path = args.config or REPO / PRESETS.get(args.shapes, PRESETS["cpu"])["config"]
    config = validate_config(yaml.safe_load(Path(path).read_text()))
    size = args.size or next(iter(config["sizes"]))
    template = config["sizes"][size]
    overrides = {
        "context_length": args.context,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "activation_checkpointing": args.activation_checkpointing or None,
    }
    template.update({key: value for key, value in overrides.items() if value is not None})
    if args.vocab:
        config["tokenizer"]["vocab_size"] = args.vocab
    if args.ffn_multiple_of:
        config["model"]["ffn_multiple_of"] = args.ffn_multiple_of
    if args.device:
        config["train"]["device"] = args.device
    if args.compile:
        config["train"]["compile"] = True
    if args.peak_tflops:
        config["train"]["peak_tflops"] = args.peak_tflops
    return config, size


def shape_settings(
    config: dict, size: str, name: str, d_model: int, n_layers: int, n_heads: int
) -> tuple[RunSpec, EngineSettings]:
    """A run's settings as the pipeline builds them, of ``size`` with the benchmarked shape."""
    config = copy.deepcopy(config)
    shape = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads}
    config["sizes"][name] = {**config["sizes"][size], **shape}
    dataset = next(iter(config["grid"]))
    run = make_run(config, dataset, name, multiplier=1, trained=False)
    return run_spec(config, run), engine_settings(config, run)


def measure(
    spec: RunSpec, engine: EngineSettings, device: torch.device, steps: int, warmup_steps: int
) -> dict:
    """Median tokens/s over ``steps`` timed optimizer steps after ``warmup_steps`` untimed ones.

    Each step waits for the device (``.item()``) so that it is timed whole; the pipeline's
    loop does not.
    """
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = build_trainer(spec, engine, device, SINGLE_PROCESS)
    trainer.objective.train()
    context = spec.shape["context_length"]
    ids = torch.randint(0, spec.shape["vocab_size"], (spec.batch_size, context + 1), device=device)
    batch = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), spec.tokens_per_step)
    seconds = []
    for index in range(warmup_steps + steps):
        started = time.perf_counter()
        train_step(trainer.objective, trainer.optimizer, batch, spec.lr, trainer.settings).item()
        if index >= warmup_steps:
            seconds.append(time.perf_counter() - started)
    tokens_per_second = spec.tokens_per_step / statistics.median(seconds)
    return {
        "n_params": spec.n_params,
        "tokens_per_s": tokens_per_second,
        "tflops": flops_per_token(spec.shape, spec.n_params) * tokens_per_second / 1e12,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="cpu", help="'paper', 'cpu' or d64/L2/H2,...")
    parser.add_argument(
        "--config", help="config file (default: the preset's, else the project's config.yaml)"
    )
    parser.add_argument("--size", help="the config's size to reshape (default: its first)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: config's")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="peak for MFU (default: the config's train.peak_tflops, else on CUDA the GPU's "
        "dense bf16 peak known by its name; none on CPU)",
    )
    parser.add_argument("--vocab", type=int, help="vocabulary (default: the config's)")
    parser.add_argument("--context", type=int, help="sequence length (default: the size's)")
    parser.add_argument("--ffn-multiple-of", type=int, help="SwiGLU rounding (the config's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (the size's)")
    parser.add_argument("--micro-batch-size", type=int, help="per forward pass (the size's)")
    parser.add_argument("--threads", type=int, help="CPU threads (the config's train.threads)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute in the backward pass"
    )
    args = parser.parse_args(argv)

    config, size = benchmark_config(args)
    shapes = parse_shapes(args.shapes)
    settings = {name: shape_settings(config, size, name, *shape) for name, shape in shapes.items()}
    first_spec, first_engine = next(iter(settings.values()))
    device = resolve_device(first_spec.device)
    peak = peak_tflops(device, first_engine.peak_tflops)
    threads = args.threads or config["train"]["threads"]
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    context = first_spec.shape["context_length"]
    options = {
        "compile": first_engine.compile,
        "activation_checkpointing": first_engine.activation_checkpointing,
    }
    print(
        f"device {device} threads {threads} vocab {first_spec.shape['vocab_size']} "
        f"context {context} batch {first_spec.batch_size} x {context} tokens, "
        f"peak {peak} TFLOP/s, {options} (size {size} of the config)"
    )
    memory_header = f" {'peak GiB':>9}" if device.type == "cuda" else ""
    print(f"{'shape':>12} {'params':>13} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7}{memory_header}")
    for name, (spec, engine) in settings.items():
        result = measure(spec, engine, device, args.steps, args.warmup_steps)
        mfu = f"{result['tflops'] / peak:>7.1%}" if peak else f"{'-':>7}"
        memory = result["peak_memory_gib"]
        print(
            f"{name:>12} {result['n_params']:>13,} {result['tokens_per_s']:>11,.0f} "
            f"{result['tflops']:>9.4f} {mfu}" + (f" {memory:>9.2f}" if memory is not None else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
