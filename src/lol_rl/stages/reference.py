"""Stage 3a: what pi_ref and the reward say of the logged data. For every train row: R(x, y)
(the data's own reward, or the task's components), the rewards of a ranking's responses, and
the per-token log-probs of the logged response under pi_ref, computed once here so that
training runs one policy forward per step. Every algorithm that reads a reward or the
reference reads this artifact, so a sweep computes it once.

The other response groups' reference log-probs are stages of their own, named by the group
(`rejected`, `ranking`, and `mismatched`: row i's prompt with row i-1's response, data.MISMATCHED),
built only for a loss that reads them (DPO, PRO, KTO's reference point): A-LOL never pays for the
rejected or ranked responses, and a sweep over DPO and PRO still computes each group once. They
never score, so a new reward reuses them.

Under several processes every process computes its share of the batches (rewards, log-probs)
and the main process writes the artifact."""

from __future__ import annotations

import json

import numpy as np
import torch

from .. import artifacts, distributed
from ..data import MISMATCHED, RANKING, REJECTED, RESPONSE, cut_counts, encode_rows
from ..logprobs import response_logprobs, to_device
from ..models import load_policy
from ..offline import ragged_index
from ..scoring import score_in_batches
from ..tasks import Task, data_reward
from . import Stage, StageRun


