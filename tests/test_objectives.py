"""Every offline objective against numbers worked out by hand, the identities between them,
their gradients, and their stability at log-prob gaps of +-50 (importance ratios of e^50)."""

from __future__ import annotations

import math

import pytest
import torch

from lol_rl.losses import LOSSES, alol_seq, dpo, dpo_ref_free, gold, nll, pro, rlol, wbc

# two responses: 2 and 3 tokens; the third entry of row 0 is padding (junk that must not count)
LOGPROBS = [[-1.0, -2.0, -9.0], [-0.5, -0.5, -1.0]]  # lp = [-3.0, -2.0]
MASK = [[True, True, False], [True, True, True]]
REF = [[-1.5, -2.0, -7.0], [-0.5, -1.0, -1.0]]  # lp_ref = [-3.5, -2.5]: both ratios e^0.5
REWARDS = [2.0, 1.0]
ADVANTAGES = [0.5, 1.5]
EPS = 0.2


def tensors(requires_grad=True):
    logprobs = torch.tensor(LOGPROBS, dtype=torch.float64, requires_grad=requires_grad)
    return {
        "logprobs": logprobs,
        "mask": torch.tensor(MASK),
        "ref_logprobs": torch.tensor(REF, dtype=torch.float64),
        "rewards": torch.tensor(REWARDS, dtype=torch.float64),
        "advantages": torch.tensor(ADVANTAGES, dtype=torch.float64),
    }


def test_wbc_by_hand():
    t = tensors()
    loss, _ = wbc(t["logprobs"], t["mask"], t["rewards"])
    assert loss.item() == pytest.approx(-(2.0 * -3.0 + 1.0 * -2.0) / 2)  # 4.0


def test_rlol_by_hand_clips_the_sequence_ratio():
    t = tensors()
    loss, metrics = rlol(t["logprobs"], t["mask"], t["ref_logprobs"], t["rewards"], eps=EPS)
    # ratio e^0.5 = 1.6487 > 1.2 for both rows: clipped to 1.2
    assert loss.item() == pytest.approx(-(2.0 * 1.2 * -3.0 + 1.0 * 1.2 * -2.0) / 2)  # 4.8
    assert metrics["ratio"].item() == pytest.approx(math.exp(0.5))
    assert metrics["clip_fraction"].item() == 1.0


def test_alol_variants_by_hand():
    t = tensors()
    args = (t["logprobs"], t["mask"])
    assert LOSSES["alol"](*args, t["ref_logprobs"], t["advantages"], eps=EPS)[0].item() == pytest.approx(
        -(0.5 * 1.2 * -3.0 + 1.5 * 1.2 * -2.0) / 2)  # 2.7
    assert LOSSES["alol_ref_free"](*args, t["advantages"])[0].item() == pytest.approx(
        -(0.5 * -3.0 + 1.5 * -2.0) / 2)  # 2.25
    loss, metrics = LOSSES["alol_kl"](*args, t["ref_logprobs"], t["advantages"], beta=0.1)
    assert metrics["kl"].item() == pytest.approx(0.5)  # mean(lp - lp_ref) = mean(0.5, 0.5)
    assert loss.item() == pytest.approx(2.25 + 0.1 * 0.5)


def test_alol_seq_by_hand_clips_each_token():
    t = tensors()
    loss, metrics = alol_seq(t["logprobs"], t["mask"], t["ref_logprobs"], t["advantages"], eps=EPS)
    # token ratios: row 0 [e^0.5 -> 1.2, 1]; row 1 [1, e^0.5 -> 1.2, 1]
    row0 = 1.2 * -1.0 + 1.0 * -2.0  # -3.2
    row1 = 1.0 * -0.5 + 1.2 * -0.5 + 1.0 * -1.0  # -2.1
    assert loss.item() == pytest.approx(-(0.5 * row0 + 1.5 * row1) / 2)  # 2.375
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)  # 2 of the 5 real tokens


def test_gold_by_hand():
    t = tensors()
    loss, _ = gold(t["logprobs"], t["mask"], t["rewards"], u=0.3)
    row0 = math.exp(-1.0) * -1.0 + 0.3 * -2.0  # p = e^-2 = 0.135 is raised to u = 0.3
    row1 = 2 * math.exp(-0.5) * -0.5 + math.exp(-1.0) * -1.0
    assert loss.item() == pytest.approx(-(2.0 * row0 + 1.0 * row1) / 2)


REJECTED = [[-2.0, -1.0, -1.0], [-3.0, -5.0, -5.0]]  # lp_l = [-4.0, -3.0]
REJECTED_MASK = [[True, True, True], [True, False, False]]
REJECTED_REF = [[-1.0, -1.0, -1.0], [-4.0, 0.0, 0.0]]  # lp_ref_l = [-3.0, -4.0]


