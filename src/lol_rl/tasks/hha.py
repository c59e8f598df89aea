"""Helpful and Harmless Assistant (HHA; Bai et al. 2022): preference pairs of final assistant turns.

Two sources of the same dialogues:

- `source: pro` (the paper's splits): the PRO repository's files (Song et al. 2024,
  github.com/AlibabaResearch/DAMO-ConvAI/tree/main/PRO, its data.zip unpacked as `data/`), one JSON
  object per line: `{prefix: [[turn, ...], ...], suffix: [chosen, rejected], reward: [r, r], sft_index,
  meta: {path, line_num, task}}`, a turn being "<|prompter|>text" or "<|assistant|>text" and the last one
  the empty "<|assistant|>" the response completes. Files: hh_train_len2/train.json,
  hh_dev/sampled_dev.json (280 rows), hh_test/{harmless_base,helpful_base,helpful_online,
  helpful_rejection}.json. The paper's 8207 test rows are these minus the 343 that the authors'
  data/hh_test/bad_test_indices.json lists (github.com/abaheti95/LoL-RL).
- `source: hub`: Anthropic/hh-rlhf as published: one folder per subset with train.jsonl.gz and
  test.jsonl.gz of `{chosen, rejected}`, each a whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue, read with
  `datasets.load_dataset(<hub id or local copy>, data_dir=<subset>)`. It has no validation split: a
  seeded sample of train rows is held out.

Each pair becomes one Example: the prompt is the history in the LLaMA chat format of the authors' code
("### Human: ... ### Assistant: ... ### Assistant:"; the system line is the task's prompt_template),
`response` the chosen turn, `rejected` the other and `ranking` both (DPO and PRO run);
`meta["segment"]` names the subset (Table 2 reports the four test segments apart).

"""

from __future__ import annotations

import logging
import math
import random
import re
from pathlib import Path
from typing import Any

from .base import DataError, Example, json_lines, read_json, require, subsample

log = logging.getLogger(__name__)

# hub subset folder -> segment name (the PRO test file's stem)
SEGMENTS = {
    "harmless-base": "harmless_base",
    "helpful-base": "helpful_base",
    "helpful-online": "helpful_online",
    "helpful-rejection-sampled": "helpful_rejection",
}
MARKERS = {"Human": "<|prompter|>", "Assistant": "<|assistant|>"}  # the OpenAssistant turn markers PRO uses
OASST_EOS = "<|endoftext|>"  # the reward models' EOS: it closes every turn (the authors' metrics_hh.py)
_CHAT_TURN = re.compile(r" ### (Human|Assistant): ")
_HUB_TURN = re.compile(r"\n\n(Human|Assistant):")


def format_dialogue(turns: list[tuple[str, str]]) -> str:
    """[(role, text), ...] -> "### Human: a ### Assistant: b ### Assistant:": every turn as
    " ### Role: text", the whole stripped, as the authors' code rewrites PRO's markers."""
    return "".join(f" ### {role}: {text}" for role, text in turns).strip()


def parse_dialogue(prompt: str) -> list[tuple[str, str]]:
    """The inverse of format_dialogue (the strip took the space around the ends)."""
    parts = _CHAT_TURN.split(f" {prompt} ")
    if parts[0] or len(parts) < 3:
        raise ValueError(f"not an HHA prompt ('### Human: ... ### Assistant:'): {prompt[:80]!r}")
    return list(zip(parts[1::2], parts[2::2]))


def oasst_rm_input(prompt: str, response: str) -> str:
    """What the OpenAssistant reward models read: each turn as "<|prompter|>text" or
    "<|assistant|>text" closed by EOS, the response completing the last (assistant) turn."""
    turns = parse_dialogue(prompt)
    turns[-1] = (turns[-1][0], turns[-1][1] + response)
    return "".join(f"{MARKERS[role]}{text}{OASST_EOS}" for role, text in turns)


