"""Training throughput and MFU of ``workflow.train.train_step`` for a list of model shapes.

Builds the trainer with ``workflow.train.build_trainer`` and times ``workflow.train.train_step``
(fused output loss, AdamW, clipping, bf16 autocast on CUDA, and the spec's options:
``--compile``, ``--activation-checkpointing``) on random token ids, so the numbers are what a
pipeline run gets minus data loading. FLOPs per token are ``workflow.train.flops_per_token``:
``6 N + 12 L d T`` (N = every parameter, as the paper counts it; the second term is
attention's score and value products), and MFU is the achieved rate over ``--peak-tflops``.
On CUDA it also prints each shape's peak GPU memory (``torch.cuda.max_memory_allocated``).

    python benchmarks/train_throughput.py --shapes cpu --device cpu --threads 2
    python benchmarks/train_throughput.py --shapes paper --device cuda --compile
    python benchmarks/train_throughput.py --shapes d64/L2/H2,d128/L4/H4 --vocab 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workflow.distributed import SINGLE_PROCESS
from workflow.runs import count_parameters, ffn_hidden_size
from workflow.train import (
    ENGINE_DEFAULTS,
    Batch,
    build_trainer,
    flops_per_token,
    peak_tflops,
    resolve_device,
    train_step,
)

# name -> (d_model, n_layers, n_heads); the paper's sizes use vocab 50432 and context 2048.
PRESETS = {
    "paper": {
        "0.011B": (96, 8, 4),
        "0.079B": (512, 8, 4),
        "0.154B": (576, 24, 8),
        "0.411B": (1024, 24, 8),
        "1.4B": (2048, 24, 16),
    },
    "cpu": {
        "d32/L2/H2": (32, 2, 2),
        "d64/L2/H2": (64, 2, 2),
        "d96/L3/H3": (96, 3, 3),
        "d128/L4/H4": (128, 4, 4),
    },
}
# MFU denominator on CPU: a 2-thread fp32 matmul on the project's 2-core machine.
CPU_PEAK_TFLOPS = 0.14
PRESET_DATA = {
    "paper": {"vocab": 50432, "context": 2048, "ffn_multiple_of": 256},
    "cpu": {"vocab": 1024, "context": 128, "ffn_multiple_of": 16},
}


def parse_shapes(text: str) -> dict[str, tuple[int, int, int]]:
    """A preset name, or comma-separated ``d{d_model}/L{n_layers}/H{n_heads}`` shapes."""
    if text in PRESETS:
        return PRESETS[text]
    shapes = {}
    for item in text.split(","):
        d_model, n_layers, n_heads = (int(part[1:]) for part in item.split("/"))
        shapes[item] = (d_model, n_layers, n_heads)
    return shapes


def measure(
    d_model: int,
    n_layers: int,
    n_heads: int,
    vocab: int,
    context: int,
    batch_size: int,
    micro_batch_size: int | None,
    ffn_multiple_of: int,
    device: torch.device,
    steps: int,
    warmup_steps: int,
    options: dict,
) -> dict:
    """Median tokens/s over ``steps`` timed optimizer steps after ``warmup_steps`` untimed ones.

    ``options`` are spec keys that change the step's speed (``compile``,
    ``activation_checkpointing``). Each step waits for the device (``.item()``) so that it
    is timed whole; the pipeline's loop does not.
    """
    ffn_hidden = ffn_hidden_size(d_model, ffn_multiple_of)
    shape = {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "ffn_hidden": ffn_hidden,
        "vocab_size": vocab,
        "context_length": context,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
    }
    n_params = count_parameters(d_model, n_layers, vocab, ffn_hidden)
    spec = {
        "run": f"benchmark d{d_model}/L{n_layers}/H{n_heads}",
        "shape": shape,
        "n_params": n_params,
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "lr": 1e-3,
        "beta1": 0.9,
        "beta2": 0.95,
        "weight_decay": 0.033,
        "z_loss": 1e-4,
        "grad_clip": 1.0,
        **ENGINE_DEFAULTS,
        **options,
    }
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = build_trainer(spec, device, SINGLE_PROCESS)
    trainer.objective.train()
    tokens_per_step = batch_size * context
    ids = torch.randint(0, vocab, (batch_size, context + 1), device=device)
    batch = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), tokens_per_step)
    seconds = []
    for index in range(warmup_steps + steps):
        started = time.perf_counter()
        train_step(trainer.objective, trainer.optimizer, batch, 1e-3, trainer.settings).item()
        if index >= warmup_steps:
            seconds.append(time.perf_counter() - started)
    tokens_per_second = tokens_per_step / statistics.median(seconds)
    return {
        "n_params": n_params,
        "tokens_per_s": tokens_per_second,
        "tflops": flops_per_token(shape, n_params) * tokens_per_second / 1e12,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="cpu", help="'paper', 'cpu' or d64/L2/H2,...")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="peak for MFU; default on CUDA the GPU's dense bf16 peak known by its name (989 "
        "for an H100 SXM), on CPU 0.14 (a 2-thread fp32 matmul on the project's 2-core machine)",
    )
    parser.add_argument("--vocab", type=int, help="vocabulary (default: the preset's)")
    parser.add_argument("--context", type=int, help="sequence length (default: the preset's)")
    parser.add_argument("--ffn-multiple-of", type=int, help="SwiGLU rounding (preset's)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward pass")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute in the backward pass"
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    peak = peak_tflops(device, args.peak_tflops) or CPU_PEAK_TFLOPS
    if device.type == "cuda" and peak == CPU_PEAK_TFLOPS:
        parser.error(f"no known peak for {torch.cuda.get_device_name(device)}: give --peak-tflops")
    options = {"compile": args.compile, "activation_checkpointing": args.activation_checkpointing}
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = PRESET_DATA.get(args.shapes, PRESET_DATA["cpu"])
    vocab = args.vocab or data["vocab"]
    context = args.context or data["context"]
    print(
        f"device {device} threads {args.threads} vocab {vocab} context {context} "
        f"batch {args.batch_size} x {context} tokens, peak {peak} TFLOP/s, {options}"
    )
    memory_header = f" {'peak GiB':>9}" if device.type == "cuda" else ""
    print(f"{'shape':>12} {'params':>13} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7}{memory_header}")
    for name, (d_model, n_layers, n_heads) in parse_shapes(args.shapes).items():
        result = measure(
            d_model,
            n_layers,
            n_heads,
            vocab,
            context,
            args.batch_size,
            args.micro_batch_size,
            args.ffn_multiple_of or data["ffn_multiple_of"],
            device,
            args.steps,
            args.warmup_steps,
            options,
        )
        memory = result["peak_memory_gib"]
        print(
            f"{name:>12} {result['n_params']:>13,} {result['tokens_per_s']:>11,.0f} "
            f"{result['tflops']:>9.4f} {result['tflops'] / peak:>7.1%}"
            + (f" {memory:>9.2f}" if memory is not None else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
