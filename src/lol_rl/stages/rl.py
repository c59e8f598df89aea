"""Stage 4: pi_theta from pi_ref, by the configured algorithm: the offline loop for every
offline loss (one policy forward per step, reference log-probs and advantages from the cache),
or online PPO (stages/ppo.py). Both run in the loop shell (loop.py) and keep the checkpoint
with the best validation reward, pi_ref itself (step 0) included, in `policy/`."""

from __future__ import annotations

import json
import logging

import torch
from omegaconf import OmegaConf

from .. import artifacts, distributed
from ..algorithms import algorithm, split_threshold
from ..data import cut_counts, encode_rows
from ..logprobs import shares_prompts
from ..loop import Validation, best_policy_saver, recover_swap, remove_checkpoint
from ..losses import LOSSES
from ..models import add_adapter, load_policy
from ..offline import BatchSource, optimize
from ..schedule import resolve_budget
from ..tasks.base import DataError
from ..scoring import validation_scorer
from . import Stage, StageRun, ppo, reference

log = logging.getLogger(__name__)


def policy_from_reference(stage: StageRun):
    """pi_ref loaded to train: with a fresh LoRA adapter when the model has one (disabling it
    gives the reference back), else its full weights."""
    model, tokenizer = load_policy(stage.inputs["sft"], distributed.load_device(stage.device), stage.cfg.model)
    if stage.cfg.model.lora:
        model = add_adapter(model, stage.cfg.model)
    return model, tokenizer


def cached_tensors(stage: StageRun, rows, algo) -> tuple[dict, dict]:
    """(per-row tensors, ragged reference log-probs of each group the loss forwards) from the
    stages this algorithm reads."""
    row_tensors, ragged = {}, {}
    if "reference" in stage.inputs:
        cache = reference.load(stage.inputs["reference"], rows)
        row_tensors = {name: cache[name].float() for name in ("rewards", "ranking_rewards") if name in cache}
        if algo.reads_reference:
            for group in reference.GROUPS:
                if group in stage.inputs:
                    cache.update(reference.load_group(stage.inputs[group], rows, group))
            ragged = {g: (cache[f"ref_logprobs/{g}"], cache[f"ref_offsets/{g}"]) for g in rows.expand(algo.groups)}
    if "advantage" in stage.inputs:
        cache = torch.load(stage.inputs["advantage"] / artifacts.ADVANTAGE_TENSORS, weights_only=True)
        row_tensors["advantages"] = cache["advantages"].float()
    return row_tensors, ragged


def run_offline(stage: StageRun) -> None:
    cfg, task = stage.cfg, stage.task
    algo = algorithm(cfg.algo)
    torch.manual_seed(cfg.seed)
    model, tokenizer = policy_from_reference(stage)
    rows = encode_rows(tokenizer, task, task.splits["train"], cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    groups = rows.expand(algo.groups)
    row_tensors, ragged = cached_tensors(stage, rows, algo)
    keep = torch.arange(len(rows))
    if algo.keep == "positive_advantage":
        keep = torch.nonzero(row_tensors["advantages"] > 0).squeeze(-1)
        if len(keep) == 0:  # rewards a scorer gave in the reference stage, not known at preflight
            advantages = row_tensors["advantages"]
            raise DataError(f"rl stage: no train row has A = R - V(x) > 0 after the advantage stage (A from "
                            f"{advantages.min():.4g} to {advantages.max():.4g}), so {algo.name} has nothing to "
                            f"train on; `lol-rl audit` shows R and V(x) per row")
    weights = row_tensors[f"{algo.sampling}s"].clamp(min=0) if algo.sampling in ("advantage", "reward") else None
    log.info("rl: %s on %d of %d train rows (kept fraction %.3f), sampling %s, responses %s",
             algo.name, len(keep), len(rows), len(keep) / len(rows), algo.sampling, groups)
    source = BatchSource(rows, row_tensors, ragged, keep, weights, cfg.rl.batch_size, cfg.seed, groups=groups,
                         shuffle=algo.sampling == "shuffle", length_buckets=cfg.rl.length_buckets,
                         share_prompt=cfg.rl.share_prompt and shares_prompts(model))
    save_best = best_policy_saver(model, tokenizer, stage.out, base_dir=stage.inputs["sft"])
    if distributed.is_main():
        recover_swap(stage.out / artifacts.POLICY)  # a kill between the two renames of a policy swap
    score = validation_scorer(task, tokenizer, cfg)
    validation = None if score is None else Validation(score, save_best, cfg.rl.val_interval, at_start=True)
    summary = optimize(model, source, LOSSES[algo.loss], algo.params, cfg.rl, device=stage.device, stage="rl",
                       metrics=stage.metrics, validation=validation, row_ids=[e.id for e in task.splits["train"]],
                       optimizer_name=cfg.model.optimizer, checkpoint=stage.out / artifacts.CHECKPOINT)
    if validation is None:  # no scorer to choose a checkpoint by: the last step is the policy
        log.info("rl: the task has no reward scorer, so the last step is kept (no validation)")
        save_best(cfg.rl.steps, None)  # on every process: a sharded model's are gathered; the main one writes
    if not distributed.is_main():  # the main process validated and saved
        return
    remove_checkpoint(stage.out / artifacts.CHECKPOINT)  # the finished artifact needs no loop state
    summary.update(kept_rows=len(keep), train_rows=len(rows), kept_fraction=len(keep) / len(rows),
                   **cut_counts("rl", len(rows), rows.truncated_prompts, rows.truncated_responses))
    (stage.out / artifacts.SUMMARY).write_text(json.dumps(summary, indent=2))


def run(stage: StageRun) -> None:
    (ppo.run if stage.cfg.algo.trainer == "ppo" else run_offline)(stage)


def resolve_threshold(cfg, inputs):
    """A loss that splits the rows at `params.threshold` (KTO) gets the mean train reward where it
    is null (algorithms.split_threshold), from the reference stage's rewards: a scorer's are known
    only now (rewards given in the data were checked before any stage)."""
    params = cfg.algo.get("params") or {}
    if "threshold" not in params:
        return cfg
    rewards = torch.load(inputs["reference"] / artifacts.REFERENCE_TENSORS, weights_only=True)["rewards"].float()
    threshold = split_threshold(cfg.algo.name, rewards, params.threshold)
    log.info("rl: %s: %d of %d train rows desirable (R > %g)", cfg.algo.name, int((rewards > threshold).sum()),
             len(rewards), threshold)
    return cfg if params.threshold is not None else OmegaConf.merge(cfg, {"algo": {"params": {"threshold": threshold}}})


def resolve(cfg, task, inputs):
    """An rl epoch counts the rows the method trains on: the kept ones (A > 0) when it drops the
    rest, as the authors' A-LOL runs scale their steps by the kept fraction. A null threshold
    becomes the data's (resolve_threshold)."""
    cfg = resolve_threshold(cfg, inputs)
    kept = cfg.algo.keep == "positive_advantage" and "advantage" in inputs
    return resolve_budget(cfg, "rl", artifacts.kept_rows(inputs["advantage"]) if kept else len(task.splits["train"]))


STAGE = Stage(
    name="rl",
    reads=("task", "model", "reward", "algo", "rl", "generation", "seed"),
    runtime=("rl.checkpoint_interval",),
    inputs=lambda algorithm: algorithm.input_stages(),
    resolve=resolve,
    run=run,
    resumable=True,  # both loops checkpoint: a killed run continues
    parallel=lambda algorithm: algorithm.trainer == "offline",  # data-parallel; PPO runs on the main process
)
