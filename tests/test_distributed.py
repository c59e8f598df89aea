"""Data-parallel training: every process takes a disjoint share of each global batch and DDP
averages the gradients, so two CPU processes (gloo) train what one process trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lol_rl.distributed import shard_rows
from lol_rl.offline import BatchSource
from test_cli import ROOT, TINY

# shuffled passes: the rows of one batch are distinct, so "disjoint" is about rows, not positions
RUN = [*TINY, "threads=1", "algo=alol", "algo.sampling=shuffle"]


def test_shards_are_disjoint_equal_and_cover_the_batch():
    batch = torch.tensor([7, 3, 9, 1, 4, 8])
    parts = [shard_rows(batch, rank, 3) for rank in range(3)]
    assert [p.tolist() for p in parts] == [[7, 1], [3, 4], [9, 8]]
    with pytest.raises(ValueError, match="a batch of 6 rows cannot be split evenly over 4 processes"):
        shard_rows(batch, 0, 4)


def test_every_process_draws_the_same_batch_and_takes_its_share():
    rows = torch.arange(40)

    class Rows:  # the two methods BatchSource.sample reads
        def batch(self, indices, groups):
            return {"input_ids": rows[indices]}

    def source():
        return BatchSource(Rows(), {}, {}, torch.arange(40), None, batch_size=8, seed=3, shuffle=True)

    whole, first, second = source(), source(), source()
    for _ in range(6):  # past one pass: the shuffle carries over
        everything, _ = whole.sample()
        (mine, batch), (theirs, _) = first.sample(0, 2), second.sample(1, 2)
        assert sorted(mine.tolist() + theirs.tolist()) == sorted(everything.tolist())
        assert not set(mine.tolist()) & set(theirs.tolist())
        assert torch.equal(batch["input_ids"], mine)


def train(tmp_path: Path, name: str, launcher: list[str], algo: list[str] = RUN[-2:]) -> tuple[Path, Path]:
    cache, record, run_dir = tmp_path / name / "cache", tmp_path / name / "shards", tmp_path / name / "run"
    record.mkdir(parents=True)
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "LOL_RL_SHARD_RECORD": str(record),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "lol_rl.cli", "train", *RUN[:-2], *algo, f"cache_dir={cache}",
                           f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return cache, run_dir


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(cache: Path, stage: str) -> dict[str, torch.Tensor]:
    [artifact] = (cache / stage).iterdir()
    return load_file(next((artifact / "policy" if stage == "rl" else artifact).glob("*.safetensors")))


# KTO: its reference point z0 is a mean over the global batch, so the processes must average it
@pytest.mark.parametrize("algo", [RUN[-2:], ["algo=kto"]], ids=["alol", "kto"])
def test_two_cpu_processes_train_on_disjoint_rows_and_match_one_process(tmp_path, algo):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    one_cache, one_run = train(tmp_path, "one", [sys.executable], algo)
    two_cache, two_run = train(tmp_path, "two", accelerate, algo)
    for stage in ("sft", "rl"):  # both data-parallel loops
        single = records(one_cache.parent / "shards" / f"{stage}-rank0.jsonl")
        ranks = [records(two_cache.parent / "shards" / f"{stage}-rank{r}.jsonl") for r in (0, 1)]
        assert len(single) == len(ranks[0]) == len(ranks[1]) > 0
        for whole, mine, theirs in zip(single, *ranks):
            assert (mine["world"], theirs["world"]) == (2, 2)
            if stage == "rl":  # shuffled passes; sft draws with replacement, so a row can repeat in a batch
                assert not set(mine["rows"]) & set(theirs["rows"]), whole["step"]
            assert sorted(mine["rows"] + theirs["rows"]) == sorted(whole["rows"]), whole["step"]
        one, two = weights(one_cache, stage), weights(two_cache, stage)
        assert one.keys() == two.keys()
        for key in one:  # the same updates up to the order of float sums
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{stage}: {key}")
    losses = [[r["loss"] for r in records(run / "metrics.jsonl") if r["stage"] == "rl"] for run in (one_run, two_run)]
    assert losses[0] and losses[1] == pytest.approx(losses[0], rel=1e-4)
    if algo == ["algo=kto"]:  # every process used the global batch's z0, not its own share's
        kls = [[r["kl"] for r in records(run / "metrics.jsonl") if r["stage"] == "rl"] for run in (one_run, two_run)]
        assert kls[1] == pytest.approx(kls[0], rel=1e-4, abs=1e-7)
    # one process wrote the run: one metrics record per step logged, one eval.json, the same numbers
    assert [r["step"] for r in records(two_run / "metrics.jsonl") if r["stage"] == "rl"] == [5, 10]
    evaluated = [json.loads((run / "eval.json").read_text()) for run in (one_run, two_run)]
    assert evaluated[1]["policy"]["reward"] == pytest.approx(evaluated[0]["policy"]["reward"], abs=1e-6)
    shutil.rmtree(tmp_path)  # two caches of models


def test_a_batch_size_that_does_not_split_over_the_processes_stops_before_any_stage():
    from omegaconf import OmegaConf

    from lol_rl.errors import ConfigError
    from lol_rl.pipeline import check_batches_split

    cfg = OmegaConf.create({"sft": {"batch_size": 64}, "rl": {"batch_size": 30}})
    check_batches_split(cfg, 2)
    with pytest.raises(ConfigError, match=r"^rl.batch_size=30 cannot be split evenly over 4 processes; "
                                             r"use a multiple of 4$"):
        check_batches_split(cfg, 4)


WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from lol_rl import distributed
import test_grad_accum

out = Path({out!r}) / f"rank{{distributed.rank()}}"
out.mkdir(parents=True)
for family in {families!r}:
    model, _ = test_grad_accum.train(out, family, grad_accum=2)
    torch.save({{n: p.detach() for n, p in model.named_parameters()}}, out / f"{{family}}.pt")
"""


def test_two_processes_of_two_micro_batches_train_like_one_process_with_the_whole_batch(tmp_path):
    """Batch 16 over 2 gloo processes x rl.grad_accum 2 (micro-batches of 4, no_sync until the
    last): the weights one process gets with the 16 rows at once, for each loss family."""
    import test_grad_accum

    families = ["nll", "dpo", "pro"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path / "two"), families=families))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*accelerate, str(script)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for family in families:
        whole, _ = test_grad_accum.train(tmp_path / "one", family, grad_accum=1)
        for rank in (0, 1):  # DDP keeps the replicas equal
            two = torch.load(tmp_path / "two" / f"rank{rank}" / f"{family}.pt")
            for name, p in whole.named_parameters():
                torch.testing.assert_close(test_grad_accum.without_key_bias(name, two[name]),
                                           test_grad_accum.without_key_bias(name, p.detach()),
                                           rtol=1e-5, atol=1e-5, msg=f"{family}, rank {rank}: {name}")
