"""Online PPO, the paper's online baseline (PAPER.md "PPO"), in the same loop shell as
the offline algorithms (loop.py): it starts from the cached sft pi_ref, validates and keeps the
best checkpoint (pi_ref at step 0 included), and its policy goes through the same eval stage.

    lol-rl train algo=ppo                          # the embedded task
    lol-rl train algo=ppo algo.params.step_multiple=1.0 seed=2

One update ("step", like an offline step it trains on rl.batch_size responses):
  1. rollout: one sampled response per train prompt from the current policy (KV cache);
  2. score: the task's composite reward of the whole response, given at its last token;
  3. log-probs under the policy (old) and pi_ref (the adapter disabled; a frozen copy only
     for a small full-weight policy), values from a head on the policy's last hidden states;
  4. per-token rewards -kl_coef * (lp_old - lp_ref) plus the score at the end; GAE;
  5. `epochs` passes of `minibatches` minibatches: clipped surrogate + vf_coef * clipped
     value loss - ent_coef * entropy; the KL coefficient adapts towards kl_target.
Updates = step_multiple x rl.steps (the paper gives PPO 2.6x the offline steps).

Written here, not taken from TRL: TRL's PPO trainer owns the data loader, expects a reward
model module and a second reference model, and has no hook for our validation and cache; the
maths is five small functions in losses.py, tested against hand-computed values.
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
from omegaconf import OmegaConf
from transformers import get_scheduler

from .. import artifacts
from ..data import cut_counts, encode_rows
from ..logprobs import gather_positions, pad_batch, response_logits, response_logprobs, response_positions, to_device
from ..loop import Loop, Validation, best_policy_saver, guarded_update, recover_swap, run_loop
from ..losses import adaptive_kl_coef, gae, masked_mean, ppo_policy_loss, ppo_value_loss, token_rewards, whiten
from ..models import add_adapter, autocast, load_policy, make_optimizer, reference_policy
from ..offline import BatchSource
from ..rewards import RewardError
from ..scoring import validation_scorer
from ..tasks import Task
from . import StageRun

log = logging.getLogger(__name__)


class TokenValueHead(torch.nn.Module):
    """V(s_t): a linear map of the policy's last hidden state before each response token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class RunningMoments:
    """Running mean and std of the scores over all updates (TRL's use_score_norm)."""

    def __init__(self):
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, values: torch.Tensor) -> None:
        n, mean, var = len(values), values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / math.sqrt(self.var + 1e-8)


def policy_outputs(model, value_head, batch: dict[str, torch.Tensor]):
    """One forward: per response token (B, R) log-probs, entropies and values, and the mask."""
    positions, targets, mask = response_positions(batch)
    with autocast(batch["input_ids"].device):  # logits at response positions only (logprobs.response_logits)
        logits, out = response_logits(model, batch, positions, output_hidden_states=True)
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # the entropy reads the whole distribution
    logprobs = log_probs.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    values = value_head(gather_positions(out.hidden_states[-1], positions))
    return logprobs, entropy, values.masked_fill(~mask, 0.0), mask


@torch.no_grad()
def sample_responses(model, prompt_ids: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
                     temperature: float, top_p: float) -> list[list[int]]:
    """One sampled response per prompt, as token ids ending at (and including) the first EOS."""
    model.eval()
    batch = pad_batch(prompt_ids, [[] for _ in prompt_ids], pad_id, side="left")
    device = next(model.parameters()).device
    out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    responses = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        responses.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return responses


def reference_logprobs(model, frozen_reference, batch):
    """Response log-probs under pi_ref: the adapter-disabled policy, or a frozen copy."""
    with torch.no_grad(), autocast(batch["input_ids"].device):
        if frozen_reference is not None:
            return response_logprobs(frozen_reference, batch)[0].float()
        with reference_policy(model):
            return response_logprobs(model, batch)[0].float()


class Rollouts:
    """The fresh experience of one update: sequences, scores and per-token tensors (B, R)."""

    def __init__(self, batch, scores, old_logprobs, ref_logprobs, old_values, mask):
        self.batch, self.scores, self.mask = batch, scores, mask
        self.old_logprobs, self.ref_logprobs, self.old_values = old_logprobs, ref_logprobs, old_values
        self.advantages = self.returns = None

    def estimate(self, params, kl_coef: float, normalised_scores: torch.Tensor) -> None:
        rewards = token_rewards(normalised_scores, self.old_logprobs, self.ref_logprobs, self.mask, kl_coef)
        advantages, self.returns = gae(rewards, self.old_values, self.mask, params.gamma, params.lam)
        self.advantages = whiten(advantages, self.mask) if params.whiten_advantages else advantages

    def minibatch(self, rows: torch.Tensor) -> tuple[dict, dict]:
        width = int(self.batch["response_lengths"][rows].max())
        tensors = {k: v[rows] for k, v in self.batch.items()}
        per_token = {name: getattr(self, name)[rows, :width]
                     for name in ("old_logprobs", "old_values", "advantages", "returns", "mask")}
        return tensors, per_token


