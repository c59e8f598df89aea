"""KTO: the loss against values worked out by hand and against TRL's KTOTrainer on the same
tensors; the mismatched pairs it reads; the threshold that splits rows into desirable and not."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
from omegaconf import OmegaConf

from lol_rl.data import MISMATCHED, TokenizedRows
from lol_rl.errors import ConfigError
from lol_rl.losses import LOSSES, kto

JUNK = -9.0  # padding: it must never count

# three rows, response lengths 2, 3 and 1: lp = [-3, -2, -3], lp_ref = [-3.3, -1.8, -1.0]
LOGPROBS = [[-1.0, -2.0, JUNK], [-0.5, -0.5, -1.0], [-3.0, JUNK, JUNK]]
MASK = [[True, True, False], [True, True, True], [True, False, False]]
REF = [[-1.2, -2.1, JUNK], [-0.5, -0.7, -0.6], [-1.0, 3.0, 3.0]]
LOG_RATIO = [0.3, -0.2, -2.0]
# mismatched pairs, lengths 1, 2, 2: lp - lp_ref = [0.5, 1.0, -0.3], mean 0.4
MIS = [[-2.0, JUNK], [-1.0, -1.0], [-0.6, -0.7]]
MIS_MASK = [[True, False], [True, True], [True, True]]
MIS_REF = [[-2.5, 5.0], [-1.5, -1.5], [-0.5, -0.5]]
Z0 = 0.4
REWARDS = [1.0, 0.0, 1.0]  # TRL labels True, False, True as task=hf reads them
BETA, DW, UW = 0.5, 1.0, 2.0


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def tensors(mismatched_shift: float = 0.0):
    """The tensors above; `mismatched_shift` raises the first token of each mismatched pair's
    reference log-prob, lowering its lp - lp_ref (and the batch mean) by as much."""
    mismatched_ref = torch.tensor(MIS_REF, dtype=torch.float64)
    mismatched_ref[:, 0] += mismatched_shift
    return {
        "logprobs": torch.tensor(LOGPROBS, dtype=torch.float64, requires_grad=True),
        "mask": torch.tensor(MASK),
        "ref_logprobs": torch.tensor(REF, dtype=torch.float64),
        "mismatched_logprobs": torch.tensor(MIS, dtype=torch.float64, requires_grad=True),
        "mismatched_mask": torch.tensor(MIS_MASK),
        "mismatched_ref_logprobs": mismatched_ref,
        "rewards": torch.tensor(REWARDS, dtype=torch.float64),
    }


def run(t, process_mean=None, threshold=0.5, **params):
    params = {"beta": BETA, "desirable_weight": DW, "undesirable_weight": UW, **params}
    return kto(**t, process_mean=process_mean, threshold=threshold, **params)


def test_kto_value_metrics_and_gradient_by_hand():
    t = tensors()
    loss, metrics = run(t)
    # desirable rows 0 and 2: 1 - sigmoid(beta (r - z0)); undesirable row 1: uw (1 - sigmoid(beta (z0 - r)))
    per_row = [DW * (1 - sigmoid(BETA * (0.3 - Z0))), UW * (1 - sigmoid(BETA * (Z0 + 0.2))),
               DW * (1 - sigmoid(BETA * (-2.0 - Z0)))]
    assert per_row == pytest.approx([0.5124974, 0.8511150, 0.7685248], abs=1e-7)
    assert loss.item() == pytest.approx(sum(per_row) / 3, rel=1e-12)
    assert loss.item() == pytest.approx(0.7107124, abs=1e-7)
    assert metrics["kl"].item() == pytest.approx(Z0)
    assert metrics["desirable_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["desirable_reward"].item() == pytest.approx(BETA * (0.3 - 2.0) / 2)
    assert metrics["undesirable_reward"].item() == pytest.approx(BETA * -0.2)
    assert metrics["logprob"].item() == pytest.approx(-8 / 3)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())

    grad, mismatched_grad = torch.autograd.grad(loss, [t["logprobs"], t["mismatched_logprobs"]], allow_unused=True)
    assert mismatched_grad is None  # z0 is detached: the mismatched pairs only set the reference point
    a = [BETA * (0.3 - Z0), BETA * (Z0 + 0.2), BETA * (-2.0 - Z0)]
    d_row = [-DW * BETA * sigmoid(a[0]) * (1 - sigmoid(a[0])) / 3,  # d/dr of the desirable term
             UW * BETA * sigmoid(a[1]) * (1 - sigmoid(a[1])) / 3,  # the undesirable one pushes r down
             -DW * BETA * sigmoid(a[2]) * (1 - sigmoid(a[2])) / 3]
    expected = torch.tensor(MASK, dtype=torch.float64) * torch.tensor(d_row, dtype=torch.float64)[:, None]
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_kto_reference_point_is_clamped_at_zero_after_the_mean_over_processes():
    # here the local mean is 0.4 - 1.0 = -0.6: alone it clamps to 0 ...
    _, alone = run(tensors(mismatched_shift=1.0))
    assert alone["kl"].item() == 0.0
    # ... averaged with another process's 1.0 it is 0.2 (TRL: gather, mean, then clamp)
    loss, metrics = run(tensors(mismatched_shift=1.0), process_mean=lambda kl: (kl + 1.0) / 2)
    assert metrics["kl"].item() == pytest.approx(0.2)
    z0 = 0.2
    expected = (1 - sigmoid(BETA * (0.3 - z0)) + UW * (1 - sigmoid(BETA * (z0 + 0.2))) + 1 - sigmoid(BETA * (-2.0 - z0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_kto_threshold_decides_the_classes():
    # threshold 1.0: R > 1 for no row, so every row is undesirable
    loss, metrics = run(tensors(), threshold=1.0)
    assert metrics["desirable_fraction"].item() == 0.0
    assert metrics["desirable_reward"].item() == 0.0  # an empty class averages to 0, not NaN
    expected = UW * sum(1 - sigmoid(BETA * (Z0 - r)) for r in LOG_RATIO) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_kto_at_pi_ref_is_half_per_row_times_its_weight():
    t = tensors()
    t["ref_logprobs"] = t["logprobs"].detach().clone()
    t["mismatched_ref_logprobs"] = t["mismatched_logprobs"].detach().clone()
    loss, metrics = run(t)
    assert metrics["kl"].item() == 0.0
    assert loss.item() == pytest.approx((DW * 0.5 * 2 + UW * 0.5) / 3)


def test_registered_with_the_keywords_its_yaml_sets():
    from lol_rl.algorithms import algorithm
    from lol_rl.cli import CONF_DIR

    assert LOSSES["kto"] is kto
    algo = algorithm(OmegaConf.merge({"trainer": "offline", "params": {}}, OmegaConf.load(CONF_DIR / "algo" / "kto.yaml")))
    assert algo.groups == ["response", MISMATCHED]
    assert algo.input_stages() == ("sft", "reference", "mismatched")


@pytest.mark.parametrize("key,value", [("desirable_weight", 0.0), ("undesirable_weight", -1.0),
                                       ("desirable_weight", "a lot")])
def test_a_class_weight_of_zero_or_less_stops_naming_the_key(key, value):
    from lol_rl.algorithms import algorithm
    from lol_rl.cli import CONF_DIR

    cfg = OmegaConf.merge({"trainer": "offline"}, OmegaConf.load(CONF_DIR / "algo" / "kto.yaml"))
    cfg.params[key] = value
    with pytest.raises(ConfigError, match=rf"^algo kto: params.{key} must be a number > 0, got {value!r}$"):
        algorithm(cfg)


# ---------------------------------------------------------------- against TRL


def trl_kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss on summed log-probs: a stand-in model serves each row's given
    log-prob (the last position of its sequence, indexed by the row's first token), the reference
    ones come precomputed (precompute_ref_logps), and one process gathers."""
    from trl.trainer.kto_trainer import KTOTrainer

    def model(input_ids, attention_mask, labels, use_cache=False, fused_lm_head=True):
        kl = bool(input_ids[0, 0] >= 100)
        values = torch.stack([(kl_logps if kl else logps)[int(i) % 100] for i in input_ids[:, 0]])
        zeros = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 2, dtype=values.dtype)
        return types.SimpleNamespace(log_probs=torch.cat([zeros, values[:, None]], dim=1),
                                     entropy=torch.zeros(zeros.shape[0], zeros.shape[1] + 1),
                                     mean_logits=torch.zeros(zeros.shape[0], zeros.shape[1] + 1))

    model.training = True
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(model=model, accelerator=accelerator, beta=beta, loss_type="kto",
                                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                    calculate_KL=True, precompute_ref_logps=True, aux_loss_enabled=False,
                                    _metrics={"train": defaultdict(list)}, _tp_size=1, _total_train_tokens=0)
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    n = len(labels)
    ids = torch.arange(n)[:, None].repeat(1, 3)
    batch = {"input_ids": ids, "attention_mask": torch.ones(n, 3, dtype=torch.long),
             "completion_mask": torch.tensor([[0, 0, 1]] * n), "KL_input_ids": ids + 100,
             "KL_attention_mask": torch.ones(n, 3, dtype=torch.long), "KL_completion_mask": torch.tensor([[0, 0, 1]] * n),
             "label": torch.tensor(labels), "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}
    return KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False), trainer._metrics["train"]


