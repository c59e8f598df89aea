"""`task=hf`: the user's data as the ecosystem keeps it, read with `datasets`.

`task.path` is a data file (.jsonl, .json, .parquet, .csv, each also gzipped), a folder of data
files or one written by `save_to_disk`, or a hub id (read from the offline cache only). The data's
names of the three splits are `task.split`; a validation or test split the data lacks is carved
from train by a seeded fraction (`task.validation_fraction`, `task.test_fraction`, `task.seed`),
its rows marked `meta.carved_from`. `task.columns` maps the names below onto the data's own
(`{prompt: question, response: answer}`). The format follows from the columns, or `task.format`:

- scored: prompt + response|completion (+ reward|score, rewards, rejected, ranking): the common row;
- preference (TRL): prompt + chosen + rejected. Without a prompt, chosen and rejected are whole
  dialogues "\\n\\nHuman: ...\\n\\nAssistant: ..." (as hh-rlhf) or message lists sharing their
  history: the prompt is that history up to the last assistant turn marker, the response and the
  rejected one the two endings (a row whose two dialogues differ before it is skipped and counted);
- unpaired (TRL): prompt + completion + label (true or false): reward 1.0 or 0.0;
- conversational: messages, a list of {role, content}: the prompt is every turn before the last
  assistant turn, the response that turn. prompt, completion, chosen and rejected may be message
  lists in the formats above too (TRL's conversational forms; a completion is one assistant message).

A conversational prompt keeps its turns: under a model with a chat template (model.chat_template)
they render through it, ending with the generation prompt; otherwise the prompt is plain text, one
"role: content" line per turn and a closing "assistant:" line the response follows. Columns a
format does not read go under meta. Every row then passes `base.parse_row`, the validator of every
data file: a bad one stops with `<path>[<split>]:<row>` (the row's index in its split, from 0) and
the data's name of the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

from .base import DataError, Example, parse_row
from .hha import _hub_turns, hub_pair

log = logging.getLogger(__name__)

# a key the loader returns beside its splits: prompt text -> its turns [(role, text), ...], for the
# conversational prompts a chat template renders (see `prompt_turns`)
PROMPT_MESSAGES = "prompt_messages"

FORMATS = ("scored", "preference", "unpaired", "conversational")
# the names a format reads, which task.columns maps onto the data's columns (conf/task/hf.yaml lists them)
KEYS = ("id", "prompt", "response", "completion", "reward", "score", "rewards", "rejected", "ranking",
        "chosen", "label", "messages", "meta")
ALIASES = {"response": ("response", "completion"), "reward": ("reward", "score")}  # the first one found is read
NEEDS = {"scored": ("prompt", "response"), "preference": ("chosen", "rejected"),
         "unpaired": ("prompt", "response", "label"), "conversational": ("messages",)}
READS = {"scored": ("reward", "rejected", "ranking"), "preference": ("prompt", "reward"),
         "unpaired": (), "conversational": ("reward",)}
COMMON = ("id", "rewards", "meta")
DATA_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ASSISTANT_MARK = "\n\nAssistant:"  # hh-rlhf's turn marker the response follows
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
NOT_OFFLINE = ("is neither a local path nor in the offline Hugging Face cache (download it once where there is "
               "network, or give a local path)")


def load_hf(cfg) -> dict[str, Any]:
    """{train, validation, test: [Example], PROMPT_MESSAGES: {prompt: turns}} from `cfg.path`."""
    mapping = _column_map(cfg.columns)
    data = _load(cfg)
    names = cfg.split
    if names.train not in data:
        raise DataError(f"task.path={cfg.path}: no split {names.train!r} (task.split.train); splits: {sorted(data)}")
    prompt_messages: dict[str, list[tuple[str, str]]] = {}
    splits = {"train": _read_split(cfg, data[names.train], names.train, mapping, prompt_messages)}
    carve = []
    for role in ("validation", "test"):
        name = names[role]
        if name is not None and name in data:
            splits[role] = _read_split(cfg, data[name], name, mapping, prompt_messages)
        elif name is not None and name != role:  # a split the user named, not the default name
            raise DataError(f"task.path={cfg.path}: no split {name!r} (task.split.{role}); splits: {sorted(data)} "
                            f"(task.split.{role}=null carves it from train)")
        else:
            carve.append(role)
    if carve:
        splits.update(_carve(cfg, splits, carve))
    return {**splits, PROMPT_MESSAGES: prompt_messages}


def prompt_turns(table: dict[str, list[tuple[str, str]]] | None):
    """The `Task.dialogue` of a conversational dataset: prompt -> its turns and the empty assistant
    turn the response completes; a prompt the data gave as plain text is one user turn. None when
    no prompt came as messages (the task then keeps its prompt_template under any model)."""
    if not table:
        return None

    def dialogue(prompt: str) -> list[tuple[str, str]]:
        return [*table.get(prompt, [("user", prompt)]), ("Assistant", "")]

    return dialogue


def plain_text(turns: list[tuple[str, str]]) -> str:
    """A conversation as the prompt text a model without a chat template reads."""
    return "".join(f"{role}: {text}\n" for role, text in turns) + "assistant:"


# --- reading the source -------------------------------------------------------------------------


def _load(cfg) -> dict[str, Any]:
    """split name -> datasets.Dataset; a path that cannot be read stops with one line."""
    from datasets import Dataset, load_dataset, load_from_disk  # heavy import, only on this path
    from datasets.exceptions import DatasetGenerationError

    given = str(cfg.path)
    path = Path(given).expanduser()
    hub_id = not path.exists() and bool(_HUB_ID.fullmatch(given)) and _data_suffix(path) not in DATA_FILES
    if not path.exists() and not hub_id:
        raise DataError(f"task.path={given}: no such file or dir")
    builder = _builder(path) if path.is_file() else None
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = load_from_disk(str(path))
        elif builder is not None:
            data = load_dataset(builder, data_files={"train": str(path)}, cache_dir=cfg.cache_dir)
        else:  # a folder of data files, or a hub id
            data = load_dataset(given if hub_id else str(path), data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
    except ConnectionError:  # HF_HUB_OFFLINE (the CLI sets it) and not in the cache
        raise DataError(f"task.path={given} {NOT_OFFLINE}") from None
    except (OSError, ValueError, DatasetGenerationError) as err:  # unreadable JSON, a bad gzip, no data files
        reason = str(err.__cause__ or err).strip().splitlines() or [type(err).__name__]
        raise DataError(f"task.path={given}: cannot read it ({reason[0]})") from None
    return {"train": data} if isinstance(data, Dataset) else dict(data)


def _data_suffix(path: Path) -> str:
    name = path.name.lower()
    return Path(name[:-3] if name.endswith(".gz") else name).suffix


def _builder(path: Path) -> str:
    builder = DATA_FILES.get(_data_suffix(path))
    if builder is None:
        raise DataError(f"task.path={path}: a data file ends in .jsonl, .json, .parquet or .csv (or that and .gz), "
                        f"got {path.name!r}")
    return builder


def _column_map(columns) -> dict[str, str]:
    mapping = {key: column for key, column in dict(columns or {}).items() if column is not None}
    unknown = sorted(set(mapping) - set(KEYS))
    if unknown:
        raise DataError(f"task.columns: unknown name(s) {unknown}; expected some of {list(KEYS)}, each mapped to "
                        "a column of the data")
    return {key: str(column) for key, column in mapping.items()}


def _read_split(cfg, dataset, split: str, mapping: dict[str, str], prompt_messages: dict) -> list[Example]:
    label = f"{cfg.path}[{split}]"
    columns = list(dataset.column_names)
    available = _available(mapping, columns, label)
    fmt = cfg.format if cfg.format != "auto" else _detect(available)
    picked = _pick(fmt, available, columns, label, auto=cfg.format == "auto")
    names = _names(fmt, picked)
    extra = [c for c in columns if c not in picked.values()]
    examples, seen, skipped, dropped = [], {}, 0, set()
    for i, row in enumerate(dataset):
        where = f"{label}:{i}"
        values = {role: row[column] for role, column in picked.items() if row[column] is not None}
        built = ROWS[fmt](values, where, names)
        if built is None:
            skipped += 1
            continue
        raw, history = built  # history: the prompt's turns, when it came as messages
        meta = _meta(values.get("meta"), {c: row[c] for c in extra}, dropped)
        if meta is not None:
            raw["meta"] = meta
        example = parse_row(raw, where, f"{split}-{i}", names)
        if example.id in seen:
            raise DataError(f"{where}: duplicate id {example.id!r} (first at row {seen[example.id]})")
        seen[example.id] = i
        if history is not None:
            _remember(prompt_messages, example.prompt, history, where)
        examples.append(example)
    log.info("hf: %s: %d rows, format %s%s", label, len(examples), fmt,
             f"; {skipped} skipped (chosen and rejected are not two endings of one dialogue)" if skipped else "")
    if dropped:
        log.info("hf: %s: column(s) %s left out of meta (their values are not JSON)", label, sorted(dropped))
    return examples


def _available(mapping: dict[str, str], columns: list[str], label: str) -> dict[str, str]:
    """name -> the data's column for each name it has: mapped, or under that very name."""
    for key, column in mapping.items():
        if column not in columns:
            raise DataError(f"{label}: no column {column!r} (task.columns.{key}); columns: {columns}")
    unmapped = {key: key for key in KEYS if key not in mapping and key in columns and key not in mapping.values()}
    return {**unmapped, **mapping}


