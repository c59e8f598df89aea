"""The whole chain on one screen: the declared stages, in order, and the resolver that builds
what a run needs of them (each cached under the hash of exactly the config it declares).

    sft -> value -----------+
      \\-> reference -> advantage -> rl -> eval        (eval_ref: pi_ref through the same eval)
      \\-> mismatched -----------------> rl             (KTO only: pi_ref on mismatched pairs)

Which of value / reference / mismatched / advantage a run builds follows from its algorithm
(algorithms.py): NLL reads none of them, wBC the reference stage's rewards, A-LOL value, reference
and advantage, KTO the reference and the mismatched pairs' log-probs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import artifacts, distributed
from .algorithms import Algorithm, algorithm, preflight, split_threshold
from .cache import StageCache
from .config import validate
from .errors import ConfigError
from .files import atomic_link, atomic_write_text
from .lease import Lease
from .models import chat_renderer, quantization_config, resolve_device
from .schedule import resolve_budget
from .scoring import format_results
from .stages import Stage, StageRun, advantage, evaluate, reference, rl, sft, value
from .tasks import Task, build_task, data_reward
from .tracking import MetricsLogger, StageRecords

log = logging.getLogger(__name__)

STAGES: tuple[Stage, ...] = (sft.STAGE, value.STAGE, reference.STAGE, *reference.GROUP_STAGES, advantage.STAGE,
                             rl.STAGE, evaluate.REFERENCE, evaluate.POLICY)
BY_NAME = {stage.name: stage for stage in STAGES}


_ABSENT = object()


def _select(cfg: DictConfig, paths: tuple[str, ...]) -> dict:
    """The nested plain dict of `cfg` holding only `paths` (dotted), resolved."""
    selected: dict = {}
    for path in paths:
        value = OmegaConf.select(cfg, path, default=_ABSENT)
        if value is _ABSENT:  # a declaration naming a key the config does not have: a bug, not a user error
            raise KeyError(f"a stage declares config key {path!r}, which the config does not have")
        *parents, leaf = path.split(".")
        node = selected
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    return selected


def _drop(tree: dict, paths: tuple[str, ...]) -> dict:
    for path in paths:
        *parents, leaf = path.split(".")
        node = tree
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)
    return tree


def key_parts(stage: Stage, cfg: DictConfig, fingerprint: str, input_keys: dict[str, str]) -> dict:
    """What the artifact's cache key hashes: the declared config slice, the data and the inputs' keys."""
    # runtime keys (how often it checkpoints, rows per no-grad forward) never change the artifact
    return {**_drop(_select(cfg, stage.reads), stage.ignores + stage.runtime), "data": fingerprint, **input_keys}


def stage_config(stage: Stage, cfg: DictConfig) -> DictConfig:
    """The config a stage's run function sees: its declared slice and runtime keys, read-only
    and closed, so reading anything else is an error rather than a silent drift of its key."""
    view = OmegaConf.create(_drop(_select(cfg, stage.reads + stage.runtime), stage.ignores))
    OmegaConf.set_struct(view, True)
    OmegaConf.set_readonly(view, True)
    return view


@dataclass
class Chain:
    """Builds (or finds in the cache) the stages a run needs, each once, inputs first. `cfg`
    gathers what the stages' `resolve` derive (step budgets from epochs), for the run's config.yaml."""

    cfg: DictConfig
    task: Task
    algorithm: Algorithm
    cache: StageCache
    metrics: MetricsLogger
    device: torch.device
    built: dict[str, tuple[Path, str]] = field(default_factory=dict)  # name -> (artifact dir, key)

    def needs(self, name: str) -> set[str]:
        return stages_needed(name, self.algorithm)

    def build(self, name: str) -> Path:
        """The artifact of `name`, after whatever it reads, in the order STAGES lists them."""
        for stage in STAGES:
            if stage.name in self.needs(name) and stage.name not in self.built:
                self._build(BY_NAME[stage.name])
        return self.built[name][0]

    def _build(self, stage: Stage) -> None:
        name = stage.name
        inputs = {upstream: self.built[upstream][0] for upstream in stage.inputs(self.algorithm)}
        if stage.resolve is not None:
            self.cfg = stage.resolve(self.cfg, self.task, inputs)
        parts = key_parts(stage, self.cfg, self.task.fingerprint(),
                          {upstream: self.built[upstream][1] for upstream in inputs})
        view = stage_config(stage, self.cfg)

        def run(out: Path) -> None:
            records = StageRecords(self.metrics, out / artifacts.VALIDATION, (f"{name}/validation",))
            stage.run(StageRun(view, self.task, inputs, out, records, self.device))

        path = self.cache.stage(stage.folder, parts, run, label=name, resumable=stage.resumable,
                                parallel=stage.parallel(self.algorithm))
        self.built[name] = (path, path.name)


def stages_needed(name: str, algorithm: Algorithm) -> set[str]:
    """`name` and every stage it reads, transitively."""
    return {name}.union(*(stages_needed(upstream, algorithm) for upstream in BY_NAME[name].inputs(algorithm)))


def check_batches_split(cfg, world: int, sections=("sft", "rl")) -> None:
    """Under `world` processes each trains on an equal share of every batch of the
    data-parallel loops, in `grad_accum` equal micro-batches: a batch size that does not divide
    stops here, not at a stage's first step."""
    for section in sections:
        batch_size, grad_accum = cfg[section].batch_size, cfg[section].get("grad_accum", 1)
        if grad_accum == 1 and batch_size % world:
            raise ConfigError(f"{section}.batch_size={batch_size} cannot be split evenly over "
                              f"{world} processes; use a multiple of {world}")
        if batch_size % (grad_accum * world):
            over = f" on each of {world} processes" if world > 1 else ""
            raise ConfigError(f"{section}.batch_size={batch_size} cannot be cut into {section}.grad_accum={grad_accum} "
                              f"equal micro-batches{over}; use a multiple of {grad_accum * world}")