def train_rewards(task: Task, examples, batch_size: int | None = None,
                  sharded: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rewards given in the data are used as they are; otherwise the task's components score,
    `batch_size` rows at a time (all at once by default; `sharded`: each process its share of
    the batches)."""
    if all(data_reward(e) is not None for e in examples):
        return np.asarray([data_reward(e) for e in examples], dtype=np.float64), {}
    return score_in_batches(task.reward, [e.prompt for e in examples], [e.response for e in examples],
                            [e.id for e in examples], batch_size or max(1, len(examples)), "train rewards", sharded)


def ranking_rewards(task: Task, examples, batch_size: int, sharded: bool = False) -> np.ndarray:
    """R(x, y) of every ranked response (N, K), scored by the task's reward, the rankings of
    `batch_size` rows at a time."""
    n_ranked = len(examples[0].ranking)
    prompts = [e.prompt for e in examples for _ in range(n_ranked)]
    total, _ = score_in_batches(task.reward, prompts, [r for e in examples for r in e.ranking],
                                [e.id for e in examples for _ in range(n_ranked)], batch_size * n_ranked,
                                "ranking rewards", sharded)
    return total.reshape(len(examples), n_ranked)


def reference_logprobs(model, rows, batch_size: int, device, group: str = RESPONSE,
                       sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi_ref(y_i | x, y_<i) of one response group of every row, ragged:
    flat (sum of lengths,) + offsets (N+1,). `sharded`: each process runs its share of the batches."""
    responses = rows.group(group)
    # length-sorted batches pad little; each batch's values go to their rows' places in one flat tensor
    order = sorted(range(len(rows)), key=lambda i: len(rows.prompt_ids[i]) + len(responses[i]))
    chunks = [order[start : start + batch_size] for start in range(0, len(rows), batch_size)]

    @torch.no_grad()
    def batch_logprobs(chunk: list[int]) -> torch.Tensor:
        # one tensor per batch, its rows one after another: a small tensor per row, thousands of
        # them between the forwards' freed buffers, kept ~200 MiB of heap from being reused
        logprobs, mask = response_logprobs(model, to_device(rows.batch(chunk, [group]), device))
        return logprobs[mask].float().cpu()

    lengths = torch.tensor([len(r) for r in responses])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.empty(int(offsets[-1]))
    for chunk, values in zip(chunks, distributed.map_batches(batch_logprobs, chunks, f"reference log-probs of {group}",
                                                             sharded=sharded)):
        flat[ragged_index(offsets, torch.tensor(chunk))] = values
    return flat, offsets


def group_logprobs(model, rows, batch_size: int, device, groups) -> dict[str, torch.Tensor]:
    """ref_logprobs/<group> and ref_offsets/<group> of each group; a group whose ids equal an
    earlier one's (ranking/0 is often the response) reuses its tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for i, group in enumerate(groups):
        same = next((g for g in groups[:i] if rows.group(g) == rows.group(group)), None)
        if same is None:
            tensors[f"ref_logprobs/{group}"], tensors[f"ref_offsets/{group}"] = reference_logprobs(
                model, rows, batch_size, device, group, sharded=True)
        else:
            tensors[f"ref_logprobs/{group}"], tensors[f"ref_offsets/{group}"] = (
                tensors[f"ref_logprobs/{same}"], tensors[f"ref_offsets/{same}"])
    return tensors


def reference_rows(stage: StageRun):
    """pi_ref in eval mode and the train rows as it tokenizes them."""
    cfg = stage.cfg
    model, tokenizer = load_policy(stage.inputs["sft"], stage.device, cfg.model)
    model.eval()
    rows = encode_rows(tokenizer, stage.task, stage.task.splits["train"], cfg.model.max_prompt_tokens,
                       cfg.model.max_response_tokens)
    return model, rows


def run(stage: StageRun) -> None:
    cfg, task = stage.cfg, stage.task
    model, rows = reference_rows(stage)
    examples = task.splits["train"]
    # every process computes its share of the batches (rewards, log-probs); the main process writes
    rewards, per_component = train_rewards(task, examples, cfg.advantage.batch_size, sharded=True)
    tensors = {"rewards": torch.from_numpy(rewards),
               **{f"rewards/{name}": torch.from_numpy(np.asarray(values)) for name, values in per_component.items()},
               **group_logprobs(model, rows, cfg.advantage.batch_size, stage.device, [RESPONSE])}
    if task.reward is not None and all(e.ranking is not None for e in examples):
        tensors["ranking_rewards"] = torch.from_numpy(ranking_rewards(task, examples, cfg.advantage.batch_size,
                                                                      sharded=True))
    if not distributed.is_main():
        return
    torch.save(tensors, stage.out / artifacts.REFERENCE_TENSORS)
    summary = cut_counts("reference", len(rows), rows.truncated_prompts, rows.truncated_responses)
    (stage.out / artifacts.SUMMARY).write_text(json.dumps(summary, indent=2))


def run_group(stage: StageRun, group: str) -> None:
    model, rows = reference_rows(stage)
    tensors = group_logprobs(model, rows, stage.cfg.advantage.batch_size, stage.device, rows.expand([group]))
    if not distributed.is_main():
        return
    torch.save(tensors, stage.out / artifacts.group_tensors(group))


def load(reference_dir, rows, name: str = artifacts.REFERENCE_TENSORS, groups=(RESPONSE,)) -> dict[str, torch.Tensor]:
    """A reference artifact's tensors, checked against this run's tokenization of every group it
    holds (`groups`)."""
    tensors = torch.load(reference_dir / name, weights_only=True)
    for group in groups:
        offsets = tensors.get(f"ref_offsets/{group}")
        lengths = torch.tensor([len(r) for r in rows.group(group)])
        if offsets is None or not torch.equal(offsets.diff(), lengths):
            raise RuntimeError(f"{reference_dir}: cached reference log-probs of '{group}' do not match this tokenization")
    return tensors


def load_group(group_dir, rows, group: str) -> dict[str, torch.Tensor]:
    """A group stage's tensors (`ranking`: every ranking/k), checked like `load`."""
    return load(group_dir, rows, artifacts.group_tensors(group), groups=rows.expand([group]))


STAGE = Stage(
    name="reference",
    reads=("task", "model", "reward"),
    runtime=("advantage.batch_size",),  # rows per no-grad forward
    inputs=lambda algorithm: ("sft",),
    run=run,
    parallel=lambda algorithm: True,  # its batches are sharded over the processes
)


def group_stage(group: str) -> Stage:
    return Stage(
        name=group,
        reads=("task", "model"),
        ignores=("task.rewards", "task.eval_rewards"),  # it never scores
        runtime=("advantage.batch_size",),  # rows per no-grad forward
        inputs=lambda algorithm: ("sft",),
        run=lambda stage: run_group(stage, group),
        parallel=lambda algorithm: True,  # its batches are sharded over the processes
    )


GROUPS = (REJECTED, RANKING, MISMATCHED)  # the groups with a stage of their own
GROUP_STAGES = tuple(group_stage(group) for group in GROUPS)
