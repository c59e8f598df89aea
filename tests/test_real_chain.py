"""`lol-rl train task=hha` end to end on the fixture files in the PRO format, scored by tiny
OpenAssistant-layout reward models: the real loader, the real scorer class and the test
reward kept apart from the train reward, the test segments reported apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lol_rl.rewards.hf import GPTNeoXRewardConfig, GPTNeoXRewardModel
from test_cli import ROOT, lol_rl
from test_rewards import INIT, oasst_layout

PRO = ROOT / "tests" / "fixtures" / "hha" / "pro"
SMALL = [
    "sft.steps=4", "sft.log_interval=2", "sft.batch_size=4", "value.epochs=2", "value.samples_per_prompt=2",
    "rl.steps=4", "rl.val_interval=2", "rl.log_interval=2", "rl.val_prompts=3", "rl.batch_size=4",
    "generation.max_new_tokens=6", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "value.heads=2",
]


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    """Two random reward models saved as the released OpenAssistant checkpoints are (the train
    one and a different test one, as HHA's 1.4B and 6.9B)."""
    root = tmp_path_factory.mktemp("oasst")
    paths = {}
    for seed, name in ((0, "train_rm"), (1, "test_rm")):
        torch.manual_seed(seed)
        model = GPTNeoXRewardModel(GPTNeoXRewardConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, initializer_range=INIT))
        oasst_layout(model, root / name)
        paths[name] = root / name
    return paths


@pytest.mark.parametrize("algo", ["alol", "dpo", "kto"])
def test_hha_chain_on_fixture_files(tmp_path, reward_models, algo):
    run_dir = tmp_path / "run"
    proc = lol_rl(
        "train", "task=hha", f"task.pro_dir={PRO}", f"algo={algo}",
        f"task.rewards=[{{name:reward,use:hha_rm,model:'{reward_models['train_rm']}',max_length:48}}]",
        f"task.eval_rewards=[{{name:reward,use:hha_rm_large,model:'{reward_models['test_rm']}',max_length:48}}]",
        *SMALL, f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    policy = json.loads((run_dir / "eval.json").read_text())["policy"]
    assert set(policy["segments"]) == {"harmless_base", "helpful_base", "helpful_online", "helpful_rejection"}
    assert sum(s["n"] for s in policy["segments"].values()) == policy["n"]
    assert 0.0 < policy["reward"] < 1.0  # sigmoid of the test model's score
    assert "| policy | harmless_base | helpful_base | helpful_online | helpful_rejection | reward |" in proc.stdout

    stages = json.loads((run_dir / "stages.json").read_text())
    generations = [json.loads(line) for line in
                   (Path(stages["eval"]["dir"]) / "generations.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if line and json.loads(line).get("stage") == "rl/validation"]
    assert generations and validation
    # the test reward is the other model: the same generations score differently under the train one
    from lol_rl.rewards import build_reward

    train_reward = build_reward([{"name": "reward", "use": "hha_rm", "model": str(reward_models["train_rm"]),
                                  "max_length": 48}], device="cpu")
    rescored, _ = train_reward.score([g["prompt"] for g in generations], [g["response"] for g in generations])
    assert not np.allclose(rescored, [g["reward"] for g in generations])


def test_a_reward_model_missing_offline_stops_before_any_stage(tmp_path):
    """The default HHA reward model is not in this machine's offline cache: one line, and no
    stage has started (no sft artifact in the cache)."""
    proc = lol_rl("train", "task=hha", f"task.pro_dir={PRO}", *SMALL, f"hydra.run.dir={tmp_path / 'run'}",
                  cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert ("lol-rl: reward component 'reward': model 'OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5' is neither "
            "a local path nor in the offline Hugging Face cache") in proc.stdout
    assert not (tmp_path / "cache" / "sft").exists()
