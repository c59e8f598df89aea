"""Stage 1: pi_ref = the initial model NLL-trained on the train split's logged responses,
resumable from its checkpoint like the rl stage."""

from __future__ import annotations

import json

import torch

from .. import artifacts, distributed
from ..data import cut_counts, encode_rows
from ..loop import remove_checkpoint
from ..losses import nll
from ..models import initial_policy, save_reference
from ..offline import BatchSource, optimize
from ..schedule import resolve_budget
from . import Stage, StageRun


def run(stage: StageRun) -> None:
    cfg, task = stage.cfg, stage.task
    torch.manual_seed(cfg.sft.seed)
    train = task.splits["train"]
    texts = [task.format_prompt(e.prompt) + task.response_prefix + e.response for e in train]
    model, tokenizer = initial_policy(cfg.model, texts, distributed.load_device(stage.device))
    rows = encode_rows(tokenizer, task, train, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    source = BatchSource(rows, {}, {}, torch.arange(len(rows)), None, cfg.sft.batch_size, cfg.sft.seed,
                         length_buckets=cfg.sft.length_buckets)
    summary = optimize(model, source, nll, {}, cfg.sft, device=stage.device, stage="sft", metrics=stage.metrics,
                       row_ids=[e.id for e in train], optimizer_name=cfg.model.optimizer,
                       checkpoint=stage.out / artifacts.CHECKPOINT)
    weights = distributed.full_state_dict(model)  # a sharded model: every process joins the gather
    if not distributed.is_main():  # the main process writes the artifact
        return
    remove_checkpoint(stage.out / artifacts.CHECKPOINT)  # the finished artifact needs no loop state
    save_reference(model, tokenizer, stage.out, cfg.model, state_dict=weights)
    summary.update(cut_counts("sft", len(rows), rows.truncated_prompts, rows.truncated_responses))
    (stage.out / artifacts.SUMMARY).write_text(json.dumps(summary, indent=2))


STAGE = Stage(
    name="sft",
    reads=("task", "model", "sft"),
    ignores=("task.rewards", "task.eval_rewards"),  # it never scores: a new reward model reuses pi_ref
    runtime=("sft.checkpoint_interval",),
    resolve=lambda cfg, task, inputs: resolve_budget(cfg, "sft", len(task.splits["train"])),
    run=run,
    resumable=True,
    parallel=lambda algorithm: True,
)
