"""Aggregate finished runs: the sweep summary, and the paper's tables and figures.

    lol-rl report multirun/toy_table2              # -> multirun/toy_table2/report/
    lol-rl report multirun/table4 --out results/   # table.md, table.csv, fig1_*.png, fig2_*.png
    lol-rl report outputs/2026-12-03/18-24-21      # one run dir
    lol-rl report outputs                          # every finished run below, sweeps and single runs alike

Runs are compared only where they share the task's data (the fingerprint `lol-rl train` records
in data.json), its reward and the model: a task whose runs differ in any of them gets one table
per group, each saying what differs.

At the end of a sweep (`lol-rl train -m ...`) the `SweepSummary` callback prints one table and
writes `summary.md` / `summary.json` in the sweep dir, then the full report into `report/`.
The report has one section per task: pi_ref, then each method in the paper's row order, mean
+- std over seeds; beside each row the paper's published one when the runs' `paper` names a
table (src/lol_rl/published.py). Figures: validation reward vs step per method family (paper
Fig. 2) and the train rewards and advantages of pi_ref (paper Fig. 1)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from . import artifacts
from .tables import markdown_table
from .files import atomic_write
from .errors import LolRlError
from .published import PUBLISHED, PublishedTable

log = logging.getLogger(__name__)

# the paper's row order (Table 2); our filter-only ablation sits by NLL, KTO (not in the paper) by
# DPO, the other preference method that reads the reference; unknown algos go last
METHOD_ORDER = ("nll", "nll_kept", "pro", "dpo_ref_free", "dpo", "kto", "wbc", "gold", "rlol",
                "alol_ref_free", "alol", "alol_seq", "alol_kl", "ppo")
FAMILIES = {  # paper Fig. 2's panels
    "NLL": ("nll", "nll_kept"),
    "preference": ("dpo", "dpo_ref_free", "pro", "kto"),
    "reward-based": ("wbc", "gold", "rlol"),
    "A-LOL": ("alol", "alol_ref_free", "alol_seq", "alol_kl"),
    "online": ("ppo",),
}


class ReportError(LolRlError):
    """A sweep dir that cannot be reported on: one line for the user, no traceback."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}:{number}: not valid JSON ({err})") from None
    return records


def run_dirs(root: Path) -> list[Path]:
    """`root` itself when it is a run dir (it holds eval.json), else every run dir below it
    (a sweep's jobs, outputs/<date>/<time>, a tree of sweeps), in job order: 2 before 10.
    Hidden dirs (.hydra, a cache) are not searched, nor the inside of a run dir."""
    if (root / artifacts.RUN_EVAL).is_file():
        return [root]
    found = []
    for here, dirs, files in os.walk(root):
        if artifacts.RUN_EVAL in files and Path(here) != root:
            found.append(Path(here))
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found, key=lambda p: [(0, int(part), "") if part.isdigit() else (1, 0, part)
                                        for part in p.relative_to(root).parts])


def collect_runs(root: Path) -> list[dict]:
    """Every finished run at or under `root`: its algo, task, seed, group (data, reward, model),
    reference and policy metrics. A run is finished once it has both eval.json and stages.json
    (written last, in that order)."""
    runs = []
    for run_dir in run_dirs(root):
        eval_path = run_dir / artifacts.RUN_EVAL
        if not (run_dir / artifacts.RUN_STAGES).is_file():
            continue
        if not (run_dir / artifacts.RUN_CONFIG).is_file():
            raise ReportError(f"{run_dir}: has eval.json but no config.yaml (not a lol-rl train run dir?)")
        cfg = OmegaConf.load(run_dir / artifacts.RUN_CONFIG)
        stages = _read_json(run_dir / artifacts.RUN_STAGES)
        results = _read_json(eval_path)
        data_file = run_dir / artifacts.RUN_DATA
        data = _read_json(data_file) if data_file.is_file() else None
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        runs.append({"algo": cfg.algo.name, "task": OmegaConf.select(cfg, "task.name", default="task"),
                     "seed": cfg.seed, "paper": OmegaConf.select(cfg, "paper", default=None),
                     "overrides": overrides, "run_dir": run_dir, "stages": stages, "group": run_group(cfg, data),
                     "reference_key": stages["eval_ref"]["dir"], "best_step": best_step(run_dir, stages), **results})
    return label_runs(runs)


