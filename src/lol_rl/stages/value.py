"""Stage 2: V_ref(x). Sample k responses of frozen pi_ref per validation prompt, score them,
and fit the value head on them; the epoch is chosen on held-out prompts, next to the constant
baseline (value_head.py holds the head and its fit). Under several processes each samples and
scores its share of the generation batches; the main process fits the head."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from .. import artifacts, distributed
from ..data import count_cut_prompts, cut_counts, encode_prompts
from ..generate import generate_with_config
from ..models import load_policy
from ..scoring import score_in_batches
from ..tasks import data_reward
from ..value_head import ValueHead, batched_prompt_states, fit_value_head
from . import Stage, StageRun

log = logging.getLogger(__name__)


def value_targets(cfg, task, model, tokenizer):
    """(responses per prompt, flat rewards, per-component rewards, reward range) of the
    validation prompts: k samples of pi_ref scored by the task's reward, or, when the task has
    only the data's rewards, each row's logged response and its reward (V then estimates the
    logging policy's value, the best available without a scorer)."""
    examples = task.splits["validation"]
    if task.reward is None:
        rewards = np.array([data_reward(e) for e in examples], dtype=np.float64)
        every = [data_reward(e) for split in ("train", "validation") for e in task.splits[split]]
        low, high = min(every), max(every)
        return [[e.response] for e in examples], rewards, {}, (low, high if high > low else low + 1.0)
    k = cfg.value.samples_per_prompt
    # every process samples its share of the generation batches, and scores its share of the samples
    # (batches of generation.batch_size prompts' k samples, in prompt order)
    samples = generate_with_config(model, tokenizer, [task.format_prompt(e.prompt) for e in examples], cfg,
                                   do_sample=True, temperature=cfg.value.temperature, num_samples=k,
                                   seed=cfg.value.seed, desc="value samples", sharded=True)
    rewards, per_component = score_in_batches(task.reward, [e.prompt for e in examples for _ in range(k)],
                                              [s for row in samples for s in row],
                                              [e.id for e in examples for _ in range(k)],
                                              cfg.generation.batch_size * k, "value scores", sharded=True)
    return samples, rewards, per_component, (task.reward.min_total, task.reward.max_total)


def run(stage: StageRun) -> None:
    cfg, task, out = stage.cfg, stage.task, stage.out
    torch.manual_seed(cfg.value.seed)
    model, tokenizer = load_policy(stage.inputs["sft"], stage.device, cfg.model)
    examples = task.splits["validation"]
    prompts = [e.prompt for e in examples]
    samples, rewards, per_component, (low, high) = value_targets(cfg, task, model, tokenizer)
    if not distributed.is_main():  # the main process fits the head and writes the artifact
        return
    k = len(samples[0])
    flat_ids = [e.id for e in examples for _ in range(k)]
    targets = torch.tensor(rewards, dtype=torch.float32)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(k)

    prompt_ids = encode_prompts(tokenizer, task, prompts, cfg.model.max_prompt_tokens)
    states, mask = batched_prompt_states(model, prompt_ids, tokenizer.pad_token_id, cfg.advantage.batch_size,
                                         stage.device)
    generator = torch.Generator().manual_seed(cfg.value.seed)
    heldout = torch.zeros(len(prompts), dtype=torch.bool)
    heldout[torch.randperm(len(prompts), generator=generator)[: max(1, int(cfg.value.heldout_fraction * len(prompts)))]] = True

    head = ValueHead(states.shape[-1], cfg.value.heads, cfg.value.dropout, high,
                     init_value=float(targets[~heldout[prompt_index]].mean()), min_value=low)
    report = fit_value_head(head, states, mask, targets, prompt_index, heldout, epochs=cfg.value.epochs,
                            batch_size=cfg.value.batch_size, lr=cfg.value.lr, seed=cfg.value.seed)
    cut = count_cut_prompts(tokenizer, [task.format_prompt(p) for p in prompts], cfg.model.max_prompt_tokens)
    report.update(cut_counts("value", len(prompts), cut))
    report.update(samples_per_prompt=k, prompts=len(prompts), mean_sample_reward=float(targets.mean()),
                  mean_sample_rewards={n: float(v.mean()) for n, v in per_component.items()},
                  targets="pi_ref samples scored by the task reward" if task.reward is not None
                  else "logged validation responses and their data rewards (no scorer configured)")
    stage.metrics.log("value", report["best_epoch"], heldout_mse=report["heldout_mse"],
                      constant_baseline_mse=report["constant_baseline_mse"])
    log.info("value: held-out MSE %.4f (constant-mean baseline %.4f), epoch %d of %d, %d samples",
             report["heldout_mse"], report["constant_baseline_mse"], report["best_epoch"], cfg.value.epochs,
             len(targets))
    torch.save(head.state_dict(), out / artifacts.VALUE_HEAD)
    (out / artifacts.VALUE_HEAD_SPEC).write_text(json.dumps(
        {"hidden": states.shape[-1], "heads": cfg.value.heads, "dropout": cfg.value.dropout,
         "max_value": high, "min_value": low}))
    (out / artifacts.VALUE_REPORT).write_text(json.dumps(report, indent=2))
    with (out / artifacts.VALUE_SAMPLES).open("w", encoding="utf-8") as f:
        for i, (pid, sample) in enumerate(zip(flat_ids, (s for row in samples for s in row))):
            f.write(json.dumps({"id": pid, "response": sample, "reward": float(rewards[i])}) + "\n")


STAGE = Stage(
    name="value",
    reads=("task", "model", "reward", "value", "generation"),
    runtime=("advantage.batch_size",),  # rows per no-grad forward of the prompt states
    inputs=lambda algorithm: ("sft",),
    run=run,
    parallel=lambda algorithm: True,  # the samples and their scores are sharded over the processes
)
