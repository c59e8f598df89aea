"""Reward components of the embedded task: graded correctness, politeness, conciseness."""

from __future__ import annotations

import re
from collections.abc import Sequence

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from ..tasks.toy import WORDS, solve

_WORD_SET = frozenset(WORDS)
_NUMBER = re.compile(r"\d+")
LONGEST_GOOD_OPENER = 5  # words in "Great question, happy to help!"


def positional_match(predicted: Sequence[str], target: Sequence[str]) -> float:
    """Partial credit: matching positions over the longer of the two sequences."""
    if not predicted or not target:
        return 0.0
    hits = sum(p == t for p, t in zip(predicted, target))
    return hits / max(len(predicted), len(target))


def extract_answer(prompt: str, response: str) -> list[str]:
    """The answer a response gives: its list words in order, or the digits of its last number
    (right-aligned, so that a dropped carry still scores the digits it got right)."""
    if prompt.startswith("add: "):
        numbers = _NUMBER.findall(response)
        return list(reversed(numbers[-1])) if numbers else []
    return [w for w in re.findall(r"[a-z]+", response.lower()) if w in _WORD_SET]


def correctness(prompt: str, response: str) -> float:
    target = solve(prompt)
    target_tokens = list(reversed(target)) if prompt.startswith("add: ") else target.split()
    return positional_match(extract_answer(prompt, response), target_tokens)


def conciseness(prompt: str, response: str) -> float:
    """1 up to the words a good response needs, then budget / words: rambling is penalised."""
    budget = len(solve(prompt).split()) + LONGEST_GOOD_OPENER
    return min(1.0, budget / max(1, len(response.split())))


class Correct:
    max_value = 1.0

    def __call__(self, prompts, responses):
        return [correctness(p, r) for p, r in zip(prompts, responses)]


class Concise:
    max_value = 1.0

    def __call__(self, prompts, responses):
        return [conciseness(p, r) for p, r in zip(prompts, responses)]


class Polite:
    """VADER's compound sentiment of the response's words, mapped from [-1, 1] to [0, 1].

    Numbers are removed first: VADER's lexicon reads some as slang ("143" I love you, "182"
    I hate you), which would let the sum an answer gives change its politeness.
    """

    max_value = 1.0

    def __init__(self):
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts, responses):
        return [(self.analyzer.polarity_scores(_NUMBER.sub("", r))["compound"] + 1) / 2 for r in responses]