def load_hha(cfg) -> dict[str, list[Example]]:
    """train / validation / test (the four segments, in SEGMENTS order) from `cfg.source`. Train
    rows with an empty response or one ending in ":" (cut off mid-turn) are dropped, as the
    authors' data_cleaning.py does; `sizes` caps each split (test: each segment)."""
    if cfg.source == "pro":
        train, validation, test = _pro_splits(cfg)
    elif cfg.source == "hub":
        train, validation, test = _hub_splits(cfg)
    else:
        raise DataError(f"task.source must be 'pro' or 'hub', got {cfg.source!r}")
    cleaned = [e for e in train if all(r.strip() and not r.endswith(":") for r in e.ranking)]
    log.info("hha: %d of %d train pairs dropped (an empty response or one ending in ':')",
             len(train) - len(cleaned), len(train))
    train = cleaned
    return {
        "train": subsample(train, cfg.sizes.train, cfg.seed),
        "validation": subsample(validation, cfg.sizes.validation, cfg.seed),
        "test": [e for segment in SEGMENTS.values() for e in subsample(test[segment], cfg.sizes.test, cfg.seed)],
    }


def _example(id_: str, turns: list[tuple[str, str]], responses: list[str], meta: dict, rewards=None) -> Example:
    return Example(id=id_, prompt=format_dialogue(turns), response=responses[0], rejected=responses[-1],
                   ranking=list(responses), rewards=rewards, meta=meta)


# --- the PRO repository's files ---------------------------------------------------------------


def _pro_splits(cfg):
    excluded = _excluded_test_rows(cfg.exclude_test) if cfg.exclude_test else {}
    test = {}
    for segment in SEGMENTS.values():
        path = Path(cfg.test_dir) / f"{segment}.json"
        skip = excluded.get(path.name, set())
        test[segment] = [
            _pro_example(raw, where, f"{segment}-{index}", segment, cfg.data_reward)
            for where, index, raw in json_lines(path) if index not in skip
        ]
    train = [_pro_example(raw, where, f"train-{i}", None, cfg.data_reward)
             for where, i, raw in json_lines(cfg.train)]
    validation = [_pro_example(raw, where, f"validation-{i}", None, cfg.data_reward)
                  for where, i, raw in json_lines(cfg.validation)]
    return train, validation, test


def _pro_example(raw: Any, where: str, id_: str, segment: str | None, data_reward: bool) -> Example:
    prefix = require(raw, "prefix", list, where)
    if not prefix or not isinstance(prefix[0], list) or not prefix[0]:
        raise DataError(f"{where}: key 'prefix' must be a list holding a non-empty list of turns")
    turns = [_pro_turn(turn, where) for turn in prefix[0]]
    if turns[-1] != ("Assistant", ""):
        raise DataError(f"{where}: key 'prefix': the last turn must be the empty '<|assistant|>' "
                        "the response completes")
    suffix = require(raw, "suffix", list, where)
    if len(suffix) < 2 or not all(isinstance(s, str) for s in suffix):
        raise DataError(f"{where}: key 'suffix' must be a list of 2 or more strings (chosen first)")
    scores = require(raw, "reward", list, where)
    if len(scores) != len(suffix) or not all(_is_number(s) for s in scores):
        raise DataError(f"{where}: key 'reward' must be {len(suffix)} finite numbers, one per suffix")
    source = raw.get("meta")
    segment = segment or _segment_of(source)
    meta = {"segment": segment, "pro_reward": scores, "source": source}
    # PRO's scores are logits of the same 1.4B reward model (the authors' lolrl_qlora_llama_hh.py
    # trains on their sigmoid); with data_reward they stand in for scoring every train row again
    rewards = {"reward": 1 / (1 + math.exp(-scores[0]))} if data_reward else None
    return _example(id_, turns, suffix, {k: v for k, v in meta.items() if v is not None}, rewards)


def _pro_turn(turn: Any, where: str) -> tuple[str, str]:
    for role, marker in MARKERS.items():
        if isinstance(turn, str) and turn.startswith(marker):
            return role, turn[len(marker):]
    raise DataError(f"{where}: key 'prefix': turn {str(turn)[:60]!r} starts with neither "
                    "'<|prompter|>' nor '<|assistant|>'")


