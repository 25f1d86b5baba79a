"""Build stage of the downstream suite: the tasks every checkpoint is evaluated on by lm-eval.

``offline`` (the embedded default) writes, for each configured task, its items as JSONL built
from held-out documents (``workflow.tasks``) and an lm-eval task YAML that reads them
(``dataset_path: json`` with an absolute ``data_files`` path: lm-eval resolves a relative one
against the working directory, not the YAML's folder). ``lm_eval --include_path DIR`` or
``TaskManager(include_path=DIR)`` loads the folder as it is.

``paper17`` names lm-eval's own equivalents of the paper's 17 tasks with the paper's shot
counts (``PAPER17``). Building it loads each task once, which downloads its dataset into
``HF_HOME``; the evaluation jobs then run offline from that cache (compute nodes often have no
network). Tasks lm-eval can only score by generating text are left out: the trained model has
no ``generate``.

Both write ``suite.json``, the manifest the evaluate stage reads: per task its lm-eval name,
shots, the metric read as accuracy, the chance level and, offline, its data file.

``python -m workflow.suite --settings JSON --out DIR``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from workflow import tasks
from workflow.atomic import atomic_path

MANIFEST = "suite.json"


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite as the evaluate stage runs it."""

    name: str  # the name in the summary and in runs.parquet's eval column
    lm_eval_task: str  # the name lm-eval's registry (or the suite's folder) knows it by
    shots: int
    metric: str  # the lm-eval metric read as the task's accuracy
    chance: float | None  # accuracy of a uniform guess (None where it varies per item)
    data_file: str | None = None  # the local items (offline tasks)
    n_examples: int | None = None


@dataclass(frozen=True)
class Builder:
    """An offline task: how its items are made and how they are scored."""

    make: Callable[..., list[dict]]
    needs: str  # "sentences" (one flat list) or "documents" (sentences per document)
    metric: str


# ``acc_mutual_info`` ranks log P(choice | context) - log P(choice): a last word is one word of
# the document's vocabulary, whose prior would otherwise decide among the four.
BUILDERS = {
    "word_order": Builder(tasks.word_order, "sentences", "acc"),
    "window_order": Builder(tasks.window_order, "sentences", "acc"),
    "adjacent_swap": Builder(tasks.adjacent_swap, "sentences", "acc"),
    "word_replacement": Builder(tasks.word_replacement, "sentences", "acc"),
    "last_word": Builder(tasks.last_word, "documents", "acc_mutual_info"),
    "continuation": Builder(tasks.continuation, "documents", "acc_mutual_info"),
}


@dataclass(frozen=True)
class PaperTask:
    """One of the paper's 17 tasks and its lm-eval counterpart."""

    paper_name: str
    lm_eval_task: str
    shots: int
    metric: str
    chance: float | None
    mapping: str  # "exact" or "approximate"
    generative: bool  # lm-eval scores it by generating text
    note: str = ""

    @property
    def name(self) -> str:
        """Unique within the suite (HellaSwag appears at 0 and 10 shots)."""
        return f"{self.lm_eval_task}_{self.shots}shot"