# ---- what runs may be compared: the same data, reward and model --------------------------

def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _compact(value) -> str:
    """A config value in one short line: [correct, polite], {name: reward, use: hha_rm}."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return "null" if value is None else str(value)


def run_group(cfg, data: dict | None) -> dict[str, str]:
    """What a run's numbers depend on besides its algorithm and seed, each as a short string:
    `data` (the fingerprint of every row, from data.json; None for a run from before it was
    recorded) and `task_config` (a hash of the task's data settings, what such runs are told
    apart by), `reward` (the command line's reward=, else the task's reward keys)
    and `model` (its resolved model config). Runs are aggregated only within one group."""
    task = _plain(OmegaConf.select(cfg, "task", default=None)) or {}
    reward_keys = {k: v for k, v in task.items() if "reward" in k}
    override = _plain(OmegaConf.select(cfg, "reward", default=None))
    settings = {k: v for k, v in task.items() if k not in reward_keys and k != "name"}
    task_config = "task config " + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    reward = {"reward": override} if override else reward_keys
    if not any(v not in (None, [], False) for v in reward.values()):
        reward_text = "none (the data's rewards)"
    else:
        reward_text = ", ".join(f"{k}={_compact(v)}" for k, v in reward.items())
    model = _plain(OmegaConf.select(cfg, "model", default=None)) or {}
    return {"data": data["fingerprint"] if data is not None else None, "task_config": task_config,
            "reward": reward_text, "model": json.dumps(model, sort_keys=True, default=str)}


def _model_difference(models: list[dict], model: dict) -> str:
    """The model keys whose values differ between the groups' models, as this one has them."""
    keys = sorted({k for m in models for k in m if len({json.dumps(x.get(k), sort_keys=True) for x in models}) > 1})
    return " ".join(f"model.{k}={_compact(model.get(k))}" for k in keys)


def group_runs(runs: list[dict]) -> list[tuple[list[dict], str]]:
    """The runs of one task split by group; with one group, ("" for its description); with
    several, each described by what sets it apart: `data ..., reward ..., model ...`."""
    # the data by its fingerprint, unless a run predates data.json: then every run by its task config
    fingerprinted = all(run["group"]["data"] is not None for run in runs)
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        group = dict(run["group"])
        group["data"] = group.pop("task_config") if not fingerprinted else group["data"]
        group.pop("task_config", None)
        groups.setdefault(tuple(sorted(group.items())), []).append(run)
    if len(groups) == 1:
        return [(runs, "")]
    keys = [dict(k) for k in groups]
    differs = [facet for facet in ("data", "reward", "model") if len({k[facet] for k in keys}) > 1]
    models = [json.loads(k["model"]) for k in keys]
    described = []
    for key, members in zip(keys, groups.values()):
        parts = []
        for facet in differs:
            value = _model_difference(models, json.loads(key["model"])) if facet == "model" else key[facet]
            parts.append(value if facet == "model" else f"{facet} {value}")
        described.append((members, ", ".join(parts)))
    return described


def best_step(run_dir: Path, stages: dict) -> int | None:
    """The step of the checkpoint a run kept (0: pi_ref itself won validation), when its rl
    artifact is still there to say."""
    artifact = resolve_stage_dir(run_dir, stages["rl"]["dir"]) if "rl" in stages else None
    best = artifact / artifacts.BEST if artifact is not None else None
    return _read_json(best)["step"] if best is not None and best.is_file() else None


# overrides that name no setting of a row: the algorithm and seed (said apart), where Hydra and the cache write
NOT_SETTINGS = ("algo=", "seed=", "hydra.", "cache_dir=")


