"""lol_rl.value_head.ValueHead and fit_value_head."""

from __future__ import annotations

import pytest
import torch

from lol_rl.value_head import ValueHead, fit_value_head, predict_values

H = 32


def _states(n=6, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, p, H, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])[:n]
    mask = torch.arange(p)[None, :] >= (p - lengths)[:, None]  # left padded, like prompt_states
    return states, mask


def test_padding_does_not_change_value():
    torch.manual_seed(0)
    head = ValueHead(H, heads=2, dropout=0.1, max_value=3.0).eval()
    states, mask = _states()
    with torch.no_grad():
        base = head(states, mask)
        # three more masked positions on the left and two on the right, full of large junk
        junk_l = torch.randn(states.shape[0], 3, H) * 1e3
        junk_r = torch.randn(states.shape[0], 2, H) * 1e3
        padded = torch.cat([junk_l, states, junk_r], dim=1)
        padded_mask = torch.cat([torch.zeros(6, 3, dtype=torch.bool), mask, torch.zeros(6, 2, dtype=torch.bool)], 1)
        # also overwrite the already-masked positions with junk
        padded[~padded_mask] = torch.randn(int((~padded_mask).sum()), H) * 1e3
        out = head(padded, padded_mask)
        # each row alone, with no padding at all
        alone = torch.stack([head(states[i : i + 1, mask[i]], mask[i : i + 1, mask[i]])[0] for i in range(6)])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, base, atol=1e-5, rtol=0)
    # and the output does depend on the real tokens
    with torch.no_grad():
        changed = states.clone()
        changed[mask] += 5.0 * torch.randn(int(mask.sum()), H)
        assert (head(changed, mask) - base).abs().max() > 1e-3


def test_output_within_range():
    torch.manual_seed(1)
    head = ValueHead(H, heads=4, dropout=0.0, max_value=2.5).eval()
    states = torch.randn(64, 4, H) * 100.0
    mask = torch.ones(64, 4, dtype=torch.bool)
    with torch.no_grad():
        out = head(states, mask)
    assert out.shape == (64,)
    assert ((out >= 0.0) & (out <= 2.5)).all()
    assert out.std() > 0  # not a constant


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="value.heads=3"):
        ValueHead(H, heads=3, dropout=0.0, max_value=1.0)


@pytest.mark.parametrize("init_value", [0.6, 2.4])
def test_init_value_sets_initial_output(init_value):
    torch.manual_seed(2)
    head = ValueHead(H, heads=2, dropout=0.1, max_value=3.0, init_value=init_value).eval()
    states = torch.randn(128, 5, H)
    mask = torch.ones(128, 5, dtype=torch.bool)
    out = predict_values(head, states, mask, batch_size=50)
    assert out.shape == (128,)
    assert abs(out.mean().item() - init_value) < 0.1
    assert (out - init_value).abs().max().item() < 0.2


def test_fit_value_head_beats_constant_baseline():
    torch.manual_seed(0)
    n_prompts, k, p = 60, 3, 4
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, H, generator=g) * 2.0
    cluster = torch.arange(n_prompts) % 2
    states = centers[cluster][:, None, :] + 0.3 * torch.randn(n_prompts, p, H, generator=g)
    lengths = torch.randint(1, p + 1, (n_prompts,), generator=g)
    mask = torch.arange(p)[None, :] >= (p - lengths)[:, None]
    states[~mask] = 100.0 * torch.randn(int((~mask).sum()), H, generator=g)  # junk at padding
    prompt_index = torch.arange(n_prompts).repeat_interleave(k)
    targets = torch.where(cluster[prompt_index] == 0, 0.5, 2.5) + 0.05 * torch.randn(n_prompts * k, generator=g)
    heldout = torch.zeros(n_prompts, dtype=torch.bool)
    heldout[torch.randperm(n_prompts, generator=g)[:15]] = True

    train_targets = targets[~heldout[prompt_index]]
    test_targets = targets[heldout[prompt_index]]
    head = ValueHead(H, heads=2, dropout=0.0, max_value=3.0, init_value=float(train_targets.mean()))
    epochs = 8
    report = fit_value_head(head, states, mask, targets, prompt_index, heldout,
                            epochs=epochs, batch_size=32, lr=1e-2, seed=0)

    # bookkeeping, computed independently
    assert report["train_samples"] == int((~heldout).sum()) * k
    assert report["heldout_samples"] == 15 * k
    baseline = torch.mean((train_targets.mean() - test_targets) ** 2).item()
    assert report["constant_baseline_mse"] == pytest.approx(baseline, rel=1e-5)
    assert baseline > 0.5  # two clusters 2 apart: a constant cannot fit them
    assert len(report["heldout_mse_by_epoch"]) == epochs + 1
    assert report["heldout_mse"] == pytest.approx(min(report["heldout_mse_by_epoch"]))
    assert report["heldout_mse_by_epoch"][report["best_epoch"]] == report["heldout_mse"]
    # the head is left at its best epoch, in eval mode
    assert not head.training
    with torch.no_grad():
        idx = prompt_index[heldout[prompt_index]]
        mse = torch.mean((head(states[idx], mask[idx]) - test_targets) ** 2).item()
    assert mse == pytest.approx(report["heldout_mse"], rel=1e-4, abs=1e-7)
    # and it learned the clusters
    assert report["best_epoch"] > 0
    assert report["heldout_mse"] < 0.1 * baseline
    assert report["heldout_mse"] < 0.1


def test_fit_value_head_keeps_best_heldout_epoch():
    """Training targets that disagree with the held-out ones make every epoch worse than the
    start: the head must come back to its initial weights, with best_epoch 0."""
    torch.manual_seed(3)
    n_prompts, k = 20, 2
    states = torch.randn(n_prompts, 3, H)
    mask = torch.ones(n_prompts, 3, dtype=torch.bool)
    prompt_index = torch.arange(n_prompts).repeat_interleave(k)
    heldout = torch.arange(n_prompts) % 4 == 0
    targets = torch.where(heldout[prompt_index], 0.5, 2.9)
    head = ValueHead(H, heads=2, dropout=0.0, max_value=3.0, init_value=0.5)
    initial = {name: t.clone() for name, t in head.state_dict().items()}
    with torch.no_grad():
        start_mse = torch.mean((head(states[heldout], mask[heldout]) - 0.5) ** 2).item()
    report = fit_value_head(head, states, mask, targets, prompt_index, heldout,
                            epochs=3, batch_size=8, lr=1e-2, seed=0)
    assert report["best_epoch"] == 0
    assert report["heldout_mse"] == pytest.approx(start_mse, rel=1e-5)
    assert all(m > start_mse for m in report["heldout_mse_by_epoch"][1:])
    assert report["constant_baseline_mse"] == pytest.approx((2.9 - 0.5) ** 2, rel=1e-5)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0, msg=name)
