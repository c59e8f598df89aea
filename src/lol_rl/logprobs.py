"""Batched per-token log-probs of responses given prompts, and the prompt's last hidden
states; padding-safe on either side (positions come from the attention mask)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pad_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Concatenate prompt+response token ids into one padded batch.

    Returns input_ids, attention_mask (B, T), response_start (B,) (index of the first
    response token) and response_lengths (B,).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_start = torch.empty(len(prompts), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        offset = 0 if side == "right" else width - lengths[i]
        input_ids[i, offset : offset + lengths[i]] = torch.tensor([*prompt, *response])
        attention_mask[i, offset : offset + lengths[i]] = 1
        response_start[i] = offset + len(prompt)
    response_lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_start": response_start,
        "response_lengths": response_lengths,
    }


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so padded and unpadded rows see the same positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_mask(response_lengths: torch.Tensor) -> torch.Tensor:
    width = int(response_lengths.max())
    return torch.arange(width, device=response_lengths.device)[None, :] < response_lengths[:, None]


def response_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every response token (B, R): the position whose output predicts it (the token at
    t is predicted by the logits at t - 1), the token id, and the mask (False at padding)."""
    input_ids = batch["input_ids"]
    mask = response_mask(batch["response_lengths"])
    target_pos = (batch["response_start"][:, None] + torch.arange(mask.shape[1], device=mask.device)).clamp(
        max=input_ids.shape[1] - 1
    )
    return target_pos - 1, input_ids.gather(1, target_pos), mask


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states at (B, R) positions -> (B, R, D)."""
    return states.gather(1, positions[..., None].expand(-1, -1, states.shape[-1]))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def response_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_i | x, y_<i) for every response token.

    Returns (logprobs, mask), both (B, R) with R the longest response; padded entries of
    `logprobs` are 0 and `mask` is False there.
    """
    attention_mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).logits
    positions, targets, mask = response_positions(batch)
    logprobs = token_logprobs(gather_positions(logits, positions), targets)
    return logprobs.masked_fill(~mask, 0.0), mask


def prompt_states(model, prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer hidden states of left-padded prompts: (B, P, H) and the mask (B, P)."""
    batch = pad_batch(prompts, [[] for _ in prompts], pad_id, side="left")
    attention_mask = batch["attention_mask"].to(device)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=True,
    )
    return out.hidden_states[-1], attention_mask.bool()


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
