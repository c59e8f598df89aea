"""Metrics: always one json line per record in the run dir; Weights & Biases when
`logger=wandb` (offline mode unless WANDB_MODE says otherwise: there may be no network)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, path: Path, use_wandb: bool = False, run_name: str = "", config: dict | None = None):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run = None
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb_run = wandb.init(project="lol-rl", name=run_name, config=config, dir=str(path.parent))

    def log(self, stage: str, step: int, **values) -> None:
        record = {"stage": stage, "step": step, "time": time.time(), **values}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{stage}/{k}": v for k, v in values.items()}, step=None)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
