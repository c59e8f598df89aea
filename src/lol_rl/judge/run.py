"""The three modes of `lol-rl judge`: judge (an LLM, both orders), export (forms for human
annotators) and import (their answers back, and the agreement with the LLM judge)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from .. import artifacts
from ..progress import progress_disabled
from ..tasks.base import DataError, read_json
from .client import JudgeError, VerdictLog, ask, make_client
from .human import export_forms, import_answers
from ..files import atomic_write_text
from .pairs import (
    JUDGE_PROMPT,
    LLM_DROPPED,
    NO_SEGMENT,
    ORDERS,
    Generation,
    Pair,
    System,
    aggregate,
    combine_orders,
    format_csv,
    format_markdown,
    judge_prompt,
    pair_systems,
    parse_verdict,
    read_generations,
    sample_pairs,
)

log = logging.getLogger(__name__)
TEST_GOOD = "test_good"  # b=test_good: the test split's own (good) responses, as in the paper


def generations_file(spec: str) -> Path:
    """A jsonl file as given, or a finished run dir's eval generations (stages.json names the dir)."""
    path = Path(spec)
    if not path.is_dir():
        return path
    stages = read_json(path / artifacts.RUN_STAGES, dict, "an object of stage label: {dir, ...}",
                       missing_hint=" (a or b is a dir, but not a finished `lol-rl train` run dir)")
    stage = stages.get("eval")
    if not isinstance(stage, dict) or not isinstance(stage.get("dir"), str):
        raise DataError(f"{path / artifacts.RUN_STAGES}: expected an 'eval' stage with a 'dir'")
    generations = artifacts.generations(Path(stage["dir"]))
    if not generations.is_file():
        raise DataError(f"{generations}: no such file (the run's eval stage dir is gone or predates saved "
                        f"generations; rerun the same `lol-rl train` command to rebuild it)")
    return generations


def run_label(spec: str) -> str:
    """A run dir as its algorithm and seed (as the train table names it); a file as its path."""
    config = Path(spec) / artifacts.RUN_CONFIG
    if Path(spec).is_dir() and config.is_file():
        cfg = OmegaConf.load(config)
        return f"{cfg.algo.name} (seed {cfg.seed})"
    return spec


def reference_responses(cfg, a_spec: str) -> System:
    """The test split's logged responses of the task named by `task=`, or by run a's config."""
    from ..tasks import LOADERS

    task_cfg = cfg.task
    if task_cfg is None:
        config = Path(a_spec) / artifacts.RUN_CONFIG
        if not config.is_file():
            raise DataError(f"b=test_good needs the task: give a as a run dir (its config.yaml names the task) "
                            f"or name it with task=<name> (a={a_spec} has no config.yaml)")
        task_cfg = OmegaConf.load(config).task
    loader = LOADERS.get(task_cfg.loader)
    if loader is None:
        raise DataError(f"unknown task loader {task_cfg.loader!r}; valid: {sorted(LOADERS)}")
    test = loader(task_cfg).get("test")  # the data alone: no reward model is built to read it
    if not test:
        raise DataError(f"task {task_cfg.name}: split 'test' has no rows")
    where = f"task {task_cfg.name} test split"
    rows = {e.id: Generation(e.id, e.prompt, e.response, e.meta.get("segment", NO_SEGMENT), f"{where}, id {e.id!r}")
            for e in test}
    return System("test good responses", where, rows, whole_split=True)


def load_systems(cfg) -> tuple[System, System]:
    if not cfg.a:
        raise DataError("judge needs a=<run dir or generations.jsonl>")
    a_file = generations_file(cfg.a)
    a = System(run_label(cfg.a), str(a_file), read_generations(a_file))
    if cfg.b == TEST_GOOD:
        return a, reference_responses(cfg, cfg.a)
    b_file = generations_file(cfg.b)
    return a, System(run_label(cfg.b), str(b_file), read_generations(b_file))


def sampled_pairs(cfg) -> tuple[System, System, list[Pair]]:
    if cfg.n < 1:
        raise DataError(f"n={cfg.n}: expected a number of pairs >= 1")
    a, b = load_systems(cfg)
    segments = list(cfg.segments) if cfg.segments else None
    return a, b, sample_pairs(pair_systems(a, b), cfg.n, cfg.seed, segments)


def fingerprint(system: System) -> str:
    """A hash of a system's responses: verdicts are reused only for the very same responses."""
    rows = [(g.id, g.prompt, g.response) for g in system.rows.values()]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# what verdicts belong to: the very responses judged, the judge and its prompt (not n, seed or
# segments, which only choose pairs, nor the labels, which only name the systems)
IDENTITY = ("a_responses", "b_responses", "judge", "prompt")


