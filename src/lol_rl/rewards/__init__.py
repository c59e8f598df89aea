"""Reward components (each a scorer in [0, 1] or a configured range) and their sum.

A component is any callable `score(prompts, responses) -> list[float]` with a `max_value` (and a
`min_value`, 0 if it has none): its declared range, which bounds the value head's output, so a
score outside it stops the run. `CompositeReward` sums them into R(x, y) and keeps each one, as
the paper's tables report them.

`build_reward` makes the components from a task's `rewards:` list. Each item is
- a registered name (`registry.COMPONENTS`), e.g. `cola`; the column is named after it;
- `module:function`, a user's `score(prompts, responses) -> list[float]` (max_value 1.0 unless
  the function has a `max_value` attribute); the column is named after the string;
- a mapping `{name: <column>, use: <registered name or module:function>, **options}`, the options
  going to the registered factory, e.g. `{name: fluency, use: cola, model: /models/cola}`.
Factories taking `device` get build_reward's; components with `fit` (TF-IDF) are fit on
`fit_texts`, the train responses; components with `fit_pairs` (the Bradley-Terry reward model)
on `fit_pairs`, the train split's (prompt, chosen, rejected) triples, and report their pairwise
accuracy on `held_out_pairs` (the validation split's) when given.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import LolRlError

Scorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class RewardError(LolRlError, RuntimeError):
    """A reward spec, a component's model or a score is unusable; one line naming the component."""


class CompositeReward:
    """R(x, y) = sum of the components' scores; `score` also returns each component."""

    def __init__(self, components: dict[str, Scorer]):
        if not components:
            raise ValueError("a reward needs at least one component")
        self.components = components

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], ids: Sequence[str] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        per_component = {}
        prompts, responses = tuple(prompts), tuple(responses)  # a scorer cannot reorder what the others see
        for name, scorer in self.components.items():
            values = _call_scorer(name, scorer, prompts, responses)
            if values.shape != (len(prompts),):
                raise RewardError(f"reward component '{name}' returned shape {values.shape}, expected ({len(prompts)},)")
            low, high = component_range(name, scorer)
            slack = 1e-6 * (high - low)  # float rounding at the bounds (a sigmoid of float32 logits)
            bad = np.flatnonzero(~np.isfinite(values) | (values < low - slack) | (values > high + slack))
            if bad.size:
                i = int(bad[0])
                which = f"prompt id {ids[i]}" if ids is not None else f"row {i}"
                outside = "" if not np.isfinite(values[i]) else (
                    f", outside its range [{low}, {high}] (a scorer declares it with `min_value`/`max_value`)")
                raise RewardError(f"reward component '{name}' returned {values[i]} for {which} ({prompts[i]!r}){outside}")
            per_component[name] = values
        total = np.sum(list(per_component.values()), axis=0)
        return total, per_component

    def check_available(self) -> None:
        """Every learned component's model is loadable here (its config is read, no weights)."""
        for scorer in self.components.values():
            if hasattr(scorer, "check_available"):
                scorer.check_available()

    @property
    def max_total(self) -> float:
        """Upper bound of R, for the value head's output range; components declare theirs."""
        return float(sum(component_range(name, scorer)[1] for name, scorer in self.components.items()))

    @property
    def min_total(self) -> float:
        """Lower bound of R (0 unless a component declares a negative `min_value`)."""
        return float(sum(component_range(name, scorer)[0] for name, scorer in self.components.items()))


def _call_scorer(name: str, scorer: Scorer, prompts: tuple[str, ...], responses: tuple[str, ...]) -> np.ndarray:
    """One component's scores as float64, or one line naming the component: its code is the user's."""
    try:
        values = scorer(prompts, responses)
    except RewardError:
        raise
    except (Exception, SystemExit) as err:  # SystemExit too: a scorer's sys.exit must not end the run unexplained
        detail = str(err).splitlines()[0] if str(err) else ""
        raise RewardError(f"reward component '{name}' raised {type(err).__name__}({detail}) on a batch of "
                          f"{len(prompts)} (it gets tuples of the prompts and responses, to read, not to change)") from None
    if isinstance(values, (Mapping, str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward component '{name}' returned a {type(values).__name__}, expected a list or "
                          f"array of {len(prompts)} numbers, one per response, in order")
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward component '{name}' returned values that are not numbers ({err})") from None


def component_range(name: str, scorer) -> tuple[float, float]:
    """[min_value, max_value] a component declares (default [0, 1])."""
    low, high = getattr(scorer, "min_value", 0.0), getattr(scorer, "max_value", 1.0)
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in (low, high)) \
            or not low < high:
        raise RewardError(f"reward component '{name}' declares the range [{low!r}, {high!r}]; "
                          "it needs finite numbers min_value < max_value")
    return float(low), float(high)


