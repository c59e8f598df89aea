"""The one loop shell every training stage runs (sft, offline rl, PPO): resume from a
checkpoint, the step, metric records and a progress line, validation on a cadence with the best
checkpoint kept, atomic checkpoint writes. The stage supplies `step(n) -> metrics` (one
optimizer step offline, one rollout-and-update in PPO) and the state it adds to a checkpoint.

The non-finite guard (`guarded_update`) is here too, called by each step function on its own
losses: one rule for what a NaN does, whoever computed it."""

from __future__ import annotations

import io
import logging
import math
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import artifacts, distributed
from .errors import LolRlError
from .faults import kill_point
from .files import atomic_write_text
from .models import save_policy
from .progress import progress_disabled
from .rewards import RewardError
from .tracking import MetricsLogger, StageRecords

log = logging.getLogger(__name__)


class CheckpointError(LolRlError, RuntimeError):
    """A resumable stage's checkpoint cannot be read; names the file."""


class NonFiniteError(LolRlError, RuntimeError):
    """A loss or gradient was NaN/inf; names the stage, the step and the batch's rows."""


def save_checkpoint(path: Path, state: dict, point: str) -> None:
    """torch.save to a temp file, then one rename: a kill at any moment leaves the previous
    checkpoint whole. Written in two halves so that the fault tests can kill between them."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temp.open("wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        kill_point(point)
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at `path`, or None when there is none; a write a kill cut short never
    replaced the checkpoint, so its temp file is dropped."""
    for torn in path.parent.glob(f".{path.name}.tmp-*"):
        torn.unlink()
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # written atomically, so only a damaged disk or a foreign file gets here
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
                              f"delete it to restart this stage from step 0") from None


def save_sharded_checkpoint(path: Path, model, optimizer, state: dict, point: str) -> None:
    """A checkpoint dir under FSDP: every process writes its shards of the weights and of the
    optimizer state (torch DCP) into a staging dir, the main one the rest of the loop state
    (`state`: scheduler, sampler, RNG, step) beside them; then the main one swaps it in by
    renames, so a kill leaves the previous checkpoint whole (`recover_swap` finishes a swap)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    staging = path.with_name(f".{path.name}.new")
    if distributed.is_main():
        shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
    if distributed.is_main():
        torch.save(state, staging / artifacts.LOOP_STATE)
    kill_point(point)
    distributed.barrier()  # every process's shards are written
    if distributed.is_main():
        swap_in(staging, path)
    distributed.barrier()


def load_sharded_checkpoint(path: Path, model, optimizer) -> dict | None:
    """The loop state of the checkpoint dir at `path`, its shards loaded into `model` and
    `optimizer` (every process reads its own); None when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if distributed.is_main():
        recover_swap(path)
    distributed.barrier()
    if not (path / artifacts.LOOP_STATE).is_file():
        return None
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the shapes to read into
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    return torch.load(path / artifacts.LOOP_STATE, weights_only=True)


def sharded_checkpoint(checkpoint: Path) -> Path:
    """Where a loop checkpointing to `checkpoint` keeps its checkpoint dir under FSDP."""
    return checkpoint.with_name(artifacts.SHARDED_CHECKPOINT)


