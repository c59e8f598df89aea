"""`task=hf`: any `datasets` source (files of each kind, a save_to_disk dir) and TRL's formats
onto the common row, the same strict validator with `<path>[<split>]:<row>` lines, splits carved
from train, conversational prompts under a chat template, and DPO and KTO runs through the CLI."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import lol_rl.pipeline as pipeline
from conftest import replace_stage_runs
from lol_rl.cli import CONF_DIR
from lol_rl.config import HFTask
from lol_rl.errors import ConfigError
from lol_rl.pipeline import run_train
from lol_rl.tasks import DataError, Example, build_task
from lol_rl.tasks.hf import NOT_OFFLINE, PROMPT_MESSAGES, load_hf
from test_cli import ROOT, TINY, lol_rl

SCORED = [{"prompt": f"question {i}", "completion": f"answer {i}", "score": i / 10, "source": "forum"}
          for i in range(10)]
PAIRS = [{"prompt": f"Say something kind about {name}.", "chosen": f"{name} is wonderful, thank you!",
          "rejected": f"{name} is fine."} for name in ("Ada", "Bo", "Cy")]
HH = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: A colour?\n\nAssistant:"


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` as the file kind `path`'s name says."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        text = "".join(json.dumps(row) + "\n" for row in rows).encode()
        path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".parquet"):
        Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def cfg(path, tmp_path: Path, **overrides):
    """conf/task/hf.yaml over its schema (a typo in a key fails), with `path` and a private datasets cache."""
    yaml = OmegaConf.load(ROOT / "conf" / "task" / "hf.yaml")
    return OmegaConf.merge(OmegaConf.structured(HFTask), yaml,
                           {"path": str(path), "cache_dir": str(tmp_path / "hf-cache")}, overrides)


def every_row(splits: dict) -> list[Example]:
    """The rows of all three splits in id order, without the carving mark (tested apart)."""
    rows = [e for split in ("train", "validation", "test") for e in splits[split]]
    for e in rows:
        e.meta.pop("carved_from", None)
    return sorted(rows, key=lambda e: (len(e.id), e.id))


def saved_dir(tmp_path: Path, splits: dict[str, list[dict]]) -> Path:
    path = tmp_path / "saved"
    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------- sources and formats


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.parquet", "rows.csv", "rows.jsonl.gz"])
def test_scored_rows_read_alike_from_every_file_kind(name, tmp_path):
    """prompt + completion + score (TRL's prompt-completion with a score); an unread column goes under meta."""
    splits = load_hf(cfg(write(tmp_path / name, SCORED), tmp_path))
    assert every_row(splits) == [Example(id=f"train-{i}", prompt=f"question {i}", response=f"answer {i}",
                                         reward=i / 10, meta={"source": "forum"}) for i in range(10)]
    assert splits[PROMPT_MESSAGES] == {}  # no prompt came as messages


def test_a_save_to_disk_dir_keeps_its_splits_and_preference_rows_are_pairs(tmp_path):
    path = saved_dir(tmp_path, {"train": PAIRS, "validation": PAIRS[:1], "test": PAIRS[1:]})
    splits = load_hf(cfg(path, tmp_path))
    ada = PAIRS[0]
    expected = Example(id="train-0", prompt=ada["prompt"], response=ada["chosen"], rejected=ada["rejected"],
                       ranking=[ada["chosen"], ada["rejected"]])
    assert splits["train"][0] == expected
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [3, 1, 2]
    assert splits["validation"][0] == Example(**{**vars(expected), "id": "validation-0"})  # nothing carved
    assert [e.id for e in splits["test"]] == ["test-0", "test-1"]


def test_implicit_prompt_pairs_split_at_the_last_assistant_turn(tmp_path, caplog):
    rows = [{"chosen": HH + " Blue, like the sky.", "rejected": HH + " No."},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}] * 5
    with caplog.at_level(logging.INFO, logger="lol_rl.tasks.hf"):
        splits = load_hf(cfg(write(tmp_path / "hh.jsonl", rows), tmp_path, validation_fraction=0.2,
                             test_fraction=0.2))
    kept = every_row(splits)
    assert [e.id for e in kept] == ["train-0", "train-2", "train-4", "train-6", "train-8"]
    assert kept[0] == Example(id="train-0", prompt=HH, response="Blue, like the sky.", rejected="No.",
                              ranking=["Blue, like the sky.", "No."])
    assert kept[0].prompt + " " + kept[0].response == rows[0]["chosen"]
    # the turns a chat template renders: hha.py's parse of the shared history
    assert splits[PROMPT_MESSAGES][HH] == [("Human", "Hi there"), ("Assistant", "Hello!"), ("Human", "A colour?")]
    assert "5 skipped (chosen and rejected are not two endings of one dialogue)" in caplog.text


