"""Reward components (each a scorer in [0, 1] or a configured range) and their sum.

A component is any callable `score(prompts, responses) -> list[float]`; `CompositeReward`
sums them into R(x, y) and keeps each one, as the paper's tables report them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import numpy as np

Scorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class RewardError(RuntimeError):
    """A reward component returned something unusable; names the component and the row."""


class CompositeReward:
    """R(x, y) = sum of the components' scores; `score` also returns each component."""

    def __init__(self, components: dict[str, Scorer]):
        if not components:
            raise ValueError("a reward needs at least one component")
        self.components = components

    @property
    def names(self) -> list[str]:
        return list(self.components)

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], ids: Sequence[str] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        per_component = {}
        for name, scorer in self.components.items():
            values = np.asarray(scorer(prompts, responses), dtype=np.float64)
            if values.shape != (len(prompts),):
                raise RewardError(f"reward component '{name}' returned shape {values.shape}, expected ({len(prompts)},)")
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                i = int(bad[0])
                row = ids[i] if ids is not None else i
                raise RewardError(f"reward component '{name}' returned {values[i]} for row {row} (prompt {prompts[i]!r})")
            per_component[name] = values
        total = np.sum(list(per_component.values()), axis=0)
        return total, per_component

    @property
    def max_total(self) -> float:
        """Upper bound of R, for the value head's output range; components declare theirs."""
        bounds = [getattr(scorer, "max_value", 1.0) for scorer in self.components.values()]
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError("every reward component needs a finite max_value")
        return float(sum(bounds))


def import_scorer(path: str) -> Scorer:
    """`package.module:function`, a function score(prompts, responses) -> list[float]."""
    module_name, _, attr = path.partition(":")
    try:
        scorer = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"reward {path!r}: cannot import it ({err})") from None
    if not callable(scorer):
        raise RewardError(f"reward {path!r} is not callable")
    return scorer


def build_reward(names: Sequence[str], device: str = "auto", fit_texts: Sequence[str] | None = None) -> CompositeReward:
    """Components by registered name (`lol_rl.rewards.registry.COMPONENTS`) or import path."""
    from .registry import COMPONENTS

    unknown = [n for n in names if n not in COMPONENTS and ":" not in n]
    if unknown:
        raise RewardError(f"unknown reward component(s) {unknown}; valid: {sorted(COMPONENTS)} or 'module:function'")
    return CompositeReward({name: import_scorer(name) if ":" in name else COMPONENTS[name]() for name in names})
