"""End to end: `lol-rl train` as a subprocess with a tiny budget, then a second algorithm
that reuses the cached upstream stages, and config errors that Hydra must reject."""

from __future__ import annotations

import json
import math
import os
import re
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
    assert f"run dir: {run_dir}" in proc.stdout
    assert f"policy:  {run_dir}/policy -> {stages['rl']['dir']}/policy" in proc.stdout
    link = run_dir / "policy"  # a relative link to the rl artifact's policy, there from the run dir alone
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (Path(stages["rl"]["dir"]) / "policy").resolve() and (link / "config.json").is_file()
    assert not list(run_dir.glob(".policy.tmp-*"))
    data = json.loads((run_dir / "data.json").read_text())
    assert data["rows"] == {"train": 200, "validation": 40, "test": 40} and len(data["fingerprint"]) == 16
    for summary in (workspace / "cache").glob("*/*/summary.json"):  # strict JSON: no NaN or -Infinity in any
        json.loads(summary.read_text(), parse_constant=lambda name: pytest.fail(f"{summary} holds {name}"))

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


def _plain_env(**extra: str) -> dict:
    """The environment of a user's shell: no PYTHONPATH onto the checkout, no LOL_RL_CONF."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOL_RL_CONF")}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}


def test_help_shows_groups_and_what_each_key_means(tmp_path):
    train = lol_rl("train", "--help", cache=tmp_path, timeout=60)
    assert train.returncode == 0, train.stdout
    text = train.stdout
    assert "algo (default alol):" in text and "task (default toy):" in text and "model (default tiny):" in text
    assert "  dpo " in text and "  hf " in text and "  smollm2 " in text and "  toy_table2 " in text
    assert "judge:" not in text  # judge's endpoints are not train's
    # a key, its default and its yaml comment on one line; a wrapped comment joined to it
    assert re.search(r"^  rl\.lr=3\.0e-4 +AdamW learning rate$", text, re.M)
    assert re.search(r"^  rl\.epochs=null +set: .* \(A > 0 rows for A-LOL", text, re.M)
    assert re.search(r"^  algo\.keep=positive_advantage +train rows used", text, re.M)
    chosen = lol_rl("train", "task=hf", "--help", cache=tmp_path, timeout=60).stdout
    assert "task (this command line: hf; default toy):" in chosen and re.search(r"^  task\.path=\?\?\? +a data file", chosen, re.M)
    unknown = lol_rl("train", "algo=nosuch", "--help", cache=tmp_path, timeout=60).stdout
    assert "algo=nosuch: there is no algo/nosuch.yaml; the options of algo are above" in unknown
    audit = lol_rl("audit", "--help", cache=tmp_path, timeout=60).stdout
    own = audit.split("keys of `lol-rl audit`")[1].split("\n\n")[0]
    assert re.search(r"^  audit\.rows=20 +the lowest-advantage train rows shown$", own, re.M)
    judge = lol_rl("judge", "--help", cache=tmp_path, timeout=60)  # no out= needed to ask for help
    assert judge.returncode == 0 and "judge (default local):" in judge.stdout
    assert re.search(r"^  n=400 +pairs sampled", judge.stdout, re.M) and "rl.lr" not in judge.stdout
    assert re.search(r"^  judge\.base_url=\S+ +the server's /v1 root", judge.stdout, re.M)


def test_config_help_reads_comments_sections_and_quoted_hashes(tmp_path):
    from lol_rl.config_help import key_docs

    conf = tmp_path / "c.yaml"
    conf.write_text('defaults:\n  - task: toy\n\na: 1   # the a\nb:     # section b\n  c: "x # y"  # c, with\n'
                    '              # a second line\n  d: [1, 2]\n# a header, not c\'s\nhydra:\n  run: x  # hidden\n')
    docs = [(d.key, d.value, d.comment) for d in key_docs(conf)]
    assert docs == [("a", "1", "the a"), ("b", "", "section b"), ("b.c", '"x # y"', "c, with a second line"),
                    ("b.d", "[1, 2]", "")]


def test_the_package_lists_every_source_folder():
    import tomllib

    from setuptools import find_packages

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(find_packages(str(ROOT / "src"))) | {"lol_rl.conf"} == set(listed)


def test_a_plain_install_carries_the_configs_and_runs(tmp_path):
    """`pip install .` (a wheel, not editable) into a fresh venv: lol-rl runs from it with the
    configs it carries, outside the checkout. --no-deps over the system's packages: no network."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # what the repo ships, copied: the build leaves nothing in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    run = lambda *cmd, **kw: subprocess.run(cmd, cwd=tmp_path, env=_plain_env(), text=True, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, timeout=120, **kw)
    built = run(sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
                "-q", "-w", str(tmp_path / "wheel"))
    assert built.returncode == 0, built.stdout[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("lol_rl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]:
        top = "src" if path.is_relative_to(ROOT / "src") else "conf"
        inside = path.relative_to(ROOT / top).as_posix()
        assert (inside if top == "src" else f"lol_rl/conf/{inside}") in names, path

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)).returncode == 0
    python, command = venv / "bin" / "python", venv / "bin" / "lol-rl"
    installed = run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--ignore-installed", "-q", str(wheel))
    assert installed.returncode == 0, installed.stdout[-3000:]
    site = run(str(python), "-c", "import lol_rl.cli as c; print(c.__file__); print(c.CONF_DIR)").stdout.split()
    assert [Path(p).is_relative_to(venv) for p in site] == [True, True] and site[1].endswith("lol_rl/conf"), site
    from importlib.metadata import version

    assert run(str(command), "--version").stdout.strip() == f"lol-rl {version('lol-rl')}"
    helped = run(str(command), "train", "--help")
    assert helped.returncode == 0 and f"config groups ({site[1]};" in helped.stdout
    assert re.search(r"^  rl\.lr=3\.0e-4 +AdamW learning rate$", helped.stdout, re.M)
    composed = run(str(command), "train", "--cfg", "job", "algo=dpo")  # Hydra composes the installed conf
    assert composed.returncode == 0 and "name: dpo" in composed.stdout, composed.stdout[-3000:]


