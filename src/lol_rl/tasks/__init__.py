"""Tasks: load data into `Example` rows, format prompts, name their reward components.

A task is built from its config by its loader name (`LOADERS`); `Task.provides` says what its data has,
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
    reward: CompositeReward          # scores train rows without a given reward, value-head samples, validation
    prompt_template: str
    eval_reward: CompositeReward | None = None  # the test reward when it differs (HHA: a larger reward model)

    @property
    def test_reward(self) -> CompositeReward:
        return self.eval_reward or self.reward

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


def load_toy_splits(cfg) -> dict[str, list[Example]]:
    return load_toy(cfg.seed, cfg.variant, dict(cfg.sizes))


def load_jsonl_splits(cfg) -> dict[str, list[Example]]:
    """The user's own data: one jsonl file per split of {prompt, response, reward?, ...}."""
    splits = {}
    for split in SPLITS:
        path = cfg.get(split)
        if not path:
            raise DataError(f"task jsonl needs task.{split}=<path to a jsonl file>")
        splits[split] = read_jsonl(path)
    return splits


# loader name (a task yaml's `loader:`) -> function(task cfg) -> {split: [Example]}
LOADERS = {"toy": load_toy_splits, "jsonl": load_jsonl_splits}


def build_task(cfg, reward_override=None, device: str = "auto") -> Task:
    """Load the splits and build the reward components the task's yaml names (or
    `reward_override`, the top-level `reward=`); components with a `fit` (TF-IDF) see the
    train responses."""
    loader = LOADERS.get(cfg.loader)
    if loader is None:
        raise ValueError(f"unknown task loader {cfg.loader!r}; valid: {sorted(LOADERS)}")
    splits = _check_splits(cfg.name, loader(cfg))
    train_responses = [e.response for e in splits["train"]]
    reward = build_reward(reward_override or cfg.rewards, device=device, fit_texts=train_responses)
    eval_specs = cfg.get("eval_rewards")
    eval_reward = None
    if eval_specs and not reward_override:
        eval_reward = build_reward(eval_specs, device=device, fit_texts=train_responses)
    return Task(cfg.name, splits, reward, cfg.prompt_template, eval_reward)


__all__ = ["Task", "Example", "DataError", "build_task", "LOADERS", "SPLITS"]