@pytest.mark.parametrize("weights,shift", [((1.0, 1.0), 0.0), ((1.0, 2.0), 0.0), ((1.33, 1.0), 1.0)],
                         ids=["equal-weights", "undesirable-x2", "z0-clamped"])
def test_kto_matches_trl(weights, shift):
    pytest.importorskip("trl")
    t = tensors(mismatched_shift=shift)
    dw, uw = weights
    ours, metrics = run(t, desirable_weight=dw, undesirable_weight=uw)
    (our_grad,) = torch.autograd.grad(ours, t["logprobs"])

    def summed(name, mask):
        return (t[name].detach() * t[mask]).sum(-1)

    logps = summed("logprobs", "mask").requires_grad_(True)
    theirs, their_metrics = trl_kto_loss(
        logps, summed("ref_logprobs", "mask"), summed("mismatched_logprobs", "mismatched_mask"),
        summed("mismatched_ref_logprobs", "mismatched_mask"), [r > 0.5 for r in REWARDS], BETA, dw, uw)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-15)
    assert metrics["kl"].item() == pytest.approx(their_metrics["kl"][-1], abs=1e-12)
    assert metrics["desirable_reward"].item() == pytest.approx(their_metrics["rewards/chosen"][-1], abs=1e-12)
    # our gradient per token is TRL's per summed log-prob, on every response token
    torch.testing.assert_close(our_grad, t["mask"].double() * their_grad[:, None], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- mismatched pairs and the threshold


def test_mismatched_pairs_are_each_prompt_with_the_previous_rows_response():
    rows = TokenizedRows(prompt_ids=[[1], [2], [3]], response_ids=[[7], [8, 9], [10]], pad_id=0)
    assert rows.expand([MISMATCHED]) == [MISMATCHED]
    assert rows.groups == ["response"]  # derived, not a group of the data: the reference stage leaves it alone
    assert rows.group(MISMATCHED) == [[10], [7], [8, 9]]
    batch = rows.batch([0, 2], ["response", MISMATCHED])
    assert batch["response_lengths"].tolist() == [1, 1, 1, 2]  # response 0, 2, then mismatched 0 (row 2's), 2 (row 1's)


def _resolve(tmp_path, rewards, threshold):
    from lol_rl import artifacts
    from lol_rl.stages.rl import resolve_threshold

    torch.save({"rewards": torch.tensor(rewards, dtype=torch.float64)}, tmp_path / artifacts.REFERENCE_TENSORS)
    cfg = OmegaConf.create({"algo": {"name": "kto", "params": {"beta": 0.1, "threshold": threshold}}})
    return resolve_threshold(cfg, {"reference": tmp_path})


def test_a_null_threshold_is_the_mean_train_reward_which_on_labels_is_the_label(tmp_path):
    labels = [1.0, 0.0, 0.0, 1.0, 1.0]
    threshold = _resolve(tmp_path, labels, None).algo.params.threshold
    assert threshold == pytest.approx(0.6)
    assert [r > threshold for r in labels] == [True, False, False, True, True]
    assert _resolve(tmp_path, [1.8, 2.4, 2.9], 2.0).algo.params.threshold == 2.0  # a given one is kept


@pytest.mark.parametrize("rewards,threshold,message", [
    ([1.75, 2.1, 2.95], 0.5, "algo kto: algo.params.threshold=0.5 makes all 3 train rows desirable (R > threshold); "
                             "train rewards span 1.75..2.95, and it needs rows on both sides"),
    ([1.0, 1.0], None, "algo kto: the mean train reward 1 (algo.params.threshold=null) makes all 2 train rows "
                       "undesirable (R <= threshold); train rewards span 1..1, and it needs rows on both sides"),
])
def test_a_threshold_with_every_row_on_one_side_is_one_line(tmp_path, rewards, threshold, message):
    with pytest.raises(ConfigError) as err:
        _resolve(tmp_path, rewards, threshold)
    assert str(err.value) == message
