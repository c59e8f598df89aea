"""Numerical guards: a non-finite loss stops training naming the step and the batch's rows,
unless skip_nonfinite, which skips the step (no parameter update) and counts it."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny_gpt2
from lol_rl.data import TokenizedRows
from lol_rl.losses import nll
from lol_rl.tracking import MetricsLogger
from lol_rl.loop import NonFiniteError
from lol_rl.offline import BatchSource, optimize

ROWS = TokenizedRows(prompt_ids=[[1, 2], [3, 4], [5, 6]], response_ids=[[7, 8], [9], [10, 11]], pad_id=0)
IDS = ["row-a", "row-b", "row-c"]


def nan_on_second_call():
    calls = {"n": 0}

    def loss_fn(logprobs, mask):
        calls["n"] += 1
        loss, metrics = nll(logprobs, mask)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    return loss_fn


def opt_cfg(skip: bool):
    return OmegaConf.create({"steps": 3, "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0,
                             "grad_clip": 1.0, "log_interval": 1, "skip_nonfinite": skip})


def test_non_finite_loss_stops_naming_step_and_rows(tmp_path):
    model = make_tiny_gpt2()
    source = BatchSource(ROWS, {}, {}, torch.tensor([1]), None, batch_size=2, seed=0)  # only row-b can be drawn
    with pytest.raises(NonFiniteError) as err:
        optimize(model, source, nan_on_second_call(), {}, opt_cfg(skip=False), device="cpu", stage="rl",
                 metrics=MetricsLogger(tmp_path / "m.jsonl"), row_ids=IDS)
    message = str(err.value)
    assert message.startswith("rl: non-finite loss at step 2")
    assert "['row-b', 'row-b']" in message and "rl.skip_nonfinite=true" in message


def test_skip_nonfinite_skips_and_counts_without_updating(tmp_path):
    model = make_tiny_gpt2()
    source = BatchSource(ROWS, {}, {}, torch.arange(3), None, batch_size=2, seed=0)
    weights = []
    loss_fn = nan_on_second_call()

    def tracking_loss(logprobs, mask):
        weights.append(next(model.parameters()).detach().clone())
        return loss_fn(logprobs, mask)

    summary = optimize(model, source, tracking_loss, {}, opt_cfg(skip=True), device="cpu", stage="sft",
                       metrics=MetricsLogger(tmp_path / "m.jsonl"), row_ids=IDS)
    assert summary["skipped_steps"] == 1
    assert not torch.equal(weights[0], weights[1])  # step 1 updated the weights
    assert torch.equal(weights[1], weights[2])      # step 2 (NaN) did not
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3]   # no record of the skipped step's NaN
    assert records[-1]["skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in records)  # finite, no NaN averaged in