def remove_checkpoint(checkpoint: Path) -> None:
    """A finished stage's loop state, whichever form it took: the artifact needs none."""
    checkpoint.unlink(missing_ok=True)
    shutil.rmtree(sharded_checkpoint(checkpoint), ignore_errors=True)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint needs: the trainable ones (all of them, or a LoRA adapter's)."""
    return {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


def guarded_update(backward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, grad_clip: float,
                   skip_nonfinite: bool, failure: Callable[[str, float, float], str]) -> torch.Tensor | None:
    """`backward()` (the step's forward and backward passes, one per micro-batch under gradient
    accumulation; it returns the step's loss), clip, and the optimizer step unless the loss or
    the gradient is NaN/inf: then NonFiniteError(`failure(what, loss, grad_norm)`), or with
    `skip_nonfinite` no step and None (the caller counts it). Returns the gradient norm of a step taken."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP's parameters are DTensors, and so is their norm
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(loss.detach() + grad_norm):  # one host sync per step, for both
        what = "loss" if not torch.isfinite(loss) else "gradient"
        message = failure(what, loss.item(), grad_norm.item())
        if not skip_nonfinite:
            raise NonFiniteError(message)
        log.warning("skipped: %s", message)
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return grad_norm


def save_policy_atomically(model, tokenizer, path: Path, base_dir: Path, state_dict: dict | None = None) -> None:
    """Write the new policy beside the old one, then swap them by renames: a kill leaves the
    old policy or the new one whole, never a mix (recover_swap puts an old one back).
    `state_dict`: the weights to write (a sharded model's, gathered), else the model's own."""
    staging = path.with_name(f".{path.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    save_policy(model, tokenizer, staging, base_dir=base_dir, state_dict=state_dict)
    swap_in(staging, path)


def swap_in(staging: Path, path: Path) -> None:
    """The dir `staging` becomes `path` by two renames, the old `path` (if any) removed after."""
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        os.rename(path, old)
    os.rename(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(path: Path) -> None:
    """After a kill between swap_in's two renames, the old dir back at `path`; staging dirs dropped."""
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.rename(old, path)
    shutil.rmtree(path.with_name(f".{path.name}.new"), ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def best_policy_saver(model, tokenizer, out: Path, base_dir: Path) -> Callable[[int, float | None], None]:
    """`on_best(step, reward)`: the policy now is the best so far; saved atomically with its step."""

    def save(step: int, score: float | None) -> None:
        weights = distributed.full_state_dict(model)  # a sharded model: every process joins the gather
        if not distributed.is_main():
            return
        save_policy_atomically(model, tokenizer, out / artifacts.POLICY, base_dir=base_dir, state_dict=weights)
        atomic_write_text(out / artifacts.BEST, json.dumps({"step": step, "validation_reward": score}))

    return save



@dataclass
class Validation:
    """Greedy generation scored on validation prompts: `score(model) -> (reward, details)`;
    `on_best(step, reward)` saves the policy whenever the reward improves. With `at_start`, the
    policy before its first step (pi_ref) is scored at step 0 and is a candidate too."""

    score: Callable[[Any], tuple[float, dict]]
    on_best: Callable[[int, float], None]
    interval: int
    at_start: bool = False


@dataclass
class Loop:
    """What the shell needs of a stage: its name, the step budget, the step function, and the
    objects whose state a checkpoint holds (`trainable`, `optimizer`, `scheduler`, and
    `extra_state`/`load_extra_state` for the stage's own: sampler, RNGs, running statistics)."""

    stage: str
    steps: int
    step: Callable[[int], dict | None]  # None: a skipped (non-finite) step
    model: Any  # what validation generates with
    trainable: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    metrics: StageRecords | MetricsLogger  # a bare logger in tests and benchmarks
    log_interval: int
    validation: Validation | None = None
    checkpoint: Path | None = None
    checkpoint_interval: int = 0
    extra_state: Callable[[], dict] = dict
    load_extra_state: Callable[[dict], None] = lambda state: None
    data_parallel: bool = False  # logged metrics are means over the processes of a data-parallel loop
    sharded: bool = False  # FSDP: every process validates and checkpoints (its shards) with the main one
    last_validation: float | None = None  # the latest validation reward, shown beside the loss (not checkpointed)
    state: dict = field(default_factory=lambda: {"step": 0, "best": {"score": -math.inf, "step": 0}, "running": {},
                                                  "counted": 0, "skipped": 0})


def run_loop(loop: Loop) -> dict:
    """Run `loop.steps` steps from wherever its checkpoint left off; returns the summary (best
    validation reward and its step, steps, skipped steps, seconds). Under several processes the
    main one alone validates and checkpoints (all of them, when the model is sharded)."""
    state = _load(loop) if loop.checkpoint is not None else None
    if state is not None:
        loop.scheduler.load_state_dict(state["scheduler"])
        loop.load_extra_state(state["extra"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        loop.state = state["loop"]
        log.info("%s: resuming from the checkpoint of step %d", loop.stage, loop.state["step"])
    # what a killed run recorded past the point this one starts from, it records again
    loop.metrics.forget_after(loop.state["step"] if state is not None else -1)
    keeper = distributed.rank() == 0 or loop.sharded  # a process that validates and checkpoints
    started = time.perf_counter()
    first = loop.state["step"] + 1
    if first == 1 and loop.validation is not None and loop.validation.at_start and keeper:
        _validate(loop, 0)
    bar = tqdm(range(first, loop.steps + 1), desc=loop.stage, disable=progress_disabled(),
               initial=loop.state["step"], total=loop.steps)
    postfix = {} if loop.last_validation is None else {"val reward": f"{loop.last_validation:.3f}"}
    for step in bar:
        kill_point(f"{loop.stage}:step:{step}")
        values = loop.step(step)
        _accumulate(loop.state, values)
        if (step % loop.log_interval == 0 or step == loop.steps) and loop.state["counted"]:
            row = _log_record(loop, step, started, first)
            if "loss" in row:
                postfix["loss"] = f"{row['loss']:.3f}"
                bar.set_postfix(postfix)
        if loop.validation is not None and keeper and (step % loop.validation.interval == 0 or step == loop.steps):
            _validate(loop, step)
            postfix["val reward"] = f"{loop.last_validation:.3f}"
            bar.set_postfix(postfix)
        if loop.checkpoint_interval and step % loop.checkpoint_interval == 0 and step < loop.steps and keeper:
            loop.state["step"] = step
            _save(loop, step)
    best = loop.state["best"]
    validated = math.isfinite(best["score"])  # JSON has no -Infinity: a loop that never validated has no best
    return {"best_validation_reward": best["score"] if validated else None, "best_step": best["step"] if validated else None,
            "steps": loop.steps,
            "skipped_steps": loop.state["skipped"], "seconds": time.perf_counter() - started}


def _load(loop: Loop) -> dict | None:
    """The checkpoint's loop state, its weights and optimizer state loaded; None when there is none."""
    if loop.sharded:
        return load_sharded_checkpoint(sharded_checkpoint(loop.checkpoint), loop.trainable, loop.optimizer)
    state = load_checkpoint(loop.checkpoint)
    if state is not None:
        load_trainable_state(loop.trainable, state["model"])
        loop.optimizer.load_state_dict(state["optimizer"])
    return state


def _save(loop: Loop, step: int) -> None:
    state = {"scheduler": loop.scheduler.state_dict(), "extra": loop.extra_state(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "loop": loop.state}
    point = f"{loop.stage}:checkpoint_write:{step}"
    if loop.sharded:
        save_sharded_checkpoint(sharded_checkpoint(loop.checkpoint), loop.trainable, loop.optimizer, state, point)
    else:
        save_checkpoint(loop.checkpoint, {"model": trainable_state(loop.trainable),
                                          "optimizer": loop.optimizer.state_dict(), **state}, point=point)


def _accumulate(state: dict, values: dict | None) -> None:
    if values is None:
        state["skipped"] += 1
        return
    state["counted"] += 1
    running = state["running"]
    for name, value in values.items():
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        running[name] = running.get(name, 0.0) + value


def _log_record(loop: Loop, step: int, started: float, first: int) -> dict:
    """The mean of each metric over the steps since the last record (over the processes of a
    data-parallel loop), with the rate, the elapsed time and the skipped steps."""
    running = distributed.mean_over_processes(loop.state["running"]) if loop.data_parallel else loop.state["running"]
    row = {name: (value / loop.state["counted"]).item() for name, value in running.items()}
    loop.state["running"], loop.state["counted"] = {}, 0
    seconds = time.perf_counter() - started
    loop.metrics.log(loop.stage, step, lr=loop.scheduler.get_last_lr()[0], seconds=seconds,
                     skipped_steps=loop.state["skipped"], **row)
    if progress_disabled() and distributed.is_main():  # no bar (CI, a log file): one line instead
        per_step = seconds / (step - first + 1)
        loss = f" loss {row['loss']:.4f}" if "loss" in row else ""
        if loop.last_validation is not None:
            loss += f", last validation reward {loop.last_validation:.4f}"
        log.info("%s: step %d/%d%s, %.3f s/step, ETA %.0f s", loop.stage, step, loop.steps, loss, per_step,
                 per_step * (loop.steps - step))
    return row


def _validate(loop: Loop, step: int) -> None:
    devices = list(range(torch.cuda.device_count()))
    try:  # generation seeds its own batches: the loop's RNG (PPO's rollouts, dropout) goes on as if it had not run
        with torch.random.fork_rng(devices=devices):
            score, details = loop.validation.score(loop.model)
    except RewardError as err:  # say where: the same scorer also runs in the value stage, eval, PPO rollouts
        raise RewardError(f"{loop.stage} validation at step {step}: {err}") from None
    if loop.sharded:  # every process generated (the forward gathers the shards); all take the main one's score
        score, details = distributed.broadcast((score, details))
    loop.metrics.log(f"{loop.stage}/validation", step, reward=score, **details)
    loop.last_validation = score
    if score > loop.state["best"]["score"]:
        loop.state["best"] = {"score": score, "step": step}
        loop.validation.on_best(step, score)
