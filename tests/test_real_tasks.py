"""The paper's four task loaders on small fixtures in each source's own format (tests/fixtures/<task>/),
through the task yamls as a run composes them, and the reward-input functions' exact outputs."""

from __future__ import annotations

import gzip
import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lol_rl.cli import CONF_DIR
from lol_rl.tasks import LOADERS, DataError
from lol_rl.tasks.base import FIT_TEXTS
from lol_rl.tasks.commonsense import NAMES, critic_input
from lol_rl.tasks.hha import oasst_rm_input
from lol_rl.tasks.reddit import dialogrpt_input as reddit_dialogrpt_input
from lol_rl.tasks.reddit import toxichat_input
from lol_rl.tasks.wow import approx_tokens, faithcritic_input, truncate_history
from lol_rl.tasks.wow import dialogrpt_input as wow_dialogrpt_input

FIXTURES = Path(__file__).parent / "fixtures"
EOS = "<|endoftext|>"


def task_cfg(task: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"task={task}", *overrides]).task


def load(task: str, *overrides: str):
    """The splits a loader returns (without the reward-fit texts some also return)."""
    cfg = task_cfg(task, *overrides)
    splits = LOADERS[cfg.loader](cfg)
    splits.pop(FIT_TEXTS, None)
    return splits


def by_id(splits) -> dict:
    return {e.id: e for rows in splits.values() for e in rows}


# --- HHA ------------------------------------------------------------------------------------------

PRO = FIXTURES / "hha" / "pro"


def hha_pro(*overrides):
    return load("hha", f"task.pro_dir={PRO}", *overrides)


def hha_hub(tmp_path, *overrides):
    return load("hha", "task.source=hub", f"task.hub_dataset={FIXTURES / 'hha' / 'hub'}",
                f"task.hub_cache_dir={tmp_path / 'hf-cache'}", "task.hub_validation=2", *overrides)


def test_hha_pro_prompt_is_the_authors_llama_chat_format():
    splits = hha_pro()
    first = splits["test"][0]
    assert first.id == "harmless_base-0"
    assert first.prompt == ("### Human: You need a lot of help ### Assistant: I could be your friend. I think you’ll "
                            "get to be super powerful. ### Human: I would never be your friend. ### Assistant:")
    assert first.response == "I would like to share some of my gifts with you."
    assert first.rejected == "How do you feel about helping each other?"
    assert first.ranking == [first.response, first.rejected]
    assert first.meta["segment"] == "harmless_base"
    cfg = task_cfg("hha")
    assert cfg.prompt_template.format(prompt="### Human: hi ### Assistant:") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.\n### Human: hi ### Assistant:")


def test_hha_pro_test_segments_and_the_authors_exclusions():
    test = hha_pro()["test"]
    # fixture rows per segment: 3, 3, 2, 2; bad_test_indices.json drops harmless_base row 1, helpful_online row 0
    assert [e.id for e in test] == ["harmless_base-0", "harmless_base-2", "helpful_base-0", "helpful_base-1",
                                    "helpful_base-2", "helpful_online-1", "helpful_rejection-0", "helpful_rejection-1"]
    assert [e.meta["segment"] for e in test] == [e.id.rsplit("-", 1)[0] for e in test]
    assert len(hha_pro("task.exclude_test=null")["test"]) == 10
    capped = hha_pro("task.sizes.test=1")["test"]
    assert [e.meta["segment"] for e in capped] == ["harmless_base", "helpful_base", "helpful_online",
                                                   "helpful_rejection"]


def test_hha_train_drops_cut_off_and_empty_responses():
    raw = [json.loads(line)["suffix"] for line in (PRO / "hh_train_len2" / "train.json").read_text().splitlines()]
    # rows 2, 3, 4 of the fixture: chosen ends with ":", rejected ends with ":", an empty response
    assert raw[2][0].endswith(":") and raw[3][1].endswith(":") and "" in raw[4]
    train = hha_pro()["train"]
    assert [e.id for e in train] == ["train-0", "train-1", "train-5"]
    assert [e.meta["segment"] for e in train] == ["harmless_base", "helpful_base", "helpful_rejection"]
    assert all(e.rewards is None for e in train)  # PRO's scores are not the reward unless asked
    assert len(hha_pro()["validation"]) == 3  # validation is not cleaned (the authors' dev is not)


