"""Typed schema of the run config, with a range for every number and the allowed values of
every choice. Hydra checks the types and unknown keys of the fixed sections when it composes the
config (the `run_schema` in conf/config.yaml); `validate` then checks the groups that differ by
choice (a task by its loader, a model by its kind, PPO's parameters) against their own schemas
and every value against its range, before any data is loaded. A bad value stops with one line:
the key, the value, what is allowed. The values and their comments live in conf/."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """`low <= value` (or `<`, `low_open`), `value <= high` (or `<`); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        low = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '<='} "
        high = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high:g}"
        return f"{low}value{high}"


def ranged(default: Any = MISSING, low=None, high=None, *, low_open=False, high_open=False):
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open)})


def choice(*allowed, default: Any = MISSING):
    return field(default=default, metadata={"choices": allowed})


def schedules() -> tuple[str, ...]:
    from transformers import SchedulerType  # the scheduler names get_scheduler takes

    return tuple(s.value for s in SchedulerType)


POSITIVE = {"low": 0, "low_open": True}
COUNT = {"low": 1}  # at least one
FRACTION = {"low": 0, "high": 1, "low_open": True, "high_open": True}


@dataclass
class OptimConfig:
    """What every training loop reads (offline.optimize, the PPO stage)."""

    steps: int = ranged(low=0)  # 0: no training (a published pi_ref used as it is)
    epochs: Optional[float] = ranged(**POSITIVE)
    batch_size: int = ranged(**COUNT)  # the optimizer batch, whatever grad_accum is
    grad_accum: int = ranged(1, **COUNT)  # micro-batches per optimizer step (batch_size % (grad_accum x processes) == 0)
    lr: float = ranged(**POSITIVE)
    weight_decay: float = ranged(low=0)
    schedule: str = field(default=MISSING, metadata={"choices": schedules})
    warmup_steps: int = ranged(low=0)
    grad_clip: float = ranged(**POSITIVE)
    log_interval: int = ranged(**COUNT)
    skip_nonfinite: bool = MISSING
    checkpoint_interval: int = ranged(low=0)  # 0: never
    length_buckets: int = ranged(**COUNT)  # batches drawn at once and regrouped by length (offline.BatchSource)


@dataclass
class SFTConfig(OptimConfig):
    seed: int = MISSING


@dataclass
class RLConfig(OptimConfig):
    val_interval: int = ranged(**COUNT)
    validations_per_epoch: Optional[int] = ranged(**COUNT)
    val_prompts: int = ranged(**COUNT)
    share_prompt: bool = MISSING  # a pair's / ranking's responses after one copy of the prompt (offline.BatchSource)


@dataclass
class ValueConfig:
    seed: int = MISSING
    samples_per_prompt: int = ranged(**COUNT)
    temperature: float = ranged(**POSITIVE)
    heldout_fraction: float = ranged(**FRACTION)  # some prompts to choose the epoch on, some to fit
    heads: int = ranged(**COUNT)
    dropout: float = ranged(low=0, high=1, high_open=True)
    epochs: int = ranged(low=0)
    batch_size: int = ranged(**COUNT)
    lr: float = ranged(**POSITIVE)


@dataclass
class AdvantageConfig:
    batch_size: int = ranged(**COUNT)


@dataclass
class GenerationConfig:
    max_new_tokens: int = ranged(**COUNT)
    batch_size: int = ranged(**COUNT)
    num_beams: int = ranged(**COUNT)
    repetition_penalty: float = ranged(**POSITIVE)


@dataclass
class EvalConfig:
    test_prompts: Optional[int] = ranged(**COUNT)  # null: the whole test split


@dataclass
class AuditConfig:
    rows: int = ranged(low=0)
    text_width: int = ranged(low=2)