def run_label(algo: str, overrides: list[str]) -> str:
    """The algorithm plus the run's other overrides, so that a sweep over e.g. `rl.lr` keeps
    its settings apart; seeds are what a row aggregates over."""
    rest = [o for o in overrides if not o.startswith(NOT_SETTINGS)]
    return " ".join([algo, *rest])


def shared_overrides(runs: list[dict]) -> list[str]:
    """Overrides every run has (`+experiment=...`, a data path): they tell no two rows apart."""
    if not runs:
        return []
    common = set(runs[0]["overrides"]).intersection(*(r["overrides"] for r in runs[1:]))
    return [o for o in runs[0]["overrides"] if o in common and not o.startswith(NOT_SETTINGS)]


def label_runs(runs: list[dict]) -> list[dict]:
    """The runs, each `name`d by what sets it apart from the others in `runs`."""
    shared = set(shared_overrides(runs))
    return [{**r, "name": run_label(r["algo"], [o for o in r["overrides"] if o not in shared])} for r in runs]


def _mean_std(values: list[float | None]) -> str:
    if any(v is None for v in values):  # a task without a scorer has no test reward
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def summary_rows(runs: list[dict]) -> dict[str, list[dict]]:
    """name -> the metric dicts to aggregate: each distinct reference once, then each algo."""
    rows: dict[str, list[dict]] = {}
    seen_refs = set()
    for run in runs:
        if run["reference_key"] not in seen_refs:
            seen_refs.add(run["reference_key"])
            rows.setdefault("pi_ref", []).append(run["reference"])
    for run in runs:
        rows.setdefault(run["name"], []).append(run["policy"])
    return rows


def sweep_summary_rows(runs: list[dict]) -> dict[str, list[dict]]:
    """summary_rows of each task and group apart (see group_runs), so that no row mixes runs of
    other data, reward or model; with several, each row name ends with `[task: what differs]`."""
    groups = [(task, members, described) for task in dict.fromkeys(r["task"] for r in runs)
              for members, described in group_runs([r for r in runs if r["task"] == task])]
    if len(groups) == 1:
        return summary_rows(runs)
    rows: dict[str, list[dict]] = {}
    for task, members, described in groups:
        tag = task + (f": {described}" if described else "")
        rows.update({f"{name} [{tag}]": metrics for name, metrics in summary_rows(label_runs(members)).items()})
    return rows


def method_rank(name: str) -> int:
    """A row's place in the paper's order (its name starts with the algo, see run_label)."""
    if name == "pi_ref":
        return -1
    algo = name.split()[0]
    return METHOD_ORDER.index(algo) if algo in METHOD_ORDER else len(METHOD_ORDER)


