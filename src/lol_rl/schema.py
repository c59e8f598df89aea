"""Typed schema of the run config (Hydra structured config): a value of the wrong type or a
key that does not exist fails when the config is composed, not deep inside a stage. Types
only: the values and their comments live in conf/config.yaml.

The `task`, `model` and `algo` groups differ by choice (a jsonl task has paths, the toy task
sizes) and are checked by their loaders and the preflight; everything else is typed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class OptimConfig:
    """What every training loop reads (train.optimize)."""

    steps: int = MISSING
    epochs: Optional[float] = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    schedule: str = MISSING
    warmup_steps: int = MISSING
    grad_clip: float = MISSING
    log_interval: int = MISSING
    skip_nonfinite: bool = MISSING


@dataclass
class SFTConfig(OptimConfig):
    seed: int = MISSING


@dataclass
class RLConfig(OptimConfig):
    val_interval: int = MISSING
    validations_per_epoch: Optional[int] = MISSING
    val_prompts: int = MISSING
    length_buckets: int = MISSING
    checkpoint_interval: int = MISSING


@dataclass
class ValueConfig:
    seed: int = MISSING
    samples_per_prompt: int = MISSING
    temperature: float = MISSING
    heldout_fraction: float = MISSING
    heads: int = MISSING
    dropout: float = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING


@dataclass
class AdvantageConfig:
    batch_size: int = MISSING


@dataclass
class GenerationConfig:
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    num_beams: int = MISSING
    repetition_penalty: float = MISSING


@dataclass
class EvalConfig:
    test_prompts: Optional[int] = MISSING


@dataclass
class AuditConfig:
    rows: int = MISSING
    text_width: int = MISSING


@dataclass
class RunConfig:
    task: Any = None
    model: Any = None
    algo: Any = None
    reward: Any = None
    seed: int = MISSING
    cache_dir: str = MISSING
    device: str = MISSING
    threads: int = MISSING
    logger: str = MISSING
    paper: Optional[str] = MISSING
    sft: SFTConfig = field(default_factory=SFTConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


@dataclass
class JudgeEndpointConfig:
    """A judge: any OpenAI-compatible chat-completions endpoint (conf/judge/*.yaml)."""

    name: str = MISSING
    base_url: str = MISSING
    model: str = MISSING
    api_key_env: Optional[str] = MISSING
    temperature: float = MISSING
    max_tokens: int = MISSING


@dataclass
class JudgeRunConfig:
    """`lol-rl judge` (conf/judge.yaml)."""

    judge: JudgeEndpointConfig = field(default_factory=JudgeEndpointConfig)
    task: Any = None
    mode: str = MISSING
    a: Optional[str] = MISSING
    b: str = MISSING
    n: int = MISSING
    seed: int = MISSING
    segments: Optional[list[str]] = MISSING
    out: str = MISSING
    max_retries: int = MISSING
    timeout: float = MISSING
    answers: Optional[list[str]] = MISSING
    verdicts: Optional[str] = MISSING


def register() -> None:
    """Make the schemas available to conf/config.yaml and conf/judge.yaml as
    `defaults: [run_schema, ...]` and `[judge_schema, ...]`."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    ConfigStore.instance().store(name="judge_schema", node=JudgeRunConfig)