def test_hha_data_reward_is_the_sigmoid_of_pros_chosen_score():
    train = hha_pro("task.data_reward=true")["train"]
    first = train[0]
    assert first.rewards == {"reward": pytest.approx(1 / (1 + math.exp(-first.meta["pro_reward"][0])))}


def test_oasst_rm_input_is_the_authors_reward_text():
    assert oasst_rm_input("### Human: a ### Assistant: b ### Human: c ### Assistant:", "d") == (
        "<|prompter|>a<|endoftext|><|assistant|>b<|endoftext|><|prompter|>c<|endoftext|><|assistant|>d<|endoftext|>")
    # the text the authors' get_score builds from the PRO row itself
    row = json.loads((PRO / "hh_test" / "harmless_base.json").read_text().splitlines()[0])
    prefix, chosen = row["prefix"][0], row["suffix"][0]
    expected = "".join(turn + EOS for turn in prefix[:-1] + [prefix[-1] + chosen])
    example = hha_pro()["test"][0]
    assert oasst_rm_input(example.prompt, example.response) == expected
    with pytest.raises(ValueError, match="not an HHA prompt"):
        oasst_rm_input("Human: hi", "there")


def test_hha_hub_layout_gives_the_same_pairs(tmp_path):
    splits = hha_hub(tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation": 2, "test": 6}
    assert [e.meta["segment"] for e in splits["test"]] == ["harmless_base"] * 2 + ["helpful_base"] * 2 + [
        "helpful_online", "helpful_rejection"]
    rows = by_id(splits)
    # harmless-base train: row 1's rejected ends with ":" (dropped), row 2's two dialogues differ (skipped)
    assert "harmless_base-train-1" not in rows and "harmless_base-train-2" not in rows
    pro = hha_pro()["test"][0]  # the same dialogue as the hub's harmless-base test row 0
    hub = rows["harmless_base-test-0"]
    assert (hub.prompt, hub.response, hub.rejected) == (pro.prompt, pro.response, pro.rejected)
    assert hub.meta == {"segment": "harmless_base", "source": "harmless-base/test row 0"}


@pytest.mark.parametrize("line, key", [
    ('{"prefix": [["<|prompter|>hi", "<|assistant|>"]], "reward": [0.1, 0.2], "sft_index": 0}', "'suffix'"),
    ('{"prefix": [["hi", "<|assistant|>"]], "suffix": ["a", "b"], "reward": [0.1, 0.2]}', "'prefix'"),
    ('{"prefix": [["<|prompter|>hi", "<|assistant|>"]], "suffix": ["a", "b"], "reward": [0.1]}', "'reward'"),
    ('{"prefix": [["<|prompter|>hi", "<|assistant|>"]], "suffix": ["a", "b"], "reward": [0.1, ', "not valid JSON"),
])
def test_hha_bad_row_names_file_line_and_key(tmp_path, line, key):
    pro = tmp_path / "pro"
    shutil.copytree(PRO, pro)
    path = pro / "hh_dev" / "sampled_dev.json"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[0], line, *rows[1:]]) + "\n")
    with pytest.raises(DataError) as info:
        load("hha", f"task.pro_dir={pro}")
    assert f"{path}:2" in str(info.value) and key in str(info.value)


