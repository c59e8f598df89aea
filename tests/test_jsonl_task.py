"""`task=jsonl` on the example the repo ships: the data's own rewards alone, and a user scorer
named by import path with `reward=`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lol_rl.tasks import DataError, build_task
from test_cli import ROOT, lol_rl

EXAMPLE = ROOT / "examples" / "support"
SPLITS = [f"task.{split}={EXAMPLE / f'{split}.jsonl'}" for split in ("train", "validation", "test")]
SMALL = [
    "sft.steps=6", "sft.log_interval=3", "sft.batch_size=8", "value.epochs=2", "value.samples_per_prompt=2",
    "rl.steps=4", "rl.val_interval=2", "rl.log_interval=2", "rl.val_prompts=4", "rl.batch_size=8",
    "generation.max_new_tokens=8", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "value.heads=2",
]


def _jsonl_cfg(**paths):
    cfg = OmegaConf.load(ROOT / "conf" / "task" / "jsonl.yaml")
    return OmegaConf.merge(cfg, {split: str(EXAMPLE / f"{split}.jsonl") for split in ("train", "validation", "test")},
                           paths)


def test_the_shipped_example_has_twenty_train_rows_with_rewards():
    task = build_task(_jsonl_cfg())
    assert len(task.splits["train"]) == 20
    assert task.reward is None  # no scorer named: the rows' rewards are the signal
    assert all(e.reward is not None for e in task.splits["train"] + task.splits["validation"])


def test_without_a_scorer_every_train_and_validation_row_needs_a_reward(tmp_path):
    rows = [json.loads(line) for line in (EXAMPLE / "validation.jsonl").read_text().splitlines()]
    del rows[3]["reward"]
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="split 'validation' row id 'val-3' has no 'reward' and no reward components"):
        build_task(_jsonl_cfg(validation=str(path)))


def test_data_rewards_only_run_the_whole_chain(tmp_path):
    run_dir = tmp_path / "run"
    proc = lol_rl("train", "task=jsonl", *SPLITS, *SMALL, f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["policy"]["reward"] is None and results["policy"]["n"] == 8
    stages = json.loads((run_dir / "stages.json").read_text())
    value_report = json.loads((Path(stages["value"]["dir"]) / "report.json").read_text())
    assert value_report["samples_per_prompt"] == 1 and "data rewards" in value_report["targets"]
    rows = [json.loads(line) for line in (Path(stages["advantage"]["dir"]) / "rows.jsonl").read_text().splitlines()]
    given = {json.loads(line)["id"]: json.loads(line)["reward"] for line in (EXAMPLE / "train.jsonl").read_text().splitlines()}
    assert {r["id"]: r["reward"] for r in rows} == given  # A is computed from the data's rewards
    best = json.loads((Path(stages["rl"]["dir"]) / "best.json").read_text())
    assert best == {"step": 4, "validation_reward": None}  # no scorer: the last step is kept
    assert "| alol (seed 1) | n/a |" in proc.stdout


def test_reward_names_a_user_scorer_by_import_path(tmp_path):
    """A scorer for the same data reuses the reference policy (sft reads no scorer) and builds
    the stages that score responses anew."""
    first = lol_rl("train", "task=jsonl", *SPLITS, *SMALL, f"hydra.run.dir={tmp_path / 'run0'}", cache=tmp_path / "cache")
    assert first.returncode == 0, first.stdout[-4000:]
    run_dir = tmp_path / "run"
    proc = lol_rl("train", "task=jsonl", *SPLITS, *SMALL, "reward=examples.support.score:score",
                  f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["sft"]["cached"] and not any(stages[s]["cached"] for s in ("value", "advantage", "rl", "eval"))
    results = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= results["policy"]["reward"] <= 1.0
    assert list(results["policy"]["rewards"]) == ["examples.support.score:score"]


def test_the_chain_runs_on_prompts_ten_times_longer_than_the_context_and_counts_the_cuts(tmp_path):
    """Every stage cuts a prompt the one way (its last max_prompt_tokens tokens): sft, the value
    samples, validation, eval; nothing overflows the tiny model's 128 positions, and each
    artifact says how many prompts it cut."""
    words = "please tell me about the weather and the sea and the mountains today".split()
    long_prompt = " ".join(words[i % len(words)] + str(i % 7) for i in range(1500))  # >> 10 x 128 tokens
    splits = {}
    for split, n in (("train", 12), ("validation", 4), ("test", 4)):
        rows = [{"id": f"{split}-{i}", "prompt": f"{i} {long_prompt}", "response": "Thank you, glad to help!",
                 "reward": 1.0 + i % 2} for i in range(n)]
        splits[split] = tmp_path / f"{split}.jsonl"
        splits[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    proc = lol_rl("train", "task=jsonl", *(f"task.{s}={p}" for s, p in splits.items()), *SMALL, "reward=[polite]",
                  f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    summary = lambda stage, name: json.loads((Path(stages[stage]["dir"]) / name).read_text())  # noqa: E731
    assert summary("sft", "summary.json")["truncated_prompts"] == 12
    assert summary("reference", "summary.json")["truncated_prompts"] == 12
    assert summary("value", "report.json")["truncated_prompts"] == 4
    assert summary("rl", "summary.json")["truncated_prompts"] == 12
    assert summary("eval", "metrics.json")["truncated_prompts"] == 4
    assert "eval: 4 of 4 prompts cut to their last max_prompt_tokens tokens" in proc.stdout + (run_dir / "cli.log").read_text()
