"""End to end: `lol-rl train` as a subprocess with a tiny budget, then a second algorithm
that reuses the cached upstream stages, and config errors that Hydra must reject."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "task.sizes.train=200", "task.sizes.validation=40", "task.sizes.test=40",
    "sft.steps=20", "sft.log_interval=10", "sft.batch_size=16",
    "value.epochs=2", "value.samples_per_prompt=2",
    "rl.steps=10", "rl.val_interval=5", "rl.log_interval=5", "rl.val_prompts=16", "rl.batch_size=16",
    "generation.max_new_tokens=16",
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "value.heads=2",
]
STAGES = ["sft", "value", "reference", "advantage", "rl", "eval_ref", "eval"]


def lol_rl(*args: str, cache: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOL_RL_CACHE": str(cache), "CI": "true", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lol_rl.cli", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def _log_text(run_dir: Path, proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + "".join(p.read_text() for p in run_dir.glob("*.log"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def first_run(workspace):
    run_dir = workspace / "run1"
    proc = lol_rl("train", *TINY, f"hydra.run.dir={run_dir}", cache=workspace / "cache")
    assert proc.returncode == 0, proc.stdout[-5000:]
    return run_dir, proc


@pytest.fixture(scope="module")
def second_run(workspace, first_run):
    run_dir = workspace / "run2"
    proc = lol_rl("train", *TINY, "algo=nll_kept", f"hydra.run.dir={run_dir}", cache=workspace / "cache")
    assert proc.returncode == 0, proc.stdout[-5000:]
    return run_dir, proc


def test_version_and_help_exit_zero(tmp_path):
    from importlib.metadata import version

    assert lol_rl("--version", cache=tmp_path).stdout.strip() == f"lol-rl {version('lol-rl')}"
    for flag in ("-h", "--help"):
        proc = lol_rl(flag, cache=tmp_path)
        assert proc.returncode == 0 and "commands: train" in proc.stdout


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_first_run_outputs(first_run, workspace):
    run_dir, proc = first_run
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {"reference", "policy"}
    for name, m in results.items():
        assert set(m) >= {"reward", "rewards", "length", "distinct", "n"}, name
        assert set(m["rewards"]) == {"correct", "polite", "concise"}
        assert all(_finite(v) and 0.0 <= v <= 1.0 for v in m["rewards"].values()), m
        assert _finite(m["reward"])
        assert m["reward"] == pytest.approx(sum(m["rewards"].values()), abs=1e-9)
        assert _finite(m["length"]) and m["length"] >= 0
        assert len(m["distinct"]) == 3 and all(_finite(d) and 0.0 <= d <= 1.0 for d in m["distinct"])
        assert m["n"] == 40  # the whole test split
    # the reference row and the policy row are both in the printed table
    assert "| pi_ref |" in proc.stdout and "| alol (seed 1) |" in proc.stdout
    stages = json.loads((run_dir / "stages.json").read_text())
    assert f"run dir: {run_dir}" in proc.stdout and f"policy:  {stages['rl']['dir']}/policy" in proc.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {}
    for r in records:
        steps.setdefault(r["stage"], []).append(r["step"])
    assert steps["sft"] == [10, 20]             # sft.steps=20, sft.log_interval=10
    assert steps["rl"] == [5, 10]               # rl.steps=10, rl.log_interval=5
    assert steps["rl/validation"] == [0, 5, 10]  # pi_ref at step 0, then every rl.val_interval=5
    assert {"value", "advantage"} <= set(steps)
    for r in records:
        if r["stage"] in ("sft", "rl"):
            assert _finite(r["loss"]) and _finite(r["grad_norm"]), r
        if r["stage"] == "rl":
            assert 0.0 <= r["clip_fraction"] <= 1.0 and _finite(r["ratio"])

    cache = workspace / "cache"
    for stage, count in {"sft": 1, "reference": 1, "value": 1, "advantage": 1, "rl": 1, "eval": 2}.items():
        dirs = [p for p in (cache / stage).iterdir() if not p.name.startswith(".")]
        assert len(dirs) == count, (stage, dirs)
        assert not list((cache / stage).glob(".tmp-*"))
    assert (next((cache / "rl").iterdir()) / "policy").is_dir()
    kept = [json.loads(line) for line in (next((cache / "rl").iterdir()) / "validation.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in kept] == [("rl/validation", s) for s in (0, 5, 10)]  # goes with the cached stage
    assert (next((cache / "advantage").iterdir()) / "advantages.pt").is_file()
    assert (next((cache / "reference").iterdir()) / "reference.pt").is_file()
    assert (next((cache / "value").iterdir()) / "value_head.pt").is_file()

    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == STAGES
    assert not any(s["cached"] for s in stages.values())
    assert all(Path(s["dir"]).is_dir() and Path(s["dir"]).parent.parent == cache for s in stages.values())


def test_second_run_reuses_upstream_stages(first_run, second_run, workspace):
    run1, _ = first_run
    run2, proc = second_run
    first = json.loads((run1 / "stages.json").read_text())
    stages = json.loads((run2 / "stages.json").read_text())
    assert list(stages) == STAGES
    for stage in ("sft", "reference", "value", "advantage", "eval_ref"):
        assert stages[stage]["cached"] is True, stage
        assert stages[stage]["dir"] == first[stage]["dir"], stage
    for stage in ("rl", "eval"):
        assert stages[stage]["cached"] is False, stage
        assert stages[stage]["dir"] != first[stage]["dir"], stage

    text = _log_text(run2, proc)
    for stage in ("sft", "reference", "value", "advantage"):
        line = next((l for l in text.splitlines() if f"stage {stage} " in l and "cached" in l), None)
        assert line is not None and "(reused)" in line, (stage, text[-3000:])
        assert not any(f"stage {stage} " in l and "building" in l for l in text.splitlines()), stage
    for stage in ("rl", "eval"):
        assert any(f"stage {stage} " in l and "building" in l for l in text.splitlines()), stage

    cache = workspace / "cache"
    counts = {s: len([p for p in (cache / s).iterdir() if not p.name.startswith(".")])
              for s in ("sft", "reference", "value", "advantage", "rl", "eval")}
    assert counts == {"sft": 1, "reference": 1, "value": 1, "advantage": 1, "rl": 2, "eval": 3}

    # the cached reference evaluation is reported identically
    r1 = json.loads((run1 / "eval.json").read_text())
    r2 = json.loads((run2 / "eval.json").read_text())
    assert r2["reference"] == r1["reference"]
    assert "| nll_kept (seed 1) |" in proc.stdout
    records = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"rl", "rl/validation"}  # only rl trained this time


def test_unknown_algo_lists_options(tmp_path):
    proc = lol_rl("train", "algo=doesnotexist", f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache",
                  timeout=120)
    assert proc.returncode != 0
    assert "Available options" in proc.stdout
    for option in ("alol", "nll", "nll_kept"):
        assert option in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_misspelled_key_fails(tmp_path):
    proc = lol_rl("train", "sft.stepz=3", f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache",
                  timeout=120)
    assert proc.returncode != 0
    assert "sft.stepz" in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_no_command_prints_usage(tmp_path):
    proc = lol_rl(cache=tmp_path / "cache", timeout=60)
    assert proc.returncode == 2
    assert "commands: train" in proc.stdout


def test_bad_data_file_stops_with_one_line_naming_file_row_and_key(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello", "reward": 1.0}\n{"prompt": "hi", "response": ""}\n')
    splits = [f"task.{s}={data}" for s in ("train", "validation", "test")]
    proc = lol_rl("train", "task=jsonl", *splits, "task.rewards=[polite]", f"hydra.run.dir={tmp_path / 'run'}",
                  cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert f"lol-rl: {data}:2: key 'response' is empty" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_preflight_refusal_on_the_command_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello", "reward": 1.0}\n')
    splits = [f"task.{s}={data}" for s in ("train", "validation", "test")]
    proc = lol_rl("train", "task=jsonl", *splits, "task.rewards=[polite]", "algo=dpo",
                  f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert "lol-rl: dpo needs preference pairs; task jsonl has none" in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_same_config_and_seed_give_identical_results_on_cpu(first_run, tmp_path):
    """Determinism: the whole chain again from an empty cache gives the same artifacts' metrics,
    the same training curve and the same test generations, bit for bit."""
    run1, _ = first_run
    run2 = tmp_path / "again"
    proc = lol_rl("train", *TINY, f"hydra.run.dir={run2}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert json.loads((run2 / "eval.json").read_text()) == json.loads((run1 / "eval.json").read_text())

    def curve(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rows]

    assert curve(run2) == curve(run1)
    generations = [sorted((Path(json.loads((run / "stages.json").read_text())["eval"]["dir"]) / "generations.jsonl")
                          .read_text().splitlines()) for run in (run1, run2)]
    assert generations[0] == generations[1]


@pytest.mark.parametrize("reward, message", [
    ("nosuch", "unknown reward component(s) ['nosuch']"),
    ("nosuch_module:score", "reward 'nosuch_module:score': cannot import it"),
])
def test_bad_reward_component_is_one_clear_line(tmp_path, reward, message):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello", "reward": 1.0}\n')
    splits = [f"task.{s}={data}" for s in ("train", "validation", "test")]
    proc = lol_rl("train", "task=jsonl", *splits, f"task.rewards=[{reward}]", f"hydra.run.dir={tmp_path / 'run'}",
                  cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert f"lol-rl: {message}" in proc.stdout and "Traceback" not in proc.stdout


def test_kto_on_the_embedded_task_reuses_pi_ref_and_its_reference_artifact(first_run, workspace):
    """KTO after A-LOL on the same cache: sft and the reference stage are the A-LOL run's (their keys
    do not depend on the algorithm), the mismatched pairs get their own stage, no value head is fit,
    and the embedded task's rewards are split at their mean."""
    run1, _ = first_run
    run_dir = workspace / "kto"
    proc = lol_rl("train", *TINY, "algo=kto", f"hydra.run.dir={run_dir}", cache=workspace / "cache")
    assert proc.returncode == 0, proc.stdout[-5000:]
    first = json.loads((run1 / "stages.json").read_text())
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["sft", "reference", "mismatched", "rl", "eval_ref", "eval"]
    for stage in ("sft", "reference", "eval_ref"):
        assert stages[stage]["cached"] is True and stages[stage]["dir"] == first[stage]["dir"], stage
    assert stages["mismatched"]["cached"] is False
    assert (Path(stages["mismatched"]["dir"]) / "mismatched.pt").is_file()
    assert "| kto (seed 1) |" in proc.stdout

    from omegaconf import OmegaConf

    threshold = OmegaConf.load(run_dir / "config.yaml").algo.params.threshold  # null resolved: the mean train reward
    assert 1.5 < threshold < 3.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [5, 10]
    for r in rl:
        assert _finite(r["loss"]) and 0.0 <= r["loss"] <= 1.0  # each row's term is a weight (1) times 1 - sigmoid
        assert _finite(r["kl"]) and r["kl"] >= 0.0 and 0.0 < r["desirable_fraction"] < 1.0
