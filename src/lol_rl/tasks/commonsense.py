"""Commonsense reasoning: COMET-distill on ATOMIC-10x (West et al. 2022, "Symbolic Knowledge
Distillation"), as the paper's appendix C.1 and the authors' preprocess_comet_and_add_rewards.py.

- ATOMIC10X.jsonl (in the SKD release, storage.googleapis.com/ai2-mosaic-public/projects/
  symbolic-knowledge-decoding/symbolic-knowledge-distillation.tar.gz, under downloaded/): one JSON
  object per line, `{head, relation, tail, split: train|val|test, rec_0.5 .. rec_0.9, p_valid_model}`,
  `p_valid_model` being the COMET critic's P(valid) of the triple. Its train and val rows are the
  train and validation splits.
- Test: ATOMIC-2020's test.tsv (atomic2020_data-feb2021/), lines `head<TAB>relation<TAB>tail`, kept
  for the seven relations of ATOMIC-10x, one row per (head, relation) pair.

The prompt is COMET-distill's: `<head> H </head> <relation> R </relation> [GEN]`; the response
(the tail) follows after a space. With `data_reward` the train and validation rows carry
`p_valid_model` as their `critic` reward, as the authors trained on it, instead of scoring
millions of logged tails again.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

from .base import DataError, Example, json_lines, require, require_file, subsample

# relation -> the phrase the COMET critic reads it as (the SKD critic's NLI-style flattening)
RELATIONS = {
    "HinderedBy": "can be hindered by",
    "xNeed": "but before, PersonX needed",
    "xWant": "as a result, PersonX wants",
    "xIntent": "because PersonX wanted",
    "xReact": "as a result, PersonX feels",
    "xAttr": "so, PersonX is seen as",
    "xEffect": "as a result, PersonX",
}
SPLITS = {"train": "train", "val": "validation"}  # ATOMIC-10x split -> ours (its own test is not used)
NO_TAIL = "none"  # ATOMIC-2020's tail for "nothing"
# The critic reads people, not "PersonX": the SKD code draws random first names; a hash of the
# head picks them here, so the input is a pure function of the triple.
NAMES = ("James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "David", "Susan")
_PROMPT = re.compile(r"<head> (.*) </head> <relation> (\w+) </relation> \[GEN\]")


def format_prompt(head: str, relation: str) -> str:
    return f"<head> {head.strip()} </head> <relation> {relation} </relation> [GEN]"


def critic_input(prompt: str, response: str) -> tuple[str, str]:
    """The COMET critic's sentence pair: (head, relation phrase + tail), PersonX/PersonY named."""
    match = _PROMPT.fullmatch(prompt)
    if match is None or match[2] not in RELATIONS:
        raise ValueError(f"not a COMET prompt with a known relation: {prompt[:80]!r}")
    head, relation = match.groups()
    h = zlib.crc32(head.encode())
    x = h % len(NAMES)
    y = (x + 1 + (h // len(NAMES)) % (len(NAMES) - 1)) % len(NAMES)  # a second, different name

    def named(text: str) -> str:
        return text.replace("PersonX", NAMES[x]).replace("PersonY", NAMES[y])

    return named(head), named(f"{RELATIONS[relation]} {response.strip()}")


def load_commonsense(cfg) -> dict[str, list[Example]]:
    splits = _atomic10x(cfg.atomic10x, cfg.data_reward)
    return {
        "train": subsample(splits["train"], cfg.sizes.train, cfg.seed),
        "validation": subsample(splits["validation"], cfg.sizes.validation, cfg.seed),
        "test": subsample(_atomic2020_test(Path(cfg.atomic2020_test)), cfg.sizes.test, cfg.seed),
    }


def _atomic10x(path, data_reward: bool) -> dict[str, list[Example]]:
    splits = {"train": [], "validation": []}
    for where, index, raw in json_lines(path):
        head, relation, tail = (require(raw, key, str, where) for key in ("head", "relation", "tail"))
        split = require(raw, "split", str, where)
        p_valid = require(raw, "p_valid_model", (int, float), where)
        if relation not in RELATIONS:
            raise DataError(f"{where}: key 'relation' is {relation!r}, expected one of {sorted(RELATIONS)}")
        if split not in (*SPLITS, "test"):
            raise DataError(f"{where}: key 'split' is {split!r}, expected train, val or test")
        if split in SPLITS:
            splits[SPLITS[split]].append(Example(
                id=f"atomic10x-{index}", prompt=format_prompt(head, relation), response=tail,
                rewards={"critic": float(p_valid)} if data_reward else None,
                meta={"relation": relation, "p_valid_model": p_valid},
            ))
    return splits


def _atomic2020_test(path: Path) -> list[Example]:
    """One row per (head, relation) of a known relation; its reference tail is the first that is
    not "none" (the authors kept the tail their critic scored best; the policy is scored on its own)."""
    require_file(path)
    pairs: dict[tuple[str, str], Example] = {}
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                fields = line.decode("utf-8").rstrip("\r\n").split("\t")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 ({err.reason})") from None
            if fields == [""]:
                continue
            if len(fields) != 3:
                raise DataError(f"{path}:{line_no}: expected 3 tab-separated fields (head, relation, tail), "
                                f"got {len(fields)}")
            head, relation, tail = fields
            if relation not in RELATIONS:
                continue
            known = pairs.get((head, relation))
            if known is None or (known.response == NO_TAIL and tail != NO_TAIL):
                pairs[(head, relation)] = Example(id=f"atomic2020-{line_no}", prompt=format_prompt(head, relation),
                                                  response=tail, meta={"relation": relation})
    return list(pairs.values())
