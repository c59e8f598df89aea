"""Tasks: load data into `Example` rows, format prompts, name their reward components.

A task is built from its config by its loader name (`LOADERS`); `Task.provides` says what its data has,
so an algorithm's needs are checked before any compute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..rewards import CompositeReward, build_reward
from ..rewards.preferences import preference_pairs
from .base import FIT_TEXTS, DataError, Example, read_jsonl
from .commonsense import load_commonsense
from .hf import PROMPT_MESSAGES, load_hf, prompt_turns
from .hha import load_hha, parse_dialogue
from .reddit import load_reddit
from .toy import load_toy
from .wow import load_wow

SPLITS = ("train", "validation", "test")

# a conversational task's yaml `dialogue:` -> its parser, prompt -> [(role, text), ...], the last
# turn the empty assistant turn the response completes
DIALOGUES = {"hha": parse_dialogue}
CHAT_ROLES = {"Human": "user", "Assistant": "assistant"}  # the parsers' roles -> chat-template roles
_PROMPT_MARK = "\0prompt\0"


@dataclass
class Task:
    name: str
    splits: dict[str, list[Example]]
    reward: CompositeReward | None   # scores train rows without a given reward, value-head samples, validation;
                                     # None: the data's own rewards only (see `build_task`)
    prompt_template: str
    eval_reward: CompositeReward | None = None  # the test reward when it differs (HHA: a larger reward model)
    response_prefix: str = " "  # between the formatted prompt and the response ("" after DialoGPT's EOS)
    dialogue: Callable[[str], list[tuple[str, str]]] | None = None  # conversational: prompt -> turns (DIALOGUES)
    chat_renderer: Callable[[list[dict]], str] | None = None  # messages -> text: set by use_chat_template

    @property
    def test_reward(self) -> CompositeReward | None:
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
        """The one formatting of a prompt (sft, value, rl, eval): the model's chat template over
        its messages once `use_chat_template` set one, else the task's prompt_template."""
        if self.chat_renderer is not None:
            return self.chat_renderer(self.chat_messages(prompt))
        return self.prompt_template.format(prompt=prompt)

    def use_chat_template(self, renderer: Callable[[list[dict]], str] | None) -> bool:
        """Render every prompt with a chat template (`models.chat_renderer`); only a
        conversational task takes one (others, the embedded task among them, keep their
        prompt_template byte for byte). The template ends with the assistant header, so nothing
        goes between it and the response. Returns whether the template is now in use."""
        if renderer is None or self.dialogue is None:
            return False
        self.chat_renderer = renderer
        self.response_prefix = ""
        return True

    def chat_messages(self, prompt: str) -> list[dict]:
        """A conversational prompt as chat messages: the prompt_template's text before {prompt}
        is the system message, then every turn but the empty last assistant one (the generation
        prompt stands for it)."""
        turns = self.dialogue(prompt)
        if not turns or turns[-1] != ("Assistant", ""):
            raise DataError(f"task {self.name}: a prompt must end with the empty assistant turn the response "
                            f"completes: {prompt[-80:]!r}")
        system = self.prompt_template.format(prompt=_PROMPT_MARK).split(_PROMPT_MARK)[0].strip()
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": CHAT_ROLES.get(role, role), "content": text} for role, text in turns[:-1]]

    def provides(self) -> set[str]:
        train = self.splits["train"]
        have = {"reference", "reward", "advantage"}
        if self.reward is not None:
            have.add("scorer")
        if all(e.rejected is not None for e in train):
            have.add("preferences")
        same_length = len({len(e.ranking) for e in train if e.ranking is not None}) == 1
        if self.reward is not None and all(e.ranking is not None for e in train) and same_length:
            have.add("ranking")  # a ranking's rewards come from the scorer
        if all("bad" in e.meta for e in train):
            have.add("ground_truth")
        return have


def data_reward(example: Example) -> float | None:
    """The reward a row gives for its logged response (`reward`, or the sum of `rewards`)."""
    if example.reward is not None:
        return example.reward
    return sum(example.rewards.values()) if example.rewards else None


