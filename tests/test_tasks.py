"""The offline task builders: deterministic, the requested size, and no answer that a rule
blind to language (position, length, word frequency, agreement with the other choices) can
pick out."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import pytest

from workflow import tasks
from workflow.suite import BUILDERS, build_items

# A small vocabulary of plain words, for documents that are prose to the sentence filter.
WORDS = " ".join(
    (
        "the kernel module loads a driver when the device appears and the user space daemon",
        "reads its configuration from a file that lists every option with a short description",
        "of what it changes and why a system administrator might want to set it differently",
    )
).split()


# Zipf's law, as in real text, so that word frequency is a clue a builder must neutralise.
ZIPF = [1 / rank for rank in range(1, len(WORDS) + 1)]
CHOICES = {"adjacent_swap": 2}  # minimal pairs; every other builder has N_CHOICES


def make_documents(n_documents: int = 60, sentences_per_document: int = 12) -> list[str]:
    """Plain-prose documents of random sentences over a small vocabulary, in paragraphs."""
    rng = random.Random(1)
    documents = []
    for _ in range(n_documents):
        sentences = [
            " ".join(rng.choices(WORDS, ZIPF, k=rng.randint(9, 20))).capitalize() + "."
            for _ in range(sentences_per_document)
        ]
        paragraphs = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
        documents.append("\n\n".join(paragraphs))
    return documents


DOCUMENTS = make_documents()


def test_prose_sentences_skip_markup_code_and_lists():
    document = (
        "Title\n=====\n\n"
        "This paragraph is plain prose and has more than enough words in it. It goes on.\n\n"
        ".. note:: a directive that should not count as a sentence at all here\n\n"
        "- a list item with quite a few words that is still not prose text\n\n"
        "    def f(x): return x  # code that is indented and not prose at all\n\n"
        "Another plain sentence here that is long enough to be kept by the filter."
    )
    assert tasks.prose_sentences(document) == [
        "This paragraph is plain prose and has more than enough words in it.",
        "Another plain sentence here that is long enough to be kept by the filter.",
    ]


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_items_are_deterministic_and_of_the_requested_size(builder):
    first = build_items(builder, DOCUMENTS, 40, "0:task")
    assert first == build_items(builder, DOCUMENTS, 40, "0:task")
    assert first != build_items(builder, DOCUMENTS, 40, "1:task")
    assert len(first) == 40
    n_choices = CHOICES.get(builder, tasks.N_CHOICES)
    for item in first:
        assert len(item["choices"]) == len(set(item["choices"])) == n_choices, item
        assert 0 <= item["label"] < n_choices
        assert item["context"] and all(choice.strip() for choice in item["choices"])


def blind_rules(items: list[dict]) -> dict[str, Callable[[list[str]], float]]:
    """Scores of a choice that use no language: its length, its words' corpus frequency, and
    how much it agrees with the item's other choices (a one-edit variant agrees less)."""
    counts = Counter(word for item in items for word in item["context"].split())

    def agreement(choices: list[str]) -> Callable[[str], float]:
        return lambda choice: sum(
            sum(a == b for a, b in zip(choice.split(), other.split(), strict=False))
            for other in choices
        )

    return {
        "longest": lambda choices: [len(choice) for choice in choices],
        "shortest": lambda choices: [-len(choice) for choice in choices],
        "most frequent words": lambda choices: [
            sum(math.log(counts[word] + 1) for word in choice.split()) for choice in choices
        ],
        "agrees with the others": lambda choices: list(map(agreement(choices), choices)),
    }


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_the_answer_is_not_given_away_without_language(builder):
    items = build_items(builder, make_documents(200), 400, "0:task")
    n_choices = CHOICES.get(builder, tasks.N_CHOICES)
    chance = 1 / n_choices
    positions = Counter(item["label"] for item in items)
    assert all(abs(positions[label] / len(items) - chance) < 0.08 for label in range(n_choices))
    for name, rule in blind_rules(items).items():
        hits = 0.0
        for item in items:
            scores = rule(item["choices"])
            best = [i for i, score in enumerate(scores) if score == max(scores)]
            hits += (item["label"] in best) / len(best)  # ties shared
        assert hits / len(items) < chance + 0.08, (builder, name, hits / len(items))


def test_replacements_come_from_the_same_frequency_band():
    sentences = [s for document in DOCUMENTS for s in tasks.prose_sentences(document)]
    band_of = tasks.FrequencyBands(word for s in sentences for word in s.split()).band_of
    items = tasks.word_replacement(sentences, 100, random.Random(0))
    for item in items:
        answer = item["choices"][item["label"]].split()
        slots = set()
        for index, choice in enumerate(item["choices"]):
            if index == item["label"]:
                continue
            changed = [
                (j, a, b)
                for j, (a, b) in enumerate(zip(answer, choice.split(), strict=True))
                if a != b
            ]
            assert len(changed) == 1
            slot, original, replacement = changed[0]
            assert band_of[original] == band_of[replacement]
            slots.add(slot)
        assert len(slots) == 1  # one slot, so no choice agrees with the others more


def test_swaps_and_reorders_keep_the_same_words():
    sentences = [s for document in DOCUMENTS for s in tasks.prose_sentences(document)]
    for builder in (tasks.adjacent_swap, tasks.word_order, tasks.window_order):
        for item in builder(sentences, 50, random.Random(0)):
            words = sorted(item["choices"][item["label"]].split())
            assert all(sorted(choice.split()) == words for choice in item["choices"])


def test_last_word_choices_are_last_words_of_the_answers_frequency_band():
    documents = [tasks.prose_sentences(document) for document in DOCUMENTS]
    finals = [sentence.split()[-1].rstrip(".") for sentences in documents for sentence in sentences]
    band_of = tasks.FrequencyBands(finals).band_of
    sentences = {sentence for document in documents for sentence in document}
    for item in tasks.last_word(documents, 50, random.Random(0)):
        words = [choice.rstrip(".") for choice in item["choices"]]
        assert " " not in "".join(words) and len({band_of[word] for word in words}) == 1
        completed = f"{item['context']} {item['choices'][item['label']]}"
        assert any(completed.endswith(sentence) for sentence in sentences), completed


def test_too_few_held_out_sentences_give_fewer_items():
    assert len(build_items("adjacent_swap", DOCUMENTS[:2], 500, "0:task")) < 500
