"""The files of every stage artifact and of a run dir, and their readers: the one place that
knows a file's name. Stages write through these names; audit, report, judge and export read
through these readers."""

from __future__ import annotations

import json
from pathlib import Path

# sft: the reference policy pi_ref, saved with save_pretrained in the artifact dir itself
SUMMARY = "summary.json"  # every training stage: steps, seconds, best validation, truncation counts

# value: V_ref(x)
VALUE_HEAD = "value_head.pt"  # the head's weights
VALUE_HEAD_SPEC = "value_head.json"  # what builds the head again (sizes, reward range)
VALUE_REPORT = "report.json"  # held-out MSE by epoch, the constant baseline
VALUE_SAMPLES = "samples.jsonl"  # pi_ref's scored samples of the validation prompts

# reference: R of every train row and pi_ref's per-token log-probs of the logged responses
REFERENCE_TENSORS = "reference.pt"


def group_tensors(group: str) -> str:
    """rejected / ranking / mismatched: pi_ref's per-token log-probs of that response group."""
    return f"{group}.pt"


# advantage: V(x) of the train prompts, A = R - V, what the A <= 0 filter keeps
ADVANTAGE_TENSORS = "advantages.pt"
ADVANTAGE_ROWS = "rows.jsonl"  # one line per train row: R, per-component R, V(x), A, kept, meta
ADVANTAGE_AUDIT = "audit.json"  # kept count, dropped fraction, drop precision/recall

# rl: the trained policy pi_theta
POLICY = "policy"  # dir: the best checkpoint by validation reward
BEST = "best.json"  # its step and validation reward
VALIDATION = "validation.jsonl"  # every validation record, so a cached rl stage keeps its curve
CHECKPOINT = "checkpoint.pt"  # loop state of a build in progress (removed when it finishes)
SHARDED_CHECKPOINT = "checkpoint.dcp"  # dir: the same under FSDP, weights and optimizer as DCP shards
LOOP_STATE = "loop.pt"  # in SHARDED_CHECKPOINT: the rest of the loop state (scheduler, sampler, RNG, step)

# eval: test metrics of one policy
EVAL_METRICS = "metrics.json"
GENERATIONS = "generations.jsonl"

# a run dir (Hydra's output dir)
RUN_CONFIG = "config.yaml"  # the resolved config (step budgets from epochs included)
RUN_EVAL = "eval.json"  # {"reference": metrics, "policy": metrics}; written before stages.json
RUN_STAGES = "stages.json"  # stage label -> {dir, cached, seconds}; written last: the run is finished
RUN_METRICS = "metrics.jsonl"  # every metric record of the run
RUN_OWNER = ".owner"  # while a run is live: its lease (lease.py); another run refuses the dir
RUN_DATA = "data.json"  # the task's data fingerprint (what the cache keys hash) and rows per split
RUN_POLICY = "policy"  # link to the rl artifact's policy dir (or a file holding its path where links fail)
RUN_OVERRIDES = ".hydra/overrides.yaml"  # Hydra's copy of the command line's overrides (hydra.output_subdir)
RUN_AUDIT = "audit.md"  # `lol-rl audit`: the table it printed
RUN_AUDIT_ROWS = "audit.json"  # and its rows, with their text

# an export (`lol-rl export`): a Hugging Face model dir (or base weights + adapter) and
EXPORT_CARD = "README.md"  # the model card
EXPORT_CONFIG = "lol_rl_config.yaml"  # the run's resolved config (its cache_dir left out)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def kept_rows(advantage_dir: Path) -> int:
    """How many train rows the A <= 0 filter keeps."""
    return read_json(advantage_dir / ADVANTAGE_AUDIT)["kept"]


def advantage_audit(advantage_dir: Path) -> dict:
    return read_json(advantage_dir / ADVANTAGE_AUDIT)


def advantage_rows(advantage_dir: Path) -> list[dict]:
    return read_jsonl(advantage_dir / ADVANTAGE_ROWS)


def eval_metrics(eval_dir: Path) -> dict:
    return read_json(eval_dir / EVAL_METRICS)


def generations(eval_dir: Path) -> Path:
    return Path(eval_dir) / GENERATIONS


def policy_dir(rl_dir: Path) -> Path:
    return Path(rl_dir) / POLICY


def best_checkpoint(rl_dir: Path) -> dict:
    """{"step", "validation_reward"} of the policy the rl stage kept (reward None: no validation)."""
    return read_json(Path(rl_dir) / BEST)


def run_stages(run_dir: Path) -> dict[str, dict]:
    """stage label -> {dir, cached, seconds} of a finished run."""
    return read_json(Path(run_dir) / RUN_STAGES)


def run_data(run_dir: Path) -> dict | None:
    """{"fingerprint", "rows": {split: n}} of a run's task data; None for a run from before it was recorded."""
    path = Path(run_dir) / RUN_DATA
    return read_json(path) if path.is_file() else None


def run_policy(run_dir: Path) -> Path:
    """The policy dir a run's `policy` link (or, where links failed, file) points to."""
    link = Path(run_dir) / RUN_POLICY
    return link.resolve() if link.is_dir() else Path(link.read_text(encoding="utf-8").strip())


def run_eval(run_dir: Path) -> dict:
    """{"reference": test metrics of pi_ref, "policy": those of pi_theta}."""
    return read_json(Path(run_dir) / RUN_EVAL)