def test_hha_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/hh_test/harmless_base.json: no such file"):
        load("hha", f"task.pro_dir={tmp_path}", "task.exclude_test=null")
    hub = tmp_path / "hub"
    shutil.copytree(FIXTURES / "hha" / "hub", hub)
    rows = b'{"chosen": "\\n\\nHuman: x"}\n{"chosen": "\\n\\nHuman: x", "rejected": "\\n\\nHuman: y"}\n'
    (hub / "helpful-online" / "train.jsonl.gz").write_bytes(gzip.compress(rows))
    with pytest.raises(DataError, match=r"helpful-online/train row 0: key 'rejected' must be a str, got NoneType"):
        load("hha", "task.source=hub", f"task.hub_dataset={hub}", f"task.hub_cache_dir={tmp_path / 'c1'}")
    (hub / "helpful-online" / "train.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"data_dir=helpful-online: cannot read it"):
        load("hha", "task.source=hub", f"task.hub_dataset={hub}", f"task.hub_cache_dir={tmp_path / 'c2'}")


# --- Reddit ---------------------------------------------------------------------------------------

REDDIT = ("task.test_per_polarity=2", "task.validation_per_polarity=2", f"task.data_dir={FIXTURES / 'reddit'}")


def test_reddit_splits_are_balanced_and_train_is_one_polarity():
    pos, neg = load("reddit_pos", *REDDIT), load("reddit_neg", *REDDIT)
    for split in ("validation", "test"):
        assert [e.meta["polarity"] for e in pos[split]] == ["positive"] * 2 + ["negative"] * 2
        assert [e.id for e in pos[split]] == [e.id for e in neg[split]]  # the same balanced sets
    # 9 rows per polarity: one lacks a text or parent, one parent and one reply are over 100 words
    assert [e.meta["polarity"] for e in pos["train"]] == ["positive"] * 2
    assert [e.meta["polarity"] for e in neg["train"]] == ["negative"] * 2
    rows = {**by_id(pos), **by_id(neg)}
    assert len(rows) == 2 * 6
    assert not {"dbx7r2m", "dby3t6n", "dbz5u8p", "dd3dd44", "dd4ee55", "dd5ff66"} & set(rows)
    assert all(len(e.prompt.split()) <= 100 and len(e.response.split()) <= 100 for e in rows.values())
    assert rows["dd6gg77"].meta == {"polarity": "negative", "score": -2946.0}


def test_reddit_tfidf_fits_on_both_polarities_train_replies():
    """One TF-IDF vocabulary for reddit_pos and reddit_neg, as the authors fit it."""
    fits = []
    for task in ("reddit_pos", "reddit_neg"):
        cfg = task_cfg(task, *REDDIT)
        splits = LOADERS[cfg.loader](cfg)
        fits.append(splits[FIT_TEXTS])
        assert set(e.response for e in splits["train"]) < set(splits[FIT_TEXTS])
    assert fits[0] == fits[1] and len(fits[0]) == 4


def test_reddit_text_is_cleaned_and_prompt_closed_by_eos():
    rows = by_id(load("reddit_pos", *REDDIT))
    assert rows["dbumnq8"].response == "Start with eggs. Master an omelette and everything else follows."
    assert rows["dbv0k2a"].response == "The Count of Monte Cristo. Read it twice and it still holds up."
    assert rows["dbw1x9c"].response == "Don't try anything new on race day. Here is my plan: <URL> worked for me."
    cfg = task_cfg("reddit_pos")
    assert cfg.prompt_template.format(prompt=rows["dc23x4s"].prompt) == "How do I fix a squeaky door?<|endoftext|>"


def test_reddit_sample_is_seeded_and_capped():
    first, again = load("reddit_pos", *REDDIT), load("reddit_pos", *REDDIT)
    assert [e.id for e in first["train"]] == [e.id for e in again["train"]]
    small = load("reddit_pos", *REDDIT, "task.sample_size=6", "task.test_per_polarity=1",
                 "task.validation_per_polarity=1")
    assert sum(e.meta["polarity"] == "positive" for e in by_id(small).values()) <= 6


def test_reddit_input_functions():
    assert reddit_dialogrpt_input("Cats or dogs?", "Dogs.") == "Cats or dogs?<|endoftext|>Dogs."
    assert toxichat_input("Cats or dogs?", "Dogs.") == "Cats or dogs?<|endoftext|>Dogs.<|endoftext|>"


def test_reddit_bad_csv_names_file_row_and_key(tmp_path):
    data = tmp_path / "reddit"
    shutil.copytree(FIXTURES / "reddit", data)
    csv = data / "comments_negative.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace(",-25,-25,", ",lots,-25,")  # data row 1's score
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{csv}: data row 1 .*key 'score' is 'lots'"):
        load("reddit_pos", *REDDIT, f"task.data_dir={data}")
    (data / "comments_positive.csv").write_text("id,text,score\nabc,hello,3\n")
    with pytest.raises(DataError, match=r"comments_positive.csv: missing column\(s\) \['parent_text'\]"):
        load("reddit_pos", *REDDIT, f"task.data_dir={data}")


# --- Commonsense ----------------------------------------------------------------------------------

COMMONSENSE = (f"task.skd_dir={FIXTURES / 'commonsense'}",)


def test_commonsense_splits_prompts_and_data_reward():
    splits = load("commonsense", *COMMONSENSE)
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "validation": 2, "test": 3}
    first = splits["train"][0]
    assert first.prompt == "<head> PersonX decides to see a therapist </head> <relation> xEffect </relation> [GEN]"
    assert first.response == "feels better"
    assert first.rewards == {"critic": 0.9934503436088562}
    assert load("commonsense", *COMMONSENSE, "task.data_reward=false")["train"][0].rewards is None
    # ATOMIC-2020 test: relations outside ATOMIC-10x's seven dropped, one row per (head, relation),
    # the first tail that is not "none" as the reference
    assert [(e.prompt, e.response) for e in splits["test"]] == [
        ("<head> PersonX abandons ___ altogether </head> <relation> xEffect </relation> [GEN]", "gets yelled at"),
        ("<head> PersonX asks PersonY to marry </head> <relation> xReact </relation> [GEN]", "nervous"),
        ("<head> PersonX takes a nap </head> <relation> xWant </relation> [GEN]", "none"),
    ]


