"""Shared setup: offline, quiet, CI-friendly environment; tiny GPT-2 models; isolated caches."""

from __future__ import annotations

import os

# set before anything imports transformers / wandb / lol_rl
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["CI"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own stage cache: nothing ever touches a shared one."""
    monkeypatch.setenv("LOL_RL_CACHE", str(tmp_path / "lol-rl-cache"))


def make_tiny_gpt2(seed: int = 0, vocab_size: int = 50):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_gpt2():
    return make_tiny_gpt2()


def replace_stage_runs(monkeypatch, runs: dict):
    """Swap the run functions of the named pipeline stages (stage name -> fn(StageRun)); the
    declarations, and so the cache keys, stay as they are."""
    import dataclasses

    import lol_rl.pipeline as pipeline

    for name, run in runs.items():
        monkeypatch.setitem(pipeline.BY_NAME, name, dataclasses.replace(pipeline.BY_NAME[name], run=run))
