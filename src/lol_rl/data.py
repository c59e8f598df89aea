"""Tokenized rows and padded batches: one place where prompts and responses become ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .logprobs import pad_batch
from .tasks import Example, Task


@dataclass
class TokenizedRows:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    pad_id: int
    truncated_prompts: int = 0
    truncated_responses: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return pad_batch([self.prompt_ids[i] for i in indices], [self.response_ids[i] for i in indices], self.pad_id)


def encode_prompts(tokenizer, task: Task, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Formatted prompt ids, truncated from the left (the paper keeps the latest turns)."""
    ids = tokenizer([task.format_prompt(p) for p in prompts], add_special_tokens=False)["input_ids"]
    return [row[-max_prompt_tokens:] for row in ids]


def encode_rows(tokenizer, task: Task, examples: Sequence[Example], max_prompt_tokens: int, max_response_tokens: int) -> TokenizedRows:
    """Prompt ids and response ids (a leading space, then EOS) of every example."""
    full_prompts = tokenizer([task.format_prompt(e.prompt) for e in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([" " + e.response for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return TokenizedRows(
        prompt_ids=[p[-max_prompt_tokens:] for p in full_prompts],
        response_ids=[(r + [eos])[:max_response_tokens] for r in responses],
        pad_id=tokenizer.pad_token_id,
        truncated_prompts=sum(len(p) > max_prompt_tokens for p in full_prompts),
        truncated_responses=sum(len(r) + 1 > max_response_tokens for r in responses),
    )