def test_critic_input_names_the_people_deterministically():
    prompt = "<head> PersonX asks PersonY for a ride </head> <relation> xIntent </relation> [GEN]"
    assert critic_input(prompt, " to get to work") == ("James asks Mary for a ride",
                                                       "because James wanted to get to work")
    for head in ("PersonX eats", "PersonX hugs PersonY", "PersonX calls PersonY's mom"):
        first, second = critic_input(f"<head> {head} </head> <relation> xEffect </relation> [GEN]", "PersonY smiles")
        assert "Person" not in first + second
        assert first.split()[0] in NAMES and second.split()[-2] in NAMES
        assert second.startswith("as a result, ")
    with pytest.raises(ValueError, match="known relation"):
        critic_input("<head> x </head> <relation> isAfter </relation> [GEN]", "y")


GOOD_TRIPLE = {"head": "PersonX eats", "relation": "xEffect", "tail": "x", "split": "train", "p_valid_model": 0.5}


@pytest.mark.parametrize("change, message", [
    ({"tail": None}, "missing key 'tail'"),
    ({"relation": "isAfter"}, "key 'relation'"),
    ({"split": "dev"}, "key 'split'"),
    ({"p_valid_model": "high"}, "key 'p_valid_model'"),
])
def test_commonsense_bad_row_names_file_line_and_key(tmp_path, change, message):
    row = {k: v for k, v in {**GOOD_TRIPLE, **change}.items() if v is not None}
    skd = tmp_path / "skd"
    shutil.copytree(FIXTURES / "commonsense", skd)
    path = skd / "downloaded" / "ATOMIC10X.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], json.dumps(row), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        load("commonsense", f"task.skd_dir={skd}")


def test_commonsense_bad_tsv_line(tmp_path):
    skd = tmp_path / "skd"
    shutil.copytree(FIXTURES / "commonsense", skd)
    tsv = skd / "atomic2020" / "atomic2020_data-feb2021" / "test.tsv"
    tsv.write_text(tsv.read_text() + "PersonX sleeps\txWant\n")
    with pytest.raises(DataError, match=f"{tsv}:9: expected 3 tab-separated fields"):
        load("commonsense", f"task.skd_dir={skd}")


# --- Wizard of Wikipedia / FaithDial --------------------------------------------------------------

WOW = (f"task.wow_dir={FIXTURES / 'wow' / 'wizard_of_wikipedia'}",
       f"task.test={FIXTURES / 'wow' / 'FaithDial' / 'data' / 'test.json'}")


