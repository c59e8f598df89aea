"""The one offline training loop (SFT is this loop with the NLL loss), and the sft/rl stages.

Per step: draw a batch (uniformly, or with replacement in proportion to a priority weight),
one policy forward for the response log-probs, the algorithm's loss, one optimizer step.
Reference log-probs come from the advantage cache; the loop never names an algorithm.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import distributed
from .data import RESPONSE, TokenizedRows, encode_rows, split_groups
from .distributed import shard_rows
from .evaluate import score_generations
from .faults import kill_point
from .files import atomic_write_text
from .generate import generate_with_config
from .logprobs import response_logprobs, to_device
from .losses import LOSSES
from .models import (
    add_adapter,
    autocast,
    initial_policy,
    load_policy,
    make_optimizer,
    save_policy,
    save_reference,
)
from .progress import progress_disabled
from .tasks import Task
from .tracking import MetricsLogger

log = logging.getLogger(__name__)


def ragged_rows(flat: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Rows `indices` of a ragged tensor stored as `flat` + `offsets` (N+1,), right-padded
    with 0 to `width` (default: the longest of them)."""
    lengths = offsets[indices + 1] - offsets[indices]
    out = torch.zeros((len(indices), width or int(lengths.max())), dtype=flat.dtype)
    for row, (start, length) in enumerate(zip(offsets[indices].tolist(), lengths.tolist())):
        out[row, :length] = flat[start : start + length]
    return out


