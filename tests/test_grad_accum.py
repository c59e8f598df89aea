"""Gradient accumulation: `batch_size` stays the optimizer batch and `grad_accum` k micro-batches
of it give the same loss, gradient and weights as the whole batch at once (up to float
rounding), for every loss family: single responses, pairs, rankings, and PPO's token means."""

from __future__ import annotations

import copy
import inspect
import json
import zlib

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny_gpt2
from lol_rl.data import TokenizedRows
from lol_rl.errors import ConfigError
from lol_rl.losses import LOSSES
from lol_rl.offline import BatchSource, optimize
from lol_rl.pipeline import check_batches_split, check_ppo_minibatches
from lol_rl.tracking import MetricsLogger

PARAMS = {"eps": 0.2, "beta": 0.1, "u": 0.1, "sft_weight": 0.05, "desirable_weight": 1.0, "undesirable_weight": 1.5,
          "threshold": 0.5}


def loss_tensors(batch: int = 16, width: int = 6, ranked: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor any loss reads, float64, with uneven response lengths."""
    g = torch.Generator().manual_seed(seed)

    def mask(*shape):
        lengths = torch.randint(1, width + 1, shape, generator=g)
        return torch.arange(width) < lengths[..., None]

    def logprobs(m):
        return (-torch.rand(m.shape, generator=g, dtype=torch.float64) * 3).masked_fill(~m, 0.0)

    t = {"mask": mask(batch), "rejected_mask": mask(batch), "ranking_mask": mask(batch, ranked)}
    for prefix in ("", "rejected_", "ranking_"):
        t[f"{prefix}logprobs"] = logprobs(t[f"{prefix}mask"]).requires_grad_()
        t[f"{prefix}ref_logprobs"] = logprobs(t[f"{prefix}mask"])
    # KTO's mismatched pairs, below their reference everywhere: z0 = max(0, mean KL) is 0 in the whole
    # batch and in every part of it. A batch-level statistic cannot be exact over micro-batches
    # otherwise: like TRL's, KTO's z0 is each micro-batch's own estimate under grad_accum.
    t["mismatched_mask"] = mask(batch)
    t["mismatched_ref_logprobs"] = logprobs(t["mismatched_mask"])
    t["mismatched_logprobs"] = (t["mismatched_ref_logprobs"] - 0.1).masked_fill(~t["mismatched_mask"], 0.0)
    t["advantages"] = torch.rand(batch, generator=g, dtype=torch.float64)
    t["rewards"] = torch.rand(batch, generator=g, dtype=torch.float64) * 2 - 0.5
    t["ranking_rewards"] = torch.rand(batch, ranked, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    return t


def call(name: str, t: dict, rows=slice(None)):
    fn = LOSSES[name]
    parameters = inspect.signature(fn).parameters.values()
    named = {p.name: p.kind for p in parameters}
    args = {p.name: t[p.name][rows] for p in parameters  # process_mean keeps its default: one process
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty}
    return fn(**args, **{k: PARAMS[k] for k, kind in named.items() if kind is inspect.Parameter.KEYWORD_ONLY})


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_offline_loss_is_the_mean_of_its_micro_batches(name):
    """The 1/k weighting of offline.accumulate_gradients is exact only for losses that are means
    over rows: checked for every registered loss, value and gradient, in float64."""
    t = loss_tensors()
    leaves = [t[k] for k in ("logprobs", "rejected_logprobs", "ranking_logprobs")]
    full, _ = call(name, t)
    full_grads = torch.autograd.grad(full, leaves, allow_unused=True, materialize_grads=True)
    parts = [call(name, t, slice(i, i + 4))[0] / 4 for i in range(0, 16, 4)]
    accumulated = sum(parts)
    grads = torch.autograd.grad(accumulated, leaves, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(accumulated, full, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- the offline loop on a tiny model ------------------------------------------------------------

ROWS, VOCAB, RANKED = 32, 50, 3


def tokenized_rows() -> TokenizedRows:
    g = torch.Generator().manual_seed(1)

    def ids(low, high):
        return [torch.randint(1, VOCAB - 1, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
                for _ in range(ROWS)]

    ranking = [ids(1, 9) for _ in range(RANKED)]
    extra = {"rejected": ranking[-1], **{f"ranking/{k}": ranking[k] for k in range(RANKED)}}
    return TokenizedRows(prompt_ids=ids(2, 12), response_ids=ranking[0], pad_id=VOCAB - 1, extra_responses=extra)


def ragged_reference(rows: TokenizedRows, group: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(group.encode()))  # not hash(): it differs between processes
    lengths = torch.tensor([len(r) for r in rows.group(group)])
    return -torch.rand(int(lengths.sum()), generator=g) * 4, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def without_key_bias(name: str, weight: torch.Tensor) -> torch.Tensor:
    """GPT-2's attention key bias has a true gradient of 0 (softmax ignores a shift of every
    score), so its gradient is rounding noise (~1e-11) that Adam's normalisation turns into moves
    of ~1e-5 either way: compared, it would test the noise. Every other weight is compared."""
    if not name.endswith("c_attn.bias"):
        return weight
    width = weight.shape[0] // 3
    return torch.cat([weight[:width], weight[2 * width :]])


FAMILIES = {  # loss, response groups, sampling: uniform draws, priority draws, shuffled passes, length buckets
    "nll": ("nll", ["response"], {}),
    "alol": ("alol", ["response"], {"weights": "advantages", "length_buckets": 4}),
    "dpo": ("dpo", ["response", "rejected"], {"shuffle": True}),
    "pro": ("pro", ["ranking/0", "ranking/1", "ranking/2"], {}),
}


def train(tmp_path, family: str, grad_accum: int, steps: int = 3, name: str = ""):
    loss, groups, sampling = FAMILIES[family]
    rows = tokenized_rows()
    g = torch.Generator().manual_seed(2)
    row_tensors = {"advantages": torch.rand(ROWS, generator=g), "rewards": torch.rand(ROWS, generator=g),
                   "ranking_rewards": torch.rand(ROWS, RANKED, generator=g).sort(dim=1, descending=True).values}
    ragged = {group: ragged_reference(rows, group) for group in groups}
    weights = row_tensors[sampling["weights"]] if "weights" in sampling else None
    source = BatchSource(rows, row_tensors, ragged, torch.arange(ROWS), weights, 16, seed=3, groups=groups,
                         shuffle=sampling.get("shuffle", False), length_buckets=sampling.get("length_buckets", 1))
    model = make_tiny_gpt2(seed=4, vocab_size=VOCAB)
    opt_cfg = OmegaConf.create({"steps": steps, "lr": 1e-2, "weight_decay": 0.01, "schedule": "linear",
                                "warmup_steps": 1, "grad_clip": 1.0, "log_interval": 1, "skip_nonfinite": False,
                                "grad_accum": grad_accum})
    metrics = tmp_path / f"{family}-{grad_accum}{name}.jsonl"
    params = {k: PARAMS[k] for k in inspect.signature(LOSSES[loss]).parameters if k in PARAMS}
    optimize(model, source, LOSSES[loss], params, opt_cfg, device=torch.device("cpu"), stage="rl",
             metrics=MetricsLogger(metrics))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return model, records


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sixteen_rows_as_four_micro_batches_of_four_train_like_sixteen_at_once(tmp_path, family):
    whole, whole_records = train(tmp_path, family, grad_accum=1)
    accumulated, accumulated_records = train(tmp_path, family, grad_accum=4)
    assert len(whole_records) == len(accumulated_records) == 3
    for a, b in zip(whole_records, accumulated_records):  # per step: loss, gradient norm, every metric of the loss
        assert a.keys() == b.keys()
        for name in a:
            if name not in ("seconds",):
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (family, a["step"], name)
    for (name, p), q in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"{family}: gradient of {name}")
        torch.testing.assert_close(without_key_bias(name, q), without_key_bias(name, p), rtol=1e-5, atol=1e-5,
                                   msg=f"{family}: {name} after 3 steps")
    moved = any(not torch.equal(p, q) for p, q in zip(whole.parameters(), make_tiny_gpt2(4, VOCAB).parameters()))
    assert moved  # the comparison is of trained weights


def test_grad_accum_one_is_the_one_batch_step_bit_for_bit(tmp_path, monkeypatch):
    """With grad_accum 1 the step is the whole batch's forward and backward, unscaled."""
    whole, records = train(tmp_path, "alol", grad_accum=1, steps=2)
    import lol_rl.offline as offline

    def one_batch(model, source, parts, loss_fn, params, device):  # the step as it was before accumulation
        (part,) = parts
        loss, metrics = offline.loss_on_batch(model, offline.to_device(source.batch(part), device), source.groups,
                                              loss_fn, params)
        loss.backward()
        return loss, metrics

    monkeypatch.setattr(offline, "accumulate_gradients", one_batch)
    again, again_records = train(tmp_path, "alol", grad_accum=1, steps=2, name="-before")
    for p, q in zip(whole.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert [r["loss"] for r in records] == [r["loss"] for r in again_records]


# --- preflight ---------------------------------------------------------------------------------

def test_a_batch_that_does_not_cut_into_micro_batches_stops_before_any_stage():
    cfg = OmegaConf.create({"sft": {"batch_size": 64, "grad_accum": 4}, "rl": {"batch_size": 16, "grad_accum": 4}})
    check_batches_split(cfg, 1)
    check_batches_split(cfg, 4)
    check_batches_split(cfg, 2, ("rl",))
    with pytest.raises(ConfigError, match=r"^rl.batch_size=16 cannot be cut into rl.grad_accum=4 equal micro-batches "
                                          r"on each of 3 processes; use a multiple of 12$"):
        check_batches_split(cfg, 3, ("rl",))
    cfg.sft.grad_accum = 3
    with pytest.raises(ConfigError, match=r"^sft.batch_size=64 cannot be cut into sft.grad_accum=3 equal "
                                          r"micro-batches; use a multiple of 3$"):
        check_batches_split(cfg, 1)


def test_ppo_minibatches_must_cut_into_micro_batches():
    cfg = OmegaConf.create({"rl": {"batch_size": 16, "grad_accum": 1}, "algo": {"params": {"minibatches": 3}}})
    check_ppo_minibatches(cfg)  # no accumulation: PPO's uneven last minibatch stays allowed
    cfg.rl.grad_accum, cfg.algo.params.minibatches = 2, 4
    check_ppo_minibatches(cfg)
    cfg.rl.grad_accum = 8
    with pytest.raises(ConfigError, match=r"^rl.batch_size=16 cannot be cut into algo.params.minibatches=4 minibatches "
                                          r"of rl.grad_accum=8 equal micro-batches; use a multiple of 32$"):
        check_ppo_minibatches(cfg)


def test_grad_accum_is_a_typed_key_with_a_range():
    from lol_rl.cli import CONF_DIR
    from lol_rl.config import validate
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["rl.grad_accum=0"])
    with pytest.raises(ConfigError, match=r"rl.grad_accum=0 is out of range; expected 1 <= rl.grad_accum"):
        validate(cfg)


