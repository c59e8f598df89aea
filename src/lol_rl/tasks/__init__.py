"""Tasks: load data into `Example` rows, format prompts, name their reward components.

A task is built from its config by name (`TASKS`); `Task.provides` says what its data has,
so an algorithm's needs are checked before any compute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..rewards import CompositeReward, build_reward
from .base import DataError, Example, read_jsonl
from .toy import load_toy

SPLITS = ("train", "validation", "test")


@dataclass
class Task:
    name: str
    splits: dict[str, list[Example]]
    reward: CompositeReward
    prompt_template: str

    def fingerprint(self) -> str:
        """A hash of every row of every split: the cache key sees the data, not only its config
        (a generator or a data file can change under the same config)."""
        digest = hashlib.sha256()
        for split in SPLITS:
            for example in self.splits[split]:
                digest.update(json.dumps(example.to_json(), sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def format_prompt(self, prompt: str) -> str:
        return self.prompt_template.format(prompt=prompt)

    def provides(self) -> set[str]:
        train = self.splits["train"]
        have = {"reference", "reward", "advantage"}
        if all(e.rejected is not None for e in train):
            have.add("preferences")
        if all(e.ranking is not None for e in train) and len({len(e.ranking) for e in train}) == 1:
            have.add("ranking")
        if all("bad" in e.meta for e in train):
            have.add("ground_truth")
        return have


def _check_splits(name: str, splits: dict[str, list[Example]]) -> dict[str, list[Example]]:
    for split in SPLITS:
        if not splits.get(split):
            raise DataError(f"task {name}: split '{split}' has no rows")
    return splits


def build_toy(cfg) -> Task:
    splits = load_toy(cfg.seed, cfg.variant, dict(cfg.sizes))
    return Task(cfg.name, _check_splits(cfg.name, splits), build_reward(cfg.rewards), cfg.prompt_template)


def build_jsonl(cfg) -> Task:
    """The user's own data: one jsonl file per split of {prompt, response, reward?, ...}."""
    splits = {}
    for split in SPLITS:
        path = cfg.get(split)
        if not path:
            raise DataError(f"task jsonl needs task.{split}=<path to a jsonl file>")
        splits[split] = read_jsonl(path)
    return Task(cfg.name, _check_splits(cfg.name, splits), build_reward(cfg.rewards), cfg.prompt_template)


TASKS = {"toy": build_toy, "jsonl": build_jsonl}


def build_task(cfg) -> Task:
    builder = TASKS.get(cfg.loader)
    if builder is None:
        raise ValueError(f"unknown task loader {cfg.loader!r}; valid: {sorted(TASKS)}")
    return builder(cfg)


__all__ = ["Task", "Example", "DataError", "build_task", "TASKS", "SPLITS"]
