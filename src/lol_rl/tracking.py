"""Metrics: always one json line per record in the run dir; Weights & Biases when
`logger=wandb` (offline mode unless WANDB_MODE says otherwise: there may be no network). A
wandb run is named `<task>-<algo>-s<seed>` and grouped by its sweep, so the seeds of one
setting sit together in the wandb UI; `wandb sync <run dir>/wandb/offline-run-*` uploads later."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .files import atomic_write_text


def sweep_group() -> str | None:
    """The sweep a run belongs to (its Hydra sweep dir), None for a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().sweep.dir)


class MetricsLogger:
    def __init__(self, path: Path, use_wandb: bool = False, run_name: str = "", config: dict | None = None,
                 group: str | None = None, tags: list[str] | None = None, enabled: bool = True):
        """`enabled=False` (the other processes of a multi-process run): records go nowhere, the
        main process logs the run."""
        self.path = path
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb_run = wandb.init(project="lol-rl", name=run_name, group=group or sweep_group(), tags=tags,
                                        config=config, dir=str(path.parent))

    def log(self, stage: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"stage": stage, "step": step, "time": time.time(), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{stage}/{k}": v for k, v in values.items()}, step=None)

    def forget_after(self, step: int) -> None:
        """Nothing: a run's own metrics.jsonl is its log, killed attempts included; only an
        artifact's records (StageRecords) must read as if the run had never been killed."""

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


class StageRecords:
    """`metrics`, plus a copy of the records of some stages in `path` inside a stage artifact:
    a cached stage's validation curve goes with it to every run that reuses it."""

    def __init__(self, metrics: MetricsLogger, path: Path, stages: tuple[str, ...]):
        self.metrics, self.path, self.stages = metrics, path, stages

    def log(self, stage: str, step: int, **values) -> None:
        self.metrics.log(stage, step, **values)
        if stage in self.stages and self.metrics.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")

    def forget_after(self, step: int) -> None:
        """On resuming from the checkpoint of `step` (-1: starting over): drop the records a
        killed run wrote after it (and a line a kill cut short), which this run writes again, so
        the artifact's records are those of a run that was never killed."""
        if not self.path.is_file() or not self.metrics.enabled:
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["step"] <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))
