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
- `source: small`: a small seeded subset of those train files kept in the repository
  (data/hh-rlhf-small, made by scripts/make_hh_subset.py), in the same row format, one folder per
  subset with train/validation/test.jsonl.gz read as they are: a real-data task for CPU runs and tests.

Each pair becomes one Example: the prompt is the history in the LLaMA chat format of the authors' code
("### Human: ... ### Assistant: ... ### Assistant:"; the system line is the task's prompt_template),
`response` the chosen turn, `rejected` the other and `ranking` both (DPO and PRO run);
`meta["segment"]` names the subset (Table 2 reports the four test segments apart).

"""

from __future__ import annotations

import gzip
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

import lol_rl

from .base import DataError, Example, decode_json, json_lines, read_json, require, require_file, subsample

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
    splits_of = {"pro": _pro_splits, "hub": _hub_splits, "small": _small_splits}
    if cfg.source not in splits_of:
        raise DataError(f"task.source must be 'pro', 'hub' or 'small', got {cfg.source!r}")
    train, validation, test = splits_of[cfg.source](cfg)
    cleaned = [e for e in train if all(complete_response(r) for r in e.ranking)]
    log.info("hha: %d of %d train pairs dropped (an empty response or one ending in ':')",
             len(train) - len(cleaned), len(train))
    train = cleaned
    return {
        "train": subsample(train, cfg.sizes.train, cfg.seed),
        "validation": subsample(validation, cfg.sizes.validation, cfg.seed),
        "test": [e for segment in SEGMENTS.values() for e in subsample(test[segment], cfg.sizes.test, cfg.seed)],
    }


def complete_response(response: str) -> bool:
    """Neither empty nor cut off mid-turn (ending in ":"), the authors' train cleaning."""
    return bool(response.strip()) and not response.endswith(":")


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
        where = f"{cfg.hub_dataset}/{subset}"
        train += _hub_rows(_numbered(data["train"], f"{where}/train"), subset, "train")
        test[segment] = _hub_rows(_numbered(data["test"], f"{where}/test"), subset, "test")
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


def _numbered(rows, where: str) -> list[tuple[str, Any]]:
    return [(f"{where} row {i}", raw) for i, raw in enumerate(rows)]


def _hub_rows(rows: list[tuple[str, Any]], subset: str, split: str) -> list[Example]:
    """The pairs of one subset's split, given as (where, row) for messages, that are two endings
    of one history (else they are no preference over one prompt)."""
    segment, examples = SEGMENTS[subset], []
    for i, (where, raw) in enumerate(rows):
        pair = hub_pair(require(raw, "chosen", str, where), require(raw, "rejected", str, where))
        if pair is not None:
            history, chosen, rejected = pair
            examples.append(_example(f"{segment}-{split}-{i}", history, [chosen, rejected],
                                     {"segment": segment, "source": f"{subset}/{split} row {i}"}))
    if len(examples) < len(rows):
        log.info("hha: %s/%s: %d of %d pairs skipped (not two endings of one dialogue)",
                 subset, split, len(rows) - len(examples), len(rows))
    return examples


def hub_pair(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str] | None:
    """A published row's two dialogues -> (the history, ending in the empty assistant turn the
    response completes, the chosen turn, the rejected turn); None unless both parse and share
    their history."""
    chosen_turns, rejected_turns = _hub_turns(chosen), _hub_turns(rejected)
    if chosen_turns is None or rejected_turns is None or chosen_turns[:-1] != rejected_turns[:-1]:
        return None
    return chosen_turns[:-1] + [("Assistant", "")], chosen_turns[-1][1], rejected_turns[-1][1]


def _hub_turns(dialogue: str) -> list[tuple[str, str]] | None:
    """The turns of a published dialogue, "\\n\\nHuman: a\\n\\nAssistant: b" -> [("Human", "a"),
    ("Assistant", "b")]; None unless it starts with a human turn and ends with an assistant turn."""
    parts = _HUB_TURN.split(dialogue)
    turns = [(role, text.strip()) for role, text in zip(parts[1::2], parts[2::2])]
    if parts[0].strip() or len(turns) < 2 or turns[0][0] != "Human" or turns[-1][0] != "Assistant":
        return None
    return turns


# --- the repository's small subset of those train files (scripts/make_hh_subset.py) --------------


def _small_splits(cfg):
    folder = repo_path(cfg.small_dir)
    if not folder.is_dir():
        raise DataError(f"task.small_dir={cfg.small_dir}: no such folder (looked from the cwd and the "
                        f"repository root, {folder}); scripts/make_hh_subset.py makes it")
    train = [e for subset in SEGMENTS for e in _small_rows(folder, subset, "train")]
    validation = [e for subset in SEGMENTS for e in _small_rows(folder, subset, "validation")]
    test = {segment: _small_rows(folder, subset, "test") for subset, segment in SEGMENTS.items()}
    return train, validation, test


def _small_rows(folder: Path, subset: str, split: str) -> list[Example]:
    return _hub_rows(gz_json_lines(folder / subset / f"{split}.jsonl.gz"), subset, split)


def repo_path(path) -> Path:
    """`path` itself when it exists (or is absolute), else the same path under the repository root of
    this (editable) install: the repo's data is found whatever the cwd."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    return Path(lol_rl.__file__).resolve().parents[2] / path


def gz_json_lines(path: Path) -> list[tuple[str, Any]]:
    """('file:line', decoded object) for each non-blank line of a gzipped JSON-lines file."""
    require_file(path)
    try:
        lines = gzip.decompress(path.read_bytes()).split(b"\n")
    except (OSError, EOFError) as err:  # not gzip (a Git LFS pointer, say) or cut short
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    numbered = [(f"{path}:{n}", line) for n, line in enumerate(lines, start=1) if line.strip()]
    return [(where, decode_json(line, where)) for where, line in numbered]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
