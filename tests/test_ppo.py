"""Online PPO: the maths against hand-computed values, then the loop on a tiny model."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lol_rl.cli import CONF_DIR

from lol_rl.losses import adaptive_kl_coef, gae, ppo_policy_loss, ppo_value_loss, token_rewards, whiten
from lol_rl.stages.ppo import RunningMoments
from lol_rl.tasks import build_task

MASK = torch.tensor([[True, True, True], [True, True, False]])  # the second response is 2 tokens


def test_token_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -0.5], [-2.0, -1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 2.0]), logprobs, ref_logprobs, MASK, kl_coef=0.5)
    # -0.5 * (lp - ref): row 1 [-0.25, 0, 0.25] + 1 at t=2; row 2 [-0.5, 0, pad] + 2 at t=1
    assert torch.allclose(rewards, torch.tensor([[-0.25, 0.0, 1.25], [-0.5, 2.0, 0.0]]))


def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.2, 9.0]])  # 9.0 sits on padding: never read
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=0.95)
    # row 1: A2 = 1 - .5 = .5; A1 = (0 + .5 - .5) + .95 * .5 = .475; A0 = 0 + .95 * .475 = .45125
    # row 2 ends at t=1 (terminal): A1 = 2 - .2 = 1.8; A0 = (0 + .2 - .1) + .95 * 1.8 = 1.81
    assert torch.allclose(advantages, torch.tensor([[0.45125, 0.475, 0.5], [1.81, 1.8, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.95125, 0.975, 1.0], [1.91, 2.0, 0.0]]))


def test_gae_with_discount():
    advantages, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), MASK[:1], gamma=0.9, lam=0.5)
    # A2 = .5; A1 = (.9 * .5 - .5) + .45 * .5 = .175; A0 = (.45 - .5) + .45 * .175 = .02875
    assert torch.allclose(advantages, torch.tensor([[0.02875, 0.175, 0.5]]))


def test_clipped_surrogate_takes_the_pessimistic_side_of_each_token():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 7.0]])
    mask = torch.tensor([[True, True, True, True, False]])  # the last token is padding
    loss, metrics = ppo_policy_loss(old + ratios.log(), old, advantages, mask, clip=0.2)
    # max(-A r, -A clip(r)): -1.2 (gain capped), -0.5, 0.8 (loss not capped), 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert metrics["clip_fraction"].item() == pytest.approx(1.0)
    assert metrics["ratio"].item() == pytest.approx(1.0)


def test_surrogate_gradient_is_zero_where_the_ratio_is_clipped_in_the_advantage_direction():
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = ppo_policy_loss(logprobs, old, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), clip=0.2)
    loss.backward()
    # token 0 is past 1 + clip with A > 0: no push further; token 1: d(-r A / 2)/d lp = -1.1 / 2
    assert logprobs.grad[0, 0].item() == 0.0
    assert logprobs.grad[0, 1].item() == pytest.approx(-0.55)


def test_clipped_value_loss():
    values = torch.tensor([[1.0, 0.0]])
    old_values = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, metrics = ppo_value_loss(values, old_values, returns, torch.ones(1, 2, dtype=torch.bool), clip=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(0, (0.3-0)^2) = 0.09
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert metrics["value_clip_fraction"].item() == pytest.approx(1.0)


def test_adaptive_kl_moves_towards_the_target_by_at_most_twenty_percent_per_horizon():
    assert adaptive_kl_coef(0.2, kl=12.0, target=6.0, n_steps=16, horizon=10000) == pytest.approx(0.2 * (1 + 0.2 * 16 / 10000))
    assert adaptive_kl_coef(0.2, kl=3.0, target=6.0, n_steps=16, horizon=10000) == pytest.approx(0.2 * (1 - 0.2 * 16 / 10000))
    assert adaptive_kl_coef(0.2, kl=6.6, target=6.0, n_steps=100, horizon=100) == pytest.approx(0.2 * 1.1)


def test_whiten_uses_only_the_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    out = whiten(values, MASK)
    kept = out[MASK]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert out[1, 2].item() == 0.0


def test_running_moments_equal_the_moments_of_everything_seen():
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 0.0])
    moments = RunningMoments()
    moments.update(first)
    moments.update(second)
    everything = torch.cat([first, second])
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.var == pytest.approx(everything.var(unbiased=False).item())


# --- the loop, through the real entrypoint, on the embedded task with a tiny budget -------------

from test_cli import TINY, lol_rl  # noqa: E402

# 60 sft steps give a pi_ref that says a word or two; PPO's rate is lr_scale (0.1) x rl.lr
PPO = [*TINY, "sft.steps=60", "algo=ppo", "rl.steps=10", "algo.params.step_multiple=3", "rl.val_interval=10",
       "rl.lr=3e-3"]
PER_UPDATE = {"reward", "kl", "kl_coef", "clip_fraction", "approx_kl", "value_loss", "entropy", "length",
              "response_tokens", "policy_loss"}


def rl_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "rl"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("ppo")
    proc = lol_rl("train", *PPO, f"hydra.run.dir={workspace / 'run'}", cache=workspace / "cache")
    assert proc.returncode == 0, proc.stdout[-5000:]
    return workspace / "run", proc


def test_ppo_logs_every_update_and_runs_step_multiple_times_the_offline_steps(ppo_run):
    run_dir, _ = ppo_run
    records = rl_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 31))  # 3 x rl.steps updates, one record each
    assert all(PER_UPDATE <= set(r) and all(math.isfinite(r[k]) for k in PER_UPDATE) for r in records)
    stages = json.loads((run_dir / "stages.json").read_text())
    assert not {"value", "reference", "advantage"} & set(stages)  # PPO scores its own samples
    summary = json.loads((Path(stages["rl"]["dir"]) / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["sequences"] == 30 * 16
    assert summary["optimizer_steps"] == 30 * 4 * 4  # epochs x minibatches per update


def test_ppo_policy_goes_through_the_same_eval_as_the_offline_algorithms(ppo_run):
    run_dir, proc = ppo_run
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results["policy"]["rewards"]) == {"correct", "polite", "concise"}
    assert results["policy"]["n"] == results["reference"]["n"] == 40
    assert "| ppo (seed 1) |" in proc.stdout


def test_ppo_raises_the_mean_rollout_reward_over_its_first_rollouts(ppo_run):
    rewards = [r["reward"] for r in rl_records(ppo_run[0])]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards


def test_a_nan_reward_stops_ppo_naming_the_component_and_the_prompt_and_keeps_what_was_written(tmp_path, monkeypatch):
    (tmp_path / "nan_scorer.py").write_text(
        "def score(prompts, responses):\n"
        "    return [float('nan') if p.startswith('add:') else 0.5 for p in prompts]\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    cache = tmp_path / "cache"
    proc = lol_rl("train", *PPO, "reward=nan_scorer:score", f"hydra.run.dir={tmp_path / 'run'}", cache=cache)
    assert proc.returncode == 2
    message = proc.stdout.strip().splitlines()[-1]
    # pi_ref's validation at step 0 is the first to score new responses
    match = re.fullmatch(r"lol-rl: rl validation at step 0: reward component 'nan_scorer:score' returned nan for "
                         r"prompt id (\S+) \('(add: [^']*)'\)", message)
    assert match, message
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        task_cfg = compose("config", overrides=[o for o in TINY if o.startswith("task.")]).task
    validation = {e.id: e.prompt for e in build_task(task_cfg).splits["validation"]}
    assert validation[match.group(1)] == match.group(2)  # the id is the offending prompt's
    sft_dirs = list((cache / "sft").iterdir())
    assert len(sft_dirs) == 1 and (sft_dirs[0] / "summary.json").is_file()  # pi_ref survives, complete
    # no rl artifact, and no partial build either: it failed before anything worth resuming
    assert not list((cache / "rl").iterdir())
    assert any(r["stage"] == "sft" for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()))


# --- with a LoRA policy: the reference is the same weights with the adapter disabled ---------

from test_models import CPU, LORA, LORA_RUN, TEXTS, _perturb_adapter, model_cfg, pretrained_dir  # noqa: E402,F401


def test_ppo_reference_is_the_adapter_disabled_policy(pretrained_dir):  # noqa: F811 (the fixture)
    from lol_rl.logprobs import pad_batch, response_logprobs
    from lol_rl.models import initial_policy, load_policy
    from lol_rl.stages.ppo import reference_logprobs

    base, tokenizer = load_policy(pretrained_dir, CPU)
    policy, _ = initial_policy(model_cfg(pretrained_dir, lora=LORA), [], CPU)
    _perturb_adapter(policy)
    ids = tokenizer(TEXTS[:2], add_special_tokens=False)["input_ids"]
    batch = pad_batch([row[:5] for row in ids], [row[5:12] for row in ids], tokenizer.pad_token_id)
    with torch.no_grad():
        expected, _ = response_logprobs(base, batch)
        adapted, _ = response_logprobs(policy, batch)
    assert not torch.allclose(adapted, expected)  # the adapter does change the policy
    torch.testing.assert_close(reference_logprobs(policy, None, batch), expected)


def test_ppo_with_a_lora_policy_saves_an_adapter_over_pi_ref(pretrained_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = lol_rl("train", "model=causal_lm_lora", f"model.path={pretrained_dir}", "model.lora.r=4", *LORA_RUN,
                  "algo=ppo", "algo.params.step_multiple=1", f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert (Path(stages["rl"]["dir"]) / "policy" / "adapter_config.json").is_file()
    assert len(rl_records(run_dir)) == 6


def _one_update(monkeypatch, skip: bool):
    """ppo_epochs on two hand-made rollouts, with a policy loss that turns NaN."""
    from omegaconf import OmegaConf

    from conftest import make_tiny_gpt2
    from lol_rl.stages import ppo
    from lol_rl.logprobs import pad_batch

    model = make_tiny_gpt2()
    head = ppo.TokenValueHead(model.config.hidden_size)
    batch = pad_batch([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)
    with torch.no_grad():
        old_logprobs, _, old_values, mask = ppo.policy_outputs(model, head, batch)
    rollouts = ppo.Rollouts(batch, torch.tensor([1.0, 0.0]), old_logprobs, old_logprobs.clone(), old_values, mask)
    params = OmegaConf.create({"gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "epochs": 1, "minibatches": 1,
                               "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "ent_coef": 0.0})
    rollouts.estimate(params, kl_coef=0.2, normalised_scores=rollouts.scores)
    monkeypatch.setattr(ppo, "ppo_policy_loss", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt_cfg = OmegaConf.create({"grad_clip": 1.0, "skip_nonfinite": skip})
    out = ppo.ppo_epochs(model, head, rollouts, optimizer, scheduler, params, opt_cfg, torch.Generator().manual_seed(0),
                         update=3, row_ids=["p-a", "p-b"])
    return out, all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_non_finite_ppo_loss_stops_naming_the_update_and_prompts(monkeypatch):
    from lol_rl.loop import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"rl \(ppo\): non-finite loss or gradient at update 3 .*\['p-[ab]', 'p-[ab]'\]"):
        _one_update(monkeypatch, skip=False)


def test_a_non_finite_ppo_minibatch_is_skipped_and_counted_when_asked(monkeypatch):
    out, unchanged = _one_update(monkeypatch, skip=True)
    assert out["skipped_minibatches"] == 1 and unchanged