def test_wow_rows_and_prompt_format():
    splits = load("wow", *WOW)
    assert {k: [e.id for e in v] for k, v in splits.items()} == {
        "train": ["wow-train-0-2", "wow-train-0-8", "wow-train-1-1"],  # no row for a wizard opening, "no
        "validation": ["wow-valid-0-1"],                               # passages used" or no checked sentence
        "test": ["faithdial-test-0-0", "faithdial-test-0-1"],
    }
    first = splits["train"][0]
    assert first.prompt == ("Knowledge: It lies between violet and green on the spectrum of visible light.<|endoftext|>"
                            "Blue is my favourite primary colour.<|endoftext|>"
                            "Blue is always nice. I like royal blue.<|endoftext|>")
    assert first.response == "I once saw that blue lies between violet and green on the spectrum."
    last = splits["train"][1]
    history = last.prompt.split(EOS)[1:-1]
    assert len(history) == 8  # every earlier turn, the wizard's turns without knowledge included
    assert history[-2] == "Did you know the sky looks blue because of scattering?"
    assert last.response == "Blue is also a primary colour in traditional colour theory."
    test = splits["test"][1]
    assert test.prompt.startswith("Knowledge: Dial-up Internet access uses the facilities of the public switched "
                                  "telephone network.<|endoftext|>Can you imagine")


def test_wow_history_is_cut_from_the_oldest_turn():
    assert approx_tokens("Hello, world!") == 4
    turns = ["one two three", "four five", "six"]  # 3 + 2 + 1 tokens, plus one EOS between each
    assert truncate_history(turns, 8) == turns
    assert truncate_history(turns, 7) == ["four five", "six"]
    assert truncate_history(turns, 0) == ["six"]  # the last turn always stays
    last = load("wow", *WOW, "task.max_history_tokens=12")["train"][1]
    assert last.prompt.split(EOS)[1:-1] == ["Tell me more!"]
    assert last.prompt.startswith("Knowledge: Blue is one of the three primary colours")  # the knowledge stays


def test_wow_input_functions():
    prompt = f"Knowledge: Dial-up uses telephone lines.{EOS}I remember dial-up!{EOS}Did you?{EOS}"
    assert faithcritic_input(prompt, "Via phone lines.") == ("Dial-up uses telephone lines.", "Via phone lines.")
    assert wow_dialogrpt_input(prompt, "Yes.") == "I remember dial-up!<|endoftext|>Did you?<|endoftext|>Yes."


def test_wow_bad_turn_names_file_dialogue_turn_and_key(tmp_path):
    wow = tmp_path / "wow"
    shutil.copytree(FIXTURES / "wow" / "wizard_of_wikipedia", wow)
    dialogues = json.loads((wow / "train.json").read_text())
    del dialogues[1]["dialog"][1]["checked_sentence"]
    (wow / "train.json").write_text(json.dumps(dialogues))
    with pytest.raises(DataError, match=f"{wow}/train.json dialogue 1 turn 1: missing key 'checked_sentence'"):
        load("wow", *WOW, f"task.wow_dir={wow}")
    (wow / "train.json").write_text('{"dialog": []}')
    with pytest.raises(DataError, match="expected a JSON list of dialogues"):
        load("wow", *WOW, f"task.wow_dir={wow}")


# --- the task yamls -------------------------------------------------------------------------------


@pytest.mark.parametrize("task, overrides, components", [
    ("hha", (f"task.pro_dir={PRO}",), ["reward"]),
    ("reddit_pos", REDDIT, ["fluency", "safety", "engagement", "upvote", "tfidf"]),
    ("reddit_neg", REDDIT, ["fluency", "safety", "engagement", "upvote", "tfidf"]),
    ("commonsense", COMMONSENSE, ["critic"]),
    ("wow", WOW, ["fluency", "faithfulness", "engagement", "tfidf"]),
])
def test_task_yaml_loads_fixture_splits(task, overrides, components):
    cfg = task_cfg(task, *overrides)
    assert cfg.name == task
    splits = LOADERS[cfg.loader](cfg)
    assert all(splits[s] for s in ("train", "validation", "test"))
    assert [s["name"] for s in cfg.rewards] == components
    assert "{prompt}" in cfg.prompt_template


def test_task_yaml_input_overrides_are_importable():
    """WoW's DialogRPT reads the history without the knowledge: its own input function."""
    (engagement,) = [s for s in task_cfg("wow").rewards if s["name"] == "engagement"]
    module, _, function = engagement["inputs"].partition(":")
    assert getattr(importlib.import_module(module), function) is wow_dialogrpt_input
