"""lol_rl.logprobs: padding-safe per-token response log-probs and prompt states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lol_rl.logprobs import pad_batch, position_ids, prompt_states, response_logprobs, response_mask

PAD = 49
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
RESPONSES = [[20, 21, 22, 23], [24], [25, 26, 27]]


def direct_logprobs(model, prompt, response):
    """Independent reference: plain model(input_ids).logits + log_softmax on the unpadded row."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0]
    predicting = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
    return F.log_softmax(predicting.double(), dim=-1)[torch.arange(len(response)), torch.tensor(response)].float()


def test_pad_batch_right_by_hand():
    batch = pad_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 0], [3, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["response_start"].tolist() == [2, 1]
    assert batch["response_lengths"].tolist() == [1, 3]


def test_pad_batch_left_by_hand():
    batch = pad_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0, side="left")
    assert batch["input_ids"].tolist() == [[0, 1, 2, 4], [3, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert batch["response_start"].tolist() == [3, 1]
    assert batch["response_lengths"].tolist() == [1, 3]
    # positions skip the left padding
    assert position_ids(batch["attention_mask"]).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]


def test_response_mask_by_hand():
    assert response_mask(torch.tensor([2, 0, 3])).tolist() == [
        [True, True, False], [False, False, False], [True, True, True]
    ]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_each_row_alone(tiny_gpt2, side):
    batch = pad_batch(PROMPTS, RESPONSES, PAD, side=side)
    with torch.no_grad():
        logprobs, mask = response_logprobs(tiny_gpt2, batch)
    width = max(len(r) for r in RESPONSES)
    assert logprobs.shape == (3, width) and mask.shape == (3, width)
    assert mask.tolist() == [[j < len(r) for j in range(width)] for r in RESPONSES]
    assert (logprobs[~mask] == 0).all()
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        with torch.no_grad():
            alone, alone_mask = response_logprobs(tiny_gpt2, pad_batch([prompt], [response], PAD))
        assert alone_mask.all() and alone.shape == (1, len(response))
        direct = direct_logprobs(tiny_gpt2, prompt, response)
        torch.testing.assert_close(alone[0], direct, atol=1e-5, rtol=0)
        torch.testing.assert_close(logprobs[i, : len(response)], direct, atol=1e-5, rtol=0)
        # real log-probabilities of a 50-token vocabulary with a random model: negative, not tiny
        assert (direct < 0).all()


def test_response_logprobs_changes_with_pad_id_never(tiny_gpt2):
    """The pad token's identity must not leak into real positions."""
    with torch.no_grad():
        a, _ = response_logprobs(tiny_gpt2, pad_batch(PROMPTS, RESPONSES, 0, side="left"))
        b, _ = response_logprobs(tiny_gpt2, pad_batch(PROMPTS, RESPONSES, 33, side="left"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_response_logprobs_has_gradient(tiny_gpt2):
    batch = pad_batch(PROMPTS, RESPONSES, PAD)
    logprobs, mask = response_logprobs(tiny_gpt2, batch)
    (logprobs * mask).sum().backward()
    grads = [p.grad for p in tiny_gpt2.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny_gpt2.zero_grad(set_to_none=True)


def test_prompt_states_padded_equal_unpadded(tiny_gpt2):
    states, mask = prompt_states(tiny_gpt2, PROMPTS, PAD, torch.device("cpu"))
    width = max(len(p) for p in PROMPTS)
    assert states.shape == (3, width, 32)
    # left padded: real tokens at the end
    assert mask.tolist() == [[j >= width - len(p) for j in range(width)] for p in PROMPTS]
    for i, prompt in enumerate(PROMPTS):
        alone, alone_mask = prompt_states(tiny_gpt2, [prompt], PAD, torch.device("cpu"))
        assert alone_mask.all() and alone.shape == (1, len(prompt), 32)
        with torch.no_grad():
            direct = tiny_gpt2(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(alone[0].detach(), direct, atol=1e-5, rtol=0)
        torch.testing.assert_close(states[i][mask[i]].detach(), direct, atol=1e-5, rtol=0)
