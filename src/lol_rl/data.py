"""Tokenized rows and padded batches: one place where prompts and responses become ids.

A row has one or more response groups: `response` (the logged one), `rejected` (of a
preference pair) and `ranking/0..K-1` (a ranking, best first), and, derived from any data,
`mismatched`: row i's prompt with the response of row i-1 (row 0 takes the last row's), the
mismatched pairs KTO estimates its KL reference point on. TRL rotates completions by one the same
way, within each chunk of a batch size; here the rotation is over the whole split, so it does
not depend on the batch size and the reference stage can cache it. A batch stacks the groups a
loss needs along the batch axis, so all of them go through the policy in one forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .logprobs import pad_batch, shared_prompt_batch
from .tasks import Example, Task

log = logging.getLogger(__name__)

RESPONSE = "response"
REJECTED = "rejected"
RANKING = "ranking"
MISMATCHED = "mismatched"  # derived, not in the data: see the module docstring


@dataclass
class TokenizedRows:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    pad_id: int
    truncated_prompts: int = 0
    truncated_responses: int = 0
    extra_responses: dict[str, list[list[int]]] = field(default_factory=dict)  # rejected, ranking/k

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def groups(self) -> list[str]:
        """The groups the data has (not the derived `mismatched`)."""
        return [RESPONSE, *self.extra_responses]

    @cached_property
    def mismatched_ids(self) -> list[list[int]]:
        """Row i's entry: the response of row i-1 (row 0: the last row's)."""
        return self.response_ids[-1:] + self.response_ids[:-1]

    def group(self, name: str) -> list[list[int]]:
        if name == MISMATCHED:
            return self.mismatched_ids
        return self.response_ids if name == RESPONSE else self.extra_responses[name]

    def expand(self, names: Sequence[str]) -> list[str]:
        """Group names with `ranking` expanded to `ranking/0..K-1`; unknown names raise."""
        expanded = []
        for name in names:
            members = [g for g in [*self.groups, MISMATCHED] if g == name or g.startswith(f"{name}/")]
            if not members:
                raise ValueError(f"response group {name!r} is not in the data (have {self.groups})")
            expanded.extend(members)
        return expanded

    def batch(self, indices: Sequence[int], groups: Sequence[str] = (RESPONSE,)) -> dict[str, torch.Tensor]:
        """Rows `indices` of each group in turn: G * len(indices) sequences, group-major."""
        prompts = [self.prompt_ids[i] for _ in groups for i in indices]
        responses = [self.group(g)[i] for g in groups for i in indices]
        return pad_batch(prompts, responses, self.pad_id)

    def shared_prompt_batch(self, indices: Sequence[int], groups: Sequence[str]) -> dict[str, torch.Tensor]:
        """Rows `indices` as one sequence each: the prompt once, then each group's response
        (logprobs.shared_prompt_batch); log-probs come out group-major as `batch`'s."""
        return shared_prompt_batch([self.prompt_ids[i] for i in indices],
                                   [[self.group(g)[i] for i in indices] for g in groups], self.pad_id)


def tensor_prefix(group: str) -> str:
    """The name prefix a loss sees for a group: logprobs, rejected_logprobs, ranking_logprobs."""
    return "" if group == RESPONSE else f"{group.split('/')[0]}_"


def split_groups(tensors: dict[str, torch.Tensor], groups: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
    """(G*B, ...) tensors -> per-group names; ranking groups stacked into (B, K, ...)."""
    out: dict[str, torch.Tensor] = {}
    ranked: dict[str, list[torch.Tensor]] = {}
    for g, group in enumerate(groups):
        for name, tensor in tensors.items():
            part = tensor[g * batch_size : (g + 1) * batch_size]
            if group.startswith(f"{RANKING}/"):
                ranked.setdefault(f"{RANKING}_{name}", []).append(part)
            else:
                out[tensor_prefix(group) + name] = part
    out.update({name: torch.stack(parts, dim=1) for name, parts in ranked.items()})
    return out


def truncate_prompt(ids: Sequence[int], max_prompt_tokens: int) -> list[int]:
    """The one truncation rule for a prompt, everywhere (training, value samples, validation,
    eval, PPO rollouts): keep its last `max_prompt_tokens` tokens, the latest turns (the paper's)."""
    return list(ids[-max_prompt_tokens:])


def prompt_ids(tokenizer, formatted_prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of already formatted prompts, each cut by `truncate_prompt`."""
    ids = tokenizer(list(formatted_prompts), add_special_tokens=False)["input_ids"]
    return [truncate_prompt(row, max_prompt_tokens) for row in ids]


def count_cut_prompts(tokenizer, formatted_prompts: Sequence[str], max_prompt_tokens: int) -> int:
    """How many of the prompts `truncate_prompt` cuts."""
    ids = tokenizer(list(formatted_prompts), add_special_tokens=False)["input_ids"]
    return sum(len(row) > max_prompt_tokens for row in ids)


def cut_counts(stage: str, rows: int, prompts: int, responses: int | None = None) -> dict:
    """The truncation record of a stage, logged (silently cut prompts make a model look worse
    than it is) and returned for the artifact's summary."""
    record = {"rows": rows, "truncated_prompts": prompts}
    what = f"{prompts} of {rows} prompts cut to their last max_prompt_tokens tokens"
    if responses is not None:
        record["truncated_responses"] = responses
        what += f", {responses} responses cut to max_response_tokens"
    (log.warning if prompts or responses else log.info)("%s: %s", stage, what)
    return record


def encode_prompts(tokenizer, task: Task, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Formatted prompt ids, truncated from the left (`truncate_prompt`)."""
    return prompt_ids(tokenizer, [task.format_prompt(p) for p in prompts], max_prompt_tokens)


def _encode_responses(tokenizer, texts: Sequence[str], max_response_tokens: int, prefix: str) -> tuple[list[list[int]], int]:
    ids = tokenizer([prefix + t for t in texts], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(r + [eos])[:max_response_tokens] for r in ids], sum(len(r) + 1 > max_response_tokens for r in ids)


def encode_rows(tokenizer, task: Task, examples: Sequence[Example], max_prompt_tokens: int, max_response_tokens: int) -> TokenizedRows:
    """Prompt ids and response ids (the task's response prefix, a space by default, then EOS)
    of every example; the rejected and ranked responses too where every example has them."""
    full_prompts = tokenizer([task.format_prompt(e.prompt) for e in examples], add_special_tokens=False)["input_ids"]
    responses, truncated = _encode_responses(tokenizer, [e.response for e in examples], max_response_tokens, task.response_prefix)
    extra = {}
    if all(e.rejected is not None for e in examples):
        extra[REJECTED], _ = _encode_responses(tokenizer, [e.rejected for e in examples], max_response_tokens, task.response_prefix)
    if all(e.ranking is not None for e in examples) and len({len(e.ranking) for e in examples}) == 1:
        for k in range(len(examples[0].ranking)):
            extra[f"{RANKING}/{k}"], _ = _encode_responses(tokenizer, [e.ranking[k] for e in examples], max_response_tokens, task.response_prefix)
    return TokenizedRows(
        prompt_ids=[truncate_prompt(p, max_prompt_tokens) for p in full_prompts],
        response_ids=responses,
        pad_id=tokenizer.pad_token_id,
        truncated_prompts=sum(len(p) > max_prompt_tokens for p in full_prompts),
        truncated_responses=truncated,
        extra_responses=extra,
    )
