"""Faults: the embedded chain is SIGKILLed inside each stage (and mid-checkpoint-write, and
between a finished build and its rename), then run again. The final eval must equal an
uninterrupted run's with the same seed, no artifact may be half-written or lost, and the rl
stage must continue from its last checkpoint, not from step 0.

The kill comes from the process itself at a named point (`LOL_RL_KILL_AT`, lol_rl/faults.py),
so every case is deterministic."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from test_cli import TINY, lol_rl

RUN = [*TINY, "rl.steps=12", "rl.val_interval=4", "rl.checkpoint_interval=4", "rl.log_interval=2",
       "sft.checkpoint_interval=5"]
CHAIN = ["sft", "reference", "value", "advantage", "rl", "eval"]


def artifacts(cache: Path) -> dict[str, set[str]]:
    """Every complete artifact: stage -> the files under each key dir (temp and partial dirs excluded)."""
    found = {}
    for key_dir in sorted(cache.glob("*/*")):
        if key_dir.is_dir() and not key_dir.name.startswith("."):
            found[f"{key_dir.parent.name}/{key_dir.name}"] = {
                str(p.relative_to(key_dir)) for p in key_dir.rglob("*") if p.is_file()}
    return found


def validation_steps(cache: Path, pattern: str) -> list[list[int]]:
    return [[json.loads(line)["step"] for line in path.read_text().splitlines()] for path in sorted(cache.glob(pattern))]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("resume")
    proc = lol_rl("train", *RUN, f"hydra.run.dir={workspace / 'run'}", cache=workspace / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    return workspace / "cache", json.loads((workspace / "run" / "eval.json").read_text())


@pytest.mark.parametrize("point, stage", [
    ("sft:step:12", "sft"),            # after the checkpoint of step 10
    ("sft:checkpoint_write:15", "sft"),  # half of the step-15 checkpoint is on disk
    ("value:epoch:1", "value"),
    ("advantage:scored", "advantage"),
    ("rl:step:7", "rl"),               # after the checkpoint of step 4
    ("rl:checkpoint_write:8", "rl"),   # half of the step-8 checkpoint is on disk
    ("rl:rename", "rl"),               # built, not yet renamed into place
    ("eval:generated", "eval"),
])
def test_killed_stage_reruns_to_the_uninterrupted_result(baseline, tmp_path, monkeypatch, point, stage):
    baseline_cache, expected = baseline
    cache = tmp_path / "cache"
    for upstream in CHAIN[: CHAIN.index(stage)]:  # start from the stages before the one killed
        shutil.copytree(baseline_cache / upstream, cache / upstream)
    before = artifacts(cache)

    monkeypatch.setenv("LOL_RL_KILL_AT", point)
    killed = lol_rl("train", *RUN, f"hydra.run.dir={tmp_path / 'killed'}", cache=cache)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert artifacts(cache) == before, "a killed stage left a complete-looking artifact, or lost one"

    monkeypatch.delenv("LOL_RL_KILL_AT")
    rerun = lol_rl("train", *RUN, f"hydra.run.dir={tmp_path / 'rerun'}", cache=cache)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert json.loads((tmp_path / "rerun" / "eval.json").read_text()) == expected
    assert artifacts(cache) == artifacts(baseline_cache)  # the same artifacts, file for file
    assert not [p for p in cache.glob("*/.*")], "temp or partial build dirs were left behind"
    for records in ("sft/*/validation.jsonl", "rl/*/validation.jsonl"):  # each validation once, as if never killed
        assert validation_steps(cache, records) == validation_steps(baseline_cache, records), records

    log = rerun.stdout + "".join(p.read_text() for p in (tmp_path / "rerun").glob("*.log"))
    if point.startswith("sft:"):
        assert "sft: resuming from the checkpoint of step 10" in log
        records = [json.loads(line) for line in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines()]
        assert min(r["step"] for r in records if r["stage"] == "sft") > 10  # not from step 0
    if point.startswith("rl:step") or point.startswith("rl:checkpoint_write"):
        assert "rl: resuming from the checkpoint of step 4" in log
        records = [json.loads(line) for line in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines()]
        assert min(r["step"] for r in records if r["stage"] == "rl") > 4  # not from step 0


def test_an_unreadable_checkpoint_is_one_line_naming_it(baseline, tmp_path, monkeypatch):
    baseline_cache, _ = baseline
    cache = tmp_path / "cache"
    for upstream in ("sft", "reference", "value", "advantage"):
        shutil.copytree(baseline_cache / upstream, cache / upstream)
    monkeypatch.setenv("LOL_RL_KILL_AT", "rl:step:7")
    assert lol_rl("train", *RUN, f"hydra.run.dir={tmp_path / 'killed'}", cache=cache).returncode == -signal.SIGKILL
    monkeypatch.delenv("LOL_RL_KILL_AT")
    (checkpoint,) = cache.glob("rl/.partial-*/checkpoint.pt")
    checkpoint.write_bytes(b"not a checkpoint")
    proc = lol_rl("train", *RUN, f"hydra.run.dir={tmp_path / 'rerun'}", cache=cache)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1].startswith(f"lol-rl: {checkpoint}: unreadable checkpoint")
    assert checkpoint.read_bytes() == b"not a checkpoint"  # left for the user to inspect or delete
    assert os.path.isdir(checkpoint.parent)


def test_killed_ppo_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(tmp_path, monkeypatch):
    ppo = [*TINY, "algo=ppo", "rl.steps=6", "rl.val_interval=4", "rl.checkpoint_interval=4"]
    full = lol_rl("train", *ppo, f"hydra.run.dir={tmp_path / 'full'}", cache=tmp_path / "full-cache")
    assert full.returncode == 0, full.stdout[-3000:]
    cache = tmp_path / "cache"
    shutil.copytree(tmp_path / "full-cache" / "sft", cache / "sft")
    monkeypatch.setenv("LOL_RL_KILL_AT", "rl:step:11")  # 2.6 x 6 = 16 updates; checkpoints at 4 and 8
    assert lol_rl("train", *ppo, f"hydra.run.dir={tmp_path / 'killed'}", cache=cache).returncode == -signal.SIGKILL
    monkeypatch.delenv("LOL_RL_KILL_AT")
    rerun = lol_rl("train", *ppo, f"hydra.run.dir={tmp_path / 'rerun'}", cache=cache)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "rl: resuming from the checkpoint of step 8" in rerun.stdout + (tmp_path / "rerun" / "cli.log").read_text()
    assert json.loads((tmp_path / "rerun" / "eval.json").read_text()) == json.loads((tmp_path / "full" / "eval.json").read_text())
    assert artifacts(cache) == artifacts(tmp_path / "full-cache")
