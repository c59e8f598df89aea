"""FSDP2 through accelerate (conf/accelerate/fsdp.yaml) on two CPU processes over gloo: the sft
and rl loops train on shards of the model what DDP trains on replicas, checkpoint in shards
(torch DCP), resume from them to the uninterrupted result, and write full-weight artifacts that
the later stages read as they read any."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from test_cli import ROOT, TINY
from test_distributed import TWO_PROCESSES, run_worker

# checkpoints every 5 sft / 4 rl steps (runtime keys: the artifacts are those of a run without)
RUN = [*TINY, "threads=1", "algo=alol", "algo.sampling=shuffle", "sft.checkpoint_interval=5", "rl.checkpoint_interval=4"]
FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
        "--config_file", str(ROOT / "conf" / "accelerate" / "fsdp.yaml")]
DDP = TWO_PROCESSES


def train(workspace: Path, name: str, launcher: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("LOL_RL_KILL_AT", None)
    if kill_at:
        env["LOL_RL_KILL_AT"] = kill_at
    return subprocess.run([*launcher, "-m", "lol_rl.cli", "train", *RUN, f"cache_dir={workspace / 'cache'}",
                           f"hydra.run.dir={workspace / name}"],
                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=400)


def artifact(cache: Path, stage: str) -> Path:
    [built] = [d for d in (cache / stage).iterdir() if not d.name.startswith(".")]
    return built / "policy" if stage == "rl" else built


def weights(cache: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(artifact(cache, stage) / "model.safetensors")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for name, launcher in (("ddp", DDP), ("fsdp", FSDP)):
        proc = train(root / name, "run", launcher)
        assert proc.returncode == 0, proc.stdout[-3000:]
    return root


def test_fsdp_trains_the_weights_ddp_trains_and_saves_them_whole(runs):
    for stage in ("sft", "rl"):
        ddp, fsdp = weights(runs / "ddp" / "cache", stage), weights(runs / "fsdp" / "cache", stage)
        assert fsdp.keys() == ddp.keys(), stage  # the full weights, the tied lm_head left out as save_pretrained does
        for key in ddp:  # the same updates up to the order of float sums (reduce-scatter vs all-reduce)
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=f"{stage}: {key}")
        configs = [json.loads((artifact(runs / r / "cache", stage) / "config.json").read_text()) for r in ("ddp", "fsdp")]
        assert configs[1]["architectures"] == configs[0]["architectures"] == ["GPT2LMHeadModel"]
        assert not list((runs / "fsdp" / "cache").glob(f"{stage}/*/checkpoint*")), "a finished stage kept its checkpoint"
    losses = [[r["loss"] for r in records(runs / name / "run" / "metrics.jsonl") if r["stage"] == "rl"]
              for name in ("ddp", "fsdp")]
    assert losses[0] and losses[1] == pytest.approx(losses[0], rel=1e-4)
    evaluated = [json.loads((runs / name / "run" / "eval.json").read_text()) for name in ("ddp", "fsdp")]
    assert evaluated[1]["policy"]["reward"] == pytest.approx(evaluated[0]["policy"]["reward"], abs=1e-6)


def test_a_killed_fsdp_run_resumes_from_its_sharded_checkpoints_to_the_uninterrupted_result(runs, tmp_path):
    for stage, point in (("sft", "sft:step:12"), ("rl", "rl:step:7")):  # after the checkpoints of steps 10 and 4
        killed = train(tmp_path, f"killed-in-{stage}", FSDP, kill_at=point)
        assert killed.returncode != 0, killed.stdout[-3000:]
        [checkpoint] = (tmp_path / "cache" / stage).glob(".partial-*/checkpoint.dcp")
        shards = sorted(p.name for p in checkpoint.iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "loop.pt"], shards  # one file per process
        sizes = [(checkpoint / name).stat().st_size for name in shards[1:3]]
        assert min(sizes) > 0.4 * max(sizes), sizes  # each process wrote its half of the weights and AdamW state
        assert not list(checkpoint.parent.glob("checkpoint.pt"))
    rerun = train(tmp_path, "rerun", FSDP)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    logged = killed.stdout + rerun.stdout + "".join(p.read_text() for p in tmp_path.glob("*/*.log"))
    assert "sft: resuming from the checkpoint of step 10" in logged
    assert "rl: resuming from the checkpoint of step 4" in logged
    for stage in ("sft", "rl"):
        resumed, uninterrupted = weights(tmp_path / "cache", stage), weights(runs / "fsdp" / "cache", stage)
        assert resumed.keys() == uninterrupted.keys()
        for key in uninterrupted:
            assert torch.equal(resumed[key], uninterrupted[key]), f"{stage}: {key}"
    evaluated = [json.loads(path.read_text()) for path in (tmp_path / "rerun" / "eval.json", runs / "fsdp" / "run" / "eval.json")]
    assert evaluated[0]["policy"] == evaluated[1]["policy"]


WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from lol_rl import distributed
import test_grad_accum

out = Path({out!r})
out.mkdir(parents=True, exist_ok=True)
for family in {families!r}:
    model, _ = test_grad_accum.train(out, family, grad_accum=2)
    assert distributed.is_sharded(model)
    weights = distributed.full_state_dict(model)  # every process gathers, the main one saves
    if distributed.is_main():
        torch.save(weights, out / f"{{family}}.pt")
"""


def test_fsdp_with_two_micro_batches_trains_every_loss_family_like_one_process_with_the_whole_batch(tmp_path):
    """Batch 16 over 2 FSDP processes x rl.grad_accum 2 (micro-batches of 4): the weights one
    process gets with the 16 rows at once, for single responses, pairs and rankings."""
    import test_grad_accum

    families = ["nll", "dpo", "pro"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path / "fsdp"), families=families))
    run_worker(FSDP, script)
    for family in families:
        whole, _ = test_grad_accum.train(tmp_path / "one", family, grad_accum=1)
        sharded = torch.load(tmp_path / "fsdp" / f"{family}.pt")
        for name, p in whole.named_parameters():
            torch.testing.assert_close(test_grad_accum.without_key_bias(name, sharded[name]),
                                       test_grad_accum.without_key_bias(name, p.detach()),
                                       rtol=1e-5, atol=1e-5, msg=f"{family}: {name}")


def test_an_fsdp_launch_refuses_fsdp1_and_a_lora_model_before_any_stage(monkeypatch):
    from lol_rl.errors import ConfigError
    from lol_rl.pipeline import check_fully_sharded

    lora = OmegaConf.create({"model": {"name": "smollm2", "lora": {"r": 8}, "quantization": None}})
    full = OmegaConf.create({"model": {"name": "tiny", "lora": None, "quantization": None}})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    check_fully_sharded(lora)  # one process: nothing is sharded
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^the accelerate config asks for FSDP version 1; lol-rl shards with FSDP2"):
        check_fully_sharded(full)
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_fully_sharded(full)
    with pytest.raises(ConfigError, match=r"^model smollm2: the FSDP launch config shards full fine-tuning"):
        check_fully_sharded(lora)
