"""The offline step every offline stage runs (sft is it with the NLL loss): draw a batch
(uniformly, as shuffled passes, or with replacement in proportion to a priority weight), one
policy forward over its response groups (one per micro-batch under `grad_accum`), the
algorithm's loss, one optimizer step. Reference
log-probs come from the reference stage's cache; nothing here names an algorithm."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence

import torch
from transformers import get_scheduler

from . import distributed
from .data import RESPONSE, TokenizedRows, split_groups
from .distributed import shard_rows
from .logprobs import response_logprobs, to_device
from .loop import Loop, Validation, guarded_update, run_loop
from .models import autocast, make_optimizer
from .tracking import StageRecords


def ragged_index(offsets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Positions in the flat tensor of rows `indices` of a ragged tensor (`offsets` (N+1,)),
    row after row: `flat[ragged_index(offsets, rows)]` is those rows concatenated."""
    starts, lengths = offsets[indices], offsets[indices + 1] - offsets[indices]
    before = lengths.cumsum(0) - lengths  # where each row begins in the concatenation
    return torch.repeat_interleave(starts - before, lengths) + torch.arange(int(lengths.sum()))


def ragged_rows(flat: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Rows `indices` of a ragged tensor stored as `flat` + `offsets` (N+1,), right-padded
    with 0 to `width` (default: the longest of them)."""
    lengths = offsets[indices + 1] - offsets[indices]
    out = torch.zeros((len(indices), width or int(lengths.max())), dtype=flat.dtype)
    out[torch.arange(out.shape[1]) < lengths[:, None]] = flat[ragged_index(offsets, indices)]
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
                 shuffle: bool = False, length_buckets: int = 1, share_prompt: bool = False):
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
        self.share_prompt = share_prompt and len(self.groups) > 1
        self._pending: list[torch.Tensor] = []
        if length_buckets > 1:  # a row's padded width: its prompt plus its longest response (or all of them, shared)
            longest = sum if self.share_prompt else max
            self.lengths = torch.tensor([len(rows.prompt_ids[i]) + longest(len(rows.group(g)[i]) for g in self.groups)
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
        return indices, self.batch(indices)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The padded batch of rows `indices`: every response group of each row (a pair or a
        ranking stays together), their cached reference log-probs, the per-row tensors."""
        batch = (self.rows.shared_prompt_batch if self.share_prompt else self.rows.batch)(indices.tolist(), self.groups)
        if self.ragged:
            width = int(batch["response_lengths"].max())
            batch["ref_logprobs"] = torch.cat([ragged_rows(*self.ragged[g], indices, width) for g in self.groups])
        for name, tensor in self.row_tensors.items():
            batch[name] = tensor[indices]
        return batch


def call_loss(loss_fn: Callable, params: dict, tensors: dict[str, torch.Tensor]):
    """Call a loss with the tensors its signature names (the loop knows no algorithm)."""
    wanted = [p.name for p in inspect.signature(loss_fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise ValueError(f"loss {loss_fn.__name__} needs {missing}, which this run does not provide")
    return loss_fn(**{name: tensors[name] for name in wanted}, **params)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_start", "response_lengths", "ref_logprobs", "position_ids",
                 "predicted_at", "targets")


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
    tensors["process_mean"] = distributed.process_mean  # a statistic of the global batch (KTO's reference point)
    return call_loss(loss_fn, params, tensors)


def micro_batches(indices: torch.Tensor, grad_accum: int) -> tuple[torch.Tensor, ...]:
    """A process's share of a batch cut into `grad_accum` equal contiguous micro-batches (a
    length-bucketed batch is sorted by length, so each micro-batch pads to its own longest)."""
    if len(indices) % grad_accum:
        raise ValueError(f"a share of {len(indices)} rows cannot be cut into {grad_accum} equal micro-batches")
    return indices.split(len(indices) // grad_accum)


def accumulate_gradients(model, source: BatchSource, parts: Sequence[torch.Tensor], loss_fn: Callable, params: dict,
                         device) -> tuple[torch.Tensor, dict]:
    """Forward and backward of each micro-batch in turn, its loss weighted 1/len(parts): every
    offline loss is a mean over rows of per-row terms (a pair or a ranking is one row; losses.py),
    so the summed gradient is the whole batch's, while only one micro-batch's activations are
    alive at a time. Under DDP only the last backward all-reduces. Returns the batch's loss
    (detached) and its metrics, each the mean of the micro-batches' (a per-row mean is then the
    batch's; a token-weighted one, alol_seq's clip fraction, is a mean of micro-batch means)."""
    if len(parts) == 1:  # no accumulation: exactly the one-batch step
        loss, metrics = loss_on_batch(model, to_device(source.batch(parts[0]), device), source.groups, loss_fn, params)
        loss.backward()
        return loss, metrics
    total, sums = None, {}
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss, metrics = loss_on_batch(model, to_device(source.batch(part), device), source.groups, loss_fn, params)
            (loss / len(parts)).backward()
        total = loss.detach() / len(parts) if total is None else total + loss.detach() / len(parts)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value.detach() / len(parts)
    return total, sums


def optimize(model, source: BatchSource, loss_fn: Callable, loss_params: dict, opt_cfg, *, device, stage: str,
             metrics: StageRecords, validation: Validation | None = None, row_ids: Sequence[str] | None = None,
             optimizer_name: str = "adamw", checkpoint=None) -> dict:
    """`opt_cfg.steps` offline steps through the loop shell (loop.run_loop): validation and the
    best checkpoint when `validation` is given, the loop state checkpointed every
    `opt_cfg.checkpoint_interval` steps when `checkpoint` is. A non-finite loss or gradient
    stops the run naming the step and the rows (by `row_ids`), unless `opt_cfg.skip_nonfinite`.

    Under several processes each trains on its share of every global batch under DDP (the
    gradient is the global batch's), or under FSDP on its shard of the model (distributed.shard);
    the main process alone validates and checkpoints (under FSDP all of them do). With
    `opt_cfg.grad_accum` k > 1 each share runs as k micro-batches whose gradients add up to its
    own (`batch_size` stays the optimizer batch; k only bounds the memory of a forward)."""
    optimizer = make_optimizer(model, opt_cfg, optimizer_name)
    rank, world = distributed.rank(), distributed.world_size()
    sharded = distributed.fully_sharded()
    if sharded:  # FSDP: `model` sharded in place, one module for the step, generation and saving
        model, optimizer = distributed.shard(model, optimizer)
    trained = model if sharded else distributed.data_parallel(model)  # `model` itself generates and saves
    scheduler = get_scheduler(opt_cfg.schedule, optimizer, num_warmup_steps=opt_cfg.warmup_steps,
                              num_training_steps=opt_cfg.steps)
    params = dict(loss_params)
    grad_accum = opt_cfg.get("grad_accum", 1)

    def step(n: int) -> dict | None:
        model.train()
        indices = shard_rows(source.draw(), rank, world)
        distributed.record_shard(stage, n, indices)
        parts = micro_batches(indices, grad_accum)
        outcome = {}

        def backward() -> torch.Tensor:
            outcome["loss"], outcome["metrics"] = accumulate_gradients(trained, source, parts, loss_fn, params, device)
            return outcome["loss"]

        def failure(what: str, loss_value: float, grad_norm: float) -> str:
            rows = [row_ids[i] for i in indices.tolist()] if row_ids is not None else indices.tolist()
            return (f"{stage}: non-finite {what} at step {n} (loss {loss_value}, grad norm {grad_norm}) on train rows "
                    f"{rows}; {stage}.skip_nonfinite=true skips such steps")

        grad_norm = guarded_update(backward, optimizer, opt_cfg.grad_clip, opt_cfg.skip_nonfinite, failure)
        scheduler.step()
        return None if grad_norm is None else {"loss": outcome["loss"], "grad_norm": grad_norm, **outcome["metrics"]}

    loop = Loop(stage=stage, steps=opt_cfg.steps, step=step, model=model, trainable=model, optimizer=optimizer,
                scheduler=scheduler, metrics=metrics, log_interval=opt_cfg.log_interval, validation=validation,
                checkpoint=checkpoint, checkpoint_interval=opt_cfg.get("checkpoint_interval", 0) if checkpoint else 0,
                extra_state=source.state_dict, load_extra_state=source.load_state_dict, data_parallel=True,
                sharded=sharded)
    return run_loop(loop)
