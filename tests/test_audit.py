"""`lol-rl audit`: the lowest-advantage rows, the drop and its precision, from the same cached
artifacts `lol-rl train` uses."""

from __future__ import annotations

import json

from lol_rl.audit import drop_by, lowest_advantage
from test_cli import TINY, lol_rl
from test_jsonl_task import SMALL


def row(i: int, advantage: float, defect: str) -> dict:
    return {"id": str(i), "advantage": advantage, "kept": advantage > 0, "reward": 1.0, "value": 1.0 - advantage,
            "rewards": {}, "meta": {"defect": defect, "bad": defect != "none"}}


def test_lowest_advantage_sorts_and_cuts():
    rows = [row(0, 0.5, "none"), row(1, -0.2, "rude"), row(2, -0.9, "wrong"), row(3, -0.2, "wrong")]
    assert [r["id"] for r in lowest_advantage(rows, 3)] == ["2", "1", "3"]  # ties keep row order


def test_drop_by_counts_drops_and_bad_rows_per_group():
    rows = [row(0, 0.5, "none"), row(1, -0.2, "rude"), row(2, 0.1, "rude"), row(3, -0.2, "none")]
    table = drop_by(rows, "defect")
    assert table == {"none": {"rows": 2, "dropped": 1, "dropped_fraction": 0.5, "bad": 0},
                     "rude": {"rows": 2, "dropped": 1, "dropped_fraction": 0.5, "bad": 2}}


def test_audit_prints_lowest_rows_and_train_reuses_its_artifacts(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "audit"
    proc = lol_rl("audit", *TINY, "audit.rows=7", f"hydra.run.dir={run_dir}", cache=cache)
    assert proc.returncode == 0, proc.stdout[-5000:]
    report = json.loads((run_dir / "audit.json").read_text())
    lowest = report["lowest"]
    assert len(lowest) == 7
    advantages = [r["advantage"] for r in lowest]
    assert advantages == sorted(advantages)
    rows = [json.loads(line) for line in open(f"{report['advantage_dir']}/rows.jsonl")]
    assert advantages[0] == min(r["advantage"] for r in rows)  # really the lowest of all train rows
    assert report["rows"] == 200 and 0 <= report["dropped_fraction"] < 1  # a tiny pi_ref: V(x) is low
    assert "drop_recall" in report  # the toy task has ground truth
    assert set(report["drop_by"]) == {"defect", "skill", "difficulty"}
    assert sum(t["rows"] for t in report["drop_by"]["defect"].values()) == 200
    text = (run_dir / "audit.md").read_text()
    assert "| id | A | V(x) | R | correct | polite | concise | prompt | response | defect |" in text
    assert "ground truth: 44.5% of the rows are bad; the drop's precision" in text
    assert lowest[0]["response"][:20] in proc.stdout.replace("\\|", "|")

    train = lol_rl("train", *TINY, f"hydra.run.dir={tmp_path / 'train'}", cache=cache)
    assert train.returncode == 0, train.stdout[-5000:]
    stages = json.loads((tmp_path / "train" / "stages.json").read_text())
    assert all(stages[s]["cached"] for s in ("sft", "reference", "value", "advantage")), stages
    assert stages["advantage"]["dir"] == report["advantage_dir"]


def test_audit_finds_the_known_bad_rows_of_a_jsonl_task(tmp_path):
    """Rows rewarded 0.9 (good) or 0.1 (bad, flagged in meta): V(x) lies strictly between the
    data's extremes, so the drop is exactly the bad rows, and they are the lowest."""
    def write(split: str, rows: list[dict]) -> str:
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f"task.{split}={path}"

    train = [{"id": f"t{i}", "prompt": f"question {i % 5}", "response": "a bad answer" if i % 3 == 0 else f"good answer {i}",
              "reward": 0.1 if i % 3 == 0 else 0.9, "meta": {"bad": i % 3 == 0}} for i in range(30)]
    held = [{"id": f"v{i}", "prompt": f"question {i}", "response": "an answer", "reward": 0.5} for i in range(8)]
    splits = [write("train", train), write("validation", held), write("test", held)]
    run_dir = tmp_path / "audit"
    proc = lol_rl("audit", "task=jsonl", *splits, *SMALL, "audit.rows=10", f"hydra.run.dir={run_dir}", cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stdout[-5000:]
    report = json.loads((run_dir / "audit.json").read_text())
    assert (report["kept"], report["drop_precision"], report["drop_recall"]) == (20, 1.0, 1.0)
    assert {r["id"] for r in report["lowest"]} == {f"t{i}" for i in range(0, 30, 3)}
    assert "the drop's precision 1.000, recall 1.000" in (run_dir / "audit.md").read_text()
