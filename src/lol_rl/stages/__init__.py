"""A stage, declared once: its name, the stages it reads, the config it reads, and its run
function. The pipeline derives the artifact's cache key from the declaration alone (the config
slice, the inputs' keys and the data fingerprint), and the run function receives only that
slice: reading an undeclared key is an error, so a key can never drift from what a stage uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ..tasks import Task
from ..tracking import MetricsLogger


@dataclass(frozen=True)
class StageRun:
    """What a run function gets: its config slice, the task, its inputs' artifact dirs (by
    stage name), the dir to write its artifact in, the metrics log and the device."""

    cfg: DictConfig
    task: Task
    inputs: dict[str, Path]
    out: Path
    metrics: MetricsLogger
    device: torch.device


@dataclass(frozen=True)
class Stage:
    """`reads`: dotted config paths the stage's result depends on (`task`, `sft`,
    `advantage.batch_size`), minus `ignores` (`task.rewards` for a stage that never scores);
    `runtime`: paths it also reads that do not change its artifact (how often it checkpoints,
    which the resume tests hold to an uninterrupted build; the batch size of no-grad forwards,
    which test_cache holds to the same tensors), passed but not keyed.
    `inputs(algorithm)`: the stages it reads, which for rl depends on what the loss reads.
    `resolve(cfg, task, inputs)`: the config with what is derived from data (steps from epochs)
    before the slice is keyed. `store`: the cache folder, when two stages share one (eval)."""

    name: str
    reads: tuple[str, ...]
    run: Callable[[StageRun], None]
    inputs: Callable[[Any], tuple[str, ...]] = lambda algorithm: ()
    ignores: tuple[str, ...] = ()
    runtime: tuple[str, ...] = ()
    resolve: Callable[[DictConfig, Task, dict[str, Path]], DictConfig] | None = None
    resumable: bool = False  # builds in a dir that outlives a kill, to continue from a checkpoint
    # every process of a multi-process run takes part (data-parallel training, or a one-pass
    # stage sharded by batch: distributed.map_batches), by algorithm
    parallel: Callable[[Any], bool] = lambda algorithm: False
    store: str | None = None

    @property
    def folder(self) -> str:
        return self.store or self.name