def paper_order(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return dict(sorted(rows.items(), key=lambda item: method_rank(item[0])))  # stable: settings keep their order


def format_summary(rows: dict[str, list[dict]]) -> str:
    components = list(next(iter(rows.values()))[0]["rewards"])
    header = ["policy", "runs", "reward", *components, "length", "distinct-1/2/3"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        distinct = "/".join(f"{statistics.mean(m['distinct'][i] for m in metrics):.3f}" for i in range(3))
        cells = [name, str(len(metrics)), _mean_std([m["reward"] for m in metrics]),
                 *(_mean_std([m["rewards"][c] for m in metrics]) for c in components),
                 _mean_std([m["length"] for m in metrics]), distinct]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the report's tables -------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    key: str        # segment/<name>, reward, reward/<component>, length, distinct-1..3 (CSV: <key>_mean, <key>_std)
    header: str
    is_reward: bool  # shown on the published table's reward scale


def metric_value(metrics: dict, key: str) -> float | None:
    if key.startswith("segment/"):
        return metrics.get("segments", {}).get(key.removeprefix("segment/"), {}).get("reward")
    if key.startswith("reward/"):
        return metrics["rewards"].get(key.removeprefix("reward/"))
    if key.startswith("distinct-"):
        return metrics["distinct"][int(key.removeprefix("distinct-")) - 1]
    return metrics[key]


def table_columns(all_metrics: list[dict]) -> list[Column]:
    segments = list(dict.fromkeys(s for m in all_metrics for s in m.get("segments", {})))
    components = list(dict.fromkeys(c for m in all_metrics for c in m["rewards"]))
    if len(components) < 2:  # one component is the total reward again (HHA's reward model)
        components = []
    return [*(Column(f"segment/{s}", s, True) for s in segments), Column("reward", "reward", True),
            *(Column(f"reward/{c}", c, True) for c in components), Column("length", "length", False),
            *(Column(f"distinct-{n}", f"distinct-{n}", False) for n in (1, 2, 3))]


@dataclass
class TableRow:
    name: str
    source: str                  # ours | paper
    n_seeds: int | None
    cells: dict[str, tuple[float | None, float | None]]  # column key -> (mean, std); std None with one seed


@dataclass
class Section:
    task: str
    columns: list[Column]
    rows: list[TableRow]
    published: PublishedTable | None
    shared: list[str]
    never_beat_reference: dict[str, tuple[int, int]]  # name -> (seeds that kept pi_ref, seeds)
    group: str = ""  # what sets this group of the task's runs apart from its others ("": the task has one)
    groups: int = 1  # how many groups the task's runs fall into
    slug: str = ""  # the figures' file name part: the task, and the group's number when it has several
    runs: list[dict] = field(default_factory=list)

    @property
    def group_facets(self) -> str:
        """'data and reward': what the task's groups differ in, from this group's description."""
        facets = [f for f in ("data", "reward", "model") if any(p.startswith(f) for p in self.group.split(", "))]
        return " and ".join(facets)

    @property
    def reward_scale(self) -> float:
        return self.published.reward_scale if self.published else 1.0


def aggregate(metrics: list[dict], columns: list[Column], scale: float) -> dict[str, tuple[float | None, float | None]]:
    """Mean and std over seeds per column; reward columns multiplied by `scale`."""
    cells = {}
    for column in columns:
        values = [metric_value(m, column.key) for m in metrics]
        if any(v is None for v in values):  # no scorer, or a segment one run lacks
            cells[column.key] = (None, None)
            continue
        values = [v * scale if column.is_reward else v for v in values]
        cells[column.key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
    return cells


def published_row(published: PublishedTable, method: str, name: str) -> TableRow | None:
    row = published.row(method)
    if row is None:
        return None
    cells = {k: (v, row.std.get(k)) for k, v in row.values.items()}
    seeds = None if method.startswith("test_") else published.seeds  # the test set's own responses: no training
    return TableRow(f"{name} (paper)", "paper", seeds, cells)


def section_paper(task: str, runs: list[dict]) -> PublishedTable | None:
    papers = {r["paper"] for r in runs}
    if len(papers) > 1:  # runs of one task from different configurations: no single table to compare with
        log.warning("%s: runs name different papers %s; no published rows", task, sorted(map(str, papers)))
        return None
    return PUBLISHED.get(papers.pop() or "", {}).get(task)


def build_section(task: str, runs: list[dict], group: str = "", groups: int = 1, number: int = 1) -> Section:
    runs = label_runs(runs)  # within one task, `task=` and the like set no row apart
    published = section_paper(task, runs)
    grouped = paper_order(summary_rows(runs))
    columns = table_columns([m for metrics in grouped.values() for m in metrics])
    scale = published.reward_scale if published else 1.0
    rows = []
    if published:  # rows the paper has and no run can have (the test set's own responses)
        rows += [published_row(published, r.method, r.label) for r in published.rows if r.method.startswith("test_")]
    names = list(grouped)
    for i, (name, metrics) in enumerate(grouped.items()):
        rows.append(TableRow(name, "ours", len(metrics), aggregate(metrics, columns, scale)))
        algo = name.split()[0]
        last_of_algo = i + 1 == len(names) or names[i + 1].split()[0] != algo
        if published and last_of_algo and (paper := published_row(published, algo, algo)):
            rows.append(paper)
    return Section(task, columns, rows, published, shared_overrides(runs), kept_reference(runs), group, groups,
                   task if groups == 1 else f"{task}-{number}", runs)


def kept_reference(runs: list[dict]) -> dict[str, tuple[int, int]]:
    """Per row name, how many of its seeds kept pi_ref: no checkpoint beat it on validation."""
    counts: dict[str, tuple[int, int]] = {}
    for run in runs:
        kept, seeds = counts.get(run["name"], (0, 0))
        counts[run["name"]] = (kept + (run.get("best_step") == 0), seeds + 1)
    return {name: count for name, count in counts.items() if count[0]}


def build_sections(runs: list[dict]) -> list[Section]:
    """One section per task, or per group of a task whose runs differ in data, reward or model."""
    sections = []
    for task in dict.fromkeys(r["task"] for r in runs):
        groups = group_runs([r for r in runs if r["task"] == task])
        sections += [build_section(task, members, group, len(groups), number)
                     for number, (members, group) in enumerate(groups, start=1)]
    return sections


def format_cell(mean: float | None, std: float | None, digits: int, source: str) -> str:
    if mean is None:
        return "" if source == "paper" else "n/a"
    if source == "paper":  # as printed in the paper (repr: the digits transcribed), none invented
        return repr(mean) + (f" +- {std!r}" if std is not None else "")
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None else "")


def column_digits(column: Column, scale: float) -> int:
    if column.key == "length":
        return 1
    return 1 if column.is_reward and scale >= 100 else 3


def format_section(section: Section) -> str:
    title = f"## {section.task}" + (f" ({section.published.section})" if section.published else "")
    title += f": {section.group}" if section.group else ""
    lines = [title, ""]
    if section.group:
        lines += [f"group {section.slug.rsplit('-', 1)[1]} of the {section.groups} groups of task {section.task}'s runs, "
                  f"which differ in their {section.group_facets}: not comparable, never aggregated together", ""]
    if section.shared:
        lines += [f"every run: `{' '.join(section.shared)}`", ""]
    header = ["policy", "seeds", *(c.header for c in section.columns)]
    lines.append(markdown_table(header, [
        [row.name, "" if row.n_seeds is None else str(row.n_seeds),
         *(format_cell(*row.cells.get(c.key, (None, None)), column_digits(c, section.reward_scale), row.source)
           for c in section.columns)]
        for row in section.rows]))
    for name, (kept, seeds) in section.never_beat_reference.items():
        lines += ["", f"`{name}`: {kept} of {seeds} seeds never beat pi_ref on validation (the policy kept is "
                      f"pi_ref itself, step 0)"]
    if section.published:
        lines += ["", f"(paper) rows: Baheti et al. 2024, {section.published.source}, as in src/lol_rl/published.py."]
        if section.published.reward_scale != 1:
            lines.append(f"Rewards are x {section.published.reward_scale:g} (the paper's sigmoid x 100 scale); "
                         f"ours are multiplied to match.")
    return "\n".join(lines)


def format_markdown(sections: list[Section]) -> str:
    return "\n\n".join(format_section(s) for s in sections) + "\n"


def format_csv(sections: list[Section]) -> str:
    """One row per task x policy (ours and the paper's): <metric>_mean, <metric>_std, n_seeds;
    `reward_scale` says what the reward columns were multiplied by."""
    keys = list(dict.fromkeys(c.key for s in sections for c in s.columns))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "group", "source", "policy", "n_seeds", "reward_scale",
                     *(f"{k}_{stat}" for k in keys for stat in ("mean", "std"))])
    for section in sections:
        for row in section.rows:
            cells = [row.cells.get(k, (None, None)) for k in keys]
            writer.writerow([section.task, section.group, row.source, row.name, "" if row.n_seeds is None else row.n_seeds,
                             section.reward_scale, *("" if v is None else repr(v) for cell in cells for v in cell)])
    return buffer.getvalue()


