"""Stage 3: the advantage cache. For every train row: R(x, y), V_ref(x), A = R - V, whether it
is kept (A > 0), and the per-token log-probs of y under pi_ref, computed once here so that
training runs one policy forward per step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import RESPONSE, encode_rows
from .faults import kill_point
from .logprobs import response_logprobs, to_device
from .models import load_policy
from .progress import progress_disabled
from .tasks import Task, data_reward
from .value import batched_prompt_states, load_value_head, predict_values

log = logging.getLogger(__name__)


def advantages(rewards: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A = R(x, y) - V_ref(x)."""
    return rewards - values


def drop_precision_recall(dropped: np.ndarray, bad: np.ndarray) -> tuple[float | None, float | None]:
    """How well dropping A <= 0 finds the truly bad rows: precision and recall of the drop
    (None where undefined: nothing dropped, or no bad row; JSON has no NaN)."""
    true_drops = float(np.sum(dropped & bad))
    precision = true_drops / dropped.sum() if dropped.any() else None
    recall = true_drops / bad.sum() if bad.any() else None
    return precision, recall


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation (ties by order): how differently A and R rank the rows; None when
    either is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def train_rewards(task: Task, examples) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rewards given in the data are used as they are; otherwise the task's components score."""
    if all(data_reward(e) is not None for e in examples):
        return np.asarray([data_reward(e) for e in examples], dtype=np.float64), {}
    return task.reward.score([e.prompt for e in examples], [e.response for e in examples], ids=[e.id for e in examples])


def ranking_rewards(task: Task, examples) -> np.ndarray:
    """R(x, y) of every ranked response (N, K), scored by the task's reward."""
    n_ranked = len(examples[0].ranking)
    prompts = [e.prompt for e in examples for _ in range(n_ranked)]
    total, _ = task.reward.score(prompts, [r for e in examples for r in e.ranking],
                                 ids=[e.id for e in examples for _ in range(n_ranked)])
    return total.reshape(len(examples), n_ranked)


def reference_logprobs(model, rows, batch_size: int, device, group: str = RESPONSE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi_ref(y_i | x, y_<i) of one response group of every row, ragged:
    flat (sum of lengths,) + offsets (N+1,)."""
    responses = rows.group(group)
    # length-sorted batches pad little; pieces go back to row order
    order = sorted(range(len(rows)), key=lambda i: len(rows.prompt_ids[i]) + len(responses[i]))
    pieces: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc=f"advantage: reference log-probs of {group}",
                          disable=progress_disabled(), leave=False):
            chunk = order[start : start + batch_size]
            logprobs, mask = response_logprobs(model, to_device(rows.batch(chunk, [group]), device))
            for i, lp, m in zip(chunk, logprobs, mask):
                pieces[i] = lp[m].float().cpu()
    lengths = torch.tensor([len(p) for p in pieces])
    return torch.cat(pieces), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


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


def run_advantage(cfg, task: Task, sft_dir: Path, value_dir: Path, out_dir: Path, metrics, device) -> None:
    model, tokenizer = load_policy(sft_dir, device, cfg.model)
    model.eval()
    examples = task.splits["train"]
    rows = encode_rows(tokenizer, task, examples, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens)
    rewards, per_component = train_rewards(task, examples)
    states, mask = batched_prompt_states(model, rows.prompt_ids, rows.pad_id, cfg.advantage.batch_size, device)
    values = predict_values(load_value_head(value_dir), states, mask).double().numpy()
    adv = rewards - values
    tensors = {"rewards": torch.from_numpy(rewards), "values": torch.from_numpy(values),
               "advantages": torch.from_numpy(adv)}
    computed: dict[str, str] = {}  # a group whose ids equal an earlier one's (ranking/0 is often the response) reuses it
    for group in rows.groups:  # the logged response, and the rejected / ranked ones where the task has them
        same = next((g for g in computed if rows.group(g) == rows.group(group)), None)
        if same is None:
            tensors[f"ref_logprobs/{group}"], tensors[f"ref_offsets/{group}"] = reference_logprobs(
                model, rows, cfg.advantage.batch_size, device, group)
        else:
            tensors[f"ref_logprobs/{group}"], tensors[f"ref_offsets/{group}"] = (
                tensors[f"ref_logprobs/{same}"], tensors[f"ref_offsets/{same}"])
        computed[group] = group
    if task.reward is not None and all(e.ranking is not None for e in examples):
        tensors["ranking_rewards"] = torch.from_numpy(ranking_rewards(task, examples))
    kill_point("advantage:scored")
    torch.save(tensors, out_dir / "advantages.pt")
    with (out_dir / "rows.jsonl").open("w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            f.write(json.dumps({"id": e.id, "reward": rewards[i], "value": values[i], "advantage": adv[i],
                                "kept": bool(adv[i] > 0), "rewards": {k: float(v[i]) for k, v in per_component.items()},
                                "meta": e.meta}) + "\n")
    report = audit(examples, rewards, values, adv)
    metrics.log("advantage", 0, **{k: v for k, v in report.items() if isinstance(v, (int, float))})
    (out_dir / "audit.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    log.info("advantage: kept %d of %d rows (dropped %.1f%%), drop precision %s recall %s",
             report["kept"], report["rows"], 100 * report["dropped_fraction"],
             _fmt(report.get("drop_precision")), _fmt(report.get("drop_recall")))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
