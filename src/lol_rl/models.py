"""Policies and tokenizers: a tiny LM built from config (with a tokenizer trained on the task
text), or any causal LM by hub id / local path; save and load as transformers does."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on the task text (about a second); digits stay single
    tokens so that arithmetic is learnable digit by digit."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def build_from_config(model_cfg, tokenizer) -> torch.nn.Module:
    """A randomly initialised GPT-2 of the configured size (no download)."""
    if model_cfg.arch != "gpt2":
        raise ValueError(f"model.arch {model_cfg.arch!r} is not supported for from_config; use 'gpt2'")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=model_cfg.n_positions,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def initial_policy(model_cfg, texts: Iterable[str]):
    """(model, tokenizer) the SFT stage starts from."""
    if model_cfg.kind == "from_config":
        tokenizer = train_tokenizer(texts, model_cfg.vocab_size)
        model = build_from_config(model_cfg, tokenizer)
    elif model_cfg.kind == "pretrained":
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path)
    else:
        raise ValueError(f"model.kind must be 'from_config' or 'pretrained', got {model_cfg.kind!r}")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("policy: %s, %.2fM parameters, vocabulary %d", model_cfg.name, n_params / 1e6, len(tokenizer))
    return model, tokenizer


def load_policy(path: str | Path, device: torch.device):
    """A saved policy and its tokenizer (an artifact of the sft or rl stage)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    return model, tokenizer


def save_policy(model, tokenizer, path: str | Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is visible; use device=cpu")
    return torch.device(name)