def collect(model, value_head, frozen_reference, tokenizer, task: Task, rows, indices: list[int], params, cfg,
            device, update: int) -> tuple[Rollouts, list[str]]:
    """Steps 1-3 of an update for the train prompts `indices`."""
    examples = [task.splits["train"][i] for i in indices]
    prompt_ids = [rows.prompt_ids[i] for i in indices]
    responses = sample_responses(model, prompt_ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                 max_new_tokens=cfg.generation.max_new_tokens, temperature=params.temperature,
                                 top_p=params.top_p)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    try:
        scores, _ = task.reward.score([e.prompt for e in examples], texts, ids=[e.id for e in examples])
    except RewardError as err:
        raise RewardError(f"rl (ppo) update {update}: {err}") from None
    batch = to_device(pad_batch(prompt_ids, responses, tokenizer.pad_token_id), device)
    with torch.no_grad():
        old_logprobs, _, old_values, mask = policy_outputs(model, value_head, batch)
    ref_logprobs = reference_logprobs(model, frozen_reference, batch)
    rollouts = Rollouts(batch, torch.as_tensor(scores, dtype=torch.float32, device=device), old_logprobs,
                        ref_logprobs, old_values, mask)
    return rollouts, texts


def ppo_epochs(model, value_head, rollouts: Rollouts, optimizer, scheduler, params, opt_cfg,
               generator: torch.Generator, update: int, row_ids: list[str]) -> dict[str, float]:
    """Step 5: `epochs` passes of shuffled minibatches over one update's rollouts. A non-finite
    loss or gradient stops the run naming the prompts, unless rl.skip_nonfinite (skipped, counted)."""
    n = len(rollouts.scores)
    size = math.ceil(n / params.minibatches)
    grad_accum = opt_cfg.get("grad_accum", 1)
    totals: dict[str, float] = {}
    steps = skipped = 0
    for _ in range(params.epochs):
        for rows in torch.randperm(n, generator=generator).split(size):
            rows = rows.to(rollouts.scores.device)
            terms: dict[str, torch.Tensor] = {}

            def backward(rows=rows, terms=terms) -> torch.Tensor:
                """The minibatch's loss, backward per micro-batch: each token mean is a sum over the
                micro-batch divided by the minibatch's token count, so the parts add up to it."""
                parts = rows.split(len(rows) // grad_accum) if grad_accum > 1 else (rows,)
                tokens = rollouts.mask[rows].sum().clamp(min=1) if grad_accum > 1 else None
                for part in parts:
                    batch, old = rollouts.minibatch(part)
                    logprobs, entropy, values, mask = policy_outputs(model, value_head, batch)
                    pg_loss, pg_metrics = ppo_policy_loss(logprobs, old["old_logprobs"], old["advantages"], mask,
                                                          clip=params.clip, tokens=tokens)
                    vf_loss, vf_metrics = ppo_value_loss(values, old["old_values"], old["returns"], mask,
                                                         clip=params.value_clip, tokens=tokens)
                    mean_entropy = masked_mean(entropy, mask, tokens)
                    loss = pg_loss + params.vf_coef * vf_loss - params.ent_coef * mean_entropy
                    loss.backward()
                    for name, value in {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss,
                                        "entropy": mean_entropy, **pg_metrics, **vf_metrics}.items():
                        terms[name] = value.detach() if name not in terms else terms[name] + value.detach()
                return terms["loss"]

            def failure(what: str, loss_value: float, grad_norm: float, rows=rows) -> str:
                prompts = [row_ids[i] for i in rows.tolist()]
                return (f"rl (ppo): non-finite loss or gradient at update {update} (loss {loss_value}, grad norm "
                        f"{grad_norm}) on train prompts {prompts}; rl.skip_nonfinite=true skips such minibatches")

            grad_norm = guarded_update(backward, optimizer, opt_cfg.grad_clip, opt_cfg.skip_nonfinite, failure)
            scheduler.step()
            if grad_norm is None:
                skipped += 1
                continue
            steps += 1
            for name, value in {**{k: v for k, v in terms.items() if k != "loss"}, "grad_norm": grad_norm}.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float().item()
    return {**{name: value / max(steps, 1) for name, value in totals.items()}, "skipped_minibatches": skipped}


def run(stage: StageRun) -> None:
    """Stage 4 with the online loop: PPO from pi_ref; the best checkpoint by validation reward
    is saved to `policy/`, as the offline loop does."""
    cfg, task, out, device = stage.cfg, stage.task, stage.out, stage.device
    params = cfg.algo.params
    if task.reward is None:
        raise ValueError(f"algo {cfg.algo.name} scores its own samples and task {task.name} has no reward scorer")
    torch.manual_seed(cfg.seed)
    sft_dir = stage.inputs["sft"]
    model, tokenizer = load_policy(sft_dir, device, cfg.model)
    frozen_reference = None
    if cfg.model.lora:  # a fresh adapter over pi_ref: disabling it gives the reference back
        model = add_adapter(model, cfg.model)
    else:  # a full-weight policy is small (model=tiny, gpt2): a frozen copy is the reference
        frozen_reference, _ = load_policy(sft_dir, device, cfg.model)
        frozen_reference.eval().requires_grad_(False)
    model.eval()  # no dropout: the old and new log-probs of a rollout must come from one function
    value_head = TokenValueHead(model.config.hidden_size).to(device)
    trainable = torch.nn.ModuleDict({"policy": model, "value_head": value_head})

    updates = max(1, round(params.step_multiple * cfg.rl.steps))
    steps_per_update = params.epochs * min(params.minibatches, cfg.rl.batch_size)
    opt_cfg = {**cfg.rl, "lr": params.lr_scale * cfg.rl.lr}
    optimizer = make_optimizer(trainable, OmegaConf.create(opt_cfg), cfg.model.optimizer)
    scheduler = get_scheduler(cfg.rl.schedule, optimizer, num_warmup_steps=cfg.rl.warmup_steps,
                              num_training_steps=updates * steps_per_update)
    train = task.splits["train"]
    rows = encode_rows(tokenizer, task, train, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    prompts = BatchSource(rows, {}, {}, torch.arange(len(rows)), None, cfg.rl.batch_size, cfg.seed, shuffle=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    row_ids = [e.id for e in train]
    score_moments = RunningMoments()
    online = {"kl_coef": params.kl_coef, "rollout_seconds": 0.0}

    def update(n: int) -> dict:
        rollout_started = time.perf_counter()
        indices = prompts.draw().tolist()
        rollouts, texts = collect(model, value_head, frozen_reference, tokenizer, task, rows, indices, params, cfg,
                                  device, n)
        online["rollout_seconds"] += time.perf_counter() - rollout_started
        scores = rollouts.scores
        if params.score_norm:
            score_moments.update(scores)
            scores = score_moments.normalise(scores)
        rollouts.estimate(params, online["kl_coef"], scores)
        kl = (rollouts.old_logprobs - rollouts.ref_logprobs).mul(rollouts.mask).sum(-1).mean().item()
        values = ppo_epochs(model, value_head, rollouts, optimizer, scheduler, params, cfg.rl, generator, n,
                            [row_ids[i] for i in indices])
        record = {"reward": rollouts.scores.mean().item(), "kl": kl, "kl_coef": online["kl_coef"],
                  "response_tokens": rollouts.mask.sum(-1).float().mean().item(),
                  "length": sum(len(t.split()) for t in texts) / len(texts), **values}
        if params.adaptive_kl:
            online["kl_coef"] = adaptive_kl_coef(online["kl_coef"], kl, params.kl_target, len(indices), params.kl_horizon)
        return record

    def extra_state() -> dict:
        return {"prompts": prompts.state_dict(), "generator": generator.get_state(),
                "score_moments": dict(score_moments.__dict__), "online": dict(online)}

    def load_extra_state(state: dict) -> None:
        prompts.load_state_dict(state["prompts"])
        generator.set_state(state["generator"])
        score_moments.__dict__.update(state["score_moments"])
        online.update(state["online"])

    recover_swap(out / artifacts.POLICY)
    score = validation_scorer(task, tokenizer, cfg)
    save_best = best_policy_saver(model, tokenizer, out, base_dir=sft_dir)
    log.info("rl: ppo for %d updates of %d rollouts (%.1fx rl.steps), %d epochs x %d minibatches each",
             updates, cfg.rl.batch_size, params.step_multiple, params.epochs, params.minibatches)
    # an update is the unit of the loop: its record is already a mean over its minibatches, so one per update
    summary = run_loop(Loop(stage="rl", steps=updates, step=update, model=model, trainable=trainable,
                            optimizer=optimizer, scheduler=scheduler, metrics=stage.metrics, log_interval=1,
                            validation=Validation(score, save_best, cfg.rl.val_interval, at_start=True),
                            checkpoint=out / artifacts.CHECKPOINT, checkpoint_interval=cfg.rl.checkpoint_interval,
                            extra_state=extra_state, load_extra_state=load_extra_state))
    (out / artifacts.CHECKPOINT).unlink(missing_ok=True)
    summary.update(optimizer_steps=updates * steps_per_update, sequences=updates * cfg.rl.batch_size,
                   rollout_seconds=online["rollout_seconds"], **cut_counts("rl (ppo)", len(rows), rows.truncated_prompts))
    (out / artifacts.SUMMARY).write_text(json.dumps(summary, indent=2))
