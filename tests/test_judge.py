"""lol_rl.judge: the pure functions on hand-written inputs, then the whole judging path against a
local chat-completions server on 127.0.0.1 (scripts/mock_judge_server.py) that the tests start:
well-formed verdicts, unreadable ones, a 429, a server error and a timeout; a killed run that
resumes without repeating a call; the human round trip; the API key kept out of every output."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lol_rl.cli import CONF_DIR
from lol_rl.judge import JudgeError, run
from lol_rl.judge.client import VerdictLog, read_verdicts
from lol_rl.judge.human import agreement, majority, outcome_for_a, read_answers
from lol_rl.judge.pairs import (
    Generation,
    Pair,
    System,
    aggregate,
    combine_orders,
    format_markdown,
    judge_prompt,
    pair_systems,
    parse_verdict,
    read_generations,
    sample_pairs,
)
from lol_rl.tasks import DataError
from lol_rl.tasks.toy import load_toy

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mock_judge_server", ROOT / "scripts" / "mock_judge_server.py")
mock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mock)


# --- pure functions --------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("Response A is polite and right.\nVerdict: A", "A"),
    ("verdict: b", "B"),
    ("**Verdict:** Tie", "tie"),
    ("Both are rude.\nVerdict: Neither.", "neither"),
    ("Verdict: Response B", "B"),
    ('Verdict: "A"', "A"),
    ("A", "A"),  # a terse judge: the word alone
    (" tie \n", "tie"),
    ("Verdict: A\nVerdict: A", "A"),
    # unreadable: never guessed
    ("I think both have merits.", None),
    ("The answer is A", None),
    ("Verdict: C", None),
    ("Verdict: A or B", None),
    ("Verdict: A\nVerdict: B", None),
    ("Verdict:", None),
    ("", None),
])
def test_parse_verdict(answer, expected):
    assert parse_verdict(answer) == expected


@pytest.mark.parametrize("ab, ba, outcome", [
    ("A", "B", "win"),  # a chosen in both orders (shown first, then second)
    ("B", "A", "lose"),
    ("tie", "tie", "tie"),
    ("neither", "neither", "neither"),
    ("A", "A", "inconsistent"),  # always the first shown: position bias, not a verdict
    ("B", "B", "inconsistent"),
    ("tie", "A", "inconsistent"),
    ("tie", "neither", "inconsistent"),
    (None, "A", "unparseable"),
    ("A", None, "unparseable"),
    (None, None, "unparseable"),
])
def test_combine_orders(ab, ba, outcome):
    assert combine_orders(ab, ba) == outcome


def test_aggregate_by_hand():
    outcomes = {"1": "win", "2": "win", "3": "lose", "4": "tie", "5": "inconsistent",
                "6": "neither", "7": "unparseable", "8": "win", "9": "inconsistent"}
    segments = {"1": "harmless-base", "2": "harmless-base", "3": "harmless-base", "4": "harmless-base",
                "5": "harmless-base", "6": "helpful-base", "7": "helpful-base", "8": "helpful-base",
                "9": "helpful-online"}
    rows = {row["segment"]: row for row in aggregate(outcomes, segments)}
    assert list(rows) == ["harmless-base", "helpful-base", "helpful-online", "overall"]
    harmless = rows["harmless-base"]  # 4 kept: 2 win, 1 tie, 1 lose; 1 inconsistent dropped
    assert harmless["criterion"] == "safer" and harmless["kept"] == 4
    assert (harmless["win"], harmless["tie"], harmless["lose"], harmless["neither"]) == (50.0, 25.0, 25.0, 0.0)
    assert (harmless["inconsistent"], harmless["unparseable"]) == (1, 0)
    helpful = rows["helpful-base"]  # 2 kept: 1 win, 1 neither; 1 unparseable
    assert helpful["criterion"] == "more helpful" and helpful["kept"] == 2
    assert (helpful["win"], helpful["neither"], helpful["unparseable"]) == (50.0, 50.0, 1)
    online = rows["helpful-online"]  # nothing kept: no percentages, not 0 %
    assert online["kept"] == 0 and online["win"] is None and online["inconsistent"] == 1
    overall = rows["overall"]  # 6 kept of 9
    assert overall["criterion"] == "by segment" and overall["kept"] == 6
    assert overall["win"] == pytest.approx(300 / 6) and overall["tie"] == pytest.approx(100 / 6)
    assert overall["lose"] == pytest.approx(100 / 6) and overall["neither"] == pytest.approx(100 / 6)
    assert (overall["inconsistent"], overall["unparseable"]) == (2, 1)
    table = format_markdown(rows.values())
    assert "| harmless-base | safer | 4 | 50.0 | 25.0 | 25.0 | 0.0 | 1 | 0 |" in table
    assert "| helpful-online | more helpful | 0 | n/a | n/a | n/a | n/a | 1 | 0 |" in table
    with pytest.raises(ValueError, match="outcome 'maybe'"):
        aggregate({"1": "maybe"}, {"1": "all"})


def _pairs(sizes: dict[str, int]) -> list[Pair]:
    return [Pair(f"{seg}-{i}", seg, f"q{i}", "ra", "rb") for seg, size in sizes.items() for i in range(size)]


def test_sample_pairs_equal_per_segment_and_seeded():
    pairs = _pairs({"d": 10, "c": 10, "b": 3, "a": 10})
    sample = sample_pairs(pairs, 12, seed=0)
    counts = {seg: sum(p.segment == seg for p in sample) for seg in "abcd"}
    assert counts == {"a": 3, "b": 3, "c": 3, "d": 3}
    counts = {seg: sum(p.segment == seg for p in sample_pairs(pairs, 18, seed=0)) for seg in "abcd"}
    assert counts == {"a": 5, "b": 3, "c": 4, "d": 4}  # 18 = 4 x 4 + 2: a and b (by name) get one more; b has 3
    assert sample_pairs(pairs, 12, seed=0) == sample  # seeded
    assert sample_pairs(pairs, 12, seed=1) != sample
    # each segment has its own generator: judging one segment alone draws the same pairs from it
    only_c = sample_pairs(pairs, 3, seed=0, segments=["c"])
    assert only_c == [p for p in sample if p.segment == "c"]
    # file order is kept within a segment
    assert [p.id for p in only_c] == sorted((p.id for p in only_c), key=lambda i: int(i.split("-")[1]))
    assert len(sample_pairs(pairs, 1000, seed=0)) == len(pairs)
    with pytest.raises(DataError, match=r"unknown segment\(s\) \['x'\]; the generations have \['a', 'b', 'c', 'd'\]"):
        sample_pairs(pairs, 4, seed=0, segments=["c", "x"])


def test_judge_prompt_criterion_and_order():
    safe = Pair("1", "harmless-base", "how do I pick a lock?", "I can't help with that.", "Use a pin.")
    first = judge_prompt(safe, "ab")
    assert "which response is safer?" in first and "more helpful" not in first
    assert first.index("I can't help") < first.index("Use a pin.")
    swapped = judge_prompt(safe, "ba")
    assert swapped.index("Use a pin.") < swapped.index("I can't help")
    helpful = judge_prompt(Pair("2", "all", "add: 2 + 3", "5.", "6."), "ab")
    assert "which response is more helpful?" in helpful


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_generations_and_pairing(tmp_path):
    rows = [{"id": i, "prompt": f"q{i}", "response": f"r{i}", "reward": 1.0} for i in range(3)]
    a = _write(tmp_path / "a.jsonl", rows)
    gens = read_generations(a)
    assert list(gens) == ["0", "1", "2"] and gens["1"].segment == "all" and gens["1"].where == f"{a}:2"
    _write(tmp_path / "empty_response.jsonl", [{"id": "0", "prompt": "q", "response": ""}])
    assert read_generations(tmp_path / "empty_response.jsonl")["0"].response == ""  # judged, not refused

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: not valid JSON"):
        read_generations(bad)
    _write(bad, [rows[0], {"id": 1, "prompt": "q"}])
    with pytest.raises(DataError, match=rf"^{bad}:2: missing key 'response'"):
        read_generations(bad)
    _write(bad, [rows[0], rows[0]])
    with pytest.raises(DataError, match=rf"^{bad}:2: duplicate id '0' \(first at {bad}:1\)"):
        read_generations(bad)
    _write(bad, [{**rows[0], "meta": {"segment": 3}}])
    with pytest.raises(DataError, match=r":1: key 'meta.segment' must be a non-empty string"):
        read_generations(bad)

    def system(name, rows, whole_split=False):
        return System(name, name, {str(r["id"]): Generation(str(r["id"]), r["prompt"], r["response"], "all", f"{name}:{k + 1}")
                                   for k, r in enumerate(rows)}, whole_split)

    pairs = pair_systems(system("a", rows), system("b", rows[::-1]))
    assert [(p.id, p.a, p.b) for p in pairs] == [("0", "r0", "r0"), ("1", "r1", "r1"), ("2", "r2", "r2")]
    with pytest.raises(DataError, match=r"^a:3: id '2' is not in b; 1 id\(s\) of a have no match in b: '2'"):
        pair_systems(system("a", rows), system("b", rows[:2]))
    with pytest.raises(DataError, match=r"^b:3: id '2' is not in a; 1 id\(s\) of b have no match in a: '2'"):
        pair_systems(system("a", rows[:2]), system("b", rows))
    assert len(pair_systems(system("a", rows[:2]), system("good", rows, whole_split=True))) == 2  # a judged its first k
    other = [dict(r, prompt="other") if r["id"] == 1 else r for r in rows]
    with pytest.raises(DataError, match=r"^b:2: id '1' has another prompt or segment than a:2"):
        pair_systems(system("a", rows), system("b", other))


def test_verdict_log_drops_a_torn_line(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    records = [{"pair": str(i), "order": "ab", "segment": "all", "verdict": "A", "answer": "Verdict: A"} for i in range(3)]
    whole = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(whole + '{"pair": "3", "ord')  # killed mid-write
    done, complete = read_verdicts(path)
    assert set(done) == {("0", "ab"), ("1", "ab"), ("2", "ab")} and complete == len(whole.encode())
    log = VerdictLog(path)
    log.add({**records[0], "pair": "3"})
    log.close()
    assert [json.loads(line)["pair"] for line in path.read_text().splitlines()] == ["0", "1", "2", "3"]
    path.write_text(whole.rstrip("\n"))  # a whole record that lost only its newline is kept
    VerdictLog(path).close()
    assert path.read_text() == whole
    path.write_text(whole.replace('"order": "ab"', '"order": "xy"', 1))
    with pytest.raises(DataError, match=rf"^{path}:1: not a verdict record"):
        read_verdicts(path)


def test_majority_and_agreement_by_hand():
    assert majority(["1", "1", "2"]) == "1"
    assert majority(["tie", None, "tie"]) == "tie"
    assert majority(["1", "2", "tie"]) is None  # no majority of three
    assert majority(["1", None, None]) is None  # one vote of three is not a majority
    assert outcome_for_a("1", a_side=1) == "win" and outcome_for_a("1", a_side=2) == "lose"
    assert outcome_for_a("2", a_side=2) == "win" and outcome_for_a("neither", a_side=2) == "neither"
    human = {"1": "win", "2": "lose", "3": "tie", "4": "no majority", "5": "win"}
    llm = {"1": "win", "2": "win", "3": "tie", "4": "win", "5": "inconsistent"}
    assert agreement(human, llm) == (2 / 3, 3)  # pairs 1, 2, 3 have both; 1 and 3 agree
    assert agreement({"1": "no majority"}, llm) == (None, 0)


def test_mock_judge_rule_reads_the_real_prompt():
    def verdict(first, second, query="reverse: cat dog"):
        return parse_verdict(mock.judge_by_reward(judge_prompt(Pair("1", "all", query, first, second), "ab")))

    good, rude = "Sure, happy to help! dog cat.", "Ugh, whatever. dog cat."
    assert verdict(good, rude) == "A"
    assert verdict(rude, good) == "B"
    assert verdict(good, good) == "tie"
    assert verdict(rude, rude) == "tie"  # rude but right and short: 2.3 of 3, good enough
    assert verdict("Ugh, whatever. cat dog.", "Ugh, whatever. cat dog.") == "neither"  # and wrong: 1.3
    # politeness 0.78 vs 0.86: a close call, which the mock gives to the first shown (position bias)
    assert verdict("Sure, no problem: dog cat.", "Of course, glad to help! dog cat.") == "A"
    assert verdict("Of course, glad to help! dog cat.", "Sure, no problem: dog cat.") == "A"
    assert verdict("x", "y", query="what is love?") == "tie"  # not a toy prompt


# --- the whole path against a local server ---------------------------------------------------

@pytest.fixture
def server():
    srv = mock.MockJudgeServer(answer=scripted_answer).start()
    srv.slow_seconds = 1.5
    yield srv
    srv.shutdown()
    srv.server_close()


def scripted_answer(prompt: str) -> str:
    """Queries name what the judge does: `win` picks the response saying 'good', `tie`/`neither`
    answer so, `biased` always picks the first shown, `garbage` gives no verdict."""
    query, first = mock._block(prompt, "query"), mock._block(prompt, "response_a")
    kind = query.split("-")[0]
    if kind == "win":
        return "Verdict: " + ("A" if "good" in first else "B")
    return {"tie": "Verdict: tie", "neither": "Verdict: neither", "biased": "Verdict: A"}.get(kind, "No idea.")


# (id, segment, a's response, b's response): a wins 3, loses 1, ties 1, neither 1; 1 inconsistent, 1 unparseable
SCRIPT = [
    ("1", "harmless-base", "win-1", "good", "bad"), ("2", "harmless-base", "win-2", "good", "bad"),
    ("3", "harmless-base", "win-3", "bad", "good"), ("4", "harmless-base", "biased-4", "x", "y"),
    ("5", "helpful-base", "win-5", "good", "bad"), ("6", "helpful-base", "tie-6", "x", "y"),
    ("7", "helpful-base", "neither-7", "x", "y"), ("8", "helpful-base", "garbage-8", "x", "y"),
]
EXPECTED_TABLE = [
    "| harmless-base | safer | 3 | 66.7 | 0.0 | 33.3 | 0.0 | 1 | 0 |",
    "| helpful-base | more helpful | 3 | 33.3 | 33.3 | 0.0 | 33.3 | 0 | 1 |",
    "| overall | by segment | 6 | 50.0 | 16.7 | 16.7 | 16.7 | 1 | 1 |",
]


@pytest.fixture
def systems(tmp_path):
    rows_a = [{"id": i, "prompt": q, "response": ra, "meta": {"segment": seg}} for i, seg, q, ra, _ in SCRIPT]
    rows_b = [{"id": i, "prompt": q, "response": rb, "meta": {"segment": seg}} for i, seg, q, _, rb in SCRIPT]
    return _write(tmp_path / "a.jsonl", rows_a), _write(tmp_path / "b.jsonl", rows_b)


def judge_config(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("judge", overrides=[f"out={out}", *overrides])


def judge(server, systems, out, *overrides):
    a, b = systems
    cfg = judge_config(out, f"a={a}", f"b={b}", "n=8", f"judge.base_url={server.base_url}",
                       "timeout=0.5", *overrides)
    run(cfg, out)
    return (out / "table.md").read_text()


def test_judge_end_to_end(server, systems, tmp_path, capsys):
    out = tmp_path / "judged"
    table = judge(server, systems, out)
    for line in EXPECTED_TABLE:
        assert line in table
    assert server.requests == 16  # 8 pairs x 2 orders, nothing else
    prompts = [prompt for prompt, _ in server.answered]
    assert sum("which response is safer?" in p for p in prompts) == 8  # harmless-base
    assert sum("which response is more helpful?" in p for p in prompts) == 8
    assert "2 judge answer(s) had no readable verdict" in table and "No idea." in table  # shown, not guessed
    assert table in capsys.readouterr().out + "\n"
    with (out / "table.csv").open() as f:
        overall = list(csv.DictReader(f))[-1]
    assert overall["segment"] == "overall" and overall["win %"] == "50.000" and overall["n kept"] == "6"
    outcomes = {r["pair"]: r["outcome"] for r in map(json.loads, (out / "pairs.jsonl").read_text().splitlines())}
    assert outcomes == {"1": "win", "2": "win", "3": "lose", "4": "inconsistent", "5": "win", "6": "tie",
                        "7": "neither", "8": "unparseable"}
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert {(v["pair"], v["order"]) for v in verdicts} == {(i, o) for i, *_ in SCRIPT for o in ("ab", "ba")}


def test_rate_limit_server_error_and_timeout_are_retried(server, systems, tmp_path):
    server.faults = ["429", "slow", "500"]  # the first call meets all three before it is answered
    table = judge(server, systems, tmp_path / "judged")
    for line in EXPECTED_TABLE:
        assert line in table
    assert server.requests == 16 + 3
    assert len((tmp_path / "judged" / "verdicts.jsonl").read_text().splitlines()) == 16


def test_a_killed_run_resumes_without_repeating_calls(server, systems, tmp_path):
    out = tmp_path / "judged"
    server.faults = ["ok"] * 5 + ["500"] * 3  # the judge dies at the 6th call: retries spent, the run stops
    with pytest.raises(JudgeError, match=r"HTTP 500 after 2 retries: the judge fell over"):
        judge(server, systems, out, "max_retries=2")
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == 5
    before = server.requests
    table = judge(server, systems, out)
    assert server.requests - before == 16 - 5  # only the calls never answered
    for line in EXPECTED_TABLE:
        assert line in table

    # killed while writing: a torn last line is dropped and that call made again, nothing else
    lines = (out / "verdicts.jsonl").read_text().splitlines(keepends=True)
    (out / "verdicts.jsonl").write_text("".join(lines[:9]) + lines[9][:20])
    before = server.requests
    assert judge(server, systems, out) == table
    assert server.requests - before == 16 - 9
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == 16
    # a rerun of a finished judging calls nothing; another n reuses every verdict it can
    before = server.requests
    judge(server, systems, out)
    judge(server, systems, out, "n=4")
    assert server.requests == before


def test_out_dir_of_another_judging_is_refused(server, systems, tmp_path):
    out = tmp_path / "judged"
    judge(server, systems, out)
    with pytest.raises(JudgeError, match=r"holds verdicts of another judging \(different judge\)"):
        judge(server, systems, out, "judge.model=another")
    b = systems[1]
    _write(b, [json.loads(line) | {"response": "changed"} for line in b.read_text().splitlines()])
    with pytest.raises(JudgeError, match=r"different b_responses"):
        judge(server, systems, out)


def test_human_round_trip(server, systems, tmp_path):
    verdicts = tmp_path / "judged" / "verdicts.jsonl"
    judge(server, systems, verdicts.parent)
    a, b = systems
    human = tmp_path / "human"
    run(judge_config(human, "mode=export", f"a={a}", f"b={b}", "n=8"), human)
    html = (human / "form.html").read_text()
    key = json.loads((human / "human_key.json").read_text())
    assert len(key["pairs"]) == 8 and {e["a_side"] for e in key["pairs"].values()} == {1, 2}  # sides shuffled
    assert [e["id"] for e in key["pairs"].values()] != [i for i, *_ in SCRIPT]  # pairs shuffled
    assert str(a) not in html and str(b) not in html and '"a_side"' not in html  # anonymised
    assert "http://" not in html and "https://" not in html and "src=" not in html  # self-contained
    with (human / "form.csv").open() as f:
        form = list(csv.DictReader(f))
    assert [r["pair_id"] for r in form] == list(key["pairs"]) and all(r["answer"] == "" for r in form)

    # three annotators: one always picks a's response; two answer like the scripted judge, except
    # that they prefer a's response on the 'tie' pair and call the unreadable ('garbage') one
    # neither; on the 'biased' pair one leaves it blank and one picks b: no majority
    def answer(entry, annotator):
        kind = next(q for i, _, q, *_ in SCRIPT if i == entry["id"]).split("-")[0]
        a_pos, b_pos = str(entry["a_side"]), str(3 - entry["a_side"])
        if annotator == 0:
            return a_pos
        if kind == "win":
            return a_pos if {i: ra for i, _, _, ra, _ in SCRIPT}[entry["id"]] == "good" else b_pos
        return {"tie": a_pos, "neither": "neither", "garbage": "neither"}.get(kind, ["", b_pos][annotator - 1])

    files = []
    for annotator in range(3):
        path = tmp_path / f"annotator{annotator}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["pair_id", "answer"])
            writer.writerows([pid, answer(entry, annotator)] for pid, entry in key["pairs"].items())
        files.append(path)
    cfg = judge_config(human, "mode=import", f"answers=[{','.join(map(str, files))}]", f"verdicts={verdicts}")
    run(cfg, human)
    text = (human / "human_table.md").read_text()
    # harmless-base: wins 1, 2, loses 3, no majority on 4; helpful-base: wins 5, 6, neither 7 and 8
    assert "| harmless-base | safer | 3 | 66.7 | 0.0 | 33.3 | 0.0 | 1 |" in text
    assert "| helpful-base | more helpful | 4 | 50.0 | 0.0 | 0.0 | 50.0 | 0 |" in text
    # both have a verdict on 1, 2, 3, 5, 6, 7 (the LLM's 4 is inconsistent, 8 unreadable); 6 differs
    assert "agreement with the LLM judge: 83.3% of 6 pairs" in text
    swapped = tmp_path / "swapped"  # verdicts about other systems (b vs a) are refused, not compared
    judge(server, (b, a), swapped)
    cfg = judge_config(human, "mode=import", f"answers=[{','.join(map(str, files))}]",
                       f"verdicts={swapped / 'verdicts.jsonl'}")
    with pytest.raises(DataError, match=r"judging.json: judged a = .* other responses than the form's"):
        run(cfg, human)


def test_human_answers_are_checked(tmp_path):
    ids = {"p0001", "p0002"}
    path = tmp_path / "answers.csv"
    cases = [
        ("pair_id,answer\np0001,1\np0002,B\n", r":3: answer 'B'; expected 1, 2, tie or neither"),
        ("pair_id,answer\np0001,1\np0009,2\n", r":3: pair_id 'p0009' is not a pair of the exported form"),
        ("pair_id,answer\np0001,1\np0001,2\n", r":3: pair_id 'p0001' is answered twice"),
        ("pair_id,answer\np0001,1\n", r": 1 pair\(s\) of the form are missing, e.g. \['p0002'\]"),
        ("id,choice\np0001,1\n", r":1: expected a header with columns pair_id and answer"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_answers(path, ids)
    path.write_text("\ufeffpair_id,answer\np0001, Tie \np0002,\n")  # a spreadsheet's BOM, spaces, a blank
    assert read_answers(path, ids) == {"p0001": "tie", "p0002": None}


def test_a_run_dir_against_test_good(server, tmp_path):
    """A finished run's eval generations (found through stages.json) against the task's test
    split, its task read from the run's config.yaml; judged by the mock's reward rule."""
    server.answer = mock.judge_by_reward
    task_cfg = OmegaConf.load(CONF_DIR / "task" / "toy.yaml")
    task_cfg.sizes = {"train": 20, "validation": 10, "test": 12}
    test = load_toy(0, "noisy", {"test": 12})["test"]
    run_dir, eval_dir = tmp_path / "run", tmp_path / "cache" / "eval" / "k"
    run_dir.mkdir()
    eval_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml({"algo": {"name": "alol"}, "seed": 1, "task": task_cfg}))
    (run_dir / "stages.json").write_text(json.dumps({"eval": {"dir": str(eval_dir), "cached": False, "seconds": 1.0}}))
    rude = [{"id": e.id, "prompt": e.prompt, "response": "Ugh, whatever. " + e.response.split(" ")[-1], "meta": e.meta}
            for e in test[:8]]  # the run judged only its first 8 test prompts
    _write(eval_dir / "generations.jsonl", rude)
    out = tmp_path / "judged"
    run(judge_config(out, f"a={run_dir}", "b=test_good", "n=6", f"judge.base_url={server.base_url}"), out)
    table = (out / "table.md").read_text()
    assert table.startswith("a = alol (seed 1) vs b = test good responses")
    assert "| all | more helpful | 6 | 0.0 | 0.0 | 100.0 | 0.0 | 0 | 0 |" in table  # rude loses every time
    assert server.requests == 12

    _write(eval_dir / "generations.jsonl", [dict(rude[0], prompt="add: 1 + 1")])
    with pytest.raises(DataError, match=r"generations.jsonl:1: id .* has another prompt or segment"):
        run(judge_config(out, f"a={run_dir}", "b=test_good", f"judge.base_url={server.base_url}"), out)
    with pytest.raises(DataError, match=r"b=test_good needs the task"):
        run(judge_config(out, f"a={eval_dir / 'generations.jsonl'}", "b=test_good"), out)


# --- the command line ------------------------------------------------------------------------

def lol_rl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CI": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lol_rl.cli", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120, check=False)


def test_cli_judge_keeps_the_api_key_secret(server, systems, tmp_path):
    secret = "sk-test-0123456789-do-not-log"
    server.api_key = secret  # the server refuses calls without it: the key is really sent
    a, b = systems
    out = tmp_path / "judged"
    args = ["judge", f"a={a}", f"b={b}", "judge=gpt4", f"judge.base_url={server.base_url}", f"out={out}"]
    proc = lol_rl(*args, env={"OPENAI_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr
    for line in EXPECTED_TABLE:
        assert line in proc.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"verdicts.jsonl", "table.md", "table.csv", "judging.json", "config.yaml"} <= {p.name for p in files}
    assert "OPENAI_API_KEY" in (out / ".hydra-judge" / "config.yaml").read_text()  # the variable's name, not its value
    for path in files:
        assert secret not in path.read_text(errors="replace"), path
    assert secret not in proc.stdout + proc.stderr

    missing = lol_rl(*args[:-1], f"out={tmp_path / 'nokey'}", env={"OPENAI_API_KEY": ""})
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("lol-rl: judge gpt4: environment variable OPENAI_API_KEY is empty or not set; "
                                      "the API key is read from it (and never from a config)")


def test_cli_bad_input_is_one_line(systems, tmp_path):
    a, b = systems
    b.write_text(b.read_text().splitlines()[0] + "\n{oops\n")
    proc = lol_rl("judge", f"a={a}", f"b={b}", f"out={tmp_path / 'x'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"lol-rl: {b}:2: not valid JSON")
    proc = lol_rl("judge", "export", f"a={a}", f"b={tmp_path / 'missing.jsonl'}", f"out={tmp_path / 'x'}")
    assert proc.returncode == 2 and proc.stderr.strip() == f"lol-rl: {tmp_path / 'missing.jsonl'}: no such file"
    proc = lol_rl("judge", f"a={a}")
    assert proc.returncode == 2 and proc.stderr.startswith("lol-rl: judge needs out=<dir>")
