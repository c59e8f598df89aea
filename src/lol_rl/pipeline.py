"""The whole chain on one screen: sft -> value -> advantage -> rl -> eval, each stage cached
under the hash of only the config it reads (see cache.py)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import distributed
from .advantage import run_advantage
from .cache import StageCache
from .evaluate import run_eval
from .files import atomic_write_text
from .losses import check_params
from .models import quantization_config, resolve_device
from .ppo import run_ppo
from .schedule import resolve_epochs
from .tasks import Task, build_task
from .tracking import MetricsLogger, StageRecords
from .train import run_rl, run_sft
from .value import run_value

log = logging.getLogger(__name__)

# the rl stage's loop: one offline loop for every offline algorithm, and online PPO
TRAINERS = {"offline": run_rl, "ppo": run_ppo}
VALIDATION = "validation.jsonl"  # in the rl artifact: its validation records (report.py's fig2)


class PreflightError(ValueError):
    """The algorithm needs something the task does not provide; raised before any compute."""


NEEDS = {
    "advantage": "advantages (a reward for every train row and validation prompts)",
    "reference": "reference log-probs",
    "reward": "rewards",
    "scorer": "a reward scorer for new responses (reward components, not only the data's rewards)",
    "preferences": "preference pairs",
    "ranking": "rankings of the same length",
    "ground_truth": "ground-truth bad-row flags",
}


def preflight(algo_cfg, task: Task) -> None:
    """Refuse, before any compute, an algorithm whose needs the task's data does not meet."""
    if algo_cfg.get("trainer", "offline") not in TRAINERS:
        raise PreflightError(f"algo {algo_cfg.name}: unknown trainer {algo_cfg.trainer!r}; valid: {sorted(TRAINERS)}")
    unknown = [need for need in algo_cfg.needs if need not in NEEDS]
    if unknown:
        raise PreflightError(f"algo {algo_cfg.name}: unknown need(s) {unknown}; valid: {sorted(NEEDS)}")
    loss = algo_cfg.get("loss") if algo_cfg.get("trainer", "offline") == "offline" else None
    try:  # a typo or a zero clip range would otherwise stop the run at the first rl step, after sft
        check_params(loss, algo_cfg.get("params") or {})
    except ValueError as err:
        raise PreflightError(f"algo {algo_cfg.name}: {err}") from None
    missing = [NEEDS[need] for need in algo_cfg.needs if need not in task.provides()]
    if missing:
        raise PreflightError(f"{algo_cfg.name} needs {' and '.join(missing)}; task {task.name} has none")


def reward_specs(reward):
    """`reward=` on the command line: one component (`reward=my_module:score`) or a list."""
    if reward is None or isinstance(reward, str):
        return [reward] if reward else None
    return list(reward)


def run_train(cfg, run_dir: Path) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = build_task(cfg.task, reward_override=reward_specs(cfg.reward), device=cfg.device)
    preflight(cfg.algo, task)
    trainer = cfg.algo.get("trainer", "offline")
    device = distributed.process_device(resolve_device(cfg.device))
    quantization_config(cfg.model, device)  # QLoRA without a GPU stops here, before any stage
    for reward in {id(r): r for r in (task.reward, task.test_reward) if r is not None}.values():
        reward.check_available()  # a reward model missing offline stops here, not after sft
    train_rows = len(task.splits["train"])
    cfg = resolve_budget(cfg, "sft", train_rows)
    resolve_budget(cfg, "rl", train_rows)  # a bad rl budget stops here too, before any stage
    check_batches_split(cfg, distributed.world_size(), ("sft", "rl") if trainer == "offline" else ("sft",))
    cache = StageCache(cfg.cache_dir)
    metrics = MetricsLogger(run_dir / "metrics.jsonl", use_wandb=cfg.logger == "wandb",
                            run_name=f"{cfg.task.name}-{cfg.algo.name}-s{cfg.seed}", tags=[cfg.task.name, cfg.algo.name],
                            config=OmegaConf.to_container(cfg, resolve=True), enabled=distributed.is_main())
    main = distributed.is_main()  # under several processes the main one writes the run dir
    if main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    data, scored = stage_keys(cfg, task)
    sft = cache.stage("sft", {**data, "sft": cfg.sft}, lambda out: run_sft(cfg, task, out, metrics, device),
                      parallel=True)
    advantage = None
    if set(cfg.algo.needs) & {"advantage", "reference", "reward"}:
        advantage = advantage_stage(cfg, task, cache, sft, scored, metrics, device)
    cfg = resolve_budget(cfg, "rl", rl_rows(cfg.algo, train_rows, advantage))
    if main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # with the resolved step budgets
    rl = cache.stage("rl", {**scored, "sft": sft.name, "advantage": advantage and advantage.name, "algo": cfg.algo,
                            "rl": cfg.rl, "generation": cfg.generation, "seed": cfg.seed},
                     lambda out: TRAINERS[trainer](cfg, task, sft, advantage, out,
                                                   StageRecords(metrics, out / VALIDATION, ("rl/validation",)), device),
                     resumable=True,  # both loops checkpoint: a killed run continues
                     parallel=trainer == "offline")  # data-parallel; PPO runs on the main process
    evaluation = {"task": cfg.task, "reward": cfg.reward, "data": data["data"], "eval": cfg.eval, "generation": cfg.generation}
    ref_eval = cache.stage("eval", {**evaluation, "policy": f"sft/{sft.name}"},
                           lambda out: run_eval(cfg, task, sft, out, device), label="eval_ref")
    policy_eval = cache.stage("eval", {**evaluation, "policy": f"rl/{rl.name}"},
                              lambda out: run_eval(cfg, task, rl / "policy", out, device), label="eval")

    results = {
        "reference": json.loads((ref_eval / "metrics.json").read_text()),
        "policy": json.loads((policy_eval / "metrics.json").read_text()),
    }
    metrics.close()
    if not main:
        return results
    atomic_write_text(run_dir / "eval.json", json.dumps(results, indent=2))
    atomic_write_text(run_dir / "stages.json", json.dumps(cache.timings, indent=2))
    print(format_table({"pi_ref": results["reference"], f"{cfg.algo.name} (seed {cfg.seed})": results["policy"]}))
    return results


