"""Aggregate finished runs into one table: test reward (total and per component), length and
distinct-1/2/3, mean +- std over seeds. At the end of a sweep (`lol-rl train -m ...`) the
`SweepSummary` callback prints it and writes `summary.md` / `summary.json` in the sweep dir."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def collect_runs(sweep_dir: Path) -> list[dict]:
    """Every finished run under `sweep_dir`: its algo, seed, reference and policy metrics."""
    runs = []
    for eval_path in sorted(sweep_dir.glob("*/eval.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        cfg = OmegaConf.load(eval_path.parent / "config.yaml")
        stages = json.loads((eval_path.parent / "stages.json").read_text())
        results = json.loads(eval_path.read_text())
        overrides_file = eval_path.parent / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        runs.append({"name": run_label(cfg.algo.name, overrides), "seed": cfg.seed,
                     "reference_key": stages["eval_ref"]["dir"], **results})
    return runs


def run_label(algo: str, overrides: list[str]) -> str:
    """The algorithm plus the run's other overrides, so that a sweep over e.g. `rl.lr` keeps
    its settings apart; seeds are what a row aggregates over."""
    rest = [o for o in overrides if not o.startswith(("algo=", "seed=", "hydra."))]
    return " ".join([algo, *rest])


def _mean_std(values: list[float | None]) -> str:
    if any(v is None for v in values):  # a task without a scorer has no test reward
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def summary_rows(runs: list[dict]) -> dict[str, list[dict]]:
    """name -> the metric dicts to aggregate: each distinct reference once, then each algo."""
    rows: dict[str, list[dict]] = {}
    seen_refs = set()
    for run in runs:
        if run["reference_key"] not in seen_refs:
            seen_refs.add(run["reference_key"])
            rows.setdefault("pi_ref", []).append(run["reference"])
    for run in runs:
        rows.setdefault(run["name"], []).append(run["policy"])
    return rows


def format_summary(rows: dict[str, list[dict]]) -> str:
    components = list(next(iter(rows.values()))[0]["rewards"])
    header = ["policy", "runs", "reward", *components, "length", "distinct-1/2/3"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        distinct = "/".join(f"{statistics.mean(m['distinct'][i] for m in metrics):.3f}" for i in range(3))
        cells = [name, str(len(metrics)), _mean_std([m["reward"] for m in metrics]),
                 *(_mean_std([m["rewards"][c] for m in metrics]) for c in components),
                 _mean_std([m["length"] for m in metrics]), distinct]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: one table for the whole sweep when the multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect_runs(sweep_dir)
        if not runs:
            log.warning("sweep %s finished with no evaluated run", sweep_dir)
            return
        rows = summary_rows(runs)
        table = format_summary(rows)
        (sweep_dir / "summary.md").write_text(table + "\n")
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        print(f"\nsweep summary ({len(runs)} runs, {sweep_dir}):\n{table}")
