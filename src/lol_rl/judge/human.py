"""Human evaluation round trip: forms of shuffled, anonymised pairs for annotators, and their
answers back as the same table (majority of three, as the paper) with the agreement with the
LLM judge's consistent verdicts on the same pairs (the paper: 72.1%)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path

from ..tasks.base import DataError, read_json, require_file
from .client import read_verdicts
from ..files import atomic_write_text
from .pairs import (
    OUTCOMES,
    Pair,
    aggregate,
    combine_orders,
    criterion,
    format_csv,
    format_markdown,
)

ANSWERS = ("1", "2", "tie", "neither")  # what an annotator answers about the two shown responses
HUMAN_DROPPED = ("no majority",)
FORM_COLUMNS = ("pair_id", "question", "prompt", "response_1", "response_2", "answer")


def anonymise(pairs: list[Pair], seed: int) -> tuple[list[dict], dict[str, dict]]:
    """The form's items (shuffled, named p0001..., a's response shown first or second at random)
    and the key from form pair id back to prompt id, segment and the side system a is on."""
    rng = random.Random(f"{seed}:human")
    shuffled = list(pairs)
    rng.shuffle(shuffled)
    items, key = [], {}
    for k, pair in enumerate(shuffled, start=1):
        pair_id, a_side = f"p{k:04d}", rng.choice((1, 2))
        first, second = (pair.a, pair.b) if a_side == 1 else (pair.b, pair.a)
        items.append({"pair_id": pair_id, "question": f"Which response is {criterion(pair.segment)}?",
                      "prompt": pair.prompt, "response_1": first, "response_2": second})
        key[pair_id] = {"id": pair.id, "segment": pair.segment, "a_side": a_side}
    return items, key


def export_forms(pairs: list[Pair], seed: int, systems: dict, out: Path) -> None:
    """form.html (self-contained: the annotator answers and downloads a CSV), form.csv (the same
    pairs with an empty answer column) and human_key.json (not for annotators): `systems`
    (labels and response fingerprints of a and b) and, per form pair, which side a is on."""
    items, key = anonymise(pairs, seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "human_key.json", json.dumps({**systems, "pairs": key}, indent=2))
    atomic_write_text(out / "form.html", form_html(items))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FORM_COLUMNS)
    writer.writeheader()
    writer.writerows({**item, "answer": ""} for item in items)
    atomic_write_text(out / "form.csv", buffer.getvalue())


def read_answers(path: Path, pair_ids: set[str]) -> dict[str, str | None]:
    """One annotator's CSV (columns pair_id and answer; others ignored): answer by pair id, None
    where left empty. Every pair of the form must be there once, with 1, 2, tie or neither."""
    require_file(path)
    answers: dict[str, str | None] = {}
    with path.open(encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"pair_id", "answer"} <= set(reader.fieldnames):
            raise DataError(f"{path}:1: expected a header with columns pair_id and answer, got {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            pair_id, answer = (row["pair_id"] or "").strip(), (row["answer"] or "").strip().lower()
            if pair_id not in pair_ids:
                raise DataError(f"{where}: pair_id {pair_id!r} is not a pair of the exported form")
            if pair_id in answers:
                raise DataError(f"{where}: pair_id {pair_id!r} is answered twice")
            if answer and answer not in ANSWERS:
                raise DataError(f"{where}: answer {row['answer']!r}; expected 1, 2, tie or neither (empty: not answered)")
            answers[pair_id] = answer or None
    missing = sorted(pair_ids - set(answers))
    if missing:
        raise DataError(f"{path}: {len(missing)} pair(s) of the form are missing, e.g. {missing[:5]}")
    return answers


def majority(answers: list[str | None]) -> str | None:
    """The answer more than half of the annotators gave (2 of 3); None when there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    answer, votes = counts.most_common(1)[0]
    return answer if votes > len(answers) / 2 else None


def outcome_for_a(answer: str, a_side: int) -> str:
    """An annotator's answer about positions as system a's outcome (win / lose / tie / neither)."""
    if answer in ("1", "2"):
        return "win" if int(answer) == a_side else "lose"
    return answer


def agreement(human: dict[str, str], llm: dict[str, str]) -> tuple[float | None, int]:
    """The fraction of pairs with a verdict from both (a majority; a consistent LLM verdict)
    where they agree, and the number of such pairs."""
    both = [pid for pid, outcome in human.items() if outcome in OUTCOMES and llm.get(pid) in OUTCOMES]
    if not both:
        return None, 0
    return sum(human[pid] == llm[pid] for pid in both) / len(both), len(both)


def llm_outcomes(verdicts_path: Path) -> dict[str, str]:
    records, _ = read_verdicts(verdicts_path)
    if not records and not verdicts_path.is_file():
        raise DataError(f"{verdicts_path}: no such file")
    pair_ids = {pair for pair, _ in records}
    return {pid: combine_orders(records[pid, "ab"]["verdict"], records[pid, "ba"]["verdict"])
            for pid in pair_ids if (pid, "ab") in records and (pid, "ba") in records}


def check_same_systems(key: dict, verdicts_path: Path) -> None:
    manifest_path = verdicts_path.parent / "judging.json"
    if manifest_path.is_file():  # the LLM judging fingerprints its systems: they must be the form's
        manifest = read_json(manifest_path, dict, "the judging's manifest")
        fields = ("a_responses", "b_responses")
        if [manifest.get(f) for f in fields] != [key.get(f) for f in fields]:
            raise DataError(f"{manifest_path}: judged a = {manifest.get('a')!r} vs b = {manifest.get('b')!r}, "
                            f"other responses than the form's a = {key['a']!r} vs b = {key['b']!r}")


