"""`task=hha task.source=small`: the hh-rlhf subset kept in the repo (data/hh-rlhf-small), and the script
that makes it (scripts/make_hh_subset.py), on a synthetic source laid out like anthropics/hh-rlhf."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lol_rl.cli import CONF_DIR
from lol_rl.tasks import DataError, build_task
from lol_rl.tasks.hha import SEGMENTS, repo_path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "hh-rlhf-small"
FIXTURE_HUB = REPO / "tests" / "fixtures" / "hha" / "hub"
CHEAP_REWARD = [{"name": "reward", "use": "polite"}]  # VADER: offline, no model weights


def make_hh_subset():
    spec = importlib.util.spec_from_file_location("make_hh_subset", REPO / "scripts" / "make_hh_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_task(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["task=hha", "task.source=small", *overrides]).task
    return build_task(cfg, reward_override=CHEAP_REWARD)


def gz_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


# --- a synthetic source: 12 good rows a subset, and each kind of row the script must leave out ---


def dialogue(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


def good_row(subset: str, i: int) -> dict:
    history = [("Human", f"{subset} question {i}?"), ("Assistant", "Which part?"), ("Human", "All of it.")]
    return {"chosen": dialogue(*history, ("Assistant", f"Here is all of {subset} {i}.")),
            "rejected": dialogue(*history, ("Assistant", "No."))}


def bad_rows(subset: str) -> list[dict]:
    ask = ("Human", f"BAD {subset}?")
    return [
        {"chosen": dialogue(ask, ("Assistant", "Same.")), "rejected": dialogue(ask, ("Assistant", "Same."))},
        {"chosen": dialogue(ask, ("Assistant", "long " * 100)), "rejected": dialogue(ask, ("Assistant", "No."))},
        {"chosen": f"Human: BAD {subset}\nAssistant: no leading turn marker", "rejected": dialogue(ask)},
        {"chosen": dialogue(ask, ("Assistant", "One.")),
         "rejected": dialogue(("Human", "BAD other history"), ("Assistant", "Two."))},
        {"chosen": dialogue(ask, ("Assistant", "Here it is:")), "rejected": dialogue(ask, ("Assistant", "No."))},
        {**good_row("harmless-base", 0), "note": "BAD: the history of another subset's row"},
    ]


def make_source(root: Path) -> Path:
    for subset in SEGMENTS:
        (root / subset).mkdir(parents=True)
        rows = [good_row(subset, i) for i in range(12)] + (bad_rows(subset) if subset != "harmless-base" else [])
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (root / subset / "train.jsonl.gz").write_bytes(gzip.compress(text.encode()))
        (root / subset / "test.jsonl.gz").write_bytes(b"not gzip: the script must never open a test file")
    (root / "LICENSE").write_text("MIT License (synthetic)\n")
    return root


SIZES = ["--train", "16", "--validation", "8", "--test", "8", "--max-chars", "300"]


def run_script(source: Path, out: Path, *extra: str) -> Path:
    args = ["--source", str(source), "--out", str(out), "--source-commit", "abc123", *SIZES, *extra]
    make_hh_subset().main(args)
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_dir(tmp_path) -> Path:
    return run_script(make_source(tmp_path / "source"), tmp_path / "small")


def test_script_is_reproducible_and_writes_the_source_format(tmp_path, small_dir):
    again = tree_bytes(run_script(tmp_path / "source", tmp_path / "again"))
    assert tree_bytes(small_dir) == again
    expected = {f"{subset}/{split}.jsonl.gz" for subset in SEGMENTS for split in ("train", "validation", "test")}
    assert set(again) == expected | {"LICENSE", "README.md"}
    assert again["LICENSE"] == b"MIT License (synthetic)\n"
    for subset in SEGMENTS:
        rows = gz_rows(small_dir / subset / "train.jsonl.gz")
        assert len(rows) == 4 and all(set(row) == {"chosen", "rejected"} for row in rows)
        assert all(row in [good_row(subset, i) for i in range(12)] for row in rows)  # no BAD row, none altered
    readme = again["README.md"].decode()
    assert "abc123" in readme and "| all | 16 | 8 | 8 |" in readme
    assert "--seed 0" in readme and "drawn from the source's `<subset>/train.jsonl.gz` files" in readme


def test_another_seed_draws_other_rows(tmp_path, small_dir):
    other = run_script(tmp_path / "source", tmp_path / "other", "--seed", "1")
    assert tree_bytes(other) != tree_bytes(small_dir)


def test_script_refuses_lfs_pointers_and_uneven_sizes(tmp_path):
    source = make_source(tmp_path / "source")
    (source / "helpful-online" / "train.jsonl.gz").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(SystemExit, match="helpful-online/train.jsonl.gz: a Git LFS pointer"):
        run_script(source, tmp_path / "out")
    with pytest.raises(SystemExit, match="--test=6: each split is shared evenly"):
        run_script(source, tmp_path / "out", "--test", "6")


def assert_usable_splits(task) -> None:
    """Every split has rows, test has the four segments, every row a pair, no test prompt elsewhere."""
    splits = task.splits
    assert all(splits[split] for split in ("train", "validation", "test"))
    assert {e.meta["segment"] for e in splits["test"]} == set(SEGMENTS.values())
    assert all(e.response and e.rejected and e.ranking == [e.response, e.rejected] for rows in splits.values()
               for e in rows)
    seen = {e.prompt for split in ("train", "validation") for e in splits[split]}
    assert not seen & {e.prompt for e in splits["test"]}


def test_subset_loads_through_build_task(small_dir):
    task = small_task(f"task.small_dir={small_dir}")
    assert_usable_splits(task)
    assert {split: len(rows) for split, rows in task.splits.items()} == {"train": 16, "validation": 8, "test": 8}
    first = task.splits["validation"][0]
    assert first.id == "harmless_base-validation-0"
    assert first.meta == {"segment": "harmless_base", "source": "harmless-base/validation row 0"}


def test_a_relative_path_not_under_the_cwd_is_read_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_path("tests/fixtures/hha") == REPO / "tests" / "fixtures" / "hha"
    (tmp_path / "tests" / "fixtures" / "hha").mkdir(parents=True)
    assert repo_path("tests/fixtures/hha") == Path("tests/fixtures/hha")  # the cwd's own comes first


def test_bad_input_is_one_line_naming_the_file_row_and_key(tmp_path, small_dir):
    with pytest.raises(DataError, match=r"task.small_dir=.*/nowhere: no such folder"):
        small_task(f"task.small_dir={tmp_path / 'nowhere'}")
    broken = tmp_path / "broken"
    shutil.copytree(small_dir, broken)
    path = broken / "helpful-online" / "validation.jsonl.gz"
    rows = gz_rows(path)
    del rows[1]["chosen"]
    path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    with pytest.raises(DataError, match=f"^{path}:2: missing key 'chosen'$"):
        small_task(f"task.small_dir={broken}")
    path.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=f"^{path}: not a readable gzip file"):
        small_task(f"task.small_dir={broken}")
    path.unlink()
    with pytest.raises(DataError, match=f"^{path}: no such file$"):
        small_task(f"task.small_dir={broken}")


# --- the subset shipped in the repo ---------------------------------------------------------------

shipped = pytest.mark.skipif(not SHIPPED.is_dir(), reason="data/hh-rlhf-small is not in this checkout: it is made "
                             "by scripts/make_hh_subset.py from hh-rlhf's train files (Git LFS)")


@shipped
def test_shipped_subset_loads_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default task.small_dir is found from the repository root
    assert_usable_splits(small_task())


@shipped
def test_shipped_subset_is_small_and_drawn_from_train_files_only():
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 1.5e6
    assert "drawn from the source's `<subset>/train.jsonl.gz` files" in (SHIPPED / "README.md").read_text()
    assert "MIT" in (SHIPPED / "LICENSE").read_text()
    hub_test = {json.dumps(row, sort_keys=True) for p in FIXTURE_HUB.glob("*/test.jsonl.gz") for row in gz_rows(p)}
    shipped_rows = {json.dumps(row, sort_keys=True) for p in SHIPPED.glob("*/*.jsonl.gz") for row in gz_rows(p)}
    assert hub_test and not shipped_rows & hub_test
