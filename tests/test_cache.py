"""lol_rl.cache: content-addressed stage artifacts, and the pipeline's choice of key parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import replace_stage_runs
from lol_rl.cache import CacheError, StageCache, config_key
from lol_rl.errors import ConfigError
from lol_rl.cli import CONF_DIR  # importing the cli registers the config schema: the file runs on its own


class Builder:
    """A build function that counts its calls and writes a marker file."""

    def __init__(self, content="built"):
        self.calls = 0
        self.content = content

    def __call__(self, out: Path) -> None:
        self.calls += 1
        assert out.is_dir() and out.name.startswith(".tmp-")
        (out / "artifact.txt").write_text(self.content)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temps(stage_dir: Path) -> list[Path]:
    return sorted(stage_dir.glob(".tmp-*"))


def test_config_key_is_deterministic_and_sensitive():
    parts = {"sft": {"steps": 3, "lr": 0.1}, "task": {"name": "toy"}}
    assert config_key("sft", parts) == config_key("sft", {"task": {"name": "toy"}, "sft": {"lr": 0.1, "steps": 3}})
    assert config_key("sft", parts) == config_key("sft", {k: OmegaConf.create(v) for k, v in parts.items()})
    assert config_key("sft", parts) == config_key("sft", OmegaConf.create(parts))
    assert len(config_key("sft", parts)) == 16
    assert config_key("sft", parts) != config_key("value", parts)
    assert config_key("sft", parts) != config_key("sft", {**parts, "sft": {"steps": 4, "lr": 0.1}})
    assert config_key("sft", parts) != config_key("sft", {**parts, "extra": None})


def test_second_call_is_a_hit(tmp_path):
    cache = StageCache(tmp_path)
    build = Builder()
    parts = {"sft": {"steps": 3}}
    first = cache.stage("sft", parts, build)
    assert build.calls == 1
    assert first == tmp_path / "sft" / config_key("sft", parts)
    assert first.is_dir() and (first / "artifact.txt").read_text() == "built"
    assert json.loads((first / "stage.json").read_text()) == {"stage": "sft", "key": first.name, "sft": {"steps": 3}}
    assert cache.timings["sft"]["cached"] is False
    assert _temps(first.parent) == []

    second = cache.stage("sft", {"sft": {"steps": 3}}, build)
    assert second == first and build.calls == 1
    assert cache.timings["sft"] == {"dir": str(first), "cached": True, "seconds": 0.0}
    # a fresh StageCache on the same root (another run) also hits
    other = StageCache(tmp_path)
    assert other.stage("sft", {"sft": {"steps": 3}}, build, label="again") == first
    assert build.calls == 1 and other.timings["again"]["cached"] is True

    changed = cache.stage("sft", {"sft": {"steps": 4}}, build)
    assert changed != first and build.calls == 2
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == sorted([first.name, changed.name])


def test_stale_temp_of_dead_process_is_ignored_and_removed(tmp_path):
    cache = StageCache(tmp_path)
    parts = {"value": {"epochs": 2}}
    key = config_key("value", parts)
    stage_dir = tmp_path / "value"
    stage_dir.mkdir()
    stale = stage_dir / f".tmp-{key}-{dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "artifact.txt").write_text("half-written")
    build = Builder("complete")
    final = cache.stage("value", parts, build)
    assert build.calls == 1
    assert final == stage_dir / key
    assert (final / "artifact.txt").read_text() == "complete"
    assert not stale.exists()
    assert _temps(stage_dir) == []


def test_temp_of_live_process_is_left_alone(tmp_path):
    """Another process may still be building the same artifact: its temp dir is not removed."""
    cache = StageCache(tmp_path)
    parts = {"value": {"epochs": 2}}
    key = config_key("value", parts)
    stage_dir = tmp_path / "value"
    stage_dir.mkdir()
    live = stage_dir / f".tmp-{key}-{os.getpid()}-cafecafe"
    live.mkdir()
    final = cache.stage("value", parts, Builder())
    assert (final / "artifact.txt").read_text() == "built"
    assert live.is_dir()


@pytest.mark.parametrize("error", [RuntimeError("boom"), FileNotFoundError("missing input"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing_and_keeps_other_artifacts(tmp_path, error):
    cache = StageCache(tmp_path)
    good = cache.stage("rl", {"rl": {"lr": 1}}, Builder("good"))
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def failing(out: Path):
        (out / "partial.bin").write_bytes(b"\0" * 100)
        raise error

    with pytest.raises(type(error)):
        cache.stage("rl", {"rl": {"lr": 2}}, failing)
    stage_dir = tmp_path / "rl"
    assert not (stage_dir / config_key("rl", {"rl": {"lr": 2}})).exists()
    assert _temps(stage_dir) == []
    assert [p.name for p in stage_dir.iterdir()] == [good.name]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert "rl" not in cache.timings or cache.timings["rl"]["dir"] == str(good)
    # the failed stage is built on the next try
    retry = cache.stage("rl", {"rl": {"lr": 2}}, Builder("retry"))
    assert (retry / "artifact.txt").read_text() == "retry"


# ---------------------------------------------------------------- pipeline keys
# The pipeline's stages, with their compute replaced by stubs: which config each stage's key sees.


@pytest.fixture
def stub_pipeline(monkeypatch):
    import lol_rl.pipeline as pipeline
    from lol_rl import artifacts

    calls: list[str] = []

    def sft(stage):
        calls.append("sft")
        (stage.out / "config_seen.json").write_text(json.dumps({"steps": stage.cfg.sft.steps}))

    def value(stage):
        calls.append("value")
        assert stage.inputs["sft"].is_dir()

    def reference(stage):
        calls.append("reference")
        assert stage.inputs["sft"].is_dir()

    def advantage(stage):
        calls.append("advantage")
        assert set(stage.inputs) == {"sft", "value", "reference"}
        (stage.out / artifacts.ADVANTAGE_AUDIT).write_text(json.dumps({"rows": 30, "kept": 20}))

    def rl(stage):
        calls.append("rl")
        assert ("advantage" in stage.inputs) == (stage.cfg.algo.keep == "positive_advantage")
        (stage.out / artifacts.POLICY).mkdir()
        (stage.out / "config_seen.json").write_text(json.dumps({"steps": stage.cfg.rl.steps,
                                                                "val_interval": stage.cfg.rl.val_interval}))

    def evaluate(stage):
        calls.append("eval")
        assert all(path.is_dir() for path in stage.inputs.values())
        (stage.out / artifacts.EVAL_METRICS).write_text(json.dumps(
            {"reward": 1.0, "rewards": {"a": 1.0}, "length": 2.0, "distinct": [1.0, 1.0, 1.0], "n": 3}))

    replace_stage_runs(monkeypatch, {"sft": sft, "value": value, "reference": reference, "advantage": advantage,
                                     "rl": rl, "eval_ref": evaluate, "eval": evaluate})
    return pipeline, calls


def _run(pipeline, tmp_path, name, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"cache_dir={tmp_path / 'cache'}", "task.sizes.train=30", "task.sizes.validation=10",
            "task.sizes.test=10", "device=cpu", "threads=0", *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir()
    pipeline.run_train(cfg, run_dir)
    return {k: (Path(v["dir"]), v["cached"]) for k, v in json.loads((run_dir / "stages.json").read_text()).items()}


def test_downstream_changes_keep_upstream_keys(stub_pipeline, tmp_path):
    pipeline, calls = stub_pipeline
    base = _run(pipeline, tmp_path, "base", [])
    assert calls == ["sft", "value", "reference", "advantage", "rl", "eval", "eval"]
    assert list(base) == ["sft", "value", "reference", "advantage", "rl", "eval_ref", "eval"]
    assert not any(cached for _, cached in base.values())
    assert json.loads((tmp_path / "base" / "eval.json").read_text())["policy"]["n"] == 3

    def rerun(name, overrides, rebuilt):
        calls.clear()
        stages = _run(pipeline, tmp_path, name, overrides)
        for stage, (path, cached) in stages.items():
            if stage in rebuilt:
                assert path != base[stage][0] and not cached, (name, stage)
            else:
                assert path == base[stage][0] and cached, (name, stage)
        return stages

    rerun("same", [], rebuilt=set())
    assert calls == []
    rerun("rl_lr", ["rl.lr=1e-4"], rebuilt={"rl", "eval"})
    assert calls == ["rl", "eval"]
    rerun("seed", ["seed=2"], rebuilt={"rl", "eval"})
    rerun("eval", ["eval.test_prompts=5"], rebuilt={"eval_ref", "eval"})
    rerun("value", ["value.epochs=3"], rebuilt={"value", "advantage", "rl", "eval"})
    assert calls == ["value", "advantage", "rl", "eval"]
    rerun("adv_batch", ["advantage.batch_size=7"], rebuilt=set())  # a runtime key: the same tensors
    rerun("checkpoints", ["sft.checkpoint_interval=7", "rl.checkpoint_interval=3"], rebuilt=set())  # runtime too
    rerun("task_reward", ["task.rewards=[correct]"], rebuilt=set(base) - {"sft"})  # pi_ref never scores
    rerun("sft", ["sft.steps=5"], rebuilt=set(base))
    rerun("kept", ["algo=nll_kept"], rebuilt={"rl", "eval"})

    calls.clear()
    nll = _run(pipeline, tmp_path, "nll", ["algo=nll"])
    assert list(nll) == ["sft", "rl", "eval_ref", "eval"]  # no value/advantage stage for plain NLL
    assert nll["sft"] == (base["sft"][0], True) and nll["eval_ref"] == (base["eval_ref"][0], True)
    assert nll["rl"][0] != base["rl"][0]
    assert calls == ["rl", "eval"]

    calls.clear()
    wbc = _run(pipeline, tmp_path, "wbc", ["algo=wbc"])
    assert list(wbc) == ["sft", "reference", "rl", "eval_ref", "eval"]  # rewards, no value head: wBC reads no V(x)
    assert wbc["reference"] == (base["reference"][0], True)


@pytest.mark.parametrize("algo,rows", [("alol", 20), ("nll", 30), ("wbc", 30)])
def test_epoch_budgets_count_the_rows_each_loop_trains_on(stub_pipeline, tmp_path, algo, rows):
    # 30 train rows; the stub advantage keeps 20: A-LOL's epochs are over those, NLL's and wBC's over all 30
    pipeline, _ = stub_pipeline
    stages = _run(pipeline, tmp_path, "run", [f"algo={algo}", "sft.epochs=2", "sft.batch_size=8", "rl.epochs=3",
                                             "rl.batch_size=4", "rl.validations_per_epoch=2"])
    assert json.loads((stages["sft"][0] / "config_seen.json").read_text()) == {"steps": 8}  # ceil(2 x 30 / 8)
    seen = json.loads((stages["rl"][0] / "config_seen.json").read_text())
    assert seen == {"steps": -(-3 * rows // 4), "val_interval": rows // 4 // 2}
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").rl.steps == seen["steps"]  # the run records what ran


def test_a_bad_epoch_budget_stops_before_any_stage(stub_pipeline, tmp_path):
    pipeline, calls = stub_pipeline
    with pytest.raises(ConfigError, match="rl: validations_per_epoch needs epochs"):
        _run(pipeline, tmp_path, "run", ["rl.validations_per_epoch=2"])
    assert calls == []


def _owner_file(path: Path, host: str, pid: int, started, renewed_ago: float = 0.0) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "started": started}))
    os.utime(path, (time.time() - renewed_ago, time.time() - renewed_ago))


def test_a_partial_build_is_resumed_only_when_its_owner_is_gone(tmp_path, monkeypatch):
    import socket

    from lol_rl import lease
    from lol_rl.lease import holder, process_start

    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    monkeypatch.setattr(lease, "LEASE_SECONDS", 0.3)
    monkeypatch.setattr("lol_rl.cache.RENEW_SECONDS", 0.05)
    monkeypatch.setattr("lol_rl.cache.LEASE_SECONDS", 0.3)
    cache = StageCache(tmp_path)
    final = cache.path("rl", {"rl": 1})
    partial = final.parent / f".partial-{final.name}"
    partial.mkdir(parents=True)
    owner = partial / "owner.pid"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _owner_file(owner, socket.gethostname(), sleeper.pid, process_start(sleeper.pid))
        assert cache._resumable_dir(final, final.name) is None  # a live builder here: leave it alone
        _owner_file(owner, socket.gethostname(), sleeper.pid, "1")  # its pid, reused by an unrelated process
        claimed, held = cache._resumable_dir(final, final.name)
        assert claimed == partial and holder(owner).pid == os.getpid()
        held.release()
        _owner_file(owner, "another-node", 12345, "7", renewed_ago=5.0)  # its lease lapsed: a requeued job resumes
        claimed, held = cache._resumable_dir(final, final.name)
        assert claimed == partial
        held.release()

        _owner_file(owner, "another-node", 12345, "7")  # another host that keeps renewing its lease
        stop = threading.Event()

        def renew():
            while not stop.wait(0.02):
                os.utime(owner)

        renewer = threading.Thread(target=renew)
        renewer.start()
        try:
            assert cache._resumable_dir(final, final.name) is None  # never shared: it builds apart
        finally:
            stop.set()
            renewer.join()
        assert holder(owner).host == "another-node"
    finally:
        sleeper.kill()


def test_a_changed_byte_in_a_cached_artifact_is_refused(tmp_path):
    cache = StageCache(tmp_path)
    built = cache.stage("sft", {"sft": 1}, Builder("weights " * 1000))
    data = bytearray((built / "artifact.txt").read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    (built / "artifact.txt").write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"cache artifact {built} is damaged: artifact.txt is not what was built"):
        StageCache(tmp_path).stage("sft", {"sft": 1}, Builder())


def test_a_read_only_cache_serves_what_it_holds_and_names_what_it_cannot_build(tmp_path, monkeypatch):
    built = StageCache(tmp_path).stage("sft", {"sft": 1}, Builder())
    monkeypatch.setattr("lol_rl.cache.check_writable", lambda root: f"cache_dir {root} is not writable (Read-only)")
    cache = StageCache(tmp_path)  # root cannot make a dir read-only for itself: the probe's answer stands in
    assert cache.stage("sft", {"sft": 1}, Builder()) == built
    with pytest.raises(CacheError, match=f"stage value is not in cache_dir {tmp_path} and cannot be built there"):
        cache.stage("value", {"value": 1}, Builder())


def test_a_full_disk_is_one_line_and_the_partial_build_is_kept(tmp_path):
    import errno

    def fill(out: Path) -> None:
        (out / "checkpoint.pt").write_text("step 4")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoint.pt.tmp"))

    cache = StageCache(tmp_path)
    final = cache.path("rl", {"rl": 1})
    with pytest.raises(CacheError) as err:
        cache.stage("rl", {"rl": 1}, fill, resumable=True)
    partial = final.parent / f".partial-{final.name}"
    assert str(err.value) == (f"stage rl: no space left writing {partial}/checkpoint.pt.tmp; the next run resumes "
                              f"from {partial}")
    assert (partial / "checkpoint.pt").read_text() == "step 4" and not (partial / "owner.pid").exists()


# ---------------------------------------------------------------- keys from the declarations

def _leaves(tree: dict, prefix: str = ""):
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}


def _others(value) -> list:
    """Different values of the same kind (for None, one per kind of optional field)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, (int, float)):
        return [value * 2 + 1]
    if isinstance(value, str):
        return [value + "x"]
    if isinstance(value, list):
        return [[*value, "x"]]
    return [3, LORA]