def check_fully_sharded(cfg) -> None:
    """An FSDP launch shards full fine-tuning; an adapter over a frozen (or 4-bit) base is
    replicated under DDP instead, where its few trainable weights cost little."""
    if not distributed.fully_sharded():
        return
    distributed.check_fsdp_version(int(os.environ.get("FSDP_VERSION", "1")))  # accelerate's default is FSDP1
    if cfg.model.get("lora") or cfg.model.get("quantization"):
        raise ConfigError(f"model {cfg.model.name}: the FSDP launch config shards full fine-tuning, and this model "
                          f"trains a LoRA adapter (model.lora / model.quantization); launch it with --multi_gpu "
                          f"(DDP), or set model.lora=null model.quantization=null to fine-tune every weight")


def check_ppo_minibatches(cfg) -> None:
    """PPO cuts each update's rl.batch_size rollouts into algo.params.minibatches minibatches, and
    each minibatch into rl.grad_accum micro-batches: with accumulation they must divide evenly."""
    grad_accum, minibatches = cfg.rl.get("grad_accum", 1), cfg.algo.params.minibatches
    if grad_accum > 1 and cfg.rl.batch_size % (minibatches * grad_accum):
        raise ConfigError(f"rl.batch_size={cfg.rl.batch_size} cannot be cut into algo.params.minibatches={minibatches} "
                          f"minibatches of rl.grad_accum={grad_accum} equal micro-batches; use a multiple of "
                          f"{minibatches * grad_accum}")


def reward_specs(reward):
    """`reward=` on the command line: one component (`reward=my_module:score`) or a list."""
    if reward is None or isinstance(reward, str):
        return [reward] if reward else None
    return list(reward)


def open_chain(cfg, metrics_path: Path, **tracking) -> Chain:
    """Everything that can be checked before a stage runs is checked here: the task's data, the
    algorithm against it, the device and quantization, the rewards' availability offline, the
    step budgets, the batch split over processes. Then the chain, ready to build."""
    cfg = validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = build_task(cfg.task, reward_override=reward_specs(cfg.reward), device=cfg.device)
    task.use_chat_template(chat_renderer(cfg.model))  # a chat model sees a conversation as its template renders it
    algo = algorithm(cfg.algo)
    preflight(algo, task)
    device = distributed.process_device(resolve_device(cfg.device))
    quantization_config(cfg.model, device)  # QLoRA without a GPU stops here, before any stage
    for reward in {id(r): r for r in (task.reward, task.test_reward) if r is not None}.values():
        reward.check_available()  # a reward model missing offline stops here, not after sft
    train_rows = len(task.splits["train"])
    resolve_budget(cfg, "sft", train_rows)
    resolve_budget(cfg, "rl", train_rows)  # a bad rl budget stops here too, before any stage
    check_batches_split(cfg, distributed.world_size(), ("sft", "rl") if algo.trainer == "offline" else ("sft",))
    check_fully_sharded(cfg)
    if algo.trainer == "ppo":  # on the main process alone
        check_ppo_minibatches(cfg)
    check_split_sizes(task, algo)
    check_data_threshold(task, algo)
    metrics = MetricsLogger(metrics_path, enabled=distributed.is_main(), **tracking)
    return Chain(cfg, task, algo, StageCache(cfg.cache_dir), metrics, device)