def import_object(path: str, owner: str) -> Any:
    """`package.module:attribute`; `owner` says whose it is in the error message. The module is
    looked up where Python looks, then in the working directory: a file there named like an
    installed module (a stray `tqdm.py`) never shadows it, in this import or any later one."""
    module_name, _, attr = path.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"{owner} {path!r}: cannot import it ({err})") from None
    finally:
        if added:
            sys.path.remove(cwd)


def import_scorer(path: str) -> Scorer:
    """`package.module:function`, a function score(prompts, responses) -> list[float]."""
    scorer = import_object(path, "reward")
    if not callable(scorer):
        raise RewardError(f"reward {path!r} is not callable")
    return scorer


def parse_spec(spec: Any) -> tuple[str, str, dict[str, Any]]:
    """One `rewards:` item -> (column name, registered name or import path, factory options)."""
    if isinstance(spec, str):
        return spec, spec, {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        use = options.pop("use", None)
        name = options.pop("name", use)
        if not isinstance(use, str) or not isinstance(name, str) or not name:
            raise RewardError(f"reward spec {spec!r}: a mapping needs `use: <registered name or module:function>` "
                              "and may give `name: <column>` and the component's options")
        return name, use, options
    raise RewardError(f"reward spec {spec!r}: expected a component name, 'module:function' or a mapping "
                      "{name, use, ...options}")


def make_component(spec: Any, use: str, options: dict[str, Any], name: str,
                   registry: Mapping[str, Callable], device: str) -> Scorer:
    """The scorer of one parsed spec; every mistake is one RewardError naming the spec."""
    if use not in registry:  # a 'module:function' scorer (build_reward has refused unknown names)
        if options:
            raise RewardError(f"reward spec {spec!r}: options {sorted(options)} are for registered components; "
                              "a 'module:function' scorer takes none")
        return import_scorer(use)
    factory = registry[use]
    signature = inspect.signature(factory)
    for key, value in (("device", device), ("name", name)):
        if key in signature.parameters:
            options.setdefault(key, value)
    try:
        signature.bind(**options)
    except TypeError as err:
        raise RewardError(f"reward spec {spec!r}: {err}; '{use}' takes {list(signature.parameters)}") from None
    try:
        return factory(**options)
    except ValueError as err:
        raise RewardError(f"reward spec {spec!r}: {err}") from None


def build_reward(specs: Any, device: str = "auto", fit_texts: Sequence[str] | None = None,
                 fit_pairs: Sequence[tuple[str, str, str]] | None = None,
                 held_out_pairs: Sequence[tuple[str, str, str]] | None = None) -> CompositeReward:
    """The components a task's `rewards:` list names (see the module docstring), fit where they
    need it. No model is loaded here, except by components fit on `fit_pairs`: the others load
    on their first call."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .registry import COMPONENTS

    if OmegaConf.is_config(specs):
        try:
            specs = OmegaConf.to_container(specs, resolve=True)
        except OmegaConfBaseException as err:  # e.g. ${oc.env:TOXICHAT_MODEL} with the variable unset
            raise RewardError(f"reward specs: {str(err).splitlines()[0]} (set it, or give the component's "
                              f"options on the command line, e.g. task.rewards=[...])") from None
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    if not specs:
        raise RewardError("a reward needs at least one component")
    parsed = [(spec, *parse_spec(spec)) for spec in specs]
    unknown = [use for _, _, use, _ in parsed if use not in COMPONENTS and ":" not in use]
    if unknown:  # every typo at once, before any component is built
        raise RewardError(f"unknown reward component(s) {unknown}; valid: {sorted(COMPONENTS)} or 'module:function'")
    components: dict[str, Scorer] = {}
    for spec, name, use, options in parsed:
        if name in components:
            raise RewardError(f"reward spec {spec!r}: column {name!r} is already used; give this one another `name:`")
        components[name] = make_component(spec, use, options, name, COMPONENTS, device)
    for name, scorer in components.items():
        component_range(name, scorer)  # a bad declared range stops here, not in the value stage
        if hasattr(scorer, "fit"):
            if fit_texts is None:
                raise RewardError(f"reward component '{name}' must be fit on the train responses; "
                                  "build_reward got no fit_texts")
            scorer.fit(fit_texts)
        if hasattr(scorer, "fit_pairs"):
            if not fit_pairs:
                raise RewardError(f"reward component '{name}' is fit on the train split's preference pairs "
                                  "(prompt, chosen, rejected); build_reward got none (does the task's data "
                                  "have rejected responses?)")
            scorer.fit_pairs(fit_pairs, held_out=held_out_pairs or None)
    return CompositeReward(components)
