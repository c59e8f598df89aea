"""Batched per-token log-probs of responses given prompts, and the prompt's last hidden
states; padding-safe on either side (positions come from the attention mask)."""

from __future__ import annotations

import contextlib
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


PROMPT_SEGMENT, PAD_SEGMENT = -1, -2  # shared_prompt_batch's segment ids besides a response's index


def shared_prompt_batch(prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Sequence[int]]],
                        pad_id: int) -> dict[str, torch.Tensor]:
    """Each row's prompt once, then each of its G responses (`groups[g][i]`): a pair or a
    ranking shares one forward and backward of its prompt instead of repeating it per response.

    Returns input_ids (B, T), a boolean attention_mask (B, 1, T, T) under which a response token
    sees the prompt and the earlier tokens of its own response only, the position_ids each token
    has in its own prompt + response sequence, response_lengths (G*B,) group-major as
    `pad_batch` over the groups, and for each response token (B, G, R) the position whose
    output predicts it (`predicted_at`: the prompt's last token for a response's first) and its
    id (`targets`). The log-probs equal those of separate prompt + response rows up to float
    rounding (the attention reductions run over other shapes)."""
    n_groups, n_rows = len(groups), len(prompts)
    if any(len(g) != n_rows for g in groups):
        raise ValueError(f"every response group needs one response per prompt ({n_rows})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("shared_prompt_batch: a prompt is empty; its responses' first tokens would have no predictor")
    response_lengths = torch.tensor([len(g[i]) for g in groups for i in range(n_rows)], dtype=torch.long)
    width = max(len(p) + sum(len(g[i]) for g in groups) for i, p in enumerate(prompts))
    longest = int(response_lengths.max())
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    segment = torch.full((n_rows, width), PAD_SEGMENT, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    predicted_at = torch.zeros((n_rows, n_groups, longest), dtype=torch.long)
    targets = torch.full((n_rows, n_groups, longest), pad_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        start = len(prompt)
        input_ids[i, :start] = torch.tensor(list(prompt))
        segment[i, :start] = PROMPT_SEGMENT
        positions[i, :start] = torch.arange(start)
        for g, group in enumerate(groups):
            response, end = group[i], start + len(group[i])
            input_ids[i, start:end] = torch.tensor(list(response), dtype=torch.long)
            segment[i, start:end] = g
            positions[i, start:end] = torch.arange(len(prompt), len(prompt) + len(response))
            # token k of the response is predicted at token k-1's position, its first at the prompt's last
            if response:
                predicted_at[i, g, : len(response)] = torch.tensor([len(prompt) - 1, *range(start, end - 1)])
                targets[i, g, : len(response)] = input_ids[i, start:end]
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    key, query = segment[:, None, :], segment[:, :, None]
    visible = causal & ((key == PROMPT_SEGMENT) | (key == query))  # a padding token sees earlier padding: no empty row
    return {"input_ids": input_ids, "attention_mask": visible[:, None], "position_ids": positions,
            "response_lengths": response_lengths, "predicted_at": predicted_at, "targets": targets}


def shares_prompts(model) -> bool:
    """Whether the model takes shared_prompt_batch's boolean 4D mask as it is: transformers'
    SDPA attention does; eager attention adds a mask to its scores, flash attention takes none."""
    return getattr(_unwrapped(model).config, "_attn_implementation", None) == "sdpa"


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
    """log softmax(logits)[target] over the whole fp32 (..., V) log-softmax (what response_logprobs
    computed before the lean path; kept as the reference the tests hold that path to)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


# elements per piece of the selective log-softmax: a piece's fp32 log-softmax (rows x V) is the
# one full-vocabulary fp32 tensor alive at a time (64 MiB: 512 rows of a 32K vocabulary, 128 of 128K)
LOGSOFTMAX_PIECE = 2**24


def _target_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


class _PiecewiseLogSoftmax(torch.autograd.Function):
    """log softmax(logits)[target] for (N, V) logits, `rows` rows at a time. It keeps only the
    logits for the backward, which writes d/dlogits = g * (onehot - softmax) into one (N, V)
    gradient piece by piece: no fp32 (N, V) log-softmax is stored, and the pieces' gradients
    are not held apart and then concatenated."""

    @staticmethod
    def forward(ctx, logits, targets, rows: int):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            out[start : start + rows] = _target_logprob(logits[start : start + rows], targets[start : start + rows])
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            piece = slice(start, start + ctx.rows)
            weight = grad_out[piece, None].float()
            piece_grad = F.softmax(logits[piece].float(), dim=-1).mul_(-weight)
            piece_grad.scatter_add_(-1, targets[piece, None], weight)
            grad[piece] = piece_grad
        return grad, None, None


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, piece: int = LOGSOFTMAX_PIECE) -> torch.Tensor:
    """log softmax(logits)[target] for (..., V) logits and (...) targets, without a whole
    (..., V) fp32 log-softmax: pieces of about `piece` elements each take their log-softmax and
    gather their targets, and the backward recomputes each piece's softmax (_PiecewiseLogSoftmax),
    so only the logits themselves (in their own dtype, bf16 on a GPU) are kept. The values are
    bit for bit `token_logprobs`' (the log-softmax is row-wise: a piece runs the same kernel on
    the same rows); the gradient equals it to float rounding (softmax vs exp of log_softmax).
    Logits that fit one piece (model=tiny's, every batch) take the one log-softmax as before,
    values and gradients bit for bit."""
    shape = targets.shape
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    rows = max(1, piece // logits.shape[-1])
    if flat_logits.shape[0] <= rows:
        return _target_logprob(flat_logits, flat_targets).reshape(shape)
    return _PiecewiseLogSoftmax.apply(flat_logits, flat_targets, rows).reshape(shape)


# vocabularies from which the LM head runs on response positions only (`head_at`). Below it
# (the tiny CPU models, 512 tokens) logits at every position are a small tensor and the head
# runs on all of them as before: gathering the head's input first gives the same values but
# reassociates the sum of the head's weight gradient over positions (~4e-8 on the tied
# embedding of model=tiny), and those runs stay bit for bit what they were.
LEAN_HEAD_MIN_VOCAB = 8192


def _unwrapped(model):
    """The module whose output embedding is the LM head (under DDP, the module it wraps)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def head_at(model, positions: torch.Tensor):
    """While active, the model's LM head (its output embedding: GPT-2, LLaMA and the rest of
    transformers' causal LMs, a peft model's included, LoRA on the head too) sees only the hidden
    states at `positions` (B, R): the logits are (B, R, V), never (B, T, V) over prompt tokens.
    transformers' `logits_to_keep` keeps one range of positions for every row; a row's response
    starts at its own position, so the head's input is gathered per row here instead. Yields a
    list that is non-empty once the head ran on gathered states (else the caller gathers logits)."""
    head = _unwrapped(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(_unwrapped(model)).__name__} has no output embedding (LM head) to gather positions for")

    gathered: list[bool] = []  # a model that computes its logits without calling its head module leaves it empty

    def gather(module, args):
        gathered.append(True)
        return (gather_positions(args[0], positions), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield gathered
    finally:
        handle.remove()


def response_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_i | x, y_<i) for every response token: the LM head runs on the positions that
    predict response tokens only, and the log-softmax is selective (`selective_logprobs`).

    Returns (logprobs, mask), both (B, R) with R the longest response; padded entries of
    `logprobs` are 0 and `mask` is False there.
    """
    if "predicted_at" in batch:  # a shared_prompt_batch: (B, G, R) response tokens -> (G*B, R), group-major
        rows, n_groups, width = batch["predicted_at"].shape
        logits, _ = response_logits(model, batch, batch["predicted_at"].reshape(rows, n_groups * width))
        logprobs = selective_logprobs(logits, batch["targets"].reshape(rows, n_groups * width))
        logprobs = logprobs.reshape(rows, n_groups, width).transpose(0, 1).reshape(n_groups * rows, width)
        mask = response_mask(batch["response_lengths"])
        return logprobs.masked_fill(~mask, 0.0), mask
    positions, targets, mask = response_positions(batch)
    logits, _ = response_logits(model, batch, positions)
    logprobs = selective_logprobs(logits, targets)
    return logprobs.masked_fill(~mask, 0.0), mask


def response_logits(model, batch: dict[str, torch.Tensor], positions: torch.Tensor, **kwargs):
    """The logits at `positions` (B, R, V) and the model's output (`kwargs` to its forward, e.g.
    output_hidden_states): the head runs on those positions alone from LEAN_HEAD_MIN_VOCAB up.
    No KV cache (`use_cache=False`, as TRL's trainers pass): one forward scores the whole
    sequence, and a cache would hold a copy of every layer's keys and values until the output
    is dropped (30-50 MiB of the 310-360 MiB a tiny-model DPO step adds to RSS)."""
    attention_mask = batch["attention_mask"]
    lean_head = _unwrapped(model).config.vocab_size >= LEAN_HEAD_MIN_VOCAB
    with head_at(model, positions) if lean_head else contextlib.nullcontext() as gathered:
        out = model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                    position_ids=batch["position_ids"] if "position_ids" in batch else position_ids(attention_mask),
                    use_cache=False, **kwargs)
    return (out.logits if gathered else gather_positions(out.logits, positions)), out


def full_response_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """response_logprobs as it was before the lean path: logits at every position, a full fp32
    log-softmax, then the response positions. The tests' and the benchmark's reference."""
    attention_mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=position_ids(attention_mask),
        use_cache=False,
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
        use_cache=False,
    )
    return out.hidden_states[-1], attention_mask.bool()


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
