"""V_ref(x): a small head over the frozen reference LM's prompt states (Algorithm 1).

Attention pooling with one learned query over the prompt's last hidden states (padding
masked, unlike the paper's code), then a one-hidden-layer MLP, squashed to the reward's range
[min_value, max_value].
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import encode_prompts
from .faults import kill_point
from .generate import generate_with_config
from .logprobs import prompt_states
from .models import load_policy
from .progress import progress_disabled
from .tasks import data_reward

log = logging.getLogger(__name__)


class ValueHead(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, max_value: float, init_value: float | None = None,
                 min_value: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"value.heads={heads} must divide the policy's hidden size {hidden}")
        if not max_value > min_value:
            raise ValueError(f"the value head needs a reward range with max > min, got [{min_value}, {max_value}]")
        self.min_value, self.max_value = min_value, max_value
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * hidden**-0.5)
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        if init_value is not None:  # start at the mean target: the constant baseline is step 0
            p = min(max((init_value - min_value) / (max_value - min_value), 1e-3), 1 - 1e-3)
            nn.init.constant_(self.mlp[-1].bias, math.log(p / (1 - p)))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (B, P, H), mask (B, P) True on prompt tokens -> V(x) (B,)."""
        query = self.query.expand(states.shape[0], -1, -1)
        pooled, _ = self.attention(query, states, states, key_padding_mask=~mask, need_weights=False)
        unit = torch.sigmoid(self.mlp(pooled[:, 0]).squeeze(-1))
        return self.min_value + unit * (self.max_value - self.min_value)


