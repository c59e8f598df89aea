"""A pair's or a ranking's responses after one copy of their prompt (logprobs.shared_prompt_batch):
the same log-probs, gradients and losses as one row per response, to float rounding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_gpt2
from lol_rl.data import REJECTED, RESPONSE, TokenizedRows
from lol_rl.logprobs import pad_batch, response_logprobs, shared_prompt_batch, shares_prompts
from lol_rl.losses import dpo
from lol_rl.offline import BatchSource, loss_on_batch

PAD = 49
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
GROUPS = [[[20, 21, 22, 23], [24], [25, 26, 27]],   # chosen
          [[30], [31, 32, 33, 34, 35], [36, 37]],   # rejected
          [[40, 41], [42, 43], [44]]]               # a third ranked response


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def separate_rows(groups):
    return pad_batch([p for _ in groups for p in PROMPTS], [r for group in groups for r in group], PAD)


def test_shared_prompt_batch_by_hand():
    batch = shared_prompt_batch([[1, 2], [3]], [[[4], [5, 6]], [[7, 8], [9]]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 7, 8], [3, 5, 6, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]
    assert batch["response_lengths"].tolist() == [1, 2, 2, 1]  # group-major, as pad_batch over the groups
    # row 0: the rejected response (7, 8) sees the prompt and itself, not the chosen token 4
    assert batch["attention_mask"][0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                          [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    # each response's first token is predicted at the prompt's last position
    assert batch["predicted_at"].tolist() == [[[1, 0], [1, 3]], [[0, 1], [0, 0]]]
    assert batch["targets"].tolist() == [[[4, 0], [7, 8]], [[5, 6], [9, 0]]]


@pytest.mark.parametrize("make_model", [make_tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("n_groups", [2, 3])
def test_shared_prompt_logprobs_and_gradients_equal_separate_rows(make_model, n_groups):
    groups = GROUPS[:n_groups]
    values, grads = [], []
    for batch in (separate_rows(groups), shared_prompt_batch(PROMPTS, groups, PAD)):
        model = make_model()
        assert shares_prompts(model)
        logprobs, mask = response_logprobs(model, batch)
        (logprobs * torch.arange(1.0, 1 + logprobs.numel()).view_as(logprobs)).sum().backward()
        values.append((logprobs, mask))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    (separate, separate_mask), (shared, shared_mask) = values
    assert torch.equal(separate_mask, shared_mask)
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_eager_attention_does_not_share_prompts():
    eager = AutoModelForCausalLM.from_config(make_tiny_gpt2().config, attn_implementation="eager")
    assert not shares_prompts(eager)


def test_dpo_loss_through_the_sampler_equals_separate_rows(tiny_gpt2):
    rows = TokenizedRows(PROMPTS, GROUPS[0], PAD, extra_responses={REJECTED: GROUPS[1]})
    groups = [RESPONSE, REJECTED]
    ragged = {}
    for g in groups:  # some cached reference log-probs per group
        lengths = torch.tensor([len(r) for r in rows.group(g)])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ragged[g] = (torch.linspace(-3.0, -0.5, int(offsets[-1])), offsets)
    losses = []
    for share in (False, True):
        source = BatchSource(rows, {}, ragged, torch.arange(3), None, batch_size=3, seed=0, groups=groups,
                             share_prompt=share)
        indices = torch.tensor([2, 0, 1])
        loss, _ = loss_on_batch(tiny_gpt2, source.batch(indices), groups, dpo, {"beta": 0.1})
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
