"""lol_rl.losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lol_rl.losses import LOSSES, alol, importance_weight, nll, sequence_logprob

JUNK = -9.0  # a value at padding positions: it must never count

# three sequences, response lengths 2, 3 and 1 (right padded to 3)
LOGPROBS = [
    [-1.0, -2.0, JUNK],
    [-0.5, -0.5, -1.0],
    [-3.0, JUNK, JUNK],
]
MASK = [
    [True, True, False],
    [True, True, True],
    [True, False, False],
]
REF = [
    [-1.2, -2.1, JUNK],   # sum(lp - ref) = 0.2 + 0.1       =  0.3
    [-0.5, -0.7, -0.6],   # sum(lp - ref) = 0 + 0.2 - 0.4   = -0.2
    [-1.0, 3.0, 3.0],     # sum(lp - ref) = -2.0 (padding ignored)
]
ADV = [0.5, 2.0, 1.0]
EPS = 0.2  # clip range [0.8, 1.2]

# hand-computed quantities
SEQ_LP = [-3.0, -2.0, -3.0]
RATIO = [math.exp(0.3), math.exp(-0.2), math.exp(-2.0)]  # 1.3499, 0.8187, 0.1353
CLIPPED = [1.2, math.exp(-0.2), 0.8]                      # rows 0 and 2 clipped
B = 3


def _tensors(requires_grad=True):
    lp = torch.tensor(LOGPROBS, dtype=torch.float64, requires_grad=requires_grad)
    mask = torch.tensor(MASK)
    ref = torch.tensor(REF, dtype=torch.float64)
    adv = torch.tensor(ADV, dtype=torch.float64)
    return lp, mask, ref, adv


def test_sequence_logprob_sums_masked_tokens():
    lp, mask, _, _ = _tensors(False)
    assert sequence_logprob(lp, mask).tolist() == pytest.approx(SEQ_LP)


def test_nll_value_metrics_and_gradient():
    lp, mask, _, _ = _tensors()
    loss, metrics = nll(lp, mask)
    # -(-3 - 2 - 3) / 3
    assert loss.item() == pytest.approx(8.0 / 3.0)
    assert metrics["logprob"].item() == pytest.approx(-8.0 / 3.0)
    assert not metrics["logprob"].requires_grad
    loss.backward()
    expected = torch.tensor(MASK, dtype=torch.float64) * (-1.0 / B)
    torch.testing.assert_close(lp.grad, expected)


def test_alol_value_and_metrics_by_hand():
    lp, mask, ref, adv = _tensors()
    loss, metrics = alol(lp, mask, ref, adv, eps=EPS)
    # -(1/3) * (0.5 * 1.2 * -3  +  2.0 * e^-0.2 * -2  +  1.0 * 0.8 * -3)
    expected_loss = -(0.5 * 1.2 * -3.0 + 2.0 * math.exp(-0.2) * -2.0 + 1.0 * 0.8 * -3.0) / 3.0
    assert expected_loss == pytest.approx(2.491641, abs=1e-6)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9)
    # the metric `ratio` is the unclipped sequence-level ratio, averaged
    assert metrics["ratio"].item() == pytest.approx(sum(RATIO) / 3.0, rel=1e-9)
    assert metrics["clip_fraction"].item() == pytest.approx(2.0 / 3.0)
    assert metrics["logprob"].item() == pytest.approx(-8.0 / 3.0)
    assert metrics["weight"].item() == pytest.approx(3.5 / 3.0)
    for name, value in metrics.items():
        assert value.dim() == 0, name
        assert not value.requires_grad, name


def test_clipped_ratio_is_sequence_level_clamped_and_detached():
    lp, mask, ref, _ = _tensors()
    ratio = importance_weight(lp, ref, mask)
    weight = ratio.clamp(1 - EPS, 1 + EPS)
    assert ratio.tolist() == pytest.approx(RATIO, rel=1e-9)
    assert weight.tolist() == pytest.approx(CLIPPED, rel=1e-9)
    assert not weight.requires_grad and not ratio.requires_grad


def test_alol_gradient_is_minus_advantage_times_clipped_ratio_over_batch():
    lp, mask, ref, adv = _tensors()
    loss, _ = alol(lp, mask, ref, adv, eps=EPS)
    loss.backward()
    per_row = [-a * w / B for a, w in zip(ADV, CLIPPED)]  # -0.2, -0.5458, -0.2667
    expected = torch.tensor(MASK, dtype=torch.float64) * torch.tensor(per_row, dtype=torch.float64)[:, None]
    torch.testing.assert_close(lp.grad, expected, rtol=1e-9, atol=1e-12)
    # padding gets exactly zero gradient
    assert (lp.grad[~torch.tensor(MASK)] == 0).all()
    assert lp.grad[1, 0].item() == pytest.approx(-2.0 * math.exp(-0.2) / 3.0, rel=1e-9)


@pytest.mark.parametrize("gap", [50.0, -50.0])
def test_alol_finite_with_huge_log_ratio(gap):
    eps = 0.9
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -3.0]], dtype=torch.float32)
    lp = (ref + gap / 2).clone().requires_grad_(True)  # sequence gap of +-50 nats per row
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = torch.tensor([1.0, 3.0])
    loss, metrics = alol(lp, mask, ref, adv, eps=eps)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(lp.grad).all()
    weight = 1 + eps if gap > 0 else 1 - eps
    seq_lp = (lp.detach() * mask).sum(-1)
    expected_loss = -(adv * weight * seq_lp).mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert metrics["clip_fraction"].item() == 1.0
    expected_grad = (-adv * weight / 2)[:, None].expand(2, 2)
    torch.testing.assert_close(lp.grad, expected_grad)


def test_alol_equals_nll_at_ratio_one_and_unit_advantage():
    lp, mask, _, _ = _tensors()
    lp2 = lp.detach().clone().requires_grad_(True)
    ref = lp.detach().clone()  # pi_theta == pi_ref: ratio 1, inside the clip range
    loss_a, metrics = alol(lp, mask, ref, torch.ones(3, dtype=torch.float64), eps=0.2)
    loss_n, _ = nll(lp2, mask)
    loss_a.backward()
    loss_n.backward()
    assert metrics["ratio"].item() == pytest.approx(1.0)
    assert metrics["clip_fraction"].item() == 0.0
    assert loss_a.item() == pytest.approx(loss_n.item())
    torch.testing.assert_close(lp.grad, lp2.grad)


def test_alol_inside_clip_range_scales_nll_gradient_by_ratio():
    lp, mask, _, _ = _tensors()
    lp2 = lp.detach().clone().requires_grad_(True)
    # ref lower by 0.1 nats on the first token only: ratio e^0.1 = 1.105 per row, inside [0.8, 1.2]
    ref = lp.detach().clone()
    ref[:, 0] -= 0.1
    loss_a, metrics = alol(lp, mask, ref, torch.ones(3, dtype=torch.float64), eps=0.2)
    loss_n, _ = nll(lp2, mask)
    loss_a.backward()
    loss_n.backward()
    assert metrics["clip_fraction"].item() == 0.0
    torch.testing.assert_close(lp.grad, math.exp(0.1) * lp2.grad)


def test_registry_names():
    assert LOSSES["nll"] is nll and LOSSES["alol"] is alol