def pair_tensors():
    t = tensors()
    t["rejected_logprobs"] = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    t["rejected_mask"] = torch.tensor(REJECTED_MASK)
    t["rejected_ref_logprobs"] = torch.tensor(REJECTED_REF, dtype=torch.float64)
    return t


def test_dpo_by_hand():
    t = pair_tensors()
    loss, metrics = dpo(t["logprobs"], t["mask"], t["ref_logprobs"], t["rejected_logprobs"], t["rejected_mask"],
                        t["rejected_ref_logprobs"], beta=0.5)
    # margins: 0.5 * ((-3 + 3.5) - (-4 + 3)) = 0.75 and 0.5 * ((-2 + 2.5) - (-3 + 4)) = -0.25
    expected = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(0.25))) / 2
    assert loss.item() == pytest.approx(expected)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == pytest.approx(0.25)


def test_dpo_ref_free_by_hand():
    t = pair_tensors()
    loss, _ = dpo_ref_free(t["logprobs"], t["mask"], t["rejected_logprobs"], t["rejected_mask"], beta=0.5)
    # margins: 0.5 * (-3 - -4) = 0.5 and 0.5 * (-2 - -3) = 0.5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_pro_by_hand():
    ranking = torch.tensor([[[-1.0, -1.0], [-2.0, -2.0], [-3.0, -8.0]]], requires_grad=True)
    mask = torch.tensor([[[True, True], [True, True], [True, False]]])
    rewards = torch.tensor([[3.0, 2.0, 0.5]])
    loss, metrics = pro(ranking, mask, rewards, sft_weight=0.05)
    # length-normalised scores s = [-1, -2, -3]; summed log-prob of the best: -2
    rank0 = math.log(math.exp(-1 * 2.5) + math.exp(-2 * 1.0) + math.exp(-3 * 2.5)) + 2.5  # temps [1, 2.5], top 2.5
    rank1 = math.log(math.exp(-2 * 1.5) + math.exp(-3 * 1.5)) + 3.0  # temps [1.5], top 1.5
    sft = 0.05 * (3 - 1) ** 2 * 2.0
    assert loss.item() == pytest.approx(rank0 + rank1 + sft, rel=1e-6)
    assert metrics["sft_loss"].item() == pytest.approx(2.0)


# identities ---------------------------------------------------------------------------------

def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


def test_rlol_with_reward_one_and_ratio_one_is_nll():
    t = tensors()
    same_ref = t["logprobs"].detach().clone()
    ones = torch.ones(2, dtype=torch.float64)
    loss_r, _ = rlol(t["logprobs"], t["mask"], same_ref, ones, eps=EPS)
    loss_n, _ = nll(t["logprobs"], t["mask"])
    assert loss_r.item() == pytest.approx(loss_n.item())
    assert torch.allclose(grads(loss_r, t["logprobs"])[0], grads(loss_n, t["logprobs"])[0])


def test_alol_ref_free_is_advantage_weighted_nll():
    t = tensors()
    loss, _ = LOSSES["alol_ref_free"](t["logprobs"], t["mask"], t["advantages"])
    by_hand = -(t["advantages"] * (t["logprobs"] * t["mask"]).sum(-1)).mean()
    assert loss.item() == pytest.approx(by_hand.item())


def test_alol_seq_inside_the_clip_range_is_the_unclipped_per_token_form():
    t = tensors()
    near_ref = t["logprobs"].detach() - 0.05  # every token ratio e^0.05 = 1.051, inside [0.8, 1.2]
    loss, metrics = alol_seq(t["logprobs"], t["mask"], near_ref, t["advantages"], eps=EPS)
    ratio = (t["logprobs"].detach() - near_ref).exp()
    unclipped = -(t["advantages"] * (ratio * t["logprobs"] * t["mask"]).sum(-1)).mean()
    assert loss.item() == pytest.approx(unclipped.item())
    assert metrics["clip_fraction"].item() == 0.0


def test_dpo_with_policy_equal_to_reference_is_log_2():
    t = pair_tensors()
    loss, _ = dpo(t["logprobs"], t["mask"], t["logprobs"].detach(), t["rejected_logprobs"], t["rejected_mask"],
                  t["rejected_logprobs"].detach(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))


def test_gold_with_u_one_is_wbc():
    t = tensors()
    loss_g, _ = gold(t["logprobs"], t["mask"], t["rewards"], u=1.0)
    loss_w, _ = wbc(t["logprobs"], t["mask"], t["rewards"])
    assert loss_g.item() == pytest.approx(loss_w.item())
    assert torch.allclose(grads(loss_g, t["logprobs"])[0], grads(loss_w, t["logprobs"])[0])


# gradients ----------------------------------------------------------------------------------