def _segment_of(source: Any) -> str | None:
    """The subset a PRO row came from, read off its meta.path (".../hhrlhf/helpful-base/train.jsonl")."""
    path = source.get("path") if isinstance(source, dict) else None
    parts = Path(path).parts if isinstance(path, str) else ()
    return next((SEGMENTS[p] for p in parts if p in SEGMENTS), None)


def _excluded_test_rows(path) -> dict[str, set[int]]:
    """The authors' bad_test_indices.json: {"harmless_base.json": [row index, ...], ...}."""
    listed = read_json(path, dict, "an object of test file name -> list of row indices",
                       " (set task.exclude_test=null to keep every test row)")
    for name, indices in listed.items():
        if not isinstance(indices, list) or not all(type(i) is int for i in indices):
            raise DataError(f"{path}: key '{name}' must be a list of row indices")
    return {name: set(indices) for name, indices in listed.items()}


# --- Anthropic/hh-rlhf as published -------------------------------------------------------------


def _hub_splits(cfg):
    train, test = [], {}
    for subset, segment in SEGMENTS.items():
        data = _hub_subset(cfg.hub_dataset, subset, cfg.hub_cache_dir)
        train += _hub_rows(data["train"], cfg.hub_dataset, subset, "train")
        test[segment] = _hub_rows(data["test"], cfg.hub_dataset, subset, "test")
    held_out = set(random.Random(cfg.seed).sample(range(len(train)), min(cfg.hub_validation, len(train))))
    validation = [e for i, e in enumerate(train) if i in held_out]
    return [e for i, e in enumerate(train) if i not in held_out], validation, test


def _hub_subset(dataset: str, subset: str, cache_dir: str | None):
    from datasets import load_dataset  # heavy import, only on this path
    from datasets.exceptions import DatasetGenerationError

    try:
        data = load_dataset(dataset, data_dir=subset, cache_dir=cache_dir)
    except (OSError, DatasetGenerationError) as err:  # a missing folder, a bad gzip, unreadable JSON
        raise DataError(f"{dataset} data_dir={subset}: cannot read it ({err.__cause__ or err})") from None
    for split in ("train", "test"):
        if split not in data:
            raise DataError(f"{dataset}/{subset}: no {split} split (expected {split}.jsonl.gz)")
    return data


def _hub_rows(rows, dataset: str, subset: str, split: str) -> list[Example]:
    """The pairs of one subset's split that are two endings of one history (else they are no
    preference over one prompt)."""
    segment, examples = SEGMENTS[subset], []
    for i, raw in enumerate(rows):
        source = f"{subset}/{split} row {i}"
        chosen = _hub_turns(require(raw, "chosen", str, f"{dataset}/{source}"))
        rejected = _hub_turns(require(raw, "rejected", str, f"{dataset}/{source}"))
        if chosen is not None and rejected is not None and chosen[:-1] == rejected[:-1]:
            history = chosen[:-1] + [("Assistant", "")]
            examples.append(_example(f"{segment}-{split}-{i}", history, [chosen[-1][1], rejected[-1][1]],
                                     {"segment": segment, "source": source}))
    if len(examples) < len(rows):
        log.info("hha: %s/%s: %d of %d pairs skipped (not two endings of one dialogue)",
                 subset, split, len(rows) - len(examples), len(rows))
    return examples


def _hub_turns(dialogue: str) -> list[tuple[str, str]] | None:
    """The turns of a published dialogue, "\\n\\nHuman: a\\n\\nAssistant: b" -> [("Human", "a"),
    ("Assistant", "b")]; None unless it starts with a human turn and ends with an assistant turn."""
    parts = _HUB_TURN.split(dialogue)
    turns = [(role, text.strip()) for role, text in zip(parts[1::2], parts[2::2])]
    if parts[0].strip() or len(turns) < 2 or turns[0][0] != "Human" or turns[-1][0] != "Assistant":
        return None
    return turns


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