def import_answers(out: Path, answer_files: list[Path], verdicts_path: Path | None) -> str:
    """Read the annotators' answers, write human_table.md / .csv in `out` (the export dir) and
    return the text: the table and, given the LLM judge's verdicts, the agreement."""
    key = read_json(out / "human_key.json", dict, "the export's key",
                    missing_hint=" (out= must be the dir `lol-rl judge export` wrote)")
    pairs = key["pairs"]
    per_annotator = [read_answers(path, set(pairs)) for path in answer_files]
    human = {}
    for pair_id, entry in pairs.items():
        answer = majority([answers[pair_id] for answers in per_annotator])
        human[entry["id"]] = "no majority" if answer is None else outcome_for_a(answer, entry["a_side"])
    rows = aggregate(human, {e["id"]: e["segment"] for e in pairs.values()}, HUMAN_DROPPED)
    title = f"a = {key['a']} vs b = {key['b']}; {len(answer_files)} annotators, majority answer (more than half of them)"
    lines = [title, "", format_markdown(rows, HUMAN_DROPPED)]
    if verdicts_path is not None:
        check_same_systems(key, verdicts_path)
        share, n = agreement(human, llm_outcomes(verdicts_path))
        lines += ["", "agreement with the LLM judge: " + (
            f"{100 * share:.1f}% of {n} pairs with a majority and a consistent LLM verdict (the paper: 72.1%)"
            if share is not None else "no pair has both a majority and a consistent LLM verdict")]
    text = "\n".join(lines)
    atomic_write_text(out / "human_table.md", text + "\n")
    atomic_write_text(out / "human_table.csv", format_csv(rows, HUMAN_DROPPED))
    return text


def form_html(items: list[dict]) -> str:
    """A self-contained page (inline CSS and JS, nothing fetched): the pairs, four choices each,
    answers kept in the browser's local storage, and a button that downloads them as a CSV."""
    data = json.dumps(items, ensure_ascii=False).replace("</", "<\\/")  # no early </script>
    form_id = hashlib.sha256(data.encode()).hexdigest()[:12]  # answers in local storage belong to this form
    return HTML_TEMPLATE.replace("__ITEMS__", data).replace("__FORM_ID__", form_id)


HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Which response is better?</title>
<style>
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; }
.pair { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin: 1.5em 0; }
.pair.done { border-color: #4a4; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: .6em; margin: .3em 0 1em; }
.choices label { margin-right: 1.5em; }
#bar { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ddd; }
</style></head><body>
<h1>Which response is better?</h1>
<p>For each query, read the two responses and answer the question above them: Response 1,
Response 2, <b>tie</b> (equally good) or <b>neither</b> (neither is acceptable). Your answers are
kept in this browser; when you are done, download them and send the CSV file back.</p>
<div id="bar">Your name: <input id="annotator" size="16">
<button id="download">Download answers (CSV)</button> <span id="progress"></span></div>
<div id="pairs"></div>
<script type="application/json" id="items">__ITEMS__</script>
<script>
const items = JSON.parse(document.getElementById("items").textContent);
const store = "lol-rl-judge-__FORM_ID__";
const answers = JSON.parse(localStorage.getItem(store) || "{}");
const choices = [["1", "Response 1"], ["2", "Response 2"], ["tie", "Tie"], ["neither", "Neither"]];
function add(parent, tag, text) { const el = document.createElement(tag); el.textContent = text; parent.appendChild(el); return el; }
function progress() {
  const done = items.filter(i => answers[i.pair_id]).length;
  document.getElementById("progress").textContent = done + " / " + items.length + " answered";
}
items.forEach((item, k) => {
  const box = add(document.getElementById("pairs"), "div", "");
  box.className = "pair" + (answers[item.pair_id] ? " done" : "");
  add(box, "h3", (k + 1) + ". " + item.question);
  add(box, "b", "Query"); add(box, "pre", item.prompt);
  add(box, "b", "Response 1"); add(box, "pre", item.response_1);
  add(box, "b", "Response 2"); add(box, "pre", item.response_2);
  const row = add(box, "div", ""); row.className = "choices";
  choices.forEach(([value, text]) => {
    const label = add(row, "label", ""); const input = document.createElement("input");
    input.type = "radio"; input.name = item.pair_id; input.value = value;
    input.checked = answers[item.pair_id] === value;
    input.onchange = () => { answers[item.pair_id] = value; localStorage.setItem(store, JSON.stringify(answers));
                             box.className = "pair done"; progress(); };
    label.appendChild(input); label.appendChild(document.createTextNode(" " + text));
  });
});
progress();
document.getElementById("download").onclick = () => {
  const missing = items.filter(i => !answers[i.pair_id]).length;
  if (missing && !confirm(missing + " pairs are not answered yet. Download anyway?")) return;
  const csv = "pair_id,answer\\n" + items.map(i => i.pair_id + "," + (answers[i.pair_id] || "")).join("\\n") + "\\n";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([csv], {type: "text/csv"}));
  link.download = "answers-" + (document.getElementById("annotator").value.trim() || "annotator") + ".csv";
  link.click();
};
</script></body></html>
"""