def _detect(available: dict[str, str]) -> str:
    if "chosen" in available and "rejected" in available:
        return "preference"
    if "label" in available:
        return "unpaired"
    if "messages" in available and "prompt" not in available:
        return "conversational"
    return "scored"


def _pick(fmt: str, available: dict[str, str], columns: list[str], label: str, auto: bool) -> dict[str, str]:
    """role -> the column it is read from, for the roles `fmt` reads."""
    picked, missing = {}, []
    for role in NEEDS[fmt] + READS[fmt] + COMMON:
        options = ALIASES.get(role, (role,))
        column = next((available[k] for k in options if k in available), None)
        if column is not None:
            picked[role] = column
        elif role in NEEDS[fmt]:
            missing.append("|".join(options))
    if missing and auto:
        raise DataError(f"{label}: no format fits the columns {columns}: scored needs prompt + response|completion, "
                        "preference chosen + rejected (+ prompt), unpaired prompt + completion + label, "
                        "conversational messages; task.columns.<name>=<column> maps a column of another name")
    if missing:
        raise DataError(f"{label}: format '{fmt}' needs column(s) {missing}; columns: {columns} "
                        "(task.columns.<name>=<column> maps a column of another name)")
    return picked


def _names(fmt: str, picked: dict[str, str]) -> dict[str, str]:
    """The data's name of each key of the common row, for the validator's messages."""
    names = dict(picked)
    if fmt == "preference":
        names["response"] = picked["chosen"]
    elif fmt == "unpaired":
        names["reward"] = picked["label"]
    elif fmt == "conversational":
        names.update(prompt=picked["messages"], response=picked["messages"])
    return names


