"""V_ref(x): a small head over the frozen reference LM's prompt states (Algorithm 1).

Attention pooling with one learned query over the prompt's last hidden states (padding
masked, unlike the paper's code), then a one-hidden-layer MLP, squashed to the reward's range
[min_value, max_value].
"""

from __future__ import annotations

import json
import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .faults import kill_point
from .logprobs import prompt_states
from .progress import progress_disabled

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


@torch.no_grad()
def padded_prompt_states(model, prompt_ids: list[list[int]], pad_id: int, width: int,
                         device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen prompt states of one batch of prompts, on the CPU, left-padded to `width`:
    (B, P, H), (B, P)."""
    states, mask = prompt_states(model, prompt_ids, pad_id, device)
    pad = width - states.shape[1]
    return nn.functional.pad(states.float().cpu(), (0, 0, pad, 0)), nn.functional.pad(mask.cpu(), (pad, 0), value=False)


def batched_prompt_states(model, prompt_ids: list[list[int]], pad_id: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen prompt states of every prompt, left-padded to one width: (N, P, H), (N, P)."""
    width = max(len(p) for p in prompt_ids)
    batches = [padded_prompt_states(model, prompt_ids[start : start + batch_size], pad_id, width, device)
               for start in range(0, len(prompt_ids), batch_size)]
    return torch.cat([states for states, _ in batches]), torch.cat([mask for _, mask in batches])


def predict_values(head: ValueHead, states: torch.Tensor, mask: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    head.eval()
    with torch.no_grad():
        return torch.cat([head(s, m) for s, m in zip(states.split(batch_size), mask.split(batch_size))])


def load_value_head(value_dir) -> ValueHead:
    spec = json.loads((value_dir / artifacts.VALUE_HEAD_SPEC).read_text())
    head = ValueHead(spec["hidden"], spec["heads"], spec["dropout"], spec["max_value"],
                     min_value=spec.get("min_value", 0.0))
    head.load_state_dict(torch.load(value_dir / artifacts.VALUE_HEAD, weights_only=True))
    return head.eval()