def test_unpaired_labels_are_rewards_one_and_zero(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+2?", "completion": "5", "label": False},
            {"prompt": "3+3?", "completion": "6", "label": True}, {"prompt": "3+3?", "completion": "7", "label": False}]
    splits = load_hf(cfg(write(tmp_path / "kto.parquet", rows), tmp_path, validation_fraction=0.25,
                         test_fraction=0.25))
    assert every_row(splits) == [Example(id=f"train-{i}", prompt=r["prompt"], response=r["completion"],
                                         reward=1.0 if r["label"] else 0.0) for i, r in enumerate(rows)]


SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Name a colour."}
PLAIN = "system: Be brief.\nuser: Name a colour.\nassistant:"


@pytest.mark.parametrize("row", [
    {"messages": [SYSTEM, USER, {"role": "assistant", "content": "Blue."}]},
    {"prompt": [SYSTEM, USER], "completion": [{"role": "assistant", "content": "Blue."}]},
    {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"chosen": [SYSTEM, USER, {"role": "assistant", "content": "Blue."}],
     "rejected": [SYSTEM, USER, {"role": "assistant", "content": "No."}]},
], ids=["messages", "prompt-completion", "preference", "implicit-preference"])
def test_conversational_rows_keep_their_turns_for_the_chat_template(row, tmp_path):
    rows = [{**row, "reward": 0.5}] * 3
    task = build_task(cfg(write(tmp_path / "chat.parquet", rows), tmp_path, validation_fraction=0.34,
                          test_fraction=0.34))
    example = task.splits["train"][0]
    assert (example.prompt, example.response) == (PLAIN, "Blue.")  # plain text without a chat template
    assert example.rejected == ("No." if "rejected" in row else None)
    assert task.format_prompt(example.prompt) == PLAIN
    rendered = []
    assert task.use_chat_template(lambda messages: rendered.append(messages) or "<chat>")
    assert task.format_prompt(example.prompt) == "<chat>" and task.response_prefix == ""
    assert rendered == [[SYSTEM, USER]]


def test_a_text_dataset_keeps_its_prompt_template_under_a_chat_model(tmp_path):
    task = build_task(cfg(write(tmp_path / "rows.jsonl", SCORED), tmp_path, prompt_template="Q: {prompt}\nA:"))
    assert not task.use_chat_template(lambda messages: "<chat>")
    assert task.format_prompt("question 1") == "Q: question 1\nA:"


def test_a_column_mapping_reads_other_names_and_errors_name_them(tmp_path):
    rows = [{"question": "Why?", "answer": "Because.", "rating": 0.7, "uid": "q1"},
            {"question": "How?", "answer": "", "rating": 0.2, "uid": "q2"}]
    columns = {"prompt": "question", "response": "answer", "reward": "rating", "id": "uid"}
    path = write(tmp_path / "qa.jsonl", rows)
    task_cfg = cfg(path, tmp_path, columns=columns, validation_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError) as err:
        load_hf(task_cfg)
    assert str(err.value) == f"{path}[train]:1: key 'answer' is empty"
    path = write(tmp_path / "qa-fixed.jsonl", [{**rows[0], "uid": f"q{i}"} for i in range(1, 6)])
    splits = load_hf(cfg(path, tmp_path, columns=columns, validation_fraction=0.2, test_fraction=0.2))
    assert every_row(splits)[0] == Example(id="q1", prompt="Why?", response="Because.", reward=0.7)


