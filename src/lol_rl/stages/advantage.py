"""Stage 3b: the advantage cache. For every train row: V_ref(x) of its prompt, A = R - V, and
whether it is kept (A > 0); `rows.jsonl` and `audit.json` say what the filter drops and, on a
task with ground truth, how well (precision and recall of the drop)."""

from __future__ import annotations

import json
import logging

import numpy as np
import scipy.stats
import torch

from .. import artifacts, distributed
from ..data import encode_prompts
from ..faults import kill_point
from ..models import load_policy
from ..value_head import load_value_head, padded_prompt_states, predict_values
from . import Stage, StageRun

log = logging.getLogger(__name__)


def drop_precision_recall(dropped: np.ndarray, bad: np.ndarray) -> tuple[float | None, float | None]:
    """How well dropping A <= 0 finds the truly bad rows: precision and recall of the drop
    (None where undefined: nothing dropped, or no bad row; JSON has no NaN)."""
    true_drops = float(np.sum(dropped & bad))
    precision = true_drops / dropped.sum() if dropped.any() else None
    recall = true_drops / bad.sum() if bad.any() else None
    return precision, recall


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation, tied values sharing their mean rank (so row order cannot move it): how
    differently A and R rank the rows; None when either is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(scipy.stats.spearmanr(a, b).statistic)


def audit(examples, rewards: np.ndarray, values: np.ndarray, adv: np.ndarray) -> dict:
    kept = adv > 0
    report = {
        "rows": len(examples),
        "kept": int(kept.sum()),
        "dropped_fraction": float(1 - kept.mean()),
        "mean_reward": float(rewards.mean()),
        "mean_value": float(values.mean()),
        "mean_positive_advantage": float(adv[kept].mean()) if kept.any() else 0.0,
        "spearman_advantage_vs_reward": spearman(adv, rewards),
    }
    if all("bad" in e.meta for e in examples):
        bad = np.array([bool(e.meta["bad"]) for e in examples])
        precision, recall = drop_precision_recall(~kept, bad)
        report.update(bad_fraction=float(bad.mean()), drop_precision=precision, drop_recall=recall)
    groups = sorted({e.meta.get("skill") for e in examples if "skill" in e.meta})
    if groups:
        by = np.array([e.meta.get("skill") for e in examples])
        report["by_skill"] = {
            g: {"rows": int((by == g).sum()), "reward": float(rewards[by == g].mean()),
                "value": float(values[by == g].mean()), "kept_fraction": float(kept[by == g].mean())}
            for g in groups
        }
    return report


def prompt_values(model, head, prompt_ids: list[list[int]], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """V(x) of every prompt (N,), `batch_size` prompts per forward, each batch's states padded to
    the longest prompt's width, as the value stage's; each process runs its share of the batches
    and none holds every prompt's states."""
    width = max(len(p) for p in prompt_ids)

    def batch_values(start: int) -> torch.Tensor:
        states, mask = padded_prompt_states(model, prompt_ids[start : start + batch_size], pad_id, width, device)
        return predict_values(head, states, mask)

    return torch.cat(distributed.map_batches(batch_values, range(0, len(prompt_ids), batch_size), "advantage V(x)",
                                             sharded=True))


def run(stage: StageRun) -> None:
    cfg, task, out = stage.cfg, stage.task, stage.out
    model, tokenizer = load_policy(stage.inputs["sft"], stage.device, cfg.model)
    model.eval()
    examples = task.splits["train"]
    reference = torch.load(stage.inputs["reference"] / artifacts.REFERENCE_TENSORS, weights_only=True)
    rewards = reference["rewards"].numpy()
    per_component = {name.split("/", 1)[1]: t.numpy() for name, t in reference.items() if name.startswith("rewards/")}
    prompt_ids = encode_prompts(tokenizer, task, [e.prompt for e in examples], cfg.model.max_prompt_tokens)
    values = prompt_values(model, load_value_head(stage.inputs["value"]), prompt_ids, tokenizer.pad_token_id,
                           cfg.advantage.batch_size, stage.device).double().numpy()
    if not distributed.is_main():  # every process computed its share of V(x); the main process writes
        return
    adv = rewards - values
    kill_point("advantage:scored")
    torch.save({"values": torch.from_numpy(values), "advantages": torch.from_numpy(adv)},
               out / artifacts.ADVANTAGE_TENSORS)
    with (out / artifacts.ADVANTAGE_ROWS).open("w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            f.write(json.dumps({"id": e.id, "reward": rewards[i], "value": values[i], "advantage": adv[i],
                                "kept": bool(adv[i] > 0), "rewards": {k: float(v[i]) for k, v in per_component.items()},
                                "meta": e.meta}) + "\n")
    report = audit(examples, rewards, values, adv)
    stage.metrics.log("advantage", 0, **{k: v for k, v in report.items() if isinstance(v, (int, float))})
    (out / artifacts.ADVANTAGE_AUDIT).write_text(json.dumps(report, indent=2, allow_nan=False))
    precision, recall = report.get("drop_precision"), report.get("drop_recall")
    log.info("advantage: kept %d of %d rows (dropped %.1f%%), drop precision %s recall %s", report["kept"],
             report["rows"], 100 * report["dropped_fraction"], "n/a" if precision is None else f"{precision:.3f}",
             "n/a" if recall is None else f"{recall:.3f}")


STAGE = Stage(
    name="advantage",
    reads=("task", "model", "reward"),
    runtime=("advantage.batch_size",),  # rows per no-grad forward of the prompt states
    inputs=lambda algorithm: ("sft", "value", "reference"),
    run=run,
    parallel=lambda algorithm: True,  # V(x) is computed in batches sharded over the processes
)