def _meta(given: Any, extra: dict[str, Any], dropped: set) -> Any:
    """The row's meta: its `meta` column (the validator checks it is an object) over the columns
    the format does not read, those whose values are JSON."""
    kept = {}
    for column, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            dropped.add(column)
            continue
        kept[column] = value
    if given is None:
        return kept or None
    return {**kept, **given} if isinstance(given, dict) else given


def _remember(table: dict, prompt: str, turns: list[tuple[str, str]], where: str) -> None:
    if table.setdefault(prompt, turns) != turns:
        raise DataError(f"{where}: its prompt's messages render as the same text as another row's different "
                        f"messages: {prompt[-80:]!r}")


def _carve(cfg, splits: dict[str, list[Example]], roles: list[str]) -> dict[str, list[Example]]:
    """The missing splits, each a seeded fraction of the train rows (disjoint, in train's order)."""
    train, source = splits["train"], cfg.split.train
    counts = {role: max(1, round(cfg[f"{role}_fraction"] * len(train))) for role in roles}
    if sum(counts.values()) >= len(train):
        raise DataError(f"{cfg.path}[{source}]: {len(train)} rows are too few to carve {' and '.join(roles)} from "
                        f"({', '.join(f'task.{r}_fraction' for r in roles)}); give those splits")
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    carved, start = {}, 0
    for role in roles:
        rows = sorted(order[start:start + counts[role]])
        start += counts[role]
        carved[role] = [dataclasses.replace(train[i], meta={**train[i].meta, "carved_from": source}) for i in rows]
    carved["train"] = [train[i] for i in sorted(order[start:])]
    log.info("hf: %s[%s]: %s carved from its %d rows (seed %d); %d train rows left", cfg.path, source,
             ", ".join(f"{role} {counts[role]}" for role in roles), len(train), cfg.seed, len(carved["train"]))
    return carved


# --- one row of each format -> the common row (and its prompt's turns, if they came as messages) ----


def _scored(values: dict, where: str, names: dict):
    raw = {key: values[key] for key in ("id", "reward", "rewards", "ranking") if key in values}
    prompt, turns = _prompt(values.get("prompt"), names["prompt"], where)
    raw.update(_given(prompt=prompt, response=_reply(values.get("response"), names["response"], where)))
    if "rejected" in values:
        raw["rejected"] = _reply(values["rejected"], names["rejected"], where)
    return raw, turns


