"""Pretrained models by path, LoRA adapters through peft, the merged reference policy, the
adapter-disabled reference, and the errors of model configs that cannot run here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lol_rl.models import (
    ModelError, initial_policy, load_policy, make_optimizer, quantization_config, reference_policy, save_policy,
    save_reference, train_tokenizer, build_from_config,
)
from test_cli import lol_rl

CPU = torch.device("cpu")
TEXTS = ["User: say hello\nAssistant: Hello there, happy to help!", "User: add: 2 + 3\nAssistant: It is 5."] * 20


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A causal LM saved as a hub checkpoint is (config, weights, tokenizer), built offline."""
    path = tmp_path_factory.mktemp("pretrained") / "tiny-gpt2"
    tokenizer = train_tokenizer(TEXTS, 300)
    cfg = OmegaConf.create({"arch": "gpt2", "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "dropout": 0.0,
                           "activation": "gelu_new"})
    torch.manual_seed(0)
    build_from_config(cfg, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_cfg(path, **extra):
    base = OmegaConf.load("conf/model/gpt2.yaml")
    return OmegaConf.merge(base, {"path": str(path), **extra})


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def _ids(tokenizer):
    return tokenizer(TEXTS[:2], return_tensors="pt", padding=True)["input_ids"]


def _perturb_adapter(model, seed=1):
    """peft starts B at zero (the adapter is a no-op); move it so the test can see it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_disabled_adapter_gives_exactly_the_base_model(pretrained_dir):
    base, tokenizer = load_policy(pretrained_dir, CPU)
    policy, _ = initial_policy(model_cfg(pretrained_dir, lora=LORA), [], CPU)
    _perturb_adapter(policy)
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = base(ids).logits
        adapted = policy(ids).logits
        with reference_policy(policy) as ref:
            disabled = ref(ids).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.equal(disabled, expected)


def test_reference_policy_needs_an_adapter(tiny_gpt2):
    with pytest.raises(ValueError, match="has no adapter"):
        with reference_policy(tiny_gpt2):
            pass


def test_only_adapter_weights_are_trained(pretrained_dir):
    policy, _ = initial_policy(model_cfg(pretrained_dir, lora=LORA), [], CPU)
    params = make_optimizer(policy, OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0})).param_groups[0]["params"]
    names = {id(p): n for n, p in policy.named_parameters()}
    assert params and all("lora_" in names[id(p)] for p in params)
    assert len(params) < len(list(policy.parameters()))


def test_sft_artifact_is_the_merged_adapter(pretrained_dir, tmp_path):
    policy, tokenizer = initial_policy(model_cfg(pretrained_dir, lora=LORA), [], CPU)
    _perturb_adapter(policy)
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = policy(ids).logits
    save_reference(policy, tokenizer, tmp_path / "sft", model_cfg(pretrained_dir, lora=LORA))
    assert not (tmp_path / "sft" / "adapter_config.json").exists()
    merged, _ = load_policy(tmp_path / "sft", CPU)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_rl_adapter_artifact_reloads_over_its_base_after_the_cache_moves(pretrained_dir, tmp_path):
    cfg = model_cfg(pretrained_dir, lora=LORA)
    cache = tmp_path / "cache"
    shutil.copytree(pretrained_dir, cache / "sft" / "key")
    reference, tokenizer = load_policy(cache / "sft" / "key", CPU, cfg)
    from lol_rl.models import add_adapter

    policy = add_adapter(reference, cfg)
    _perturb_adapter(policy, seed=2)
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = policy(ids).logits
    save_policy(policy, tokenizer, cache / "rl" / "key" / "policy", base_dir=cache / "sft" / "key")
    assert json.loads((cache / "rl" / "key" / "policy" / "policy.json").read_text()) == {"base": "../../../sft/key"}
    moved = tmp_path / "moved"
    shutil.move(cache, moved)
    reloaded, _ = load_policy(moved / "rl" / "key" / "policy", CPU, cfg)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected)


def test_adapter_artifact_without_its_base_dir_is_refused(pretrained_dir, tmp_path):
    policy, tokenizer = initial_policy(model_cfg(pretrained_dir, lora=LORA), [], CPU)
    with pytest.raises(ValueError, match="base weights"):
        save_policy(policy, tokenizer, tmp_path / "policy")


def test_qlora_on_cpu_is_a_clear_error():
    cfg = OmegaConf.load("conf/model/llama7b_qlora.yaml")
    cfg = OmegaConf.merge(OmegaConf.load("conf/model/gpt2.yaml"), cfg)
    with pytest.raises(ModelError, match="4-bit quantization \\(QLoRA\\) needs a CUDA GPU and this run's device is cpu"):
        quantization_config(cfg, CPU)


def test_unknown_quantization_and_dtype_are_refused(pretrained_dir):
    with pytest.raises(ModelError, match="quantization must be null or nf4, got 'int3'"):
        quantization_config(model_cfg(pretrained_dir, quantization="int3"), CPU)
    with pytest.raises(ModelError, match="dtype must be auto or one of"):
        initial_policy(model_cfg(pretrained_dir, dtype="fp8"), [], CPU)


def test_model_id_missing_offline_names_it(tmp_path):
    with pytest.raises(ModelError, match="cannot load .*no-such-org/no-such-model.*offline Hugging Face cache"):
        initial_policy(model_cfg("no-such-org/no-such-model"), [], CPU)


def test_cli_qlora_without_gpu_is_one_line(tmp_path):
    proc = lol_rl("train", "model=llama7b_qlora", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "c")
    assert proc.returncode == 2
    assert "lol-rl: model llama7b_qlora: 4-bit quantization (QLoRA) needs a CUDA GPU" in proc.stdout
    assert "Traceback" not in proc.stdout


LORA_RUN = [
    "task.sizes.train=160", "task.sizes.validation=24", "task.sizes.test=24",
    "sft.steps=8", "sft.log_interval=4", "sft.batch_size=16", "sft.lr=1e-3",
    "value.epochs=2", "value.samples_per_prompt=2", "value.heads=2",
    "rl.steps=6", "rl.val_interval=3", "rl.log_interval=3", "rl.val_prompts=8", "rl.batch_size=8",
    "generation.max_new_tokens=8", "model.max_prompt_tokens=32", "model.max_response_tokens=24",
]


def test_cli_chain_with_a_pretrained_model_and_lora(pretrained_dir, tmp_path):
    """The whole chain on a local pretrained checkpoint with LoRA: the sft artifact is full
    weights (merged adapter), the rl artifact an adapter whose disabled output reproduces the
    reference log-probs the reference stage cached."""
    run_dir = tmp_path / "run"
    proc = lol_rl("train", "model=causal_lm_lora", f"model.path={pretrained_dir}", "model.lora.r=4",
                  *LORA_RUN, f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    sft_dir, rl_dir, reference_dir = (Path(stages[s]["dir"]) for s in ("sft", "rl", "reference"))
    assert not (sft_dir / "adapter_config.json").exists() and (rl_dir / "policy" / "adapter_config.json").exists()

    from lol_rl.data import encode_rows
    from lol_rl.logprobs import response_logprobs
    from lol_rl.tasks import build_task
    from lol_rl.offline import ragged_rows

    cfg = OmegaConf.load(run_dir / "config.yaml")
    task = build_task(cfg.task)
    policy, tokenizer = load_policy(rl_dir / "policy", CPU, cfg.model)
    rows = encode_rows(tokenizer, task, task.splits["train"][:8], cfg.model.max_prompt_tokens,
                       cfg.model.max_response_tokens)
    batch = rows.batch(list(range(8)))
    cached = torch.load(reference_dir / "reference.pt", weights_only=True)
    expected = ragged_rows(cached["ref_logprobs/response"], cached["ref_offsets/response"], torch.arange(8),
                           int(batch["response_lengths"].max()))
    with torch.no_grad(), reference_policy(policy) as ref:
        disabled, _ = response_logprobs(ref, batch)
    torch.testing.assert_close(disabled, expected.to(disabled.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("model.kind=weird", "lol-rl: model.kind='weird' is not allowed; expected one of ['from_config', 'pretrained']"),
    ("task.variant=muddy", "lol-rl: task.variant='muddy' is not allowed; expected one of ['noisy', 'clean']"),
])
def test_a_bad_config_value_is_one_line(tmp_path, override, message):
    proc = lol_rl("train", override, "task.sizes.train=50", "task.sizes.validation=10", "task.sizes.test=10",
                  f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "c")
    assert proc.returncode == 2 and message in proc.stdout and "Traceback" not in proc.stdout
