"""lol_rl.scoring: distinct-n by hand, and the summary of scored generations."""

from __future__ import annotations

import pytest

from lol_rl.scoring import distinct_n, score_generations
from lol_rl.rewards import CompositeReward, RewardError
from lol_rl.tasks import Example, Task


@pytest.mark.parametrize(
    "texts, n, expected",
    [
        # unigrams the, cat, the | cat, dog: 3 unique of 5
        (["The cat the", "cat DOG"], 1, 3 / 5),
        # bigrams (the cat) (cat the) | (cat dog): no bigram across the two texts, 3 of 3
        (["The cat the", "cat DOG"], 2, 1.0),
        # counted over all texts together, not averaged per text: a a a | b -> 2 of 4 (not 2/3)
        (["a a a", "b"], 1, 2 / 4),
        # repeats across texts count once
        (["a b", "a b"], 1, 2 / 4),
        (["a b", "a b"], 2, 1 / 2),
        # lowercasing
        (["Hello hello HELLO"], 1, 1 / 3),
        (["Hello World", "hello world"], 2, 1 / 2),
        # whitespace tokens: punctuation is part of a token
        (["cat. cat"], 1, 2 / 2),
        # trigrams: x y z | x y z w -> (x y z) (x y z) (y z w): 2 of 3
        (["x y z", "x y z w"], 3, 2 / 3),
        # texts shorter than n give no n-grams; other texts still count
        (["a b", "c d e"], 3, 1.0),
        (["a b", "c"], 3, 0.0),
        ([], 1, 0.0),
        ([""], 1, 0.0),
    ],
)
def test_distinct_n_by_hand(texts, n, expected):
    assert distinct_n(texts, n) == pytest.approx(expected)


def _task(components):
    examples = [Example(id=f"t{i}", prompt=f"p{i}", response="r") for i in range(3)]
    return Task("hand", {"train": examples, "validation": examples, "test": examples},
                CompositeReward(components), "{prompt}")


def test_score_generations_summary_by_hand():
    task = _task({
        "words": lambda prompts, responses: [len(r.split()) / 10 for r in responses],
        "has_a": lambda prompts, responses: [1.0 if "a" in r.split() else 0.0 for r in responses],
    })
    responses = ["a b", "c d e f", "a"]
    summary, total, parts = score_generations(task.reward, task.splits["test"], responses)
    # words: 0.2, 0.4, 0.1; has_a: 1, 0, 1
    assert parts["words"].tolist() == pytest.approx([0.2, 0.4, 0.1])
    assert parts["has_a"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == pytest.approx([1.2, 0.4, 1.1])
    assert summary["reward"] == pytest.approx(2.7 / 3)
    assert summary["rewards"] == pytest.approx({"words": 0.7 / 3, "has_a": 2 / 3})
    assert summary["length"] == pytest.approx(7 / 3)
    # unigrams a b c d e f a: 6 of 7; bigrams ab cd de ef: 4 of 4; trigrams cde def: 2 of 2
    assert summary["distinct"] == pytest.approx([6 / 7, 1.0, 1.0])
    assert summary["n"] == 3


def test_non_finite_component_is_named():
    task = _task({"broken": lambda prompts, responses: [0.0, float("nan"), 1.0]})
    with pytest.raises(RewardError, match="'broken'.*prompt id t1"):
        score_generations(task.reward, task.splits["test"], ["x", "y", "z"])


def _length(prompts, responses):
    return [float(len(r)) for r in responses]


_length.max_value = 10.0  # a component declares its range; these responses are short


def test_segments_are_reported_separately():
    examples = [Example(id=f"t{i}", prompt=f"p{i}", response="r", meta={"segment": seg})
                for i, seg in enumerate(["harmless-base", "helpful-base", "harmless-base"])]
    reward = CompositeReward({"len": _length})
    summary, _, _ = score_generations(reward, examples, ["a", "bb", "ccc"])
    assert summary["segments"] == {"harmless-base": {"reward": 2.0, "n": 2}, "helpful-base": {"reward": 2.0, "n": 1}}
    assert summary["reward"] == pytest.approx(2.0)


def test_without_a_scorer_only_length_and_diversity_are_reported():
    examples = [Example(id="t0", prompt="p", response="r")]
    summary, total, parts = score_generations(None, examples, ["a b a"])
    assert summary["reward"] is None and summary["rewards"] == {} and total is None and parts == {}
    assert summary["length"] == 3 and summary["distinct"][0] == pytest.approx(2 / 3)