def fit_value_head(
    head: ValueHead,
    states: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    prompt_index: torch.Tensor,
    heldout: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict:
    """MSE-fit the head on (prompt, sampled reward) pairs; keep the epoch with the lowest
    held-out MSE (prompts in `heldout` are never trained on).

    states/mask: cached prompt states, one row per prompt. targets/prompt_index: one entry
    per sample. heldout: bool per prompt.
    """
    generator = torch.Generator().manual_seed(seed)
    train_samples = torch.nonzero(~heldout[prompt_index]).squeeze(-1)
    test_samples = torch.nonzero(heldout[prompt_index]).squeeze(-1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)

    def heldout_mse() -> float:
        head.eval()
        with torch.no_grad():
            idx = prompt_index[test_samples]
            return torch.mean((head(states[idx], mask[idx]) - targets[test_samples]) ** 2).item()

    best = {"epoch": 0, "mse": heldout_mse(), "state": {k: v.clone() for k, v in head.state_dict().items()}}
    history = [best["mse"]]
    for epoch in tqdm(range(1, epochs + 1), desc="value head", disable=progress_disabled()):
        head.train()
        for chunk in train_samples[torch.randperm(len(train_samples), generator=generator)].split(batch_size):
            idx = prompt_index[chunk]
            loss = torch.mean((head(states[idx], mask[idx]) - targets[chunk]) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        kill_point(f"value:epoch:{epoch}")
        mse = heldout_mse()
        history.append(mse)
        if mse < best["mse"]:
            best = {"epoch": epoch, "mse": mse, "state": {k: v.clone() for k, v in head.state_dict().items()}}
    head.load_state_dict(best["state"])
    head.eval()
    constant = targets[train_samples].mean()
    return {
        "heldout_mse": best["mse"],
        "constant_baseline_mse": torch.mean((constant - targets[test_samples]) ** 2).item(),
        "best_epoch": best["epoch"],
        "heldout_mse_by_epoch": history,
        "train_samples": len(train_samples),
        "heldout_samples": len(test_samples),
    }


def batched_prompt_states(model, prompt_ids: list[list[int]], pad_id: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen prompt states of every prompt, left-padded to one width: (N, P, H), (N, P)."""
    width = max(len(p) for p in prompt_ids)
    states, masks = [], []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            s, m = prompt_states(model, prompt_ids[start : start + batch_size], pad_id, device)
            pad = width - s.shape[1]
            states.append(nn.functional.pad(s.float().cpu(), (0, 0, pad, 0)))
            masks.append(nn.functional.pad(m.cpu(), (pad, 0), value=False))
    return torch.cat(states), torch.cat(masks)


def predict_values(head: ValueHead, states: torch.Tensor, mask: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    head.eval()
    with torch.no_grad():
        return torch.cat([head(s, m) for s, m in zip(states.split(batch_size), mask.split(batch_size))])


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
    samples = generate_with_config(model, tokenizer, [task.format_prompt(e.prompt) for e in examples], cfg,
                                   do_sample=True, temperature=cfg.value.temperature, num_samples=k,
                                   seed=cfg.value.seed, desc="value samples")
    rewards, per_component = task.reward.score([e.prompt for e in examples for _ in range(k)],
                                               [s for row in samples for s in row],
                                               ids=[e.id for e in examples for _ in range(k)])
    return samples, rewards, per_component, (task.reward.min_total, task.reward.max_total)


def run_value(cfg, task, sft_dir, out_dir, metrics, device) -> None:
    """Stage 2: sample k responses of frozen pi_ref per validation prompt, score them, and fit
    V(x) on them; the epoch is chosen on held-out prompts, next to the constant baseline."""
    torch.manual_seed(cfg.value.seed)
    model, tokenizer = load_policy(sft_dir, device, cfg.model)
    examples = task.splits["validation"]
    prompts = [e.prompt for e in examples]
    samples, rewards, per_component, (low, high) = value_targets(cfg, task, model, tokenizer)
    k = len(samples[0])
    flat_ids = [e.id for e in examples for _ in range(k)]
    targets = torch.tensor(rewards, dtype=torch.float32)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(k)

    prompt_ids = encode_prompts(tokenizer, task, prompts, cfg.model.max_prompt_tokens)
    states, mask = batched_prompt_states(model, prompt_ids, tokenizer.pad_token_id, cfg.advantage.batch_size, device)
    generator = torch.Generator().manual_seed(cfg.value.seed)
    heldout = torch.zeros(len(prompts), dtype=torch.bool)
    heldout[torch.randperm(len(prompts), generator=generator)[: max(1, int(cfg.value.heldout_fraction * len(prompts)))]] = True

    head = ValueHead(states.shape[-1], cfg.value.heads, cfg.value.dropout, high,
                     init_value=float(targets[~heldout[prompt_index]].mean()), min_value=low)
    report = fit_value_head(head, states, mask, targets, prompt_index, heldout, epochs=cfg.value.epochs,
                            batch_size=cfg.value.batch_size, lr=cfg.value.lr, seed=cfg.value.seed)
    report.update(samples_per_prompt=k, prompts=len(prompts), mean_sample_reward=float(targets.mean()),
                  mean_sample_rewards={n: float(v.mean()) for n, v in per_component.items()},
                  targets="pi_ref samples scored by the task reward" if task.reward is not None
                  else "logged validation responses and their data rewards (no scorer configured)")
    metrics.log("value", report["best_epoch"], heldout_mse=report["heldout_mse"],
                constant_baseline_mse=report["constant_baseline_mse"])
    log.info("value: held-out MSE %.4f (constant-mean baseline %.4f), epoch %d of %d, %d samples",
             report["heldout_mse"], report["constant_baseline_mse"], report["best_epoch"], cfg.value.epochs,
             len(targets))
    torch.save(head.state_dict(), out_dir / "value_head.pt")
    (out_dir / "value_head.json").write_text(json.dumps(
        {"hidden": states.shape[-1], "heads": cfg.value.heads, "dropout": cfg.value.dropout,
         "max_value": high, "min_value": low}))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for i, (pid, sample) in enumerate(zip(flat_ids, (s for row in samples for s in row))):
            f.write(json.dumps({"id": pid, "response": sample, "reward": float(rewards[i])}) + "\n")


def load_value_head(value_dir) -> ValueHead:
    spec = json.loads((value_dir / "value_head.json").read_text())
    head = ValueHead(spec["hidden"], spec["heads"], spec["dropout"], spec["max_value"],
                     min_value=spec.get("min_value", 0.0))
    head.load_state_dict(torch.load(value_dir / "value_head.pt", weights_only=True))
    return head.eval()