class BatchSource:
    """Draws training batches over the kept rows: with replacement in proportion to
    `weights` (priority sampling), uniformly (`weights` None), or as shuffled passes over the
    data (`shuffle`). A batch holds the token ids of each response group, the cached
    reference log-probs of each group (`ragged`, group-major like the ids) and per-row tensors.

    With `length_buckets` k > 1, k batches are drawn at once, sorted by length, cut into k
    batches and served in random order: each batch pads less, and the k batches hold exactly
    the rows k plain draws would have held (the sampling distribution is unchanged)."""

    def __init__(self, rows: TokenizedRows, row_tensors: dict[str, torch.Tensor], ragged: dict, keep: torch.Tensor,
                 weights: torch.Tensor | None, batch_size: int, seed: int, groups: Sequence[str] = (RESPONSE,),
                 shuffle: bool = False, length_buckets: int = 1):
        if len(keep) == 0:
            raise ValueError("no train row left to train on (every row was dropped: A <= 0 for all of them)")
        self.rows, self.row_tensors, self.ragged = rows, row_tensors, ragged
        self.keep = keep
        self.weights = None if weights is None else weights[keep].double()
        if self.weights is not None and not (self.weights > 0).any():
            raise ValueError("every sampling weight is zero: no row to train on")
        self.batch_size = batch_size
        self.groups = list(groups)
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self.length_buckets = length_buckets
        self._pending: list[torch.Tensor] = []
        if length_buckets > 1:  # a row's padded width: its prompt plus its longest response group
            self.lengths = torch.tensor([len(rows.prompt_ids[i]) + max(len(rows.group(g)[i]) for g in self.groups)
                                         for i in range(len(rows))])

    def _draw(self) -> torch.Tensor:
        if self.weights is not None:
            return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        if not self.shuffle:
            return torch.randint(len(self.keep), (self.batch_size,), generator=self.generator)
        while len(self._order) < self.batch_size:  # next shuffled pass, carried over across passes
            self._order = torch.cat([self._order, torch.randperm(len(self.keep), generator=self.generator)])
        picks, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return picks

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order, "pending": self._pending}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"]
        self._pending = list(state["pending"])

    def draw(self) -> torch.Tensor:
        """The row indices of the next batch."""
        if self.length_buckets <= 1:
            return self.keep[self._draw()]
        if not self._pending:
            rows = self.keep[torch.cat([self._draw() for _ in range(self.length_buckets)])]
            by_length = rows[torch.argsort(self.lengths[rows], stable=True)].split(self.batch_size)
            self._pending = [by_length[i] for i in torch.randperm(len(by_length), generator=self.generator).tolist()]
        return self._pending.pop()

    def sample(self, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next batch, or process `rank`'s disjoint share of it when `world` processes train
        on one global batch (every process draws the same batches: same seed, same sampler)."""
        indices = shard_rows(self.draw(), rank, world)
        batch = self.rows.batch(indices.tolist(), self.groups)
        if self.ragged:
            width = int(batch["response_lengths"].max())
            batch["ref_logprobs"] = torch.cat([ragged_rows(*self.ragged[g], indices, width) for g in self.groups])
        for name, tensor in self.row_tensors.items():
            batch[name] = tensor[indices]
        return indices, batch


def call_loss(loss_fn: Callable, params: dict, tensors: dict[str, torch.Tensor]):
    """Call a loss with the tensors its signature names (the loop knows no algorithm)."""
    wanted = [p.name for p in inspect.signature(loss_fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise ValueError(f"loss {loss_fn.__name__} needs {missing}, which this run does not provide")
    return loss_fn(**{name: tensors[name] for name in wanted}, **params)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_start", "response_lengths", "ref_logprobs")


def loss_on_batch(model, batch: dict[str, torch.Tensor], groups: Sequence[str], loss_fn: Callable, params: dict):
    """One policy forward over every response group of the batch, then the loss."""
    with autocast(batch["input_ids"].device):
        logprobs, mask = response_logprobs(model, batch)
    logprobs = logprobs.float()
    per_token = {"logprobs": logprobs, "mask": mask}
    if "ref_logprobs" in batch:
        per_token["ref_logprobs"] = batch["ref_logprobs"]
    batch_size = logprobs.shape[0] // len(groups)
    tensors = split_groups(per_token, groups, batch_size)
    tensors.update({k: v for k, v in batch.items() if k not in SEQUENCE_KEYS})
    return call_loss(loss_fn, params, tensors)


CHECKPOINT = "checkpoint.pt"


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


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint needs: the trainable ones (all of them, or a LoRA adapter's)."""
    return {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


class CheckpointError(RuntimeError):
    """A resumable stage's checkpoint cannot be read; names the file."""


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/inf; names the stage, the step and the batch's rows."""


def optimize(model, source: BatchSource, loss_fn: Callable, loss_params: dict, opt_cfg, *, device, stage: str,
             metrics: MetricsLogger, validate: Callable | None = None, on_best: Callable | None = None,
             row_ids: Sequence[str] | None = None, optimizer_name: str = "adamw", checkpoint: Path | None = None) -> dict:
    """Run `opt_cfg.steps` optimizer steps; validate every `val_interval` steps and call
    `on_best(model, step, score)` when the validation score improves. A non-finite loss or
    gradient stops the run (naming the step and the rows, by `row_ids`) unless
    `opt_cfg.skip_nonfinite`, which skips such steps and counts them. With `checkpoint`, the
    whole loop state (trainable weights, optimizer, scheduler, sampler, RNG, best score) is
    saved there every `checkpoint_interval` steps, and a run that finds it continues from it.

    Under several processes each trains on its share of every global batch under DDP (the
    gradient is the global batch's); the main process alone validates and checkpoints."""
    optimizer = make_optimizer(model, opt_cfg, optimizer_name)
    rank, world = distributed.rank(), distributed.world_size()
    trained = distributed.data_parallel(model)  # the forward/backward; `model` itself for generation and saving
    scheduler = get_scheduler(opt_cfg.schedule, optimizer, num_warmup_steps=opt_cfg.warmup_steps,
                              num_training_steps=opt_cfg.steps)
    params = dict(loss_params)
    loop = {"step": 0, "best": {"score": -math.inf, "step": 0}, "running": {}, "counted": 0, "skipped": 0}
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        source.load_state_dict(state["source"])
        torch.set_rng_state(state["rng"])
        loop = state["loop"]
        log.info("%s: resuming from the checkpoint of step %d", stage, loop["step"])
    best, running = loop["best"], loop["running"]
    counted, skipped = loop["counted"], loop["skipped"]
    interval = opt_cfg.get("checkpoint_interval", 0) if checkpoint is not None else 0
    started = time.perf_counter()
    bar = tqdm(range(loop["step"] + 1, opt_cfg.steps + 1), desc=stage, disable=progress_disabled(),
               initial=loop["step"], total=opt_cfg.steps)
    for step in bar:
        kill_point(f"{stage}:step:{step}")
        model.train()
        indices, batch = source.sample(rank, world)
        distributed.record_shard(stage, step, indices)
        loss, loss_metrics = loss_on_batch(trained, to_device(batch, device), source.groups, loss_fn, params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], opt_cfg.grad_clip)
        if not torch.isfinite(loss.detach() + grad_norm):  # one host sync per step, for both
            rows = [row_ids[i] for i in indices.tolist()] if row_ids is not None else indices.tolist()
            what = "loss" if not torch.isfinite(loss) else "gradient"
            if not opt_cfg.skip_nonfinite:
                raise NonFiniteError(f"{stage}: non-finite {what} at step {step} (loss {loss.item()}, grad norm "
                                     f"{grad_norm.item()}) on train rows {rows}; {stage}.skip_nonfinite=true skips such steps")
            skipped += 1
            log.warning("%s: skipped step %d, non-finite %s on train rows %s", stage, step, what, rows)
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            counted += 1
            for name, value in {"loss": loss.detach(), "grad_norm": grad_norm, **loss_metrics}.items():
                running[name] = running.get(name, 0.0) + value.detach().float()
        scheduler.step()
        if (step % opt_cfg.log_interval == 0 or step == opt_cfg.steps) and counted:
            row = {name: (value / counted).item()
                   for name, value in distributed.mean_over_processes(running).items()}
            running.clear()
            counted = 0
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            metrics.log(stage, step, lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - started,
                        skipped_steps=skipped, **row)
        if validate is not None and rank == 0 and (step % opt_cfg.val_interval == 0 or step == opt_cfg.steps):
            score, details = validate(model)
            metrics.log(f"{stage}/validation", step, reward=score, **details)
            if score > best["score"]:
                best = {"score": score, "step": step}
                if on_best is not None:
                    on_best(model, step, score)
        if interval and step % interval == 0 and step < opt_cfg.steps and rank == 0:
            loop = {"step": step, "best": best, "running": running, "counted": counted, "skipped": skipped}
            save_checkpoint(checkpoint, {"model": trainable_state(model),
                                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                         "source": source.state_dict(), "rng": torch.get_rng_state(), "loop": loop},
                            point=f"{stage}:checkpoint_write:{step}")
    return {"best_validation_reward": best["score"], "best_step": best["step"], "steps": opt_cfg.steps,
            "skipped_steps": skipped, "seconds": time.perf_counter() - started}


def run_sft(cfg, task: Task, out_dir: Path, metrics: MetricsLogger, device) -> None:
    """Stage 1: pi_ref = the initial model NLL-trained on the train split's logged responses."""
    torch.manual_seed(cfg.sft.seed)
    train = task.splits["train"]
    texts = [task.format_prompt(e.prompt) + task.response_prefix + e.response for e in train]
    model, tokenizer = initial_policy(cfg.model, texts, device)
    rows = encode_rows(tokenizer, task, train, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    source = BatchSource(rows, {}, {}, torch.arange(len(rows)), None, cfg.sft.batch_size, cfg.sft.seed)
    summary = optimize(model, source, LOSSES["nll"], {}, cfg.sft, device=device, stage="sft", metrics=metrics,
                       row_ids=[e.id for e in train], optimizer_name=cfg.model.get("optimizer", "adamw"))
    if not distributed.is_main():  # the main process writes the artifact
        return
    save_reference(model, tokenizer, out_dir, cfg.model)
    summary.update(truncated_prompts=rows.truncated_prompts, truncated_responses=rows.truncated_responses)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def make_validator(task: Task, tokenizer, cfg) -> Callable | None:
    """Greedy generation on a bounded set of validation prompts, scored by the task reward
    (None for a task without a scorer: nothing can score new responses)."""
    if task.reward is None:
        return None
    examples = task.splits["validation"][: cfg.rl.val_prompts]
    prompts = [e.prompt for e in examples]
    formatted = [task.format_prompt(p) for p in prompts]

    def validate(model) -> tuple[float, dict]:
        responses = [r[0] for r in generate_with_config(model, tokenizer, formatted, cfg)]
        scores, _, _ = score_generations(task.reward, examples, responses)
        return scores["reward"], {f"reward/{k}": v for k, v in scores["rewards"].items()} | {"length": scores["length"]}

    return validate


SAMPLING = ("uniform", "shuffle", "advantage", "reward")
KEEP = ("all", "positive_advantage")


def load_advantage_cache(advantage_dir: Path, rows: TokenizedRows) -> dict[str, torch.Tensor]:
    """The advantage stage's tensors, checked against this run's tokenization of every group."""
    cache = torch.load(advantage_dir / "advantages.pt", weights_only=True)
    for group in rows.groups:
        offsets = cache.get(f"ref_offsets/{group}")
        lengths = torch.tensor([len(r) for r in rows.group(group)])
        if offsets is None or not torch.equal(offsets.diff(), lengths):
            raise RuntimeError(f"{advantage_dir}: cached reference log-probs of '{group}' do not match this tokenization")
    return cache



def save_policy_atomically(model, tokenizer, path: Path, base_dir: Path) -> None:
    """Write the new policy beside the old one, then swap them by renames: a kill leaves the
    old policy or the new one whole, never a mix (recover_policy puts an old one back)."""
    staging, old = path.with_name(f".{path.name}.new"), path.with_name(f".{path.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    save_policy(model, tokenizer, staging, base_dir=base_dir)
    if path.exists():
        os.rename(path, old)
    os.rename(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_policy(path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.rename(old, path)
    shutil.rmtree(path.with_name(f".{path.name}.new"), ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def run_rl(cfg, task: Task, sft_dir: Path, advantage_dir: Path | None, out_dir: Path, metrics: MetricsLogger,
           device) -> None:
    """Stage 4: offline RL from pi_ref with the configured algorithm; best checkpoint by
    validation reward is saved to `out_dir/policy`."""
    algo = cfg.algo
    if algo.sampling not in SAMPLING or algo.keep not in KEEP:
        raise ValueError(f"algo {algo.name}: sampling must be one of {SAMPLING} and keep one of {KEEP}, "
                         f"got sampling={algo.sampling!r} keep={algo.keep!r}")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(sft_dir, device, cfg.model)
    if cfg.model.get("lora"):  # a fresh adapter over pi_ref: disabling it gives the reference back
        model = add_adapter(model, cfg.model)
    rows = encode_rows(tokenizer, task, task.splits["train"], cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    groups = rows.expand(algo.responses)
    row_tensors, ragged = {}, {}
    keep = torch.arange(len(rows))
    weights = None
    if advantage_dir is not None:
        cache = load_advantage_cache(advantage_dir, rows)
        row_tensors = {name: cache[name].float() for name in ("advantages", "rewards", "ranking_rewards") if name in cache}
        ragged = {g: (cache[f"ref_logprobs/{g}"], cache[f"ref_offsets/{g}"]) for g in groups}
        if algo.keep == "positive_advantage":
            keep = torch.nonzero(cache["advantages"] > 0).squeeze(-1)
        if algo.sampling in ("advantage", "reward"):
            weights = row_tensors[f"{algo.sampling}s"].clamp(min=0)
    elif algo.keep != "all" or algo.sampling in ("advantage", "reward"):
        raise ValueError(f"algo {algo.name} keeps/samples by advantage or reward but no advantage stage ran")
    log.info("rl: %s on %d of %d train rows (kept fraction %.3f), sampling %s, responses %s",
             algo.name, len(keep), len(rows), len(keep) / len(rows), algo.sampling, groups)
    source = BatchSource(rows, row_tensors, ragged, keep, weights, cfg.rl.batch_size, cfg.seed, groups=groups,
                         shuffle=algo.sampling == "shuffle", length_buckets=cfg.rl.length_buckets)

    def save_best(model, step, score):
        save_policy_atomically(model, tokenizer, out_dir / "policy", base_dir=sft_dir)
        atomic_write_text(out_dir / "best.json", json.dumps({"step": step, "validation_reward": score}))

    if distributed.is_main():
        recover_policy(out_dir / "policy")  # a kill between the two renames of a policy swap
    validate = make_validator(task, tokenizer, cfg)
    summary = optimize(model, source, LOSSES[algo.loss], algo.params, cfg.rl, device=device, stage="rl",
                       metrics=metrics, validate=validate, on_best=save_best,
                       row_ids=[e.id for e in task.splits["train"]], optimizer_name=cfg.model.get("optimizer", "adamw"),
                       checkpoint=out_dir / CHECKPOINT)
    if not distributed.is_main():  # the main process validated and saved
        return
    (out_dir / CHECKPOINT).unlink(missing_ok=True)  # the finished artifact needs no loop state
    if validate is None:  # no scorer to choose a checkpoint by: the last step is the policy
        log.info("rl: the task has no reward scorer, so the last step is kept (no validation)")
        save_best(model, cfg.rl.steps, None)
    summary.update(kept_rows=len(keep), train_rows=len(rows), kept_fraction=len(keep) / len(rows))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