def check_manifest(path: Path, manifest: dict) -> None:
    """An out dir holds the verdicts of one judge on one a and b with one prompt. Another n, seed
    or segments may reuse them (the calls already made are not paid again); anything else must
    not, so it is refused rather than mixed in."""
    if path.is_file():
        before = read_json(path, dict, "the judging's manifest")
        changed = [key for key in IDENTITY if before.get(key) != manifest[key]]
        if changed:
            raise JudgeError(f"{path.parent} holds verdicts of another judging (different {', '.join(changed)}); "
                             f"give another out= or delete that dir")
    atomic_write_text(path, json.dumps(manifest, indent=2))


def run_judge(cfg, out: Path) -> list[dict]:
    """Ask the judge about every sampled pair in both orders (skipping calls already logged),
    then write the Table 3 layout as table.md / table.csv and print it."""
    a, b, pairs = sampled_pairs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # names the key's variable, never the key
    judge = cfg.judge
    check_manifest(out / "judging.json", {
        "a": a.label, "a_responses": fingerprint(a), "b": b.label, "b_responses": fingerprint(b),
        "judge": {"base_url": judge.base_url, "model": judge.model, "temperature": judge.temperature,
                  "max_tokens": judge.max_tokens},
        "prompt": hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest()[:16],
    })
    verdicts = VerdictLog(out / "verdicts.jsonl")
    try:
        todo = [(pair, order) for pair in pairs for order in ORDERS if (pair.id, order) not in verdicts.done]
        log.info("judge %s at %s: %d pairs x 2 orders, %d calls to make (%d logged before)", judge.model,
                 judge.base_url, len(pairs), len(todo), 2 * len(pairs) - len(todo))
        if todo:
            with make_client(judge, cfg.max_retries, cfg.timeout) as client:
                for pair, order in tqdm(todo, desc="judge", disable=progress_disabled()):
                    answer = ask(client, judge, judge_prompt(pair, order))
                    verdicts.add({"pair": pair.id, "order": order, "segment": pair.segment,
                                  "verdict": parse_verdict(answer), "answer": answer})
    finally:
        verdicts.close()
    return write_llm_table(cfg, a, b, pairs, verdicts.done, out)


def write_llm_table(cfg, a: System, b: System, pairs: list[Pair], done: dict, out: Path) -> list[dict]:
    outcomes = {p.id: combine_orders(done[p.id, "ab"]["verdict"], done[p.id, "ba"]["verdict"]) for p in pairs}
    rows = aggregate(outcomes, {p.id: p.segment for p in pairs}, LLM_DROPPED)
    title = (f"a = {a.label} vs b = {b.label}; judge {cfg.judge.model} at {cfg.judge.base_url}, "
             f"asked in both orders, consistent verdicts only")
    unreadable = [done[p.id, o] for p in pairs for o in ORDERS if done[p.id, o]["verdict"] is None]
    notes = [f"{len(unreadable)} judge answer(s) had no readable verdict (kept in verdicts.jsonl), e.g.:",
             *(f"  pair {r['pair']} order {r['order']}: {r['answer'][:160]!r}" for r in unreadable[:3])]
    text = "\n".join([title, "", format_markdown(rows, LLM_DROPPED), *([""] + notes if unreadable else [])])
    atomic_write_text(out / "table.md", text + "\n")
    atomic_write_text(out / "table.csv", format_csv(rows, LLM_DROPPED))
    atomic_write_text(out / "pairs.jsonl", "".join(
        json.dumps({"pair": p.id, "segment": p.segment, "outcome": outcomes[p.id],
                    "verdict_ab": done[p.id, "ab"]["verdict"], "verdict_ba": done[p.id, "ba"]["verdict"]}) + "\n"
        for p in pairs))
    print(text)
    return rows


def run_export(cfg, out: Path) -> None:
    a, b, pairs = sampled_pairs(cfg)
    systems = {"a": a.label, "a_responses": fingerprint(a), "b": b.label, "b_responses": fingerprint(b)}
    export_forms(pairs, cfg.seed, systems, out)
    print(f"{len(pairs)} pairs for annotators: {out / 'form.html'} (or {out / 'form.csv'}); "
          f"the key stays in {out / 'human_key.json'}")


def run_import(cfg, out: Path) -> None:
    if not cfg.answers:
        raise DataError("judge import needs answers=[<annotator 1 csv>,<annotator 2 csv>,<annotator 3 csv>]")
    text = import_answers(out, [Path(p) for p in cfg.answers], Path(cfg.verdicts) if cfg.verdicts else None)
    print(text)


MODES = {"judge": run_judge, "export": run_export, "import": run_import}


def run(cfg, out: Path) -> None:
    if cfg.mode not in MODES:
        raise DataError(f"mode={cfg.mode}: expected one of {sorted(MODES)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise; retries are logged by openai
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    MODES[cfg.mode](cfg, out)
