"""Make data/hh-rlhf-small: a small seeded subset of Anthropic's hh-rlhf train files, in their own format,
for `lol-rl train task=hha task.source=small` (CPU runs with a small model, and the tests).

    python scripts/make_hh_subset.py --source HH_RLHF --source-commit SHA

HH_RLHF is a copy of github.com/anthropics/hh-rlhf (or of the hub's Anthropic/hh-rlhf, laid out alike)
with its Git LFS files pulled: <subset>/train.jsonl.gz for the four subsets, and LICENSE. Only the train
files are read, the new test rows included, so the hub's test files (the paper's test set) stay unseen.

A row is kept when the loader would use it as it is: both dialogues parse and share their history
(`hub_pair`, the loader's own parse), the final turns differ, neither is empty or cut off mid-turn, and the
chosen dialogue (prompt + chosen turn) is at most --max-chars long. One row per history across all subsets,
so no prompt is in two splits. Each subset's kept rows are shuffled with a fixed seed and cut into test,
validation and train, each written in source order; gzip without a timestamp, so a rerun gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

from lol_rl.tasks.base import DataError, require
from lol_rl.tasks.hha import SEGMENTS, complete_response, gz_json_lines, hub_pair

SPLITS = ("test", "validation", "train")  # cut in this order from each subset's shuffled rows
LFS_POINTER = b"version https://git-lfs"  # what a clone without `git lfs pull` holds in place of the data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="a copy of hh-rlhf with its LFS files pulled")
    parser.add_argument("--source-commit", required=True, help="the source's commit, recorded in the README")
    parser.add_argument("--source-repo", default="github.com/anthropics/hh-rlhf", help="recorded in the README")
    parser.add_argument("--out", type=Path, default=Path("data/hh-rlhf-small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=1000, help="pairs in all, split evenly over the 4 subsets")
    parser.add_argument("--validation", type=int, default=100, help="likewise")
    parser.add_argument("--test", type=int, default=200, help="likewise")
    parser.add_argument("--max-chars", type=int, default=1500, help="longest chosen dialogue (prompt + response)")
    return parser.parse_args(argv)


def per_subset_sizes(args: argparse.Namespace) -> dict[str, int]:
    sizes = {split: getattr(args, split) for split in SPLITS}
    uneven = [f"--{split}={n}" for split, n in sizes.items() if n % len(SEGMENTS)]
    if uneven:
        sys.exit(f"{', '.join(uneven)}: each split is shared evenly by the {len(SEGMENTS)} subsets")
    return {split: n // len(SEGMENTS) for split, n in sizes.items()}


def read_train_rows(path: Path) -> list[tuple[str, dict]]:
    if path.is_file() and path.read_bytes().startswith(LFS_POINTER):
        sys.exit(f"{path}: a Git LFS pointer, not the data (pull the LFS files first: git lfs pull)")
    return gz_json_lines(path)


def history_if_kept(raw: dict, where: str, max_chars: int) -> tuple | None:
    """The row's history when the row is worth keeping (see the module docstring), else None."""
    chosen, rejected = require(raw, "chosen", str, where), require(raw, "rejected", str, where)
    pair = hub_pair(chosen, rejected)
    if pair is None or len(chosen) > max_chars:
        return None
    history, chosen_turn, rejected_turn = pair
    # equal final turns (chosen == rejected) are no preference
    if chosen_turn == rejected_turn or not (complete_response(chosen_turn) and complete_response(rejected_turn)):
        return None
    return tuple(history)


def kept_rows(rows: list[tuple[str, dict]], max_chars: int, seen: set) -> list[dict]:
    """The rows worth keeping whose history is not in `seen` (which they join), in source order."""
    kept = []
    for where, raw in rows:
        history = history_if_kept(raw, where, max_chars)
        if history is not None and history not in seen:
            seen.add(history)
            kept.append({"chosen": raw["chosen"], "rejected": raw["rejected"]})
    return kept