def _check_data_rewards(name: str, splits: dict[str, list[Example]]) -> None:
    """Without a scorer, the value head fits on the validation rows' logged responses and A is
    computed from the train rows' rewards: both splits must give one for every row."""
    for split in ("train", "validation"):
        missing = next((e for e in splits[split] if data_reward(e) is None), None)
        if missing is not None:
            raise DataError(f"task {name}: split '{split}' row id {missing.id!r} has no 'reward' and no reward "
                            f"components are configured; give every train and validation row a reward, or name a "
                            f"scorer with reward=[<component or module:function>]")


def _check_template(name: str, template) -> None:
    """`prompt_template` formats every prompt (sft, value, rl, eval): a wrong field would stop the
    run inside the first stage, a template without `{prompt}` would silently drop the prompts."""
    marker = "\0prompt\0"
    try:
        formatted = str(template).format(prompt=marker)
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"task {name}: prompt_template {template!r} cannot be formatted ({type(err).__name__}: {err}); "
                        "its one field is {prompt}, and a literal brace is written {{ or }}") from None
    if marker not in formatted:
        raise DataError(f"task {name}: prompt_template {template!r} has no {{prompt}}, so every prompt would be dropped")


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
LOADERS = {
    "toy": load_toy_splits,
    "jsonl": load_jsonl_splits,
    "hha": load_hha,
    "reddit": load_reddit,
    "commonsense": load_commonsense,
    "wow": load_wow,
    "hf": load_hf,
}


def build_task(cfg, reward_override=None, device: str = "auto") -> Task:
    """Load the splits and build the reward components the task's yaml names (or
    `reward_override`, the top-level `reward=`); components with a `fit` (TF-IDF) see the
    train responses. With no component named, the rows' own rewards are the only signal:
    the value head fits on the validation rows' logged responses, training keeps its last
    step, and the test reports length and diversity but no reward."""
    loader = LOADERS.get(cfg.loader)
    if loader is None:
        raise DataError(f"unknown task loader {cfg.loader!r}; valid: {sorted(LOADERS)}")
    _check_template(cfg.name, cfg.prompt_template)
    dialogue = _dialogue_parser(cfg)
    splits = loader(cfg)
    fit_texts = splits.pop(FIT_TEXTS, None)
    dialogue = dialogue or prompt_turns(splits.pop(PROMPT_MESSAGES, None))  # prompts the data gave as messages
    splits = _check_splits(cfg.name, splits)
    fit_texts = fit_texts or [e.response for e in splits["train"]]
    specs = reward_override or cfg.get("rewards")
    if not specs:  # the user's rows carry rewards and no scorer is named: use the data's rewards
        _check_data_rewards(cfg.name, splits)
        return Task(cfg.name, splits, None, cfg.prompt_template, response_prefix=cfg.get("response_prefix", " "),
                    dialogue=dialogue)
    # components with `fit_pairs` (a Bradley-Terry reward model) fit on the train pairs and
    # report their accuracy on the validation pairs, which they never saw
    pairs = dict(fit_pairs=preference_pairs(splits["train"]), held_out_pairs=preference_pairs(splits["validation"]))
    reward = build_reward(specs, device=device, fit_texts=fit_texts, **pairs)
    eval_specs = cfg.get("eval_rewards")
    eval_reward = None
    if eval_specs and not reward_override:
        eval_reward = build_reward(eval_specs, device=device, fit_texts=fit_texts, **pairs)
    return Task(cfg.name, splits, reward, cfg.prompt_template, eval_reward, cfg.get("response_prefix", " "),
                dialogue=dialogue)


def _dialogue_parser(cfg):
    """`dialogue:` in a task's yaml names the parser of a conversational task's prompts."""
    name = cfg.get("dialogue")
    if name is not None and name not in DIALOGUES:
        raise DataError(f"task {cfg.name}: unknown dialogue {name!r}; valid: {sorted(DIALOGUES)}")
    return DIALOGUES.get(name)


__all__ = ["Task", "Example", "DataError", "build_task", "data_reward", "LOADERS", "SPLITS"]
