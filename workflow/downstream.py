"""Evaluate stage, downstream: one checkpoint on a task suite through EleutherAI's lm-eval.

The checkpoint is loaded here, once (``import workflow.model`` registers ScalingLM with
``AutoModelForCausalLM``; ``workflow.device`` resolves the device, as for the trainer), and
handed to lm-eval's ``HFLM`` as a model object, which every shot count reuses:
``simple_evaluate`` runs the suite's tasks, batched, once per shot count. Two files are
written: lm-eval's own results (keyed by shot count) and a small summary, whose per-task
accuracies and average top-1 error (each with a normal 95% interval from lm-eval's standard
error) the aggregate stage turns into rows of runs.parquet.

The rule sets HF_DATASETS_OFFLINE and HF_HUB_OFFLINE: the offline suite's data is local, and
the paper suite's datasets were fetched into HF_HOME when the suite was built.

``python -m workflow.downstream --checkpoint DIR --suite DIR --run JSON --summary OUT
--results OUT --batch-size N --device D --threads N``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from workflow.atomic import atomic_path, write_json
from workflow.errors import TrainError
from workflow.integrity import DamagedOutputError, check_checkpoint
from workflow.intervals import Z_95
from workflow.suite import SuiteError, TaskSpec, read_manifest


def normal_interval(value: float, stderr: float | None) -> tuple[float | None, float | None]:
    """The normal 95% interval of an accuracy or error, clipped to [0, 1]; None without a
    standard error."""
    if stderr is None:
        return None, None
    return max(0.0, value - Z_95 * stderr), min(1.0, value + Z_95 * stderr)


def summarize(
    suite: str, task_specs: Sequence[TaskSpec], results_by_shots: dict[int, dict]
) -> dict:
    """Per-task accuracy (its task spec's metric) and the suite's average top-1 error.

    The average is the plain mean of 1 - accuracy over the tasks, as the paper's; its standard
    error combines the tasks' (independent) standard errors.
    """
    tasks = {}
    for task_spec in task_specs:
        results = results_by_shots[task_spec.shots]
        metrics = results["results"][task_spec.lm_eval_task]
        accuracy = float(metrics[f"{task_spec.metric},none"])
        stderr = metrics.get(f"{task_spec.metric}_stderr,none")
        stderr = float(stderr) if isinstance(stderr, int | float) else None
        tasks[task_spec.name] = {
            "lm_eval_task": task_spec.lm_eval_task,
            "metric": task_spec.metric,
            "accuracy": accuracy,
            "stderr": stderr,
            "interval": normal_interval(accuracy, stderr),
            "n_shot": int(results["n-shot"][task_spec.lm_eval_task]),
            "n_examples": int(results["n-samples"][task_spec.lm_eval_task]["effective"]),
            "chance": task_spec.chance,
        }
    errors = [1.0 - task["accuracy"] for task in tasks.values()]
    stderrs = [task["stderr"] for task in tasks.values()]
    average = sum(errors) / len(errors)
    stderr = (
        math.sqrt(sum(se**2 for se in stderrs)) / len(stderrs)
        if all(se is not None for se in stderrs)
        else None
    )
    return {
        "suite": suite,
        "tasks": tasks,
        "average_error": average,
        "average_error_stderr": stderr,
        "average_error_interval": normal_interval(average, stderr),
    }


def run_lm_eval(
    checkpoint: str | Path,
    include_path: str | None,
    task_specs: Sequence[TaskSpec],
    batch_size: int,
    device: str,
) -> dict[int, dict]:
    """lm-eval's results for every shot count of the suite, the model loaded once."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import workflow.model  # noqa: F401  (registers ScalingLM with AutoModelForCausalLM)
    from workflow.device import resolve_device

    torch_device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).to(torch_device).eval()
    language_model = HFLM(
        pretrained=model,
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        backend="causal",
        batch_size=batch_size,
        device=str(torch_device),
    )
    # The offline suite's folder alone: indexing every one of lm-eval's task files is slow.
    task_manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    by_shots = defaultdict(list)
    for task_spec in task_specs:
        by_shots[task_spec.shots].append(task_spec.lm_eval_task)
    return {
        shots: lm_eval.simple_evaluate(
            model=language_model,
            tasks=names,
            num_fewshot=shots,
            task_manager=task_manager,
            log_samples=False,
            bootstrap_iters=1000,  # means have a closed-form standard error; not bootstrapped
        )
        for shots, names in sorted(by_shots.items())
    }


def evaluate_downstream(
    checkpoint: str | Path,
    suite_dir: str | Path,
    run: dict,
    summary_path: str | Path,
    results_path: str | Path,
    batch_size: int,
    device: str,
) -> dict:
    """Run the suite on one checkpoint; write lm-eval's results and the summary."""
    manifest, task_specs = read_manifest(suite_dir)
    check_checkpoint(checkpoint)
    from lm_eval.utils import handle_non_serializable  # slow to import: after the checks

    started = time.perf_counter()
    results = run_lm_eval(checkpoint, manifest["include_path"], task_specs, batch_size, device)
    seconds = time.perf_counter() - started
    with atomic_path(results_path) as temporary:
        temporary.write_text(
            json.dumps(
                {str(shots): result for shots, result in results.items()},
                default=handle_non_serializable,
                indent=2,
            )
        )
    summary = {
        **summarize(manifest["suite"], task_specs, results),
        "run": run,
        "checkpoint": str(checkpoint),
        "batch_size": batch_size,
        "seconds": seconds,
    }
    write_json(summary_path, summary)
    for name, task in summary["tasks"].items():
        print(
            f"{name}: {task['metric']} {task['accuracy']:.3f} (chance {task['chance']}) "
            f"on {task['n_examples']} items, {task['n_shot']}-shot",
            flush=True,
        )
    print(f"average error {summary['average_error']:.4f}; lm-eval took {seconds:.1f} s")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained directory")
    parser.add_argument("--suite", required=True, help="the suite's directory (build_suite)")
    parser.add_argument("--run", required=True, help="JSON: the run's identity columns")
    parser.add_argument("--summary", required=True, help="summary JSON to write")
    parser.add_argument("--results", required=True, help="lm-eval results JSON to write")
    parser.add_argument("--batch-size", type=int, required=True, help="lm-eval batch size")
    parser.add_argument("--device", required=True, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        evaluate_downstream(
            args.checkpoint,
            args.suite,
            json.loads(args.run),
            args.summary,
            args.results,
            args.batch_size,
            args.device,
        )
    except (SuiteError, TrainError, DamagedOutputError) as error:
        sys.exit(f"evaluate_downstream: {error}")


if __name__ == "__main__":
    main()