# --- PPO: token means over a minibatch -----------------------------------------------------------

def ppo_update(grad_accum: int):
    from lol_rl.logprobs import pad_batch
    from lol_rl.stages.ppo import Rollouts, TokenValueHead, policy_outputs, ppo_epochs

    rows = tokenized_rows()
    batch = pad_batch(rows.prompt_ids[:16], rows.response_ids[:16], rows.pad_id)
    model = make_tiny_gpt2(seed=5, vocab_size=VOCAB)
    torch.manual_seed(6)
    value_head = TokenValueHead(model.config.hidden_size)
    with torch.no_grad():
        old_logprobs, _, old_values, mask = policy_outputs(model, value_head, batch)
    ref = (old_logprobs - 0.1 * torch.rand(old_logprobs.shape, generator=torch.Generator().manual_seed(7))) * mask
    scores = torch.linspace(-1, 1, 16)
    params = OmegaConf.create({"gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "epochs": 2, "minibatches": 2,
                               "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "ent_coef": 0.01})
    rollouts = Rollouts(batch, scores, old_logprobs, ref, old_values, mask)
    rollouts.estimate(params, 0.2, scores)
    trainable = torch.nn.ModuleDict({"policy": model, "value_head": value_head})
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    opt_cfg = OmegaConf.create({"grad_clip": 1.0, "skip_nonfinite": False, "grad_accum": grad_accum})
    metrics = ppo_epochs(model, value_head, rollouts, optimizer, scheduler, params, opt_cfg,
                         torch.Generator().manual_seed(8), 1, [str(i) for i in range(16)])
    return trainable, metrics


def test_ppo_minibatch_as_micro_batches_trains_like_the_whole_minibatch():
    whole, whole_metrics = ppo_update(1)
    accumulated, accumulated_metrics = ppo_update(4)
    assert whole_metrics.keys() == accumulated_metrics.keys()
    for name, value in whole_metrics.items():
        assert accumulated_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for (name, p), q in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(without_key_bias(name, q), without_key_bias(name, p), rtol=1e-5, atol=1e-5, msg=name)
