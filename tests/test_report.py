"""The sweep summary: one row per setting (seeds aggregated), each reference policy once."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from lol_rl.report import collect_runs, format_summary, run_label, summary_rows


def metrics(reward: float, length: float = 5.0) -> dict:
    return {"reward": reward, "rewards": {"a": reward / 2, "b": reward / 2}, "length": length,
            "distinct": [0.1, 0.2, 0.3], "n": 10}


def fake_run(sweep: Path, job: int, algo: str, seed: int, overrides: list[str], reward: float, ref: str) -> None:
    run = sweep / str(job)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"algo": {"name": algo}, "seed": seed}), run / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"algo={algo}", f"seed={seed}", *overrides]), run / ".hydra" / "overrides.yaml")
    (run / "stages.json").write_text(json.dumps({"eval_ref": {"dir": ref}}))
    (run / "eval.json").write_text(json.dumps({"reference": metrics(2.0), "policy": metrics(reward)}))


def test_summary_aggregates_seeds_and_keeps_settings_apart(tmp_path):
    fake_run(tmp_path, 0, "alol", 1, [], 2.5, "ref0")
    fake_run(tmp_path, 1, "alol", 2, [], 2.7, "ref0")
    fake_run(tmp_path, 2, "dpo", 1, ["rl.lr=1e-05"], 2.2, "ref0")
    fake_run(tmp_path, 3, "dpo", 1, ["rl.lr=3e-05"], 1.8, "ref0")
    rows = summary_rows(collect_runs(tmp_path))
    assert list(rows) == ["pi_ref", "alol", "dpo rl.lr=1e-05", "dpo rl.lr=3e-05"]
    assert len(rows["pi_ref"]) == 1  # the shared reference is counted once
    table = format_summary(rows)
    assert "| alol | 2 | 2.600 +- 0.141 | 1.300 +- 0.071 | 1.300 +- 0.071 | 5.000 +- 0.000 | 0.100/0.200/0.300 |" in table
    assert "| dpo rl.lr=3e-05 | 1 | 1.800 |" in table


def test_run_label_drops_seed_algo_and_hydra_overrides():
    assert run_label("alol", ["algo=alol", "seed=3", "hydra.run.dir=x", "algo.params.eps=0.2"]) == "alol algo.params.eps=0.2"