@dataclass
class RunConfig:
    task: Any = None  # TASK_SCHEMAS, by task.loader
    model: Any = None  # MODEL_SCHEMAS, by model.kind
    algo: Any = None  # AlgoConfig (its params: the loss's keywords, or PPOParams)
    reward: Any = None
    seed: int = MISSING
    cache_dir: str = MISSING
    device: str = MISSING  # checked by device_ok: auto | cpu | cuda | cuda:<n>
    threads: int = ranged(low=0)
    logger: str = choice("jsonl", "wandb")
    paper: Optional[str] = MISSING
    sft: SFTConfig = field(default_factory=SFTConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


# --- the groups that differ by choice -----------------------------------------------------------

@dataclass
class Sizes:
    """Rows per split (a seeded subset of a real task's data; the embedded task's sizes)."""

    train: Optional[int] = ranged(None, **COUNT)
    validation: Optional[int] = ranged(None, **COUNT)
    test: Optional[int] = ranged(None, **COUNT)


@dataclass
class TaskConfig:
    """What every task has: its name, its loader, how a prompt is shown, its reward components."""

    name: str = MISSING
    loader: str = MISSING
    prompt_template: str = "{prompt}"  # how a prompt is shown to the model; its one field is {prompt}
    response_prefix: str = " "  # between the formatted prompt and the response
    rewards: Any = field(default_factory=list)  # components summed into R(x, y): names, {name, use, ...}, 'module:fn'
    eval_rewards: Any = None  # the test reward when it differs (HHA: a larger reward model)


@dataclass
class ToyTask(TaskConfig):
    seed: int = MISSING
    variant: str = choice("noisy", "clean")
    sizes: Sizes = field(default_factory=Sizes)


@dataclass
class JsonlTask(TaskConfig):
    # paths of the three splits; the loader names a split not given
    train: Optional[str] = MISSING
    validation: Optional[str] = MISSING
    test: Optional[str] = MISSING


@dataclass
class HHATask(TaskConfig):
    source: str = choice("pro", "hub", "small")
    pro_dir: str = MISSING
    train: str = MISSING
    validation: str = MISSING
    test_dir: str = MISSING
    exclude_test: Optional[str] = MISSING
    data_reward: bool = MISSING
    hub_dataset: str = MISSING
    hub_cache_dir: Optional[str] = MISSING
    hub_validation: int = ranged(**COUNT)
    small_dir: str = MISSING
    dialogue: Optional[str] = None  # how a prompt becomes chat messages under a model's chat template
    seed: int = MISSING
    sizes: Sizes = field(default_factory=Sizes)


@dataclass
class RedditTask(TaskConfig):
    polarity: str = choice("positive", "negative")
    data_dir: str = MISSING
    positive_csv: str = MISSING
    negative_csv: str = MISSING
    sample_size: int = ranged(**COUNT)
    seed: int = MISSING
    test_per_polarity: int = ranged(**COUNT)
    validation_per_polarity: int = ranged(**COUNT)


@dataclass
class CommonsenseTask(TaskConfig):
    skd_dir: str = MISSING
    atomic10x: str = MISSING
    atomic2020_test: str = MISSING
    data_reward: bool = MISSING
    seed: int = MISSING
    sizes: Sizes = field(default_factory=Sizes)


@dataclass
class WowTask(TaskConfig):
    wow_dir: str = MISSING
    train: str = MISSING
    validation: str = MISSING
    test: str = MISSING
    max_history_tokens: int = ranged(**COUNT)
    seed: int = MISSING
    sizes: Sizes = field(default_factory=Sizes)


@dataclass
class HFSplits:
    """The data's names of its splits; a validation or test split it lacks (or null) is carved from train."""

    train: str = MISSING
    validation: Optional[str] = MISSING
    test: Optional[str] = MISSING


@dataclass
class HFTask(TaskConfig):
    path: str = MISSING  # a data file (.jsonl/.json/.parquet/.csv, or .gz), a dataset dir, or a hub id (offline cache)
    data_dir: Optional[str] = None  # a folder inside a hub dataset or dataset dir (hh-rlhf: helpful-base)
    cache_dir: Optional[str] = None  # the datasets cache (null: the HF default)
    split: HFSplits = field(default_factory=HFSplits)
    columns: Dict[str, Optional[str]] = field(default_factory=dict)  # a name the loader reads -> the data's column
    format: str = choice("auto", "scored", "preference", "unpaired", "conversational")
    validation_fraction: float = ranged(**FRACTION)  # of the train rows, when the data has no validation split
    test_fraction: float = ranged(**FRACTION)  # of the train rows, when the data has no test split
    seed: int = MISSING  # of what is carved from train


TASK_SCHEMAS = {"toy": ToyTask, "jsonl": JsonlTask, "hha": HHATask, "reddit": RedditTask,
                "commonsense": CommonsenseTask, "wow": WowTask, "hf": HFTask}


@dataclass
class LoraConfig:
    r: int = ranged(**COUNT)
    alpha: float = ranged(**POSITIVE)
    dropout: float = ranged(low=0, high=1, high_open=True)
    target_modules: Any = MISSING  # a list of module names, or 'all-linear'


@dataclass
class ModelConfig:
    """What every model has: how long a row may be, how it trains."""

    name: str = MISSING
    kind: str = MISSING
    max_prompt_tokens: int = ranged(**COUNT)  # prompts are left-truncated to this many tokens
    max_response_tokens: int = ranged(**COUNT)  # responses (with EOS) are truncated to this many tokens
    lora: Optional[LoraConfig] = None  # null: full fine-tuning
    optimizer: str = choice("adamw", "paged_adamw_32bit", default="adamw")
    gradient_checkpointing: bool = False


@dataclass
class FromConfigModel(ModelConfig):
    """A small GPT-2 built from config with a BPE tokenizer trained on the task text."""

    arch: str = choice("gpt2")
    n_layer: int = ranged(**COUNT)
    n_embd: int = ranged(**COUNT)
    n_head: int = ranged(**COUNT)
    n_positions: int = ranged(**COUNT)
    dropout: float = ranged(low=0, high=1, high_open=True)
    # GPT-2's tanh GELU: gelu_new from small element-wise ops, gelu_pytorch_tanh the same function as one fused op
    activation: str = choice("gelu_new", "gelu_pytorch_tanh", default="gelu_new")
    vocab_size: int = ranged(low=16)


@dataclass
class PretrainedModel(ModelConfig):
    """A Hugging Face causal LM by hub id (offline cache) or local dir, or a gguf file of a package."""

    path: Optional[str] = MISSING
    dtype: str = choice("auto", "bf16", "fp32", default="auto")
    quantization: Optional[str] = choice(None, "nf4", default=None)
    sft_adapter: Optional[str] = None  # a published SFT adapter used as the reference
    gguf_package: Optional[str] = None  # a pinned requirement (name==version) of the package that ships the gguf file
    gguf_file: Optional[str] = None  # the file's path inside that package
    chat_template: bool = False  # render conversational prompts with the tokenizer's chat template


MODEL_SCHEMAS = {"from_config": FromConfigModel, "pretrained": PretrainedModel}


@dataclass
class AlgoConfig:
    name: str = MISSING
    trainer: str = choice("offline", "ppo", default="offline")  # the loop: offline (any loss) | ppo (online)
    loss: Optional[str] = None  # a function of lol_rl.losses.LOSSES (offline); its signature says what it reads
    keep: str = choice("all", "positive_advantage", default="all")
    sampling: str = choice("uniform", "shuffle", "advantage", "reward", default="uniform")
    params: Any = field(default_factory=dict)


@dataclass
class PPOParams:
    lr_scale: float = ranged(**POSITIVE)
    step_multiple: float = ranged(**POSITIVE)
    epochs: int = ranged(**COUNT)
    minibatches: int = ranged(**COUNT)
    clip: float = ranged(low=0, high=1, low_open=True)
    value_clip: float = ranged(**POSITIVE)
    vf_coef: float = ranged(low=0)
    ent_coef: float = ranged(low=0)
    gamma: float = ranged(low=0, high=1)
    lam: float = ranged(low=0, high=1)
    kl_coef: float = ranged(low=0)
    adaptive_kl: bool = MISSING
    kl_target: float = ranged(**POSITIVE)
    kl_horizon: int = ranged(**COUNT)
    score_norm: bool = MISSING
    whiten_advantages: bool = MISSING
    temperature: float = ranged(**POSITIVE)
    top_p: float = ranged(low=0, high=1, low_open=True)


# --- `lol-rl judge` (conf/judge.yaml) ---------------------------------------------------------

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_name(key: str, value: Any) -> None:
    """A `*_env` key names an environment variable; a pasted secret there would be written to the
    run's config.yaml and Hydra's copies, so it is refused, and never echoed."""
    if value is None or (isinstance(value, str) and ENV_NAME.fullmatch(value)):
        return
    raise ConfigError(f"{key} must name an environment variable (e.g. OPENAI_API_KEY) that holds the key, not "
                      f"the key itself; the value given ({len(str(value))} characters, not shown) is not a "
                      f"variable name and was written nowhere")


def check_env_overrides(overrides: list[str]) -> None:
    """`check_env_name` on the command line, before Hydra copies the overrides into the run dir."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key.endswith("_env") and value not in ("null", ""):
            check_env_name(key, value)


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


# --- checking ----------------------------------------------------------------------------------

def _typed(schema: type, node, where: str) -> DictConfig:
    """`node` merged over its schema: a key the schema lacks or a value of the wrong type stops."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{where}{'.' + str(key) if key else ''}: {reason}") from None