def test_carved_splits_are_seeded_disjoint_marked_and_in_the_fingerprint(tmp_path, caplog):
    rows = [{**r, "id": f"r{i}"} for i, r in enumerate(SCORED * 4)]
    path = write(tmp_path / "rows.jsonl", rows)

    def ids(seed, **fractions):
        splits = load_hf(cfg(path, tmp_path, seed=seed, **fractions))
        return {s: [e.id for e in splits[s]] for s in ("train", "validation", "test")}, splits

    with caplog.at_level(logging.INFO, logger="lol_rl.tasks.hf"):
        first, splits = ids(0)
    assert "validation 4, test 4 carved from its 40 rows (seed 0); 32 train rows left" in caplog.text
    assert ids(0)[0] == first and ids(1)[0] != first
    assert [len(first[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    every = first["train"] + first["validation"] + first["test"]
    assert sorted(every) == sorted(r["id"] for r in rows)  # disjoint, and nothing lost
    assert all(e.meta["carved_from"] == "train" for s in ("validation", "test") for e in splits[s])
    assert not any("carved_from" in e.meta for e in splits["train"])
    fingerprint = build_task(cfg(path, tmp_path)).fingerprint()
    assert build_task(cfg(path, tmp_path, test_fraction=0.2)).fingerprint() != fingerprint


def test_only_the_missing_split_is_carved(tmp_path):
    path = saved_dir(tmp_path, {"train": SCORED, "test": SCORED[:2]})
    splits = load_hf(cfg(path, tmp_path, validation_fraction=0.3))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [7, 3, 2]
    assert [e.id for e in splits["test"]] == ["test-0", "test-1"] and "carved_from" not in splits["test"][0].meta


def test_task_format_overrides_what_the_columns_suggest(tmp_path):
    rows = [{"prompt": "p", "response": "logged", "reward": 0.3, "chosen": "good", "rejected": "bad"}] * 10
    path = write(tmp_path / "both.jsonl", rows)
    auto = load_hf(cfg(path, tmp_path))["train"][0]
    assert (auto.response, auto.rejected, auto.reward) == ("good", "bad", 0.3)
    scored = load_hf(cfg(path, tmp_path, format="scored"))["train"][0]
    assert scored == Example(id=scored.id, prompt="p", response="logged", reward=0.3, rejected="bad",
                             meta={"chosen": "good"})
    with pytest.raises(DataError) as err:
        load_hf(cfg(path, tmp_path, format="unpaired"))
    assert str(err.value) == (f"{path}[train]: format 'unpaired' needs column(s) ['label']; columns: "
                              "['prompt', 'response', 'reward', 'chosen', 'rejected'] "
                              "(task.columns.<name>=<column> maps a column of another name)")


# ---------------------------------------------------------------- bad input: one line each

GOOD = {"prompt": "p", "completion": "c", "reward": 1.0}


@pytest.mark.parametrize("rows, expected", [
    ([GOOD, {"prompt": "p", "reward": 1.0}, GOOD], "{path}[train]:1: missing key 'completion'"),
    ([GOOD, {**GOOD, "reward": "high"}, GOOD], "{path}[train]:1: key 'reward': expected a number, got str 'high'"),
    ([{**GOOD, "label": 1}] * 3, "{path}[train]:0: key 'label' must be a bool (true or false), got int 1"),
    ([{"messages": [{"role": "user", "content": "hi"}]}] * 3,
     "{path}[train]:0: key 'messages' has no assistant turn (the response)"),
    ([{"chosen": "plain text", "rejected": HH + " x"}] * 3,
     "{path}[train]:0: key 'chosen' must be a dialogue '\\n\\nHuman: ...\\n\\nAssistant: ...' ending with an "
     "assistant turn, or a list of messages (there is no prompt column)"),
    ([GOOD, {**GOOD, "id": 7}, {**GOOD, "id": 7}], "{path}[train]:2: duplicate id '7' (first at row 1)"),
    ([{"question": "q", "answer": "a"}] * 3,
     "{path}[train]: no format fits the columns ['question', 'answer']: scored needs prompt + response|completion, "
     "preference chosen + rejected (+ prompt), unpaired prompt + completion + label, conversational messages; "
     "task.columns.<name>=<column> maps a column of another name"),
], ids=["missing-column", "reward-not-a-number", "label-not-bool", "no-assistant-turn", "implicit-not-a-dialogue",
        "duplicate-id", "no-format"])
def test_a_bad_row_stops_with_one_line_naming_split_row_and_key(rows, expected, tmp_path):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_hf(cfg(path, tmp_path, validation_fraction=0.34, test_fraction=0.34))
    assert str(err.value) == expected.format(path=path)


@pytest.mark.parametrize("path, overrides, expected", [
    ("{tmp}/missing.jsonl", {}, "task.path={tmp}/missing.jsonl: no such file or dir"),
    ("nobody/no-such-dataset", {}, f"task.path=nobody/no-such-dataset {NOT_OFFLINE}"),
    ("{tmp}/bad.jsonl.gz", {}, "task.path={tmp}/bad.jsonl.gz: cannot read it (Not a gzipped file (b'no'))"),
    ("{tmp}/rows.jsonl", {"columns": {"prompt": "question"}},
     "{tmp}/rows.jsonl[train]: no column 'question' (task.columns.prompt); columns: "
     "['prompt', 'completion', 'score', 'source']"),
    ("{tmp}/rows.jsonl", {"split": {"validation": "dev"}},
     "task.path={tmp}/rows.jsonl: no split 'dev' (task.split.validation); splits: ['train'] "
     "(task.split.validation=null carves it from train)"),
], ids=["missing-path", "hub-id-not-cached", "not-gzip", "mapped-column-absent", "named-split-absent"])
def test_a_bad_source_or_mapping_stops_with_one_line(path, overrides, expected, tmp_path):
    write(tmp_path / "rows.jsonl", SCORED)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError) as err:
        load_hf(cfg(path.format(tmp=tmp_path), tmp_path, **overrides))
    assert str(err.value) == expected.format(tmp=tmp_path)


def test_a_misspelt_column_name_is_refused(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="Could not override 'task.columns.promt'"):
            compose("config", overrides=["task=hf", "task.path=x", "task.columns.promt=question"])
    untyped = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "task" / "hf.yaml"),  # build_task given a bare yaml
                              {"path": str(write(tmp_path / "rows.jsonl", SCORED)), "columns": {"promt": "question"}})
    with pytest.raises(DataError) as err:
        load_hf(untyped)
    assert str(err.value) == ("task.columns: unknown name(s) ['promt']; expected some of ['id', 'prompt', 'response', "
                              "'completion', 'reward', 'score', 'rewards', 'rejected', 'ranking', 'chosen', 'label', "
                              "'messages', 'meta'], each mapped to a column of the data")