def draw(rows: list[dict], sizes: dict[str, int], seed: str, subset: str) -> dict[str, list[dict]]:
    """Disjoint seeded samples of `rows`, one per split, each in source order."""
    needed = sum(sizes.values())
    if len(rows) < needed:
        sys.exit(f"{subset}: {len(rows)} train rows worth keeping, {needed} needed (lower the sizes)")
    order = random.Random(seed).sample(range(len(rows)), needed)
    drawn, start = {}, 0
    for split in SPLITS:
        drawn[split] = [rows[i] for i in sorted(order[start:start + sizes[split]])]
        start += sizes[split]
    return drawn


def jsonl_gz(rows: list[dict]) -> bytes:
    """The source's own format: one json.dumps object a line (ASCII escapes, as the source has them);
    no timestamp or file name in the gzip header, so equal rows give equal bytes."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def table_row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def readme(args: argparse.Namespace, drawn: dict, counts: dict) -> str:
    """The provenance: source and commit, the command, what was kept, the sizes."""
    columns = ("train", "validation", "test")
    table = "\n".join(table_row(subset, *(len(d[split]) for split in columns), counts[subset][1], counts[subset][0])
                      for subset, d in drawn.items())
    total = table_row("all", *(sum(len(d[split]) for d in drawn.values()) for split in columns),
                      *(sum(c[i] for c in counts.values()) for i in (1, 0)))
    return f"""# hh-rlhf-small

A small seeded subset of Anthropic's hh-rlhf (Bai et al. 2022), for `lol-rl train task=hha task.source=small`:
CPU runs with a small model, and the tests.

- Source: {args.source_repo} at commit {args.source_commit}; MIT license, copied in LICENSE.
- Format: the source's own: `<subset>/{{train,validation,test}}.jsonl.gz`, one `{{"chosen", "rejected"}}` object a
  line, each a whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue.
- Every row, test and validation included, was drawn from the source's `<subset>/train.jsonl.gz` files. The
  source's test files were never read, so the hub's test set (the paper's) stays unseen by this subset.
- Rows kept: both dialogues parse and share their history, the final turns differ, neither is empty or cut off
  mid-turn, the chosen dialogue is at most {args.max_chars} characters; one row per history, so no prompt is in
  two splits. Each subset's kept rows were shuffled (seed {args.seed}) and cut into test, validation, train.

Made with:

    python scripts/make_hh_subset.py --source HH_RLHF --source-commit {args.source_commit} --seed {args.seed} \\
        --train {args.train} --validation {args.validation} --test {args.test} --max-chars {args.max_chars}

(HH_RLHF: a copy of the source at that commit with its Git LFS files pulled.)

| subset | train | validation | test | source train rows kept | source train rows |
|---|---|---|---|---|---|
{table}
{total}
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = per_subset_sizes(args)
    license_path = args.source / "LICENSE"
    if not license_path.is_file():
        sys.exit(f"{license_path}: no such file (the source's license travels with the subset)")
    drawn, counts, seen = {}, {}, set()
    try:
        for subset in SEGMENTS:
            rows = read_train_rows(args.source / subset / "train.jsonl.gz")
            kept = kept_rows(rows, args.max_chars, seen)
            counts[subset] = (len(rows), len(kept))
            drawn[subset] = draw(kept, sizes, f"{args.seed}-{subset}", subset)
    except DataError as err:
        sys.exit(str(err))
    for subset, splits in drawn.items():
        (args.out / subset).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            (args.out / subset / f"{split}.jsonl.gz").write_bytes(jsonl_gz(rows))
    (args.out / "LICENSE").write_bytes(license_path.read_bytes())
    (args.out / "README.md").write_text(readme(args, drawn, counts), encoding="utf-8")
    print(f"{args.out}: " + ", ".join(f"{s} {sum(len(d[s]) for d in drawn.values())}" for s in SPLITS))


if __name__ == "__main__":
    main()
