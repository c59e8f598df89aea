"""`lol-rl audit`: what the A <= 0 filter throws away (the paper's App. B.4 analysis as a
command). It builds (or reuses, from the cache) the reference chain sft -> value -> advantage
of the given config and prints the train rows with the lowest advantage: their text, reward
per component, V(x) and A; the fraction dropped; and, on a task whose rows carry ground-truth
flags (`meta.bad`, the embedded task), the precision and recall of the drop, overall and per
kind of defect and per prompt group.

    lol-rl audit                         # the embedded task
    lol-rl audit task=toy_clean audit.rows=50
    lol-rl audit task=hha task.pro_dir=... # any task: the same cached artifacts `train` uses
"""

from __future__ import annotations

import json
from pathlib import Path

from . import artifacts
from .files import atomic_write_text
from .pipeline import open_chain
from .tables import markdown_table

def lowest_advantage(rows: list[dict], n: int) -> list[dict]:
    """The `n` rows with the lowest A, lowest first (ties by row order)."""
    return sorted(rows, key=lambda r: r["advantage"])[:n]


def drop_by(rows: list[dict], key: str) -> dict[str, dict]:
    """Per value of `meta[key]`: rows, the fraction dropped (A <= 0) and, where rows carry
    `meta.bad`, how many of them are bad."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row["meta"].get(key)), []).append(row)
    table = {}
    for value, members in sorted(groups.items()):
        dropped = sum(not r["kept"] for r in members)
        entry = {"rows": len(members), "dropped": dropped, "dropped_fraction": dropped / len(members)}
        if all("bad" in r["meta"] for r in members):
            entry["bad"] = sum(bool(r["meta"]["bad"]) for r in members)
        table[value] = entry
    return table


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line in a table cell
    return text if len(text) <= width else text[: width - 1] + "…"


def format_audit(summary: dict, lowest: list[dict], examples: dict, width: int) -> str:
    lines = [f"train rows {summary['rows']}, kept (A > 0) {summary['kept']}, dropped "
             f"{100 * summary['dropped_fraction']:.1f}%; mean R {summary['mean_reward']:.3f}, "
             f"mean V(x) {summary['mean_value']:.3f}, Spearman(A, R) {_num(summary['spearman_advantage_vs_reward'])}"]
    if "drop_precision" in summary:
        lines.append(f"ground truth: {100 * summary['bad_fraction']:.1f}% of the rows are bad; the drop's precision "
                     f"{_num(summary['drop_precision'])}, recall {_num(summary['drop_recall'])}")
    for key, table in summary.get("drop_by", {}).items():
        lines += ["", markdown_table([key, "rows", "dropped %", "bad rows"],
                                     [[value, t["rows"], f"{100 * t['dropped_fraction']:.1f}", t.get("bad", "-")]
                                      for value, t in table.items()])]
    components = list(lowest[0]["rewards"]) if lowest else []
    header = ["id", "A", "V(x)", "R", *components, "prompt", "response"]
    if lowest and "bad" in lowest[0]["meta"]:
        header.append("defect")
    cells_of_rows = []
    for row in lowest:
        example = examples[row["id"]]
        cells = [str(row["id"]), f"{row['advantage']:.3f}", f"{row['value']:.3f}", f"{row['reward']:.3f}",
                 *(f"{row['rewards'][c]:.3f}" for c in components),
                 _clip(example.prompt, width).replace("|", "\\|"), _clip(example.response, width).replace("|", "\\|")]
        if "defect" in header:
            cells.append(str(row["meta"].get("defect", "bad" if row["meta"]["bad"] else "none")))
        cells_of_rows.append(cells)
    lines += ["", f"the {len(lowest)} rows with the lowest advantage:", "", markdown_table(header, cells_of_rows)]
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def audit_summary(advantage_dir: Path, rows: list[dict]) -> dict:
    summary = artifacts.advantage_audit(advantage_dir)
    summary.pop("by_skill", None)  # drop_by has it, with the drop counted
    by = [key for key in ("defect", "skill", "difficulty", "segment") if rows and all(key in r["meta"] for r in rows)]
    summary["drop_by"] = {key: drop_by(rows, key) for key in by}
    return summary


def run_audit(cfg, run_dir: Path) -> dict:
    chain = open_chain(cfg, run_dir / artifacts.RUN_METRICS)  # the same checks and cache keys as train
    advantage = chain.build("advantage")
    chain.metrics.close()
    rows = artifacts.advantage_rows(advantage)
    summary = audit_summary(advantage, rows)
    lowest = lowest_advantage(rows, cfg.audit.rows)
    examples = {e.id: e for e in chain.task.splits["train"]}
    table = format_audit(summary, lowest, examples, cfg.audit.text_width)
    atomic_write_text(run_dir / artifacts.RUN_AUDIT, table + "\n")
    atomic_write_text(run_dir / artifacts.RUN_AUDIT_ROWS, json.dumps({"advantage_dir": str(advantage), **summary,
                                                     "lowest": [{**r, "prompt": examples[r["id"]].prompt,
                                                                 "response": examples[r["id"]].response}
                                                                for r in lowest]}, indent=2))
    print(table)
    print(f"\n(written to {run_dir / artifacts.RUN_AUDIT} and {artifacts.RUN_AUDIT_ROWS}; artifact {advantage})")
    return summary