def test_dpo_on_scored_rows_stops_before_any_stage(tmp_path, monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("a stage started")

    replace_stage_runs(monkeypatch, {name: tripwire for name in pipeline.BY_NAME})
    path = write(tmp_path / "rows.jsonl", SCORED)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run_cfg = compose("config", overrides=["task=hf", f"task.path={path}", f"task.cache_dir={tmp_path / 'hf'}",
                                               "algo=dpo", f"cache_dir={tmp_path / 'cache'}", "device=cpu"])
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError) as err:
        run_train(run_cfg, tmp_path / "run")
    assert str(err.value) == "dpo needs preference pairs; task hf has none"


# ---------------------------------------------------------------- end to end


def test_dpo_runs_on_trl_preference_rows_through_the_cli(tmp_path):
    rows = [{"prompt": f"Say something kind about {name} ({i}).", "chosen": f"{name} is lovely, thank you!",
             "rejected": f"{name} is fine."} for i in range(12) for name in ("Ada", "Bo", "Cy", "Di", "Ed")]
    path = write(tmp_path / "pairs.jsonl", rows)
    tiny = [o for o in TINY if not o.startswith("task.sizes.")]
    run_dir = tmp_path / "run"
    proc = lol_rl("train", "task=hf", f"task.path={path}", f"task.cache_dir={tmp_path / 'hf'}", "task.rewards=[polite]",
                  "algo=dpo", *tiny, f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["policy"]["n"] == 6  # the carved test split: 10% of 60 rows
    stages = json.loads((run_dir / "stages.json").read_text())
    assert "value" not in stages and "advantage" not in stages  # DPO reads pairs and the reference only
    assert "| dpo (seed 1) |" in proc.stdout


def test_kto_runs_on_trl_unpaired_rows_through_the_cli(tmp_path):
    """TRL's unpaired format (prompt, completion, label): the labels are the desirable rows (the
    null threshold resolves to the mean of the 1/0 rewards, which lies between them)."""
    names = ("Ada", "Bo", "Cy", "Di", "Ed")
    rows = [{"prompt": f"Say something kind about {name} ({i}).",
             "completion": f"{name} is lovely, thank you!" if (i + k) % 2 else f"{name} is fine.",
             "label": bool((i + k) % 2)} for i in range(12) for k, name in enumerate(names)]
    path = write(tmp_path / "unpaired.jsonl", rows)
    tiny = [o for o in TINY if not o.startswith("task.sizes.")]
    run_dir = tmp_path / "run"
    proc = lol_rl("train", "task=hf", f"task.path={path}", f"task.cache_dir={tmp_path / 'hf'}", "task.rewards=[polite]",
                  "algo=kto", *tiny, f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert "value" not in stages and "advantage" not in stages and "mismatched" in stages
    threshold = OmegaConf.load(run_dir / "config.yaml").algo.params.threshold
    assert 0.0 < threshold < 1.0
    assert "| kto (seed 1) |" in proc.stdout
    desirable = [json.loads(line)["desirable_fraction"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("stage") == "rl"]
    assert desirable and all(0.0 < d < 1.0 for d in desirable)


def test_kto_with_a_threshold_above_every_label_stops_before_any_stage_in_one_line(tmp_path):
    rows = [{"prompt": f"q {i}", "completion": f"a {i}", "label": i % 2 == 0} for i in range(40)]
    path = write(tmp_path / "unpaired.jsonl", rows)
    tiny = [o for o in TINY if not o.startswith("task.sizes.")]
    proc = lol_rl("train", "task=hf", f"task.path={path}", f"task.cache_dir={tmp_path / 'hf'}", "task.rewards=[polite]",
                  "algo=kto", "algo.params.threshold=1.0", *tiny, f"hydra.run.dir={tmp_path / 'run'}",
                  cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert ("lol-rl: algo kto: algo.params.threshold=1 makes all 32 train rows undesirable (R <= threshold); train "
            "rewards span 0..1, and it needs rows on both sides") in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "cache" / "sft").exists()  # the labels came with the data: checked before any stage
