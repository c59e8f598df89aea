"""The memory-lean log-probs: the LM head on response positions only (`head_at`) and a
selective log-softmax in pieces (`selective_logprobs`) give the numbers of the full path
(logits at every position, one fp32 log-softmax over the vocabulary) for GPT-2, LLaMA and
LoRA models over them; below LEAN_HEAD_MIN_VOCAB the path is the old one bit for bit."""

from __future__ import annotations

import pytest
import torch

import lol_rl.logprobs as logprobs
from lol_rl.logprobs import full_response_logprobs, pad_batch, response_logprobs, selective_logprobs, token_logprobs

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 3, 4], [14], [15, 16, 17, 18]]
RESPONSES = [[20, 21, 22, 23], [24], [25, 26, 27, 28, 29, 30], [31, 32]]


def gpt2(vocab: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=False))


def lora(model, targets):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for name, p in peft_model.named_parameters():  # a LoRA B starts at 0: move it, so the adapter counts
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return peft_model


MODELS = {
    "gpt2": lambda: gpt2(),
    "llama": lambda: llama(),
    "gpt2+lora": lambda: lora(gpt2(), "all-linear"),
    "llama+lora": lambda: lora(llama(), "all-linear"),
    "llama+lora on the head": lambda: lora(llama(), ["q_proj", "v_proj", "lm_head"]),
}


def values_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    values, mask = fn(model, batch)
    (-(values * mask).sum(-1).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return values.detach(), mask, grads


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_lean_path_gives_the_full_paths_values_and_gradients(name, side, monkeypatch):
    monkeypatch.setattr(logprobs, "LEAN_HEAD_MIN_VOCAB", 0)  # the head on response positions, whatever the vocabulary
    monkeypatch.setattr(logprobs, "LOGSOFTMAX_PIECE", 64 * 5)  # pieces of 5 rows: several, recomputed in the backward
    monkeypatch.setattr(logprobs.selective_logprobs, "__defaults__", (64 * 5,))
    model = MODELS[name]()
    batch = pad_batch(PROMPTS, RESPONSES, pad_id=0, side=side)
    full, full_mask, full_grads = values_and_grads(full_response_logprobs, model, batch)
    lean, lean_mask, lean_grads = values_and_grads(response_logprobs, model, batch)
    assert torch.equal(lean_mask, full_mask)
    torch.testing.assert_close(lean, full, rtol=0, atol=1e-6)
    assert (lean[full_mask] < 0).all() and (lean[~full_mask] == 0).all()
    assert full_grads.keys() == lean_grads.keys() and len(full_grads) > 0
    for key in full_grads:
        torch.testing.assert_close(lean_grads[key], full_grads[key], rtol=1e-5, atol=1e-6, msg=key)
    assert model.get_output_embeddings()._forward_pre_hooks == {}  # the gather is gone after the call


def test_the_head_sees_only_the_response_positions(monkeypatch):
    monkeypatch.setattr(logprobs, "LEAN_HEAD_MIN_VOCAB", 0)
    model = llama()
    batch = pad_batch(PROMPTS, RESPONSES, pad_id=0)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append((args[0].shape, out.shape)))
    with torch.no_grad():
        response_logprobs(model, batch)
    (hidden, logits), = seen
    width = max(len(r) for r in RESPONSES)
    assert hidden == (len(PROMPTS), width, 32) and logits == (len(PROMPTS), width, 64)
    assert batch["input_ids"].shape[1] > width  # fewer than every position


def test_the_gather_hook_is_removed_when_the_forward_fails(monkeypatch):
    monkeypatch.setattr(logprobs, "LEAN_HEAD_MIN_VOCAB", 0)
    model = gpt2()
    batch = pad_batch(PROMPTS, RESPONSES, pad_id=0)
    batch["input_ids"] = batch["input_ids"] + 1000  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        response_logprobs(model, batch)
    assert model.get_output_embeddings()._forward_pre_hooks == {}


def test_below_the_lean_vocabulary_the_path_is_the_old_one_bit_for_bit():
    """model=tiny (512 tokens): the same values and the same gradients, not just close ones, so
    the default run's numbers do not move."""
    model = gpt2(vocab=512)
    assert 512 < logprobs.LEAN_HEAD_MIN_VOCAB
    batch = pad_batch(PROMPTS, RESPONSES, pad_id=0)
    full, _, full_grads = values_and_grads(full_response_logprobs, model, batch)
    lean, _, lean_grads = values_and_grads(response_logprobs, model, batch)
    assert torch.equal(lean, full)
    assert all(torch.equal(lean_grads[k], full_grads[k]) for k in full_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_logprobs_in_pieces_are_the_full_log_softmax(dtype):
    """Values bit for bit, gradients to float rounding (the backward's softmax is recomputed)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 37, 101, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 101, (3, 37), generator=g)
    weights = torch.rand(3, 37, generator=g)
    whole = token_logprobs(logits, targets)
    (whole_grad,) = torch.autograd.grad((whole * weights).sum(), logits)
    pieces = selective_logprobs(logits, targets, piece=101 * 8)  # 14 pieces of 8 rows, the last short
    (pieces_grad,) = torch.autograd.grad((pieces * weights).sum(), logits)
    assert pieces.dtype == torch.float32 and pieces.shape == (3, 37)
    assert torch.equal(pieces, whole)
    assert pieces_grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(pieces_grad, whole_grad, **tolerance)
    with torch.no_grad():  # the reference stage's no-grad forwards: no checkpointing, same values
        assert torch.equal(selective_logprobs(logits, targets, piece=101 * 8), whole.detach())


def test_a_model_that_never_calls_its_head_module_gets_its_logits_gathered_after(monkeypatch):
    """Some architectures compute logits as F.linear(hidden, weight) without the head module:
    the hook never fires, and the full logits are gathered at the response positions instead."""
    import torch.nn.functional as F

    monkeypatch.setattr(logprobs, "LEAN_HEAD_MIN_VOCAB", 0)
    model = gpt2()
    batch = pad_batch(PROMPTS, RESPONSES, pad_id=0)
    with torch.no_grad():
        expected, _ = full_response_logprobs(model, batch)
    from transformers.modeling_outputs import CausalLMOutput

    def linear_logits(**kwargs):
        hidden = model.transformer(**kwargs).last_hidden_state
        return CausalLMOutput(logits=F.linear(hidden, model.lm_head.weight))

    monkeypatch.setattr(model, "forward", linear_logits)
    with torch.no_grad():
        got, _ = response_logprobs(model, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
