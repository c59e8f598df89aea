"""The common row every task loads into, the validated reader for data files, and the
readers the task loaders share (JSON lines, typed keys, seeded subsets)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LolRlError


# a loader may return this key beside its splits: the texts reward components with a `fit`
# (TF-IDF) fit on, when they are not simply the train responses
FIT_TEXTS = "reward_fit_texts"


class DataError(LolRlError, ValueError):
    """Bad input data; the message names the file, the row and the key."""


@dataclass
class Example:
    """One row: a prompt, one logged response, and what else the source has.

    `reward`/`rewards` are given by the data (used as they are) or left None (the task's
    reward components score the response). `rejected` is a worse response to the same
    prompt (a preference pair with `response` as the chosen one); `ranking` is a list of
    responses ordered best first.
    """

    id: str
    prompt: str
    response: str
    reward: float | None = None
    rewards: dict[str, float] | None = None
    rejected: str | None = None
    ranking: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


REQUIRED = ("prompt", "response")
OPTIONAL = ("id", "reward", "rewards", "rejected", "ranking", "meta")


# training holds rewards in float32 and fits V(x) by their squared error: beyond the square root of
# float32's largest number (1.8e19) that square is inf, and so is every loss weighted by A
REWARD_LIMIT = 3.4028234663852886e38 ** 0.5


def require_file(path: Path, hint: str = "") -> Path:
    """`path` if it is a file; else one line saying what is there instead."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file{hint}")
    if not path.is_file():
        raise DataError(f"{path}: no such file{hint}")
    return path


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = {}
    for key, value in pairs:
        if key in row:  # json.loads would keep the last one silently
            raise ValueError(f"key '{key}' appears twice in one object")
        row[key] = value
    return row


def decode_json(text: str | bytes, where: str) -> Any:
    """One JSON document; a syntax error, a duplicate key in an object or a number Python cannot
    hold is one line naming `where`."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except ValueError as err:  # a duplicate key, or an integer of more digits than Python converts
        raise DataError(f"{where}: {str(err).splitlines()[0]}") from None


def _text(value: str, where: str) -> str:
    """`value` if a tokenizer can encode it: a lone UTF-16 surrogate (JSON's "\\ud800") cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where} holds a lone surrogate {value[err.start]!r} at character {err.start}, which is "
                        "not text (an escape from a broken UTF-16 source?)") from None
    return value


def _finite_reward(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if isinstance(value, int) and abs(value) > REWARD_LIMIT:  # maybe beyond any float: math.isfinite would overflow
        raise DataError(f"{where}: reward {str(value)[:12]}... ({len(str(abs(value)))} digits) is too large to train "
                        f"on in float32 (|reward| <= {REWARD_LIMIT:.3g}); rescale the rewards")
    if not math.isfinite(value):
        raise DataError(f"{where}: reward must be finite, got {value!r}")
    if abs(value) > REWARD_LIMIT:
        raise DataError(f"{where}: reward {value!r} is too large to train on in float32 (|reward| <= "
                        f"{REWARD_LIMIT:.3g}); rescale the rewards")
    return float(value)


def parse_row(raw: Any, where: str, index: int | str, columns: dict[str, str] | None = None) -> Example:
    """Validate one decoded json object into an Example; `where` is 'file:line' for messages.
    `columns` names a key as the data has it, when the data named it otherwise (task=hf's
    column mapping: {'prompt': 'question'} makes an empty prompt "key 'question' is empty")."""
    def key_(key: str) -> str:
        return (columns or {}).get(key, key)

    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; expected {list(REQUIRED + OPTIONAL)} "
                        "(anything else goes under 'meta')")
    for key in REQUIRED:
        if key not in raw:
            raise DataError(f"{where}: missing key '{key_(key)}'")
        if not isinstance(raw[key], str):
            raise DataError(f"{where}: key '{key_(key)}' must be a string, got {type(raw[key]).__name__}")
        if not _text(raw[key], f"{where}: key '{key_(key)}'").strip():
            raise DataError(f"{where}: key '{key_(key)}' is empty")
    reward = _finite_reward(raw["reward"], f"{where}: key '{key_('reward')}'") if "reward" in raw else None
    rewards = None
    if "rewards" in raw:
        if not isinstance(raw["rewards"], dict) or not raw["rewards"]:
            raise DataError(f"{where}: key '{key_('rewards')}' must be a non-empty object of name: number")
        rewards = {k: _finite_reward(v, f"{where}: key '{key_('rewards')}.{k}'") for k, v in raw["rewards"].items()}
    rejected = raw.get("rejected")
    if rejected is not None and (not isinstance(rejected, str) or not _text(rejected, f"{where}: key '{key_('rejected')}'").strip()):
        raise DataError(f"{where}: key '{key_('rejected')}' must be a non-empty string")
    ranking = raw.get("ranking")
    if ranking is not None and (
        not isinstance(ranking, list) or len(ranking) < 2
        or not all(isinstance(r, str) and r.strip() for r in ranking)
    ):
        raise DataError(f"{where}: key '{key_('ranking')}' must be a list of 2 or more non-empty strings")
    for i, text in enumerate(ranking or ()):
        _text(text, f"{where}: key '{key_('ranking')}[{i}]'")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{where}: key '{key_('meta')}' must be an object")
    row_id = raw.get("id", index)
    # ids key the advantage cache and the judge's pairs: `null` or an object would all read alike
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or not str(row_id).strip():
        raise DataError(f"{where}: key '{key_('id')}' must be a non-empty string or an integer, got {row_id!r}")
    return Example(
        id=str(row_id), prompt=raw["prompt"], response=raw["response"],
        reward=reward, rewards=rewards, rejected=rejected, ranking=ranking, meta=meta,
    )


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a jsonl file of rows; the first bad row stops with file:line and key."""
    path = require_file(Path(path))
    examples, seen = [], {}
    with path.open("rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                continue
            raw = decode_json(text.rstrip("\r\n"), where)  # a row cut short points at its end, not at column 1 of the next line
            example = parse_row(raw, where, index=len(examples))
            if example.id in seen:
                raise DataError(f"{where}: duplicate id {example.id!r} (first at line {seen[example.id]})")
            seen[example.id] = line_no
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def json_lines(path) -> Iterator[tuple[str, int, Any]]:
    """('file:line', row index, decoded object) for each non-blank line of a JSON-lines file."""
    path = require_file(Path(path))
    with path.open("rb") as f:
        index = 0
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            yield where, index, decode_json(line, where)
            index += 1


def require(row: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """row[key], which must exist and be a `kind`; DataError names where, the key and what came."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{where}: missing key '{key}'")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{where}: key '{key}' must be a {names}, got {type(value).__name__}")
    return value


def subsample(rows: list, n: int | None, seed: int) -> list:
    """At most `n` rows: a seeded random subset, kept in file order (n None: all)."""
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def read_json(path, expected: type, what: str, missing_hint: str = "") -> Any:
    """A whole-file JSON document of type `expected` (`what` describes it for the message)."""
    path = require_file(Path(path), missing_hint)
    data = decode_json(path.read_bytes(), str(path))
    if not isinstance(data, expected):
        raise DataError(f"{path}: expected {what}, got {type(data).__name__}")
    return data