# Gadre et al. (2024), Table 2: the 17 tasks and their shots, evaluated with LLM-Foundry.
PAPER17 = (
    PaperTask("ARC-Easy", "arc_easy", 10, "acc_norm", 0.25, "exact", False),
    PaperTask(
        "BIG-bench: CS algorithms",
        "bigbench_cs_algorithms_multiple_choice",
        10,
        "acc",
        None,
        "approximate",
        False,
        "the paper scores the exact continuation; lm-eval ranks the listed targets",
    ),
    PaperTask(
        "BIG-bench: Dyck languages",
        "bigbench_dyck_languages_multiple_choice",
        10,
        "acc",
        None,
        "approximate",
        False,
        "the paper scores the exact continuation; lm-eval ranks the listed targets",
    ),
    PaperTask(
        "BIG-bench: Novel Concepts",
        "bigbench_novel_concepts_multiple_choice",
        10,
        "acc",
        0.25,
        "exact",
        False,
    ),
    PaperTask(
        "BIG-bench: Operators",
        "bigbench_operators_generate_until",
        10,
        "exact_match",
        0.0,
        "approximate",
        True,
    ),
    PaperTask(
        "BIG-bench: QA WikiData",
        "bigbench_qa_wikidata_generate_until",
        10,
        "exact_match",
        0.0,
        "approximate",
        True,
    ),
    PaperTask("BoolQ", "boolq", 10, "acc", 0.5, "exact", False),
    PaperTask(
        "CommonsenseQA",
        "commonsense_qa",
        10,
        "acc",
        0.2,
        "approximate",
        False,
        "lm-eval ranks the letters A-E after listing the five answers; the paper ranks the answers",
    ),
    PaperTask("COPA", "copa", 0, "acc", 0.5, "exact", False),
    PaperTask("CoQA", "coqa", 0, "em", 0.0, "approximate", True, "lm-eval generates; F1 and EM"),
    PaperTask("HellaSwag (0-shot)", "hellaswag", 0, "acc_norm", 0.25, "exact", False),
    PaperTask("HellaSwag (10-shot)", "hellaswag", 10, "acc_norm", 0.25, "exact", False),
    PaperTask("LAMBADA", "lambada_openai", 0, "acc", 0.0, "exact", False),
    PaperTask("PIQA", "piqa", 10, "acc_norm", 0.5, "exact", False),
    PaperTask(
        "PubMedQA (labeled)",
        "pubmedqa",
        10,
        "acc",
        1 / 3,
        "approximate",
        False,
        "lm-eval ranks yes/no/maybe; the paper scores the generated answer",
    ),
    PaperTask(
        "SQuAD",
        "squad_completion",
        10,
        "contains",
        0.0,
        "approximate",
        True,
        "lm-eval's completion variant; generative",
    ),
    PaperTask("Winograd", "wsc273", 0, "acc", 0.5, "exact", False),
)


class SuiteError(ValueError):
    """A suite that cannot be built; the message names the task or file."""


def read_documents(path: str | Path) -> list[str]:
    """The documents of a split written by the prepare stage (one JSON object per line)."""
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def build_items(builder: str, documents: Sequence[str], n_items: int, seed: str) -> list[dict]:
    """The items of one offline task: deterministic in (documents, n_items, seed)."""
    spec = BUILDERS[builder]
    per_document = [tasks.prose_sentences(document) for document in documents]
    if spec.needs == "sentences":
        material = [sentence for sentences in per_document for sentence in sentences]
    else:
        material = [sentences for sentences in per_document if sentences]
    return spec.make(material, n_items, random.Random(seed))


def task_yaml(name: str, data_file: Path, metric: str) -> dict:
    """An lm-eval multiple-choice task reading ``data_file`` (absolute, see the docstring)."""
    metrics = ["acc"] if metric == "acc" else ["acc", metric]
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        # Field names, not Jinja templates: lm-eval compiles a template for every item, a large
        # share of a small model's evaluation.
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": metric_name, "aggregation": "mean", "higher_is_better": True}
            for metric_name in metrics
        ],
        "metadata": {"version": 1.0},
    }


def build_offline(
    task_settings: dict[str, dict],
    sources: dict[str, str],
    examples: int,
    seed: int,
    write_to: Path,
    final_dir: Path,
) -> list[TaskSpec]:
    """Write every offline task's JSONL and YAML into ``write_to``; the YAMLs and the
    returned manifest entries name the data at ``final_dir``, where it will end up."""
    specs = []
    for name, setting in task_settings.items():
        builder = BUILDERS[setting["builder"]]
        documents = read_documents(sources[setting["source"]])
        items = build_items(setting["builder"], documents, examples, f"{seed}:{name}")
        if len(items) < examples:
            raise SuiteError(
                f"task {name}: {setting['source']}'s held-out documents give {len(items)} "
                f"{setting['builder']} items, fewer than downstream.examples ({examples}); "
                f"lower it or raise that dataset's val_fraction"
            )
        data_file = final_dir.resolve() / f"{name}.jsonl"
        (write_to / data_file.name).write_text("".join(json.dumps(item) + "\n" for item in items))
        (write_to / f"{name}.yaml").write_text(
            yaml.safe_dump(task_yaml(name, data_file, builder.metric), sort_keys=False)
        )
        specs.append(
            TaskSpec(
                name=name,
                lm_eval_task=name,
                shots=0,
                metric=builder.metric,
                chance=1 / len(items[0]["choices"]),
                data_file=str(data_file),
                n_examples=len(items),
            )
        )
        print(f"{name}: {len(items)} items from {setting['source']}", flush=True)
    return specs