def _check_values(schema: type, node: DictConfig, where: str) -> None:
    """Every field's value against its range or choices, nested sections included."""
    for f in dataclasses.fields(schema):
        value = node[f.name] if f.name in node else None
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(_schema_of(f)) and isinstance(value, DictConfig):
            _check_values(_schema_of(f), value, key)
            continue
        if OmegaConf.is_missing(node, f.name):
            raise ConfigError(f"{key} has no value; set {key}=<value>")
        if value is None:
            continue
        allowed = f.metadata.get("choices")
        if allowed is not None:
            allowed = allowed() if callable(allowed) else allowed
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not allowed; expected one of {[a for a in allowed]}")
        bound = f.metadata.get("range")
        if bound is not None and not bound.admits(value):
            raise ConfigError(f"{key}={value!r} is out of range; expected {str(bound).replace('value', key)}")


def _schema_of(f: dataclasses.Field):
    """The dataclass a field holds (Optional[X] -> X), or None."""
    kind = f.type if not isinstance(f.type, str) else eval(f.type, globals())  # annotations are strings here
    for candidate in getattr(kind, "__args__", (kind,)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def check_positions(model: DictConfig, max_new_tokens: int) -> None:
    """A from-config model has `n_positions`: a training row (prompt + response) or a generation
    (prompt + new tokens) longer than that would fail inside a forward as an index error."""
    for what, length in (("max_response_tokens", model.max_response_tokens),
                         ("generation.max_new_tokens", max_new_tokens)):
        longest = model.max_prompt_tokens + length
        if longest > model.n_positions:
            raise ConfigError(f"model {model.name}: max_prompt_tokens + {what} = {longest} exceeds n_positions "
                              f"{model.n_positions}; lower one of them or raise model.n_positions")


def device_ok(device: str) -> bool:
    head, _, index = device.partition(":")
    return device in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit())


