"""The preflight check passes every shipped algorithm where the task has what it needs (its
refusals are in test_bad_input.py); response groups (chosen/rejected, rankings) are batched and
split back correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lol_rl.cli import CONF_DIR
from lol_rl.data import TokenizedRows, split_groups
from lol_rl.offline import BatchSource, ragged_rows


def write_rows(path: Path, n: int, with_pairs: bool) -> Path:
    with path.open("w") as f:
        for i in range(n):
            row = {"prompt": f"say something nice {i}", "response": "Thanks, happy to help!", "reward": 1.0}
            if with_pairs:
                row["rejected"] = "Go away."
            f.write(json.dumps(row) + "\n")
    return path


def jsonl_cfg(tmp_path: Path, with_pairs: bool, algo: str):
    splits = {s: write_rows(tmp_path / f"{s}.jsonl", 4, with_pairs) for s in ("train", "validation", "test")}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            "task=jsonl", *(f"task.{s}={p}" for s, p in splits.items()), "task.rewards=[polite]",
            f"algo={algo}", f"cache_dir={tmp_path / 'cache'}", "device=cpu"])


def test_preflight_passes_when_the_task_has_pairs(tmp_path):
    from lol_rl.algorithms import algorithm, preflight
    from lol_rl.config import validate
    from lol_rl.tasks import build_task

    cfg = validate(jsonl_cfg(tmp_path, with_pairs=True, algo="dpo"))
    preflight(algorithm(cfg.algo), build_task(cfg.task))  # no error


def test_every_algo_config_declares_a_known_trainer_and_an_offline_one_a_registered_loss():
    from lol_rl.algorithms import KEEP, SAMPLING, TRAINERS, algorithm
    from lol_rl.config import validate
    from lol_rl.losses import LOSSES

    names = sorted(p.stem for p in (CONF_DIR / "algo").glob("*.yaml"))
    assert {"nll", "wbc", "gold", "rlol", "alol", "alol_ref_free", "alol_seq", "alol_kl", "dpo", "dpo_ref_free",
            "pro", "ppo"} <= set(names)
    for name in names:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            algo = validate(compose("config", overrides=[f"algo={name}"])).algo  # the shipped values pass
        assert algo.name == name and algo.trainer in TRAINERS, name
        if algo.trainer == "offline":
            assert algo.loss in LOSSES and algo.keep in KEEP and algo.sampling in SAMPLING, name
        algorithm(algo)


ROWS = TokenizedRows(
    prompt_ids=[[1, 2], [3], [4, 5, 6]],
    response_ids=[[7], [8, 9], [10]],
    pad_id=0,
    extra_responses={"rejected": [[11, 12], [13], [14]], "ranking/0": [[7], [8, 9], [10]],
                     "ranking/1": [[15], [16], [17, 18, 19]]},
)


def test_groups_are_stacked_group_major_and_split_back():
    groups = ROWS.expand(["response", "rejected"])
    batch = ROWS.batch([2, 0], groups)
    assert batch["input_ids"].shape[0] == 4
    assert batch["response_lengths"].tolist() == [1, 1, 1, 2]  # response 2, response 0, rejected 2, rejected 0
    logprobs = torch.arange(8.0).reshape(4, 2)
    out = split_groups({"logprobs": logprobs, "mask": logprobs > 0}, groups, batch_size=2)
    assert out["logprobs"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert out["rejected_logprobs"].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    ranked = split_groups({"logprobs": logprobs}, ROWS.expand(["ranking"]), batch_size=2)
    assert ranked["ranking_logprobs"].shape == (2, 2, 2)
    assert ranked["ranking_logprobs"][:, 1].tolist() == [[4.0, 5.0], [6.0, 7.0]]


def test_unknown_group_is_an_error():
    with pytest.raises(ValueError, match="response group 'chosen' is not in the data"):
        ROWS.expand(["chosen"])


def test_ragged_rows_pad_to_the_batch_width():
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    offsets = torch.tensor([0, 1, 3, 6])
    assert ragged_rows(flat, offsets, torch.tensor([2, 0]), width=4).tolist() == [[4.0, 5.0, 6.0, 0.0],
                                                                              [1.0, 0.0, 0.0, 0.0]]


def test_batch_source_gives_reference_logprobs_of_every_group_aligned_with_the_ids():
    lengths = {g: [len(r) for r in ROWS.group(g)] for g in ROWS.groups}
    ragged = {}
    for g, lens in lengths.items():  # reference log-prob of token j of row i in group g: -(100 i + j) - (1000 if rejected)
        values = [-(100.0 * i + j) - (1000.0 if g == "rejected" else 0.0) for i, n in enumerate(lens) for j in range(n)]
        ragged[g] = (torch.tensor(values), torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]))
    source = BatchSource(ROWS, {}, ragged, torch.arange(3), None, 2, seed=0, groups=["response", "rejected"],
                         shuffle=True)
    indices, batch = source.sample()
    width = int(batch["response_lengths"].max())
    assert batch["ref_logprobs"].shape == (4, width)
    for row, i in enumerate(indices.tolist()):
        assert batch["ref_logprobs"][row, 0].item() == -(100.0 * i)
        assert batch["ref_logprobs"][2 + row, 0].item() == -(100.0 * i) - 1000.0


def test_shuffle_visits_every_kept_row_once_per_pass():
    keep = torch.tensor([0, 2])
    source = BatchSource(ROWS, {}, {}, keep, None, batch_size=1, seed=3, shuffle=True)
    seen = [source.sample()[0].item() for _ in range(6)]
    for start in range(0, 6, 2):
        assert sorted(seen[start : start + 2]) == [0, 2]


def test_config_values_are_typed_at_composition():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
        assert isinstance(cfg.sft.steps, int) and isinstance(cfg.rl.lr, float)
        with pytest.raises((ConfigCompositionException, ValidationError), match="sft.steps"):
            compose("config", overrides=["sft.steps=abc"])
        with pytest.raises(ConfigCompositionException, match="stepz"):
            compose("config", overrides=["sft.stepz=3"])