def test_clipped_ratio_passes_no_gradient_of_its_own():
    """The weight is detached: d loss / d logprob_i = -w * clip(r) / B on every real token,
    also on a row whose ratio is clipped (no gradient through the ratio itself)."""
    t = tensors()
    loss, _ = rlol(t["logprobs"], t["mask"], t["ref_logprobs"], t["rewards"], eps=EPS)
    (grad,) = grads(loss, t["logprobs"])
    expected = torch.tensor([[-2.0 * 1.2 / 2, -2.0 * 1.2 / 2, 0.0], [-1.2 / 2] * 3], dtype=torch.float64)
    assert torch.allclose(grad, expected)


def test_alol_seq_gradient_is_per_token_clipped_weight():
    t = tensors()
    loss, _ = alol_seq(t["logprobs"], t["mask"], t["ref_logprobs"], t["advantages"], eps=EPS)
    (grad,) = grads(loss, t["logprobs"])
    expected = torch.tensor([[-0.5 * 1.2 / 2, -0.5 * 1.0 / 2, 0.0],
                             [-1.5 * 1.0 / 2, -1.5 * 1.2 / 2, -1.5 * 1.0 / 2]], dtype=torch.float64)
    assert torch.allclose(grad, expected)


def test_gold_token_weight_is_detached():
    t = tensors()
    loss, _ = gold(t["logprobs"], t["mask"], t["rewards"], u=0.3)
    (grad,) = grads(loss, t["logprobs"])
    expected = torch.tensor([[-2.0 * math.exp(-1.0) / 2, -2.0 * 0.3 / 2, 0.0],
                             [-math.exp(-0.5) / 2, -math.exp(-0.5) / 2, -math.exp(-1.0) / 2]], dtype=torch.float64)
    assert torch.allclose(grad, expected)


def _all_loss_calls(gap: float):
    """Each registered loss on the same tensors with the reference `gap` nats away per token."""
    t = pair_tensors()
    t["ref_logprobs"] = t["logprobs"].detach() + gap
    t["rejected_ref_logprobs"] = t["rejected_logprobs"].detach() - gap
    ranking = torch.stack([t["logprobs"], t["rejected_logprobs"]], dim=1)
    ranking_mask = torch.stack([t["mask"], t["rejected_mask"]], dim=1)
    calls = {
        "nll": lambda: nll(t["logprobs"], t["mask"]),
        "wbc": lambda: wbc(t["logprobs"], t["mask"], t["rewards"]),
        "gold": lambda: gold(t["logprobs"], t["mask"], t["rewards"], u=0.1),
        "rlol": lambda: rlol(t["logprobs"], t["mask"], t["ref_logprobs"], t["rewards"], eps=0.9),
        "alol": lambda: LOSSES["alol"](t["logprobs"], t["mask"], t["ref_logprobs"], t["advantages"], eps=0.9),
        "alol_ref_free": lambda: LOSSES["alol_ref_free"](t["logprobs"], t["mask"], t["advantages"]),
        "alol_seq": lambda: alol_seq(t["logprobs"], t["mask"], t["ref_logprobs"], t["advantages"], eps=0.9),
        "alol_kl": lambda: LOSSES["alol_kl"](t["logprobs"], t["mask"], t["ref_logprobs"], t["advantages"], beta=0.1),
        "dpo": lambda: dpo(t["logprobs"], t["mask"], t["ref_logprobs"], t["rejected_logprobs"], t["rejected_mask"],
                           t["rejected_ref_logprobs"], beta=0.1),
        "dpo_ref_free": lambda: dpo_ref_free(t["logprobs"], t["mask"], t["rejected_logprobs"], t["rejected_mask"],
                                             beta=0.1),
        "pro": lambda: pro(ranking, ranking_mask, torch.tensor([[2.0, 1.0], [1.0, 0.5]], dtype=torch.float64),
                           sft_weight=0.05),
        # the rejected responses stand in for the mismatched pairs, their reference -gap nats away
        "kto": lambda: LOSSES["kto"](t["logprobs"], t["mask"], t["ref_logprobs"], t["rejected_logprobs"],
                                     t["rejected_mask"], t["rejected_ref_logprobs"], t["rewards"], beta=0.1,
                                     desirable_weight=1.0, undesirable_weight=1.0, threshold=1.5),
    }
    return t, calls


@pytest.mark.parametrize("gap", [50.0, -50.0])
def test_every_loss_is_finite_at_huge_ratios(gap):
    t, calls = _all_loss_calls(gap)
    assert set(calls) == set(LOSSES), "a loss was added without a stability check"
    for name, call in calls.items():
        loss, metrics = call()
        (grad,) = torch.autograd.grad(loss, t["logprobs"])
        assert torch.isfinite(loss), name
        assert torch.isfinite(grad).all(), name
        assert all(torch.isfinite(v) for v in metrics.values()), name
