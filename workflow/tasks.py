"""Multiple-choice items built from held-out documents, for the offline downstream suite.

The paper's downstream tasks need the hub; these need only the documents that the prepare
stage held out of training. Each builder is a pure function of sentences (or documents) and a
seeded ``random.Random``, so the same corpus always gives the same items. An item is
``{"context", "choices", "label"}``: lm-eval scores ``context + " " + choice`` for every choice
and counts the item correct when the true choice (``label``) has the highest likelihood.

The distractors are built so that a rule that ignores the language cannot find the answer:
the choices of a word-order item hold the same words, and a reordered window is the same one
in every choice; a minimal pair has two choices, since
with several one-edit variants the answer would be the one that agrees with the others
everywhere; a replaced word and a last-word distractor come from the answer's frequency band,
drawn as the answer was; a continuation distractor is another document's sentence of about
the same length. The answer's position is uniform.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

Item = dict  # {"context": str, "choices": list[str], "label": int}

N_CHOICES = 4
# A sentence boundary: end punctuation, space, capital letter.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Plain prose only: letters, digits and ordinary punctuation (no markup, code or tables).
_PROSE = re.compile(r"^[A-Za-z0-9 ,;:'\"()\-.!?%/]+$")
# A paragraph whose lines start like these is a list, heading, directive, table or code.
_NOT_PROSE_START = tuple("*-=#.:|+`>_~[0123456789")
_WORD = re.compile(r"^[A-Za-z]+$")


def prose_sentences(document: str, min_words: int = 8, max_words: int = 25) -> list[str]:
    """The plain-prose sentences of a document, in order; markup, code and lists are skipped."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", document):
        lines = [line.strip() for line in paragraph.splitlines()]
        if not lines or any(not line or line.startswith(_NOT_PROSE_START) for line in lines):
            continue
        for sentence in _SENTENCE_BREAK.split(" ".join(lines)):
            n_words = len(sentence.split())
            if (
                min_words <= n_words <= max_words
                and _PROSE.match(sentence)
                and sentence[-1] in ".!?"
            ):
                sentences.append(sentence)
    return sentences


def _item(context: str, answer: str, distractors: Sequence[str], rng: random.Random) -> Item:
    """An item with the answer at a uniformly random position among the distractors."""
    choices = [*distractors]
    label = rng.randrange(len(choices) + 1)
    choices.insert(label, answer)
    return {"context": context, "choices": choices, "label": label}


def _halves(sentence: str) -> tuple[list[str], list[str]]:
    words = sentence.split()
    middle = len(words) // 2
    return words[:middle], words[middle:]


def _sentence_items(
    sentences: Sequence[str],
    n_items: int,
    rng: random.Random,
    distractors_of: Callable[[list[str], random.Random], list[list[str]] | None],
) -> list[Item]:
    """Items whose context is a sentence's first half and whose choices are variants of its
    second half; ``distractors_of`` returns the variants, or None to skip the sentence."""
    order = list(range(len(sentences)))
    rng.shuffle(order)
    items = []
    for index in order:
        head, tail = _halves(sentences[index])
        variants = distractors_of(tail, rng)
        if variants is None:
            continue
        items.append(_item(" ".join(head), " ".join(tail), [" ".join(v) for v in variants], rng))
        if len(items) == n_items:
            break
    return items


def word_order(sentences: Sequence[str], n_items: int, rng: random.Random) -> list[Item]:
    """The true second half of a sentence against three random orders of its words."""

    def shuffled(tail: list[str], rng: random.Random) -> list[list[str]] | None:
        if len(set(tail)) < 5:
            return None
        variants: list[list[str]] = []
        while len(variants) < N_CHOICES - 1:
            variant = rng.sample(tail, len(tail))
            if variant != tail and variant not in variants:
                variants.append(variant)
        return variants

    return _sentence_items(sentences, n_items, rng, shuffled)


def window_order(sentences: Sequence[str], n_items: int, rng: random.Random) -> list[Item]:
    """The true second half against three copies in which the same four consecutive words are
    in other orders: harder than reordering the whole half, and every choice agrees with the
    others outside the window."""
    window = 4

    def reordered(tail: list[str], rng: random.Random) -> list[list[str]] | None:
        starts = [
            j for j in range(len(tail) - window + 1) if len(set(tail[j : j + window])) == window
        ]
        if not starts:
            return None
        j = rng.choice(starts)
        words = tail[j : j + window]
        orders: list[list[str]] = []
        while len(orders) < N_CHOICES - 1:
            order = rng.sample(words, window)
            if order != words and order not in orders:
                orders.append(order)
        return [[*tail[:j], *order, *tail[j + window :]] for order in orders]

    return _sentence_items(sentences, n_items, rng, reordered)