def _changed(cfg, path: str, value):
    from omegaconf.errors import ValidationError

    for other in _others(value):
        for name in reversed(path.split(".")):
            other = {name: other}
        try:
            return OmegaConf.merge(cfg, other)
        except ValidationError:
            continue
    raise AssertionError(f"no other value fits {path}")


def _under(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("overrides", [[], ["task=jsonl", "task.train=a", "task.validation=b", "task.test=c",
                                            "model=gpt2", "algo=ppo"]], ids=["toy-tiny-alol", "jsonl-gpt2-ppo"])
def test_a_stage_key_moves_with_exactly_the_config_it_declares(overrides):
    from hydra import compose, initialize_config_dir

    from lol_rl.config import validate
    from lol_rl.pipeline import STAGES, key_parts

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose("config", overrides=overrides))
    leaves = list(_leaves(OmegaConf.to_container(cfg, resolve=True)))
    assert len(leaves) > 60
    for stage in STAGES:
        key = config_key(stage.folder, key_parts(stage, cfg, "data", {}))
        for path, value in leaves:
            changed = _changed(cfg, path, value)
            moved = config_key(stage.folder, key_parts(stage, changed, "data", {})) != key
            declared = _under(path, stage.reads) and not _under(path, stage.ignores + stage.runtime)
            assert moved == declared, f"stage {stage.name}: changing {path} {'moved' if moved else 'kept'} its key"
        assert config_key(stage.folder, key_parts(stage, cfg, "other data", {})) != key
        assert config_key(stage.folder, key_parts(stage, cfg, "data", {"sft": "another"})) != key


def test_a_stage_sees_only_the_config_it_declares():
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import ConfigAttributeError

    from lol_rl.config import validate
    from lol_rl.pipeline import BY_NAME, stage_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose("config"))
    view = stage_config(BY_NAME["value"], cfg)
    assert view.value.epochs == cfg.value.epochs and view.advantage.batch_size == cfg.advantage.batch_size
    with pytest.raises(ConfigAttributeError):
        view.rl  # noqa: B018 (an undeclared section)
    with pytest.raises(ConfigAttributeError):
        view.advantage.other  # noqa: B018
    sft_view = stage_config(BY_NAME["sft"], cfg)
    assert "rewards" not in sft_view.task and sft_view.sft.checkpoint_interval == cfg.sft.checkpoint_interval
