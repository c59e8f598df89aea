"""lol_rl.generate (batched, left-padded, length-sorted) against plain greedy decoding, and
lol_rl.data.encode_rows against the tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lol_rl.data import encode_prompts, encode_rows
from lol_rl.generate import generate
from lol_rl.models import train_tokenizer
from lol_rl.rewards import CompositeReward
from lol_rl.tasks import Example, Task

ROWS = [
    ("repeat: fox owl", "Okay, sure: fox owl."),
    ("sort: owl cat bee ant", "Sure, no problem: ant bee cat owl."),
    ("add: 7 + 8", "Of course, glad to help! 15."),
    ("reverse: cow dog", "Sure, happy to help! dog cow."),
    ("add: 2 + 3", "Okay, sure: 5."),
]
TEMPLATE = "User: {prompt}\nAssistant:"


@pytest.fixture(scope="module")
def task():
    examples = [Example(id=str(i), prompt=p, response=r) for i, (p, r) in enumerate(ROWS)]
    reward = CompositeReward({"one": lambda prompts, responses: [1.0] * len(responses)})
    return Task("hand", {"train": examples, "validation": examples, "test": examples}, reward, TEMPLATE)


@pytest.fixture(scope="module")
def tokenizer(task):
    texts = [task.format_prompt(e.prompt) + " " + e.response for e in task.splits["train"]] * 4
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=0.5,  # large weights: varied, prompt-dependent outputs
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


def greedy_alone(model, tokenizer, prompt: str, max_new_tokens: int, max_prompt_tokens: int = 40) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def test_a_prompt_ten_times_the_context_is_cut_as_training_cuts_it(model, tokenizer, task):
    """Generation keeps a prompt's last max_prompt_tokens tokens, the ids encode_rows trains on,
    and never asks for more positions than the model has (64 here, 640-token prompts)."""
    long_prompts = [" ".join([p] * 100) for p, _ in ROWS[:3]]
    formatted = [task.format_prompt(p) for p in long_prompts]
    assert min(len(tokenizer(f, add_special_tokens=False)["input_ids"]) for f in formatted) > 10 * 64
    examples = [Example(id=str(i), prompt=p, response="ok") for i, p in enumerate(long_prompts)]
    rows = encode_rows(tokenizer, task, examples, max_prompt_tokens=40, max_response_tokens=8)
    assert rows.truncated_prompts == 3 and all(len(ids) == 40 for ids in rows.prompt_ids)
    assert encode_prompts(tokenizer, task, long_prompts, 40) == rows.prompt_ids
    got = generate(model, tokenizer, formatted, max_prompt_tokens=40, max_new_tokens=60, batch_size=2)
    expected = []
    for ids in rows.prompt_ids:  # plain greedy from the training ids, within the 64 positions
        out = []
        with torch.no_grad():
            for _ in range(64 - 40):
                nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
                if nxt == tokenizer.eos_token_id:
                    break
        expected.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    assert [g[0] for g in got] == expected


def test_batched_greedy_equals_plain_greedy(model, tokenizer, task):
    prompts = [task.format_prompt(p) for p, _ in ROWS]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) > 1  # batches really are padded
    got = generate(model, tokenizer, prompts, max_prompt_tokens=40, max_new_tokens=6, batch_size=3)
    assert [len(g) for g in got] == [1] * len(prompts)
    expected = [greedy_alone(model, tokenizer, p, 6) for p in prompts]
    assert len(set(expected)) > 1  # the check can tell prompts apart
    assert [g[0] for g in got] == expected


def test_beam_search_and_repetition_penalty_reach_the_model(model, tokenizer, task):
    """The paper's small-task decoding (beam 2, penalty 2.5): each prompt alone, unpadded,
    through transformers' generate gives what the batched call gives."""
    prompts = [task.format_prompt(p) for p, _ in ROWS]
    got = generate(model, tokenizer, prompts, max_prompt_tokens=40, max_new_tokens=6, batch_size=2, num_beams=2, repetition_penalty=2.5)
    expected = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=2,
                             repetition_penalty=2.5, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert [g[0] for g in got] == expected
    greedy = generate(model, tokenizer, prompts, max_prompt_tokens=40, max_new_tokens=6, batch_size=2)
    assert [g[0] for g in got] != [g[0] for g in greedy]  # the settings change what is decoded


def test_sampling_is_seeded(model, tokenizer, task):
    prompts = [task.format_prompt(p) for p, _ in ROWS]
    a = generate(model, tokenizer, prompts, max_prompt_tokens=40, max_new_tokens=5, batch_size=2, do_sample=True, num_samples=3, seed=7)
    b = generate(model, tokenizer, prompts, max_prompt_tokens=40, max_new_tokens=5, batch_size=2, do_sample=True, num_samples=3, seed=7)
    c = generate(model, tokenizer, prompts, max_prompt_tokens=40, max_new_tokens=5, batch_size=2, do_sample=True, num_samples=3, seed=8)
    assert a == b
    assert a != c
    assert [len(row) for row in a] == [3] * len(prompts)


def test_encode_rows(tokenizer, task):
    rows = encode_rows(tokenizer, task, task.splits["train"], max_prompt_tokens=64, max_response_tokens=64)
    assert len(rows) == len(ROWS) and rows.pad_id == tokenizer.pad_token_id
    assert rows.truncated_prompts == 0 and rows.truncated_responses == 0
    for (prompt, response), p_ids, r_ids in zip(ROWS, rows.prompt_ids, rows.response_ids):
        assert tokenizer.decode(p_ids) == TEMPLATE.format(prompt=prompt)
        assert r_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(r_ids[:-1]) == " " + response
    # digits are single tokens
    digits = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert len(digits) == 5


def test_encode_truncation(tokenizer, task):
    full = encode_rows(tokenizer, task, task.splits["train"], max_prompt_tokens=64, max_response_tokens=64)
    rows = encode_rows(tokenizer, task, task.splits["train"], max_prompt_tokens=4, max_response_tokens=3)
    assert rows.prompt_ids == [p[-4:] for p in full.prompt_ids]  # prompts keep their end
    assert rows.response_ids == [r[:3] for r in full.response_ids]
    assert rows.truncated_prompts == sum(len(p) > 4 for p in full.prompt_ids)
    assert rows.truncated_responses == sum(len(r) > 3 for r in full.response_ids)
    assert rows.truncated_responses == len(ROWS)
    assert encode_prompts(tokenizer, task, [p for p, _ in ROWS], 4) == rows.prompt_ids
    batch = rows.batch([1, 0])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["input_ids"][0, :4].tolist() == rows.prompt_ids[1]
    assert batch["response_start"].tolist() == [4, 4]