def adjacent_swap(sentences: Sequence[str], n_items: int, rng: random.Random) -> list[Item]:
    """The true second half against a copy with one pair of adjacent words swapped: minimal
    pairs of word order, as in BLiMP (two choices; chance is 1/2)."""

    def swapped(tail: list[str], rng: random.Random) -> list[list[str]] | None:
        places = [j for j in range(len(tail) - 1) if tail[j] != tail[j + 1]]
        if not places:
            return None
        j = rng.choice(places)
        return [[*tail[:j], tail[j + 1], tail[j], *tail[j + 2 :]]]

    return _sentence_items(sentences, n_items, rng, swapped)


class FrequencyBands:
    """Words (letters only) grouped by the integer part of log2 of their count, so the words
    of a band have about the same prior; a distractor drawn from the answer's band, in
    proportion to the counts (as the answer itself was drawn), gives a frequency rule nothing."""

    def __init__(self, words: Iterable[str]) -> None:
        counts = Counter(word for word in words if _WORD.match(word))
        self.bands: dict[int, dict[str, int]] = {}
        for word, count in sorted(counts.items()):
            self.bands.setdefault(int(math.log2(count)), {})[word] = count
        self.band_of = {word: band for band, words in self.bands.items() for word in words}

    def draw(self, word: str, k: int, rng: random.Random) -> list[str] | None:
        """``k`` distinct other words of ``word``'s band; None if it has fewer."""
        peers = {
            other: count
            for other, count in self.bands.get(self.band_of.get(word), {}).items()
            if other != word
        }
        if len(peers) < k:
            return None
        drawn: list[str] = []
        while len(drawn) < k:
            (other,) = rng.choices(list(peers), weights=list(peers.values()))
            if other not in drawn:
                drawn.append(other)
        return drawn


def word_replacement(sentences: Sequence[str], n_items: int, rng: random.Random) -> list[Item]:
    """The true second half against three copies in which one word (the same one) is replaced
    by another word of its frequency band: which word fits the slot."""
    bands = FrequencyBands(word for sentence in sentences for word in sentence.split())

    def replaced(tail: list[str], rng: random.Random) -> list[list[str]] | None:
        places = [j for j, word in enumerate(tail) if word in bands.band_of]
        rng.shuffle(places)
        for j in places:
            words = bands.draw(tail[j], N_CHOICES - 1, rng)
            if words is not None:
                return [[*tail[:j], word, *tail[j + 1 :]] for word in words]
        return None

    return _sentence_items(sentences, n_items, rng, replaced)


def _split_last_word(sentence: str) -> tuple[str, str, str]:
    """(the sentence without its last word, the last word, its closing punctuation)."""
    head, _, last = sentence.rpartition(" ")
    word = last.rstrip(".!?")
    return head, word, last[len(word) :]


def last_word(documents: Sequence[Sequence[str]], n_items: int, rng: random.Random) -> list[Item]:
    """LAMBADA-like: the sentence before and a sentence without its last word; the true last
    word against three words that end other held-out sentences, from its frequency band
    (counted as last words)."""
    pairs = [
        (sentences[index - 1], sentences[index])
        for sentences in documents
        for index in range(1, len(sentences))
    ]
    bands = FrequencyBands(
        _split_last_word(sentence)[1] for sentences in documents for sentence in sentences
    )
    rng.shuffle(pairs)
    items = []
    for previous, sentence in pairs:
        head, word, ending = _split_last_word(sentence)
        distractors = bands.draw(word, N_CHOICES - 1, rng)
        if distractors is None:
            continue
        choices = [other + ending for other in distractors]
        items.append(_item(f"{previous} {head}", word + ending, choices, rng))
        if len(items) == n_items:
            break
    return items


def continuation(
    documents: Sequence[Sequence[str]], n_items: int, rng: random.Random
) -> list[Item]:
    """HellaSwag-like: two sentences of a document; its next sentence against three sentences
    of other documents with about the same number of words (so length gives nothing away)."""
    pool = [
        (document, sentence)
        for document, sentences in enumerate(documents)
        for sentence in sentences
    ]
    candidates = [
        (document, sentences[index - 2 : index], sentences[index])
        for document, sentences in enumerate(documents)
        for index in range(2, len(sentences))
    ]
    rng.shuffle(candidates)
    items = []
    for document, context, answer in candidates:
        length = len(answer.split())
        similar = [
            sentence
            for other, sentence in pool
            if other != document and abs(len(sentence.split()) - length) <= max(1, length // 10)
        ]
        if len(similar) < N_CHOICES - 1:
            continue
        items.append(_item(" ".join(context), answer, rng.sample(similar, N_CHOICES - 1), rng))
        if len(items) == n_items:
            break
    return items
