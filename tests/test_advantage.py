"""The advantage and reference stages' pieces by hand, the ragged reference log-prob cache, and batch sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lol_rl.stages.advantage import audit, drop_precision_recall, spearman
from lol_rl.stages.reference import reference_logprobs, train_rewards
from lol_rl.data import TokenizedRows
from lol_rl.logprobs import pad_batch, response_logprobs
from lol_rl.rewards import CompositeReward
from lol_rl.tasks import Example, Task
from lol_rl.offline import BatchSource, call_loss, ragged_rows
from lol_rl.losses import alol, nll

PAD = 49
ROWS = TokenizedRows(
    prompt_ids=[[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]],
    response_ids=[[11, 12], [13, 14, 15, 16], [17], [18, 19, 20]],
    pad_id=PAD,
)


def test_advantages_and_drop_stats_by_hand():
    dropped = np.array([True, True, False, False, True])
    bad = np.array([True, False, True, False, True])
    precision, recall = drop_precision_recall(dropped, bad)
    assert precision == pytest.approx(2 / 3)  # 2 of the 3 dropped rows are bad
    assert recall == pytest.approx(2 / 3)     # 2 of the 3 bad rows are dropped


def test_spearman_with_ties_does_not_depend_on_row_order():
    rewards = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0])
    advantages = np.array([0.3, 0.1, 0.2, 0.5, 0.4, 0.9, -0.2, 0.0])
    order = np.random.default_rng(0).permutation(len(rewards))
    assert spearman(advantages, rewards) == spearman(advantages[order], rewards[order])
    # by hand: R's tied rows share their mean rank; Spearman is Pearson's r of the ranks
    ranks_r = np.array([4, 4, 4, 6.5, 6.5, 8, 1.5, 1.5])
    ranks_a = np.array([5, 3, 4, 7, 6, 8, 1, 2])
    assert spearman(advantages, rewards) == pytest.approx(np.corrcoef(ranks_a, ranks_r)[0, 1])


def test_spearman_by_hand():
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([30.0, 20.0, 10.0])) == pytest.approx(-1.0)
    # ranks 0 1 2 3 vs 0 2 1 3: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 30.0, 20.0, 40.0])) == pytest.approx(0.8)


def _examples(n_bad=2):
    return [Example(id=str(i), prompt="p", response="r", meta={"bad": i < n_bad, "skill": "s"}) for i in range(4)]


def test_audit_by_hand():
    rewards = np.array([1.0, 2.0, 3.0, 4.0])
    values = np.array([1.5, 1.0, 3.5, 1.0])
    adv = rewards - values  # -0.5, 1, -0.5, 3: rows 0 and 2 dropped
    report = audit(_examples(), rewards, values, adv)
    assert report["rows"] == 4 and report["kept"] == 2
    assert report["dropped_fraction"] == pytest.approx(0.5)
    assert report["mean_positive_advantage"] == pytest.approx(2.0)
    assert report["mean_reward"] == pytest.approx(2.5) and report["mean_value"] == pytest.approx(1.75)
    assert report["bad_fraction"] == pytest.approx(0.5)
    assert report["drop_precision"] == pytest.approx(0.5)  # dropped 0, 2; bad 0, 1
    assert report["drop_recall"] == pytest.approx(0.5)
    assert report["by_skill"]["s"]["kept_fraction"] == pytest.approx(0.5)


def test_audit_is_strict_json_when_nothing_is_dropped():
    """audit.json and the metrics.jsonl record are JSON files: a NaN literal is not JSON (the
    project's own loader rejects it). Happens whenever every row has A > 0."""
    rewards = np.array([1.0, 2.0, 3.0, 4.0])
    values = np.zeros(4)
    report = audit(_examples(), rewards, values, rewards - values)
    assert report["kept"] == 4
    json.dumps(report, allow_nan=False)


def _length(prompts, responses):
    return [len(r) for r in responses]


_length.max_value = 10.0  # a component declares its range; these responses are short


def test_train_rewards_given_or_scored():
    reward = CompositeReward({"len": _length})
    given = [Example(id="a", prompt="p", response="xy", reward=0.5),
             Example(id="b", prompt="p", response="xyz", rewards={"u": 0.25, "v": 1.0})]
    task = Task("t", {"train": given, "validation": given, "test": given}, reward, "{prompt}")
    values, parts = train_rewards(task, given)
    assert values.tolist() == [0.5, 1.25] and parts == {}
    mixed = [given[0], Example(id="c", prompt="p", response="abcd")]
    values, parts = train_rewards(task, mixed)
    assert values.tolist() == [2.0, 4.0] and parts["len"].tolist() == [2.0, 4.0]


def test_reference_logprobs_ragged_cache_matches_padded_batch(tiny_gpt2):
    flat, offsets = reference_logprobs(tiny_gpt2, ROWS, batch_size=3, device=torch.device("cpu"))
    assert offsets.tolist() == [0, 2, 6, 7, 10]
    assert flat.shape == (10,)
    for i in range(len(ROWS)):
        with torch.no_grad():
            alone, _ = response_logprobs(tiny_gpt2, pad_batch([ROWS.prompt_ids[i]], [ROWS.response_ids[i]], PAD))
        torch.testing.assert_close(flat[offsets[i]: offsets[i + 1]], alone[0], atol=1e-5, rtol=0)
    # rows back out of the ragged store, right padded with 0, aligned with a training batch
    indices = torch.tensor([3, 1, 1, 2])
    ragged = ragged_rows(flat, offsets, indices)
    with torch.no_grad():
        padded, mask = response_logprobs(tiny_gpt2, ROWS.batch(indices.tolist()))
    assert ragged.shape == padded.shape == (4, 4)
    torch.testing.assert_close(ragged, padded, atol=1e-5, rtol=0)
    assert (ragged[~mask] == 0).all()


def test_batch_source_keeps_and_weights():
    row_tensors = {"advantages": torch.tensor([5.0, -1.0, 0.0, 2.0])}
    keep = torch.tensor([0, 2, 3])
    weights = row_tensors["advantages"].clamp(min=0)  # row 2 has weight 0
    source = BatchSource(ROWS, row_tensors, {}, keep, weights, batch_size=64, seed=0)
    seen = []
    for _ in range(5):
        indices, batch = source.sample()
        seen += indices.tolist()
        torch.testing.assert_close(batch["advantages"], row_tensors["advantages"][indices])
        assert batch["input_ids"].shape[0] == 64
    counts = {i: seen.count(i) for i in range(4)}
    assert counts[1] == 0 and counts[2] == 0  # not kept / zero weight
    assert counts[0] > counts[3] > 0          # drawn in proportion 5 : 2
    assert 0.6 < counts[0] / len(seen) < 0.82
    # same seed, same draws
    again = BatchSource(ROWS, row_tensors, {}, keep, weights, batch_size=64, seed=0)
    assert again.sample()[0].tolist() == seen[:64]
    with pytest.raises(ValueError, match="zero"):
        BatchSource(ROWS, row_tensors, {}, torch.tensor([1, 2]), weights, batch_size=4, seed=0)


def test_call_loss_passes_named_tensors():
    lp = torch.tensor([[-1.0, -2.0]])
    mask = torch.tensor([[True, True]])
    tensors = {"logprobs": lp, "mask": mask, "ref_logprobs": lp, "advantages": torch.tensor([2.0]),
               "rewards": torch.tensor([9.0]), "input_ids": torch.zeros(1, 3)}
    loss, _ = call_loss(alol, {"eps": 0.5}, tensors)
    assert loss.item() == pytest.approx(6.0)  # -(2 * 1 * -3)
    loss, _ = call_loss(nll, {}, tensors)
    assert loss.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="advantages"):
        call_loss(alol, {"eps": 0.5}, {"logprobs": lp, "mask": mask, "ref_logprobs": lp})