def resolve_budget(cfg, section: str, rows: int):
    """`cfg` with `<section>.steps` (and `val_interval`) from `<section>.epochs` over `rows`
    (schedule.resolve_epochs); `cfg` itself when the section counts steps."""
    try:
        resolved = resolve_epochs(cfg[section], rows)
    except ValueError as err:
        raise PreflightError(f"{section}: {err}") from None
    if resolved is cfg[section]:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg[section] = resolved
    return cfg


def check_batches_split(cfg, world: int, sections=("sft", "rl")) -> None:
    """Under `world` processes each trains on an equal share of every batch of the
    data-parallel loops: a batch size that does not divide stops here, not at a stage's first step."""
    for section in sections:
        if cfg[section].batch_size % world:
            raise PreflightError(f"{section}.batch_size={cfg[section].batch_size} cannot be split evenly over "
                                 f"{world} processes; use a multiple of {world}")


def rl_rows(algo_cfg, train_rows: int, advantage: Path | None) -> int:
    """The rows an offline method trains on: the kept ones (A > 0) when it drops the rest, as
    the authors' A-LOL runs scale their epochs by the kept fraction."""
    if algo_cfg.get("keep") == "positive_advantage" and advantage is not None:
        return json.loads((advantage / "audit.json").read_text())["kept"]
    return train_rows


def stage_keys(cfg, task: Task) -> tuple[dict, dict]:
    """The config parts the stages key on: the data alone (sft), and the data with its scorers."""
    # the sft stage reads the data, not the scorers: a new reward model reuses pi_ref
    task_data = {k: v for k, v in cfg.task.items() if k not in ("rewards", "eval_rewards")}
    data = {"task": task_data, "data": task.fingerprint(), "model": cfg.model}
    return data, {**data, "task": cfg.task, "reward": cfg.reward}


def advantage_stage(cfg, task: Task, cache: StageCache, sft: Path, scored: dict, metrics, device) -> Path:
    """Stages 2 and 3 over a built pi_ref: V_ref(x), then R, V, A and the reference log-probs
    (`scored`: stage_keys' second part)."""
    value = cache.stage("value", {**scored, "sft": sft.name, "value": cfg.value, "generation": cfg.generation},
                        lambda out: run_value(cfg, task, sft, out, metrics, device))
    return cache.stage("advantage", {**scored, "sft": sft.name, "value": value.name},
                       lambda out: run_advantage(cfg, task, sft, value, out, metrics, device))



def format_table(rows: dict[str, dict]) -> str:
    """A markdown table: total, per-segment (HHA) and per-component test reward, length,
    distinct-1/2/3."""
    first = next(iter(rows.values()))
    components = list(first["rewards"])
    segments = list(first.get("segments", {}))
    header = ["policy", *segments, "reward", *components, "length", "distinct-1/2/3", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        reward = "n/a" if m["reward"] is None else f"{m['reward']:.3f}"  # a task without a scorer
        cells = [name, *(f"{m['segments'][s]['reward']:.3f}" for s in segments), reward,
                 *(f"{m['rewards'][c]:.3f}" for c in components), f"{m['length']:.1f}",
                 "/".join(f"{d:.3f}" for d in m["distinct"]), str(m["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