def _preference(values: dict, where: str, names: dict):
    raw = {key: values[key] for key in ("id", "reward", "rewards") if key in values}
    if "prompt" in names:  # an explicit prompt
        prompt, turns = _prompt(values.get("prompt"), names["prompt"], where)
        chosen = _reply(values.get("chosen"), names["chosen"], where)
        rejected = _reply(values.get("rejected"), names["rejected"], where)
    else:
        pair = _implicit(_needed(values, "chosen", where, names), _needed(values, "rejected", where, names),
                         where, names)
        if pair is None:
            return None
        prompt, chosen, rejected, turns = pair
    raw.update(_given(prompt=prompt, response=chosen, rejected=rejected))
    if isinstance(chosen, str) and isinstance(rejected, str):
        raw["ranking"] = [chosen, rejected]  # best first: PRO runs on pairs too
    return raw, turns


def _unpaired(values: dict, where: str, names: dict):
    label = _needed(values, "label", where, names)
    if not isinstance(label, bool):
        raise DataError(f"{where}: key '{names['label']}' must be a bool (true or false), got "
                        f"{type(label).__name__} {label!r}")
    raw = {key: values[key] for key in ("id", "rewards") if key in values}
    prompt, turns = _prompt(values.get("prompt"), names["prompt"], where)
    raw.update(_given(prompt=prompt, response=_reply(values.get("response"), names["response"], where)))
    raw["reward"] = 1.0 if label else 0.0
    return raw, turns


def _conversational(values: dict, where: str, names: dict):
    key = names["messages"]
    messages = _messages(_needed(values, "messages", where, names), key, where)
    last = max((i for i, (role, _) in enumerate(messages) if role == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: key '{key}' has no assistant turn (the response)")
    if last < len(messages) - 1:
        raise DataError(f"{where}: key '{key}': a {messages[last + 1][0]!r} turn follows the last assistant turn; "
                        "the response must be the last turn")
    if last == 0:
        raise DataError(f"{where}: key '{key}' has no turn before the assistant turn (the prompt)")
    raw = {k: values[k] for k in ("id", "reward", "rewards") if k in values}
    raw.update(prompt=plain_text(messages[:last]), response=messages[last][1])
    return raw, messages[:last]


ROWS = {"scored": _scored, "preference": _preference, "unpaired": _unpaired, "conversational": _conversational}


def _implicit(chosen: Any, rejected: Any, where: str, names: dict):
    """(prompt, chosen, rejected, turns) from two whole dialogues; None if they differ before
    their last assistant turn."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen_turns = _messages(chosen, names["chosen"], where)
        rejected_turns = _messages(rejected, names["rejected"], where)
        for key, dialogue in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if dialogue[-1][0] != "assistant" or len(dialogue) < 2:
                raise DataError(f"{where}: key '{names[key]}' must be the prompt's turns and then an assistant "
                                "turn (there is no prompt column)")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            return None
        history = chosen_turns[:-1]
        return plain_text(history), chosen_turns[-1][1], rejected_turns[-1][1], history
    for key, dialogue in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(dialogue, str) or _hub_turns(dialogue) is None:
            raise DataError(f"{where}: key '{names[key]}' must be a dialogue '\\n\\nHuman: ...\\n\\nAssistant: ...' "
                            "ending with an assistant turn, or a list of messages (there is no prompt column)")
    pair = hub_pair(chosen, rejected)
    if pair is None:
        return None
    history, chosen_turn, rejected_turn = pair
    prompt = chosen[:chosen.rindex(ASSISTANT_MARK) + len(ASSISTANT_MARK)]
    return prompt, chosen_turn, rejected_turn, history[:-1]


def _prompt(value: Any, key: str, where: str) -> tuple[Any, list[tuple[str, str]] | None]:
    """A prompt as text and, when it came as messages, its turns (the validator checks the rest)."""
    if isinstance(value, list):
        turns = _messages(value, key, where)
        return plain_text(turns), turns
    return value, None


def _reply(value: Any, key: str, where: str) -> Any:
    """A response as text: a string, or a list holding one assistant message."""
    if not isinstance(value, list):
        return value
    turns = _messages(value, key, where)
    if [role for role, _ in turns] != ["assistant"]:
        raise DataError(f"{where}: key '{key}' must be one assistant message, got roles {[r for r, _ in turns]}")
    return turns[0][1]


def _messages(value: Any, key: str, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: key '{key}' must be a non-empty list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    turns = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not role.strip() or not isinstance(content, str):
            raise DataError(f"{where}: key '{key}[{i}]' must be a message {{role, content}} of strings, "
                            f"got {str(message)[:80]}")
        turns.append((role, content))
    return turns


def _needed(values: dict, role: str, where: str, names: dict) -> Any:
    if role not in values:
        raise DataError(f"{where}: missing key '{names[role]}'")
    return values[role]


def _given(**values: Any) -> dict[str, Any]:
    """The values present (a missing one is left for the validator to name)."""
    return {key: value for key, value in values.items() if value is not None}
