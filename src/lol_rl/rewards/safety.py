"""Safety as 1 - P(profane): the linear SVM over word and character n-grams that the
`alt-profanity-check` wheel ships (trained on offensive/clean comments; sklearn, runs on CPU).
It reads the response alone, so it flags insults and swearing, not harmful help given politely."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import cache

import numpy as np

from . import RewardError

PACKAGE_HINT = "pip install 'alt-profanity-check>=1.9,<2'"


def missing_package(name: str) -> RewardError:
    return RewardError(f"reward component '{name}' needs the package alt-profanity-check ({PACKAGE_HINT})")


@cache
def profane_probability(name: str):
    """The package's predict_prob, imported on first use: the import unpickles its model (seconds)."""
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise missing_package(name) from None
    return predict_prob


class ProfanitySafety:
    """1 - P(profane | response), in [0, 1]."""

    min_value, max_value = 0.0, 1.0

    def __init__(self, name: str = "profanity_safety"):
        self.name = name

    def check_available(self) -> None:
        if importlib.util.find_spec("profanity_check") is None:
            raise missing_package(self.name)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if not len(responses):
            return np.zeros(0)
        return 1.0 - np.asarray(profane_probability(self.name)(list(responses)), dtype=np.float64)
