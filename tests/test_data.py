"""lol_rl.tasks.base.read_jsonl round trips and defaults (its refusals are in test_bad_input.py),
and the toy task's data and rewards."""

from __future__ import annotations

import json
import math
import random

import pytest

from lol_rl.rewards import RewardError, build_reward
from lol_rl.rewards.toy import correctness, positional_match
from lol_rl.tasks.base import Example, read_jsonl
from lol_rl.tasks.toy import NOISE_RATE, load_toy, wrong_answer

def _write(tmp_path, lines: list[str | bytes], name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def test_json_nan_literal_is_really_parsed_by_python():
    """The reason the loader must check: json.loads accepts NaN."""
    assert math.isnan(json.loads('{"reward": NaN}')["reward"])


def test_jsonl_round_trip(tmp_path):
    examples = [
        Example(id="r1", prompt="add: 2 + 2", response="Sure: 4.", reward=1.5,
                rewards={"correct": 1.0, "polite": 0.5}, rejected="Ugh. 5.", ranking=["Sure: 4.", "Ugh. 5."],
                meta={"skill": "add", "bad": False}),
        Example(id="r2", prompt="café ☕ «quoted» \"x\"", response="multi\nline\tresponse"),
        Example(id="r3", prompt="p", response="r", reward=-2.0, meta={}),
    ]
    path = tmp_path / "rt.jsonl"
    path.write_text("".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    assert read_jsonl(path) == examples


def test_read_jsonl_default_ids_and_values(tmp_path):
    path = _write(tmp_path, ['{"prompt": "p1", "response": "r1", "reward": 2}',
                             '{"prompt": "p2", "response": "r2", "rewards": {"a": 0.25, "b": 1}}'])
    rows = read_jsonl(path)
    assert [r.id for r in rows] == ["0", "1"]
    assert rows[0].reward == 2.0 and isinstance(rows[0].reward, float)
    assert rows[1].reward is None and rows[1].rewards == {"a": 0.25, "b": 1.0}


# ------------------------------------------------------------------ toy task

SIZES = {"train": 1500, "validation": 60, "test": 60}


@pytest.fixture(scope="module")
def reward():
    return build_reward(["correct", "polite", "concise"])


@pytest.fixture(scope="module")
def toy_splits():
    return {variant: load_toy(0, variant, SIZES) for variant in ("noisy", "clean")}


def _as_json(splits):
    return {k: [e.to_json() for e in v] for k, v in splits.items()}


def test_toy_is_deterministic(toy_splits):
    small = {"train": 50, "validation": 10, "test": 10}
    assert _as_json(load_toy(3, "noisy", small)) == _as_json(load_toy(3, "noisy", small))
    assert _as_json(load_toy(3, "noisy", small)) != _as_json(load_toy(4, "noisy", small))
    assert _as_json(load_toy(0, "noisy", SIZES)) == _as_json(toy_splits["noisy"])
    assert {k: len(v) for k, v in toy_splits["noisy"].items()} == SIZES


def test_toy_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        load_toy(0, "filthy", {"train": 5, "validation": 5, "test": 5})


def _check_rate(rows, rate, label):
    assert rows, label
    fraction = sum(bool(e.meta["bad"]) for e in rows) / len(rows)
    tolerance = 4 * math.sqrt(rate * (1 - rate) / len(rows))  # 4 binomial standard deviations
    assert abs(fraction - rate) < tolerance, (label, fraction, rate, tolerance, len(rows))


@pytest.mark.parametrize("variant", ["noisy", "clean"])
def test_toy_bad_fraction_near_noise_rate(toy_splits, variant):
    """NOISE_RATE[variant] is one rate, or one rate per prompt difficulty (meta['difficulty'])."""
    train = toy_splits[variant]["train"]
    rate = NOISE_RATE[variant]
    if isinstance(rate, dict):
        groups = {}
        for e in train:
            groups.setdefault(e.meta["difficulty"], []).append(e)
        assert set(groups) <= set(rate)
        for difficulty, rows in groups.items():
            if len(rows) >= 100:
                _check_rate(rows, rate[difficulty], f"{variant}/{difficulty}")
        expected = sum(rate[d] * len(rows) for d, rows in groups.items()) / len(train)
        _check_rate(train, expected, variant)
    else:
        _check_rate(train, rate, variant)
    # the noisy variant is noisier than the clean one
    rates = [NOISE_RATE[v] if not isinstance(NOISE_RATE[v], dict) else max(NOISE_RATE[v].values())
             for v in ("clean", "noisy")]
    assert rates[0] < rates[1]


@pytest.mark.parametrize("variant", ["noisy", "clean"])
def test_toy_eval_splits_never_bad(toy_splits, variant):
    for split in ("validation", "test"):
        assert not any(e.meta["bad"] for e in toy_splits[variant][split])


def test_toy_rankings(toy_splits, reward):
    for variant in ("noisy", "clean"):
        for split, examples in toy_splits[variant].items():
            ids = [e.id for e in examples]
            assert len(set(ids)) == len(ids)
            for e in examples:
                assert e.rejected == e.ranking[-1]
                assert e.ranking[0] == e.response
                assert len(e.ranking) >= 2
    rows = toy_splits["noisy"]["train"][:400] + toy_splits["noisy"]["validation"]
    prompts = [e.prompt for e in rows for _ in e.ranking]
    totals, _ = reward.score(prompts, [r for e in rows for r in e.ranking])
    start = 0
    for e in rows:
        row = totals[start : start + len(e.ranking)].tolist()
        start += len(e.ranking)
        assert all(a > b for a, b in zip(row, row[1:])), (e.ranking, row)
    assert start == len(totals)


def test_toy_good_responses_are_correct_and_concise(toy_splits, reward):
    good = [e for e in toy_splits["noisy"]["train"] if not e.meta["bad"]] + toy_splits["noisy"]["test"]
    assert len(good) > 100
    _, parts = reward.score([e.prompt for e in good], [e.response for e in good])
    assert (parts["correct"] == 1.0).all()
    assert (parts["concise"] == 1.0).all()
    assert ((parts["polite"] >= 0) & (parts["polite"] <= 1)).all()


def test_build_reward_unknown_component():
    with pytest.raises(RewardError, match="nicety"):
        build_reward(["correct", "nicety"])


# ------------------------------------------------------------------ hand-checked reward pieces

@pytest.mark.parametrize(
    "predicted, target, expected",
    [
        (["a", "b", "c"], ["a", "b", "c"], 1.0),
        (["a", "x", "c"], ["a", "b", "c", "d"], 2 / 4),
        (["a"], ["a", "b", "c"], 1 / 3),
        (["a", "b", "c", "d", "e"], ["a", "b"], 2 / 5),
        (["b", "a"], ["a", "b"], 0.0),
        ([], ["a"], 0.0),
        (["a"], [], 0.0),
    ],
)
def test_positional_match(predicted, target, expected):
    assert positional_match(predicted, target) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prompt, dropped, expected",
    [
        # 58 + 67 = 125; without carries 5+6 -> 1, 8+7 -> 5: "15". Right-aligned: 5|2|1 vs 5|1 -> 1 of 3
        ("add: 58 + 67", "15", 1 / 3),
        # 19 + 3 = 22; without the carry "12": 2|2 vs 2|1 -> 1 of 2
        ("add: 19 + 3", "12", 1 / 2),
        # 999 + 1 = 1000; without carries "990": 0|0|0|1 vs 0|9|9 -> 1 of 4
        ("add: 999 + 1", "990", 1 / 4),
        # 7 + 8 = 15; without the carry "5": 5|1 vs 5 -> 1 of 2
        ("add: 7 + 8", "5", 1 / 2),
    ],
)
def test_dropped_carry_gets_partial_credit(prompt, dropped, expected):
    assert wrong_answer(random.Random(0), prompt) == dropped
    assert correctness(prompt, f"Okay, sure: {dropped}.") == pytest.approx(expected)
    correct = str(eval(prompt.removeprefix("add: ")))
    assert correctness(prompt, f"Okay, sure: {correct}.") == 1.0


def test_correctness_lists_by_hand():
    # reverse: fox owl cat -> cat owl fox; the lazy copy matches only the middle word
    assert correctness("reverse: fox owl cat", "Okay, sure: fox owl cat.") == pytest.approx(1 / 3)
    assert correctness("reverse: fox owl cat", "Okay, sure: cat owl fox.") == 1.0
    assert correctness("sort: owl cat", "Okay, sure: cat.") == pytest.approx(1 / 2)
    assert correctness("repeat: owl cat", "no animals here") == 0.0
