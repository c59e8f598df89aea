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
# two CPU processes over gloo, DDP (accelerate's own launcher, as a user runs it)
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def run_worker(launcher: list[str], script: Path) -> None:
    """A test's worker script under `launcher`, one thread per process; fails the test with its output."""
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, str(script)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]


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
    one_cache, one_run = train(tmp_path, "one", [sys.executable], algo)
    two_cache, two_run = train(tmp_path, "two", TWO_PROCESSES, algo)
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


SHARDED = ["value", "reference", "advantage", "eval"]  # eval: pi_ref's and the policy's
# the passes each sharded stage runs, by batch; small batches so that every pass has several
PASSES = ["value samples", "value scores", "train rewards", "reference log-probs of response",
          "ranking rewards", "advantage V(x)", "eval", "eval scores"]  # A-LOL: no rejected group stage
# an even number of generation batches (4 of 40 prompts): the last one, whose RNG state the value
# head's init draws from, is the second process's
SMALL_BATCHES = ["generation.batch_size=10", "advantage.batch_size=32"]


def manifests(cache: Path, stage: str) -> dict[str, dict]:
    return {a.name: json.loads((a / "manifest.json").read_text()) for a in (cache / stage).iterdir()
            if not a.name.startswith(".")}


def test_two_processes_shard_the_one_pass_stages_and_write_the_artifacts_of_one(tmp_path):
    """value, reference, advantage and eval over 2 gloo processes: each process runs every other
    batch of each pass, and every file of those artifacts has the SHA-256 of the 1-process run's.
    The 2-process run reuses the 1-process run's sft and rl artifacts (DDP training matches one
    process only to float rounding), so the sharded stages read the same inputs."""
    overrides = [*RUN[-2:], *SMALL_BATCHES]
    one_cache, _ = train(tmp_path, "one", [sys.executable], overrides)
    for stage in ("sft", "rl"):
        shutil.copytree(one_cache / stage, tmp_path / "two" / "cache" / stage)
    two_cache, two_run = train(tmp_path, "two", TWO_PROCESSES, overrides)
    built = {label for label, timing in json.loads((two_run / "stages.json").read_text()).items() if not timing["cached"]}
    assert built == {"value", "reference", "advantage", "eval_ref", "eval"}
    for stage in SHARDED:
        assert manifests(two_cache, stage) == manifests(one_cache, stage), stage
    single = {r["desc"]: r for r in records(one_cache.parent / "shards" / "map-rank0.jsonl") if r["desc"] in PASSES}
    assert set(single) == set(PASSES)
    for r in (0, 1):
        passes = [p for p in records(two_cache.parent / "shards" / f"map-rank{r}.jsonl") if p["desc"] in PASSES]
        assert sorted({p["desc"] for p in passes}) == sorted(PASSES)
        for p in passes:  # process r ran batches r, r+2, ... of the batches the single process ran
            whole = single[p["desc"]]
            assert whole["batches"] == list(range(whole["of"])) and whole["of"] >= 3, p["desc"]
            assert (p["world"], p["of"], p["batches"]) == (2, whole["of"], list(range(r, whole["of"], 2))), p["desc"]
    shutil.rmtree(tmp_path)


FAILING_SCORER = """
import os

def score(prompts, responses):
    if os.environ.get("RANK") == "1":  # the second process's share of a sharded pass
        raise ValueError("cannot score this batch")
    return [0.5] * len(prompts)
"""


def test_a_process_failing_its_share_of_a_pass_stops_every_process_with_one_line(tmp_path):
    """A scorer that fails in the second process's share of eval's scoring: the main process is
    told (it would otherwise wait in the gather until the 48-hour timeout) and both exit."""
    (tmp_path / "failing_scorer.py").write_text(FAILING_SCORER)
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*TWO_PROCESSES, "-m", "lol_rl.cli", "train", *RUN[:-2], "algo=nll", "generation.batch_size=10",
                           "reward=failing_scorer:score", f"cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode != 0
    assert ("lol-rl: eval scores: process 1 of 2 failed: RewardError: reward component 'failing_scorer:score' "
            "raised ValueError(cannot score this batch)") in proc.stdout, proc.stdout[-3000:]
    assert not (tmp_path / "run" / "eval.json").exists()


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
    run_worker(TWO_PROCESSES, script)
    for family in families:
        whole, _ = test_grad_accum.train(tmp_path / "one", family, grad_accum=1)
        for rank in (0, 1):  # DDP keeps the replicas equal
            two = torch.load(tmp_path / "two" / f"rank{rank}" / f"{family}.pt")
            for name, p in whole.named_parameters():
                torch.testing.assert_close(test_grad_accum.without_key_bias(name, two[name]),
                                           test_grad_accum.without_key_bias(name, p.detach()),
                                           rtol=1e-5, atol=1e-5, msg=f"{family}, rank {rank}: {name}")