def test_the_policy_link_is_replaced_whole_and_falls_back_to_a_file(tmp_path, monkeypatch):
    from lol_rl import artifacts
    from lol_rl.files import atomic_link

    run_dir, old, new = tmp_path / "outputs" / "run", tmp_path / "cache" / "rl" / "a" / "policy", tmp_path / "b"
    for path in (run_dir, old, new):
        path.mkdir(parents=True)
    assert atomic_link(run_dir / "policy", old) == "symlink"
    assert os.readlink(run_dir / "policy") == os.path.join("..", "..", "cache", "rl", "a", "policy")
    assert atomic_link(run_dir / "policy", new) == "symlink" and artifacts.run_policy(run_dir) == new.resolve()

    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    assert atomic_link(run_dir / "policy", old) == "file"
    assert (run_dir / "policy").read_text() == f"{old}\n" and artifacts.run_policy(run_dir) == old
    assert sorted(p.name for p in run_dir.iterdir()) == ["policy"]


def test_the_progress_bar_shows_the_last_validation_reward_beside_the_loss(tmp_path, monkeypatch, caplog):
    import logging

    import torch

    from lol_rl import loop as loop_module
    from lol_rl.tracking import MetricsLogger

    shown = []

    class Bar:  # records what tqdm would print after the bar
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, values):
            shown.append(dict(values))

    monkeypatch.setattr(loop_module, "tqdm", Bar)
    monkeypatch.setattr(loop_module, "progress_disabled", lambda: False)
    weight = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(weight.parameters(), lr=0.1)
    rewards = iter([0.5, 0.75, 0.25])  # steps 0, 2, 4
    validation = loop_module.Validation(score=lambda model: (next(rewards), {}), on_best=lambda step, score: None,
                                        interval=2, at_start=True)
    run = loop_module.Loop(stage="rl", steps=4, step=lambda n: {"loss": float(n)}, model=weight, trainable=weight,
                           optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                           metrics=MetricsLogger(tmp_path / "metrics.jsonl"), log_interval=1, validation=validation)
    loop_module.run_loop(run)
    assert shown[0] == {"val reward": "0.500", "loss": "1.000"}  # pi_ref's, from step 0, beside the first loss
    assert shown[-1] == {"val reward": "0.250", "loss": "4.000"}
    assert {"val reward": "0.750", "loss": "2.000"} in shown

    # without a bar (CI, a log file) the log line says it too
    monkeypatch.setattr(loop_module, "progress_disabled", lambda: True)
    rewards = iter([0.5, 0.75, 0.25])
    run.state = {"step": 0, "best": {"score": -math.inf, "step": 0}, "running": {}, "counted": 0, "skipped": 0}
    run.last_validation = None
    with caplog.at_level(logging.INFO, logger="lol_rl.loop"):
        loop_module.run_loop(run)
    assert "rl: step 3/4 loss 3.0000, last validation reward 0.7500," in caplog.text


def test_a_response_groups_reference_log_probs_are_built_only_for_a_loss_that_reads_them(first_run, workspace):
    """A-LOL reads pi_ref's log-probs of the logged responses alone: the reference artifact holds no
    other group's. DPO on the same cache reuses that artifact and builds the rejected group's stage."""
    import torch

    run1, _ = first_run
    first = json.loads((run1 / "stages.json").read_text())
    assert "rejected" not in first and "ranking" not in first
    held = torch.load(Path(first["reference"]["dir"]) / "reference.pt", weights_only=True)
    assert sorted(k for k in held if k.startswith("ref_")) == ["ref_logprobs/response", "ref_offsets/response"]
    run_dir = workspace / "dpo"
    proc = lol_rl("train", *TINY, "algo=dpo", f"hydra.run.dir={run_dir}", cache=workspace / "cache")
    assert proc.returncode == 0, proc.stdout[-5000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["sft", "reference", "rejected", "rl", "eval_ref", "eval"]
    assert stages["reference"]["cached"] is True and stages["reference"]["dir"] == first["reference"]["dir"]
    rejected = torch.load(Path(stages["rejected"]["dir"]) / "rejected.pt", weights_only=True)
    assert sorted(rejected) == ["ref_logprobs/rejected", "ref_offsets/rejected"]
    assert len(rejected["ref_logprobs/rejected"]) == int(rejected["ref_offsets/rejected"][-1]) > 0


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