def test_batch_source_refuses_an_empty_kept_set():
    rows = TokenizedRows([[1]], [[2]], 0)
    with pytest.raises(ValueError, match="no train row left to train on"):
        BatchSource(rows, {}, {}, torch.tensor([], dtype=torch.long), None, 4, 0)


def test_length_buckets_serve_the_rows_of_plain_draws_regrouped_by_length():
    lengths = torch.tensor([1, 9, 2, 8, 3, 7, 4, 6, 5, 10, 11, 12])
    rows = TokenizedRows([[1] * int(n) for n in lengths], [[2]] * len(lengths), 0)
    weights = torch.linspace(1.0, 2.0, len(lengths))
    plain = BatchSource(rows, {}, {}, torch.arange(len(lengths)), weights, batch_size=4, seed=3)
    bucketed = BatchSource(rows, {}, {}, torch.arange(len(lengths)), weights, batch_size=4, seed=3, length_buckets=4)
    plain_batches = [plain.draw() for _ in range(4)]
    bucketed_batches = [bucketed.draw() for _ in range(4)]
    assert sorted(torch.cat(bucketed_batches).tolist()) == sorted(torch.cat(plain_batches).tolist())

    def padding(batches):  # pad tokens a batch of prompt + response carries
        return sum(int((lengths[b].max() - lengths[b]).sum()) for b in batches)

    assert padding(bucketed_batches) < padding(plain_batches)
    spans = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in bucketed_batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))  # non-overlapping length ranges