def paper_suite() -> list[TaskSpec]:
    """The paper's tasks that lm-eval scores by likelihood, with the paper's shots."""
    return [
        TaskSpec(task.name, task.lm_eval_task, task.shots, task.metric, task.chance)
        for task in PAPER17
        if not task.generative
    ]


def download_paper_suite(specs: Sequence[TaskSpec]) -> None:
    """Load every task once, so its dataset is in HF_HOME before the offline evaluations."""
    from lm_eval.tasks import TaskManager

    try:
        TaskManager().load(sorted({spec.lm_eval_task for spec in specs}))
    except OSError as error:  # the hub's connection errors, after datasets' own retries
        raise SuiteError(
            f"the paper17 suite fetches its datasets from the Hugging Face hub once, and the hub "
            f"could not be reached ({error}). Build the suite where there is network and copy "
            'it here: README, "The paper\'s suite", says how (`snakemake --cores 1 '
            "--configfile presets/paper.yaml results/paper/suites/paper17`, then copy "
            "results/paper/hf_home and results/paper/suites), or use `downstream.suite: offline`"
        ) from None


def build_suite(settings: dict, out: str | Path) -> dict:
    """Write the suite (task files and ``suite.json``) into the directory ``out``, atomically."""
    out = Path(out)
    with atomic_path(out) as temporary:
        temporary.mkdir()
        if settings["suite"] == "offline":
            specs = build_offline(
                settings["tasks"],
                settings["sources"],
                settings["examples"],
                settings["seed"],
                write_to=temporary,
                final_dir=out,
            )
            include_path = str(out.resolve())
        else:
            specs = paper_suite()
            download_paper_suite(specs)
            include_path = None
        manifest = {
            "suite": settings["suite"],
            "include_path": include_path,
            "tasks": [asdict(spec) for spec in specs],
        }
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(suite_dir: str | Path) -> tuple[dict, list[TaskSpec]]:
    """The suite's manifest and its tasks; a missing file names itself and the rule that
    makes it (Snakemake does not notice a file deleted inside the suite's directory)."""
    path = Path(suite_dir, MANIFEST)
    if not path.is_file():
        raise SuiteError(f"{path} is missing; it is made by rule build_suite")
    manifest = json.loads(path.read_text())
    specs = [TaskSpec(**task) for task in manifest["tasks"]]
    for spec in specs:
        if spec.data_file is None:
            continue
        for needed in (Path(spec.data_file), Path(manifest["include_path"], f"{spec.name}.yaml")):
            if not needed.is_file():
                raise SuiteError(
                    f"task file {needed} of task {spec.name} is missing; it is made by rule "
                    f"build_suite (delete {suite_dir} and run snakemake again to rebuild it)"
                )
    return manifest, specs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--settings", required=True, help="JSON: suite, tasks, sources, examples, seed"
    )
    parser.add_argument("--out", required=True, help="the suite's directory")
    args = parser.parse_args(argv)
    try:
        manifest = build_suite(json.loads(args.settings), args.out)
    except SuiteError as error:
        sys.exit(f"build_suite: {error}")
    print(f"wrote {len(manifest['tasks'])} tasks of suite {manifest['suite']} to {args.out}")


if __name__ == "__main__":
    main()