def check_split_sizes(task: Task, algo: Algorithm) -> None:
    """The smallest splits the stages a run builds can work with, checked before the first."""
    validation = len(task.splits["validation"])
    if "value" in stages_needed("rl", algo) and validation < 2:  # some prompts to choose V's epoch on, some to fit it on
        raise ConfigError(f"task {task.name}: the value stage fits V(x) on some validation prompts and "
                          f"chooses its epoch on the others (value.heldout_fraction), so it needs at least 2 "
                          f"validation rows; split 'validation' has {validation}")


def check_data_threshold(task: Task, algo: Algorithm) -> None:
    """A threshold over rewards the data gives (TRL's labels) is checked before any stage; over a
    scorer's, when the reference stage has them (rl.resolve)."""
    if "threshold" not in algo.params:
        return
    rewards = [data_reward(e) for e in task.splits["train"]]
    if all(r is not None for r in rewards):
        split_threshold(algo.name, torch.tensor(rewards, dtype=torch.float64).float(), algo.params["threshold"])


def claim_run_dir(run_dir: Path) -> Lease:
    """This run's hold on its dir: two live runs never write one config.yaml or metrics.jsonl."""
    lease = Lease(run_dir / artifacts.RUN_OWNER)
    if not lease.claim():
        raise ConfigError(f"run dir {run_dir} belongs to the live run {lease.holder}; give this run its own "
                          f"hydra.run.dir=<dir>")
    return lease


def run_train(cfg, run_dir: Path) -> dict:
    lease = claim_run_dir(run_dir) if distributed.is_main() else None
    try:
        return _run_train(cfg, run_dir)
    finally:
        if lease is not None:
            lease.release()


def _run_train(cfg, run_dir: Path) -> dict:
    chain = open_chain(cfg, run_dir / artifacts.RUN_METRICS, use_wandb=cfg.logger == "wandb",
                       run_name=f"{cfg.task.name}-{cfg.algo.name}-s{cfg.seed}", tags=[cfg.task.name, cfg.algo.name],
                       config=OmegaConf.to_container(cfg, resolve=True))
    main = distributed.is_main()  # under several processes the main one writes the run dir
    if main:
        atomic_write_text(run_dir / artifacts.RUN_CONFIG, OmegaConf.to_yaml(chain.cfg, resolve=True))
    chain.build("rl")  # then pi_ref and pi_theta through the same eval
    results = {"reference": artifacts.eval_metrics(chain.build("eval_ref")),
               "policy": artifacts.eval_metrics(chain.build("eval"))}
    chain.metrics.close()
    if not main:
        return results
    atomic_write_text(run_dir / artifacts.RUN_CONFIG, OmegaConf.to_yaml(chain.cfg, resolve=True))  # resolved budgets
    data = {"fingerprint": chain.task.fingerprint(), "rows": {s: len(rows) for s, rows in chain.task.splits.items()}}
    atomic_write_text(run_dir / artifacts.RUN_DATA, json.dumps(data, indent=2))  # lol-rl report groups runs by it
    policy = chain.build("rl") / artifacts.POLICY
    atomic_link(run_dir / artifacts.RUN_POLICY, policy)
    atomic_write_text(run_dir / artifacts.RUN_EVAL, json.dumps(results, indent=2))
    atomic_write_text(run_dir / artifacts.RUN_STAGES, json.dumps(chain.cache.timings, indent=2))
    print(format_results({"pi_ref": results["reference"], f"{cfg.algo.name} (seed {cfg.seed})": results["policy"]}))
    print(f"\nrun dir: {run_dir}\npolicy:  {run_dir / artifacts.RUN_POLICY} -> {policy}\n"
          f"export:  lol-rl export {run_dir} --out <dir>")
    return results