def _group(cfg: DictConfig, name: str, schemas: dict[str, type], selector: str) -> DictConfig:
    node = cfg[name]
    chosen = node.get(selector)
    if chosen not in schemas:
        raise ConfigError(f"{name}.{selector}={chosen!r} is not allowed; expected one of {list(schemas)}")
    typed = _typed(schemas[chosen], node, name)
    _check_values(schemas[chosen], typed, name)
    return typed


def validate(cfg: DictConfig) -> DictConfig:
    """The run config with its groups typed (their defaults filled in), or ConfigError naming
    the first key whose value is not allowed."""
    _check_values(RunConfig, cfg, "")
    if not device_ok(cfg.device):
        raise ConfigError(f"device={cfg.device!r} is not allowed; expected auto, cpu, cuda or cuda:<index>")
    resolved = cfg.copy()
    resolved.task = _group(resolved, "task", TASK_SCHEMAS, "loader")
    resolved.model = _group(resolved, "model", MODEL_SCHEMAS, "kind")
    resolved.algo = _typed(AlgoConfig, resolved.algo, "algo")
    _check_values(AlgoConfig, resolved.algo, "algo")
    if resolved.algo.trainer == "ppo":
        params = _typed(PPOParams, resolved.algo.params, "algo.params")
        _check_values(PPOParams, params, "algo.params")
    if resolved.model.kind == "from_config":
        check_positions(resolved.model, resolved.generation.max_new_tokens)
    if resolved.value.heads and resolved.model.kind == "from_config" and resolved.model.n_embd % resolved.value.heads:
        raise ConfigError(f"value.heads={resolved.value.heads} must divide model.n_embd={resolved.model.n_embd}")
    return resolved


def register() -> None:
    """Make the schemas available to conf/config.yaml and conf/judge.yaml as
    `defaults: [run_schema, ...]` and `[judge_schema, ...]`."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    ConfigStore.instance().store(name="judge_schema", node=JudgeRunConfig)
    # conf/config.yaml's default run and sweep dirs end in the pid: two runs started in the same
    # second get two dirs
    if not OmegaConf.has_resolver("lol_rl.pid"):
        OmegaConf.register_new_resolver("lol_rl.pid", os.getpid)