# ---- figures -------------------------------------------------------------------------------

def validation_curve(run: dict) -> dict[int, float]:
    """step -> validation reward, from the rl artifact's own records (there even when this run
    reused a cached stage), else from the run's metrics; a resumed build logs some steps twice,
    the last one counts."""
    artifact = resolve_stage_dir(run["run_dir"], run["stages"]["rl"]["dir"]) if "rl" in run["stages"] else None
    path = artifact / artifacts.VALIDATION if artifact is not None else None
    if path is None or not path.is_file():
        path = run["run_dir"] / artifacts.RUN_METRICS
    if not path.is_file():
        return {}
    curve = {}
    for record in _read_jsonl(path):
        if record.get("stage") == "rl/validation" and record.get("reward") is not None:
            curve[int(record["step"])] = float(record["reward"])
    return curve


def family_of(algo: str) -> str:
    return next((family for family, algos in FAMILIES.items() if algo in algos), "other")


def seed_band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """steps, mean, min, max over the seeds that logged each step."""
    steps = sorted(set().union(*curves))
    per_step = [[c[s] for c in curves if s in c] for s in steps]
    return steps, [statistics.mean(v) for v in per_step], [min(v) for v in per_step], [max(v) for v in per_step]


def plot_validation(task: str, runs: list[dict], path: Path, scale: float) -> bool:
    """Paper Fig. 2: validation reward vs step, one panel per method family, mean over seeds
    with a min..max band. False when no run logged a validation."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state inside a training process

    by_method: dict[str, list[dict[int, float]]] = {}
    for run in label_runs(runs):
        if curve := validation_curve(run):
            by_method.setdefault(run["name"], []).append({s: r * scale for s, r in curve.items()})
    if not by_method:
        return False
    families = [f for f in [*FAMILIES, "other"] if any(family_of(m.split()[0]) == f for m in by_method)]
    columns = min(3, len(families))  # five families side by side would squash each panel
    grid_rows = math.ceil(len(families) / columns)
    fig = Figure(figsize=(5.2 * columns, 3.9 * grid_rows), layout="constrained")
    grid = fig.subplots(grid_rows, columns, sharey=True, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(families):]:
        ax.set_visible(False)
    for ax, family in zip(axes, families):
        for i, name in enumerate(m for m in sorted(by_method, key=method_rank) if family_of(m.split()[0]) == family):
            steps, mean, low, high = seed_band(by_method[name])
            color = f"C{i}"
            ax.plot(steps, mean, color=color, marker="o", markersize=3, label=f"{name} ({len(by_method[name])} seeds)")
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        ax.set_title(family)
        ax.set_xlabel("step (PPO: update)" if family == "online" else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for row in grid:
        row[0].set_ylabel("validation reward" + (f" (x {scale:g})" if scale != 1 else ""))
    fig.suptitle(f"{task}: validation reward, mean over seeds (band: min..max)")
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=110))
    return True


def resolve_stage_dir(run_dir: Path, stage_dir: str) -> Path | None:
    """Stage dirs are recorded relative to where `lol-rl train` ran (Hydra's runtime.cwd);
    fall back to the current dir and the run dir's ancestors for a moved sweep."""
    path = Path(stage_dir)
    if path.is_absolute():
        return path if path.is_dir() else None
    bases = []
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        bases.append(Path(OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd", default=".")))
    bases += [Path.cwd(), *run_dir.resolve().parents]
    return next((base / path for base in bases if (base / path).is_dir()), None)


def advantage_rows(runs: list[dict]) -> list[dict] | None:
    """The advantage artifact's rows.jsonl of the first run that has one."""
    for run in runs:
        if "advantage" not in run["stages"]:
            continue
        found = resolve_stage_dir(run["run_dir"], run["stages"]["advantage"]["dir"])
        if found is not None and (found / artifacts.ADVANTAGE_ROWS).is_file():
            return _read_jsonl(found / artifacts.ADVANTAGE_ROWS)
    return None


def plot_distributions(task: str, rows: list[dict], path: Path, scale: float) -> None:
    """Paper Fig. 1: the train rewards R and the advantages A = R - V(x) of pi_ref; the rows
    with A <= 0 are the ones A-LOL drops."""
    from matplotlib.figure import Figure

    rewards = [r["reward"] * scale for r in rows]
    advantages = [r["advantage"] * scale for r in rows]
    dropped = sum(not r["kept"] for r in rows) / len(rows)
    unit = f" (x {scale:g})" if scale != 1 else ""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax_r, ax_a = fig.subplots(1, 2)
    # stacked by what A-LOL does with the row: where R and A disagree, V(x) is doing the work
    ax_r.hist([[r for r, row in zip(rewards, rows) if row["kept"]], [r for r, row in zip(rewards, rows) if not row["kept"]]],
              bins=40, stacked=True, color=["C2", "C3"], label=["kept (A > 0)", "dropped (A <= 0)"])
    ax_r.set_xlabel(f"train reward R{unit}")
    ax_r.set_ylabel("train rows")
    ax_r.set_title("reward R(x, y)")
    ax_r.legend(fontsize=9)
    ax_a.hist([a for a in advantages if a > 0], bins=40, color="C2", label="A > 0 (kept)")
    ax_a.hist([a for a in advantages if a <= 0], bins=40, color="C3", alpha=0.8, label="A <= 0 (dropped)")
    ax_a.axvline(0.0, color="black", linestyle="--", linewidth=1.2, label="A = 0")
    ax_a.set_xlabel(f"advantage A = R - V(x){unit}")
    ax_a.set_title("advantage of pi_ref")
    ax_a.legend(fontsize=9)
    fig.suptitle(f"{task}: {len(rows)} train rows, {100 * dropped:.1f}% dropped (A <= 0)")
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=110))


# ---- the report ----------------------------------------------------------------------------

def write_report(sweep_dir: Path, out_dir: Path) -> str:
    """Tables (table.md, table.csv) and figures of every finished run under `sweep_dir`, into
    `out_dir`; returns the markdown."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir}: not a directory (give a run dir, a sweep dir, or a dir above them)")
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir}: no such directory")
    runs = collect_runs(sweep_dir)
    if not runs:
        raise ReportError(f"{sweep_dir}: no finished run in it or below it (a run dir holds eval.json and "
                          f"stages.json once `lol-rl train` finishes)")
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = build_sections(runs)
    markdown = format_markdown(sections)
    atomic_write(out_dir / "table.md", lambda temp: temp.write_text(markdown))
    atomic_write(out_dir / "table.csv", lambda temp: temp.write_text(format_csv(sections)))
    for section in sections:
        title = f"{section.task} ({section.group})" if section.group else section.task
        if not plot_validation(title, section.runs, out_dir / f"fig2_validation_{section.slug}.png", section.reward_scale):
            log.info("report: %s: no validation records, no fig2", title)
        rows = advantage_rows(section.runs)
        if rows:
            plot_distributions(title, rows, out_dir / f"fig1_distributions_{section.slug}.png", section.reward_scale)
        else:
            log.info("report: %s: no run has an advantage stage (or its rows.jsonl is gone), no fig1", title)
    log.info("report: %d runs, written to %s", len(runs), out_dir)
    return markdown


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lol-rl report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, metavar="dir",
                        help="a run dir, a sweep dir, or any dir with finished runs below it (outputs/, multirun/)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <dir>/report/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        markdown = write_report(args.sweep_dir, args.out or args.sweep_dir / "report")
    except ReportError as err:
        print(f"lol-rl: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown, end="")


class SweepSummary(Callback):
    """Hydra callback: one table for the whole sweep when the multirun ends, and the report."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect_runs(sweep_dir)
        if not runs:
            log.warning("sweep %s finished with no evaluated run", sweep_dir)
            return
        rows = sweep_summary_rows(runs)
        table = format_summary(rows)
        (sweep_dir / "summary.md").write_text(table + "\n")
        summary = {name: metrics for name, metrics in rows.items()}
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nsweep summary ({len(runs)} runs, {sweep_dir}):\n{table}")
        try:
            write_report(sweep_dir, sweep_dir / "report")
        except Exception as err:  # the runs are done and summarised: a plotting failure must not fail the sweep
            log.warning("report of %s failed (%s); rerun with `lol-rl report %s`", sweep_dir, err, sweep_dir)
            return
        print(f"report (tables, figures): {sweep_dir / 'report'}")
