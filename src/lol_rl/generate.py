"""Batched generation: left padding, the KV cache, length-sorted batches; prompts cut by the
one truncation rule (data.truncate_prompt), and never more new tokens than the model has
positions for."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import distributed
from .data import prompt_ids
from .logprobs import pad_batch

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    desc: str = "generate",
    sharded: bool = False,
) -> list[list[str]]:
    """`num_samples` responses per formatted prompt, each prompt cut to its last
    `max_prompt_tokens` tokens: sampled, or greedy / beam search (`num_beams`,
    `repetition_penalty`: the paper's small tasks decode with beam 2, penalty 2.5).
    `sharded`: every process calls this and generates its share of the batches
    (distributed.map_batches); the responses are those of one process."""
    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = new_token_budget(model, max_prompt_tokens, max_new_tokens)
    # sort by length so each batch pads little; results are put back in prompt order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    # one seed per batch, drawn in batch order: a batch samples alike whichever process runs it
    generator_seed = torch.Generator().manual_seed(seed)
    seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)) for _ in chunks]
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0} if do_sample else
                {"do_sample": False, "num_beams": num_beams, "repetition_penalty": repetition_penalty})

    def generate_batch(batch: int) -> list[str]:
        ids = prompt_ids(tokenizer, [prompts[i] for i in chunks[batch]], max_prompt_tokens)
        enc = pad_batch(ids, [[] for _ in ids], tokenizer.pad_token_id, side="left")
        torch.manual_seed(seeds[batch])
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    outputs: list[list[str]] = [[] for _ in prompts]
    batches = distributed.map_batches(generate_batch, range(len(chunks)), desc, sharded=sharded, seeds_each_batch=True)
    for chunk, texts in zip(chunks, batches):
        for j, i in enumerate(chunk):
            outputs[i] = [t.strip() for t in texts[j * num_samples : (j + 1) * num_samples]]
    return outputs


def new_token_budget(model, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """`max_new_tokens`, less what would run past the model's positions after the longest prompt."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is None or max_prompt_tokens + max_new_tokens <= positions:
        return max_new_tokens
    if positions <= max_prompt_tokens:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room to generate in the model's "
                         f"{positions} positions")
    log.warning("generation: %d new tokens after a %d-token prompt exceed the model's %d positions; generating %d",
                max_new_tokens, max_prompt_tokens, positions, positions - max_prompt_tokens)
    return positions - max_prompt_tokens


def generate_with_config(model, tokenizer, formatted_prompts: Sequence[str], cfg, **kwargs) -> list[list[str]]:
    """`generate` with the run's `generation` settings (validation, eval, value samples; the
    beam settings apply to greedy decoding only)."""
    return generate(model, tokenizer, formatted_prompts, max_prompt_tokens=cfg.model.max_prompt_tokens,
                    max_new_tokens=cfg.generation.max_new_tokens,
                    batch_size=cfg.generation.batch_size, num_beams=cfg.generation.num_beams,
                    repetition_penalty=cfg.generation.repetition_penalty, **kwargs)
