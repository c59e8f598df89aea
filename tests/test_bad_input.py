"""The bad input matrix (issue 8): each way a user's data, config, reward or cache can be wrong,
with the exact line `lol-rl` prints for it. Every case stops before the first stage computes
(the stage functions are replaced by a tripwire), so no work is lost and nothing trains here,
except the one case that shows how over-long prompts are truncated and counted.

Most cases run `run_train` in-process (fast); a few run the command, for what only it shows:
Hydra's strict keys and types, and one line with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import lol_rl.pipeline as pipeline
from lol_rl.cache import CacheError
from lol_rl.cli import CONF_DIR
from lol_rl.models import ModelError
from lol_rl.errors import ConfigError
from lol_rl.pipeline import run_train
from lol_rl.rewards import CompositeReward, RewardError
from lol_rl.tasks import DataError
from conftest import replace_stage_runs
from test_cli import lol_rl

ROWS = {
    "train": [{"id": f"r{i}", "prompt": f"say something nice {i}", "response": "Thanks, happy to help!", "reward": 1.0}
              for i in range(3)],
    "validation": [{"id": f"v{i}", "prompt": f"greet me {i}", "response": "Hello there!", "reward": 0.5}
                   for i in range(2)],
    "test": [{"id": f"t{i}", "prompt": f"thank me {i}", "response": "You are welcome."} for i in range(2)],
}
VALID_KEYS = "['prompt', 'response', 'id', 'reward', 'rewards', 'rejected', 'ranking', 'meta']"
CLIP_ZERO = "a clip range of 0 or less clamps every ratio to a point or to nothing"
NOT_OFFLINE = "is neither a local path nor in the offline Hugging Face cache (download it once where there is network, " \
              "or give a local path)"
DELETE = "delete that dir to rebuild it"
WRITABLE = "set cache_dir=<a writable dir> or LOL_RL_CACHE"


def write_split(tmp: Path, split: str, lines: list[str | bytes | dict]) -> Path:
    path = tmp / f"{split}.jsonl"
    encoded = [line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
               for line in lines]
    path.write_bytes(b"".join(line + b"\n" for line in encoded))
    return path


def write_splits(tmp: Path) -> None:
    for split, rows in ROWS.items():
        write_split(tmp, split, rows)


def bad_row(line: str | bytes | dict, split: str = "train") -> Callable[[Path], None]:
    """`split`.jsonl with `line` as its line 2, between two good rows."""
    good = ROWS[split]
    return lambda tmp: write_split(tmp, split, [good[0], line, good[-1]])


def rows(split: str, lines: list) -> Callable[[Path], None]:
    return lambda tmp: write_split(tmp, split, lines)


@dataclass
class Case:
    id: str
    expected: str                     # the whole line; {tmp} is the case's tmp dir
    setup: Callable[[Path], None] | None = None   # writes the bad input over the good splits
    overrides: tuple[str, ...] = ()
    error: type = DataError


def wrong_type(key: str, value, got: str) -> Case:
    return Case(f"{key}-is-{got}", f"lol-rl: {{tmp}}/train.jsonl:2: key '{key}' must be a string, got {got}",
                bad_row({"prompt": "x", "response": "y", key: value}))


NAN_IN_DATA = '{"prompt": "x", "response": "y", "reward": NaN}'  # json.loads accepts it: the loader must not
NON_UTF8 = b'{"prompt": "caf\xe9", "response": "y", "reward": 1.0}'  # Latin-1 "café"

CASES = [
    # ---- the rows of a jsonl split: file:line and key
    Case("malformed-json", "lol-rl: {tmp}/train.jsonl:2: not valid JSON (Expecting value, column 29)",
         bad_row('{"prompt": "x", "response": ')),
    Case("not-an-object", "lol-rl: {tmp}/train.jsonl:2: expected a JSON object, got list", bad_row('["x", "y"]')),
    Case("missing-prompt", "lol-rl: {tmp}/train.jsonl:2: missing key 'prompt'", bad_row({"response": "y"})),
    Case("missing-response", "lol-rl: {tmp}/validation.jsonl:2: missing key 'response'",
         bad_row({"prompt": "x", "reward": 0.5}, "validation")),
    wrong_type("prompt", 3, "int"),
    wrong_type("response", ["y", "z"], "list"),
    Case("empty-prompt", "lol-rl: {tmp}/train.jsonl:2: key 'prompt' is empty", bad_row({"prompt": "", "response": "y"})),
    Case("blank-response", "lol-rl: {tmp}/test.jsonl:2: key 'response' is empty",
         bad_row({"prompt": "x", "response": " \t "}, "test")),
    Case("unknown-key-typo", f"lol-rl: {{tmp}}/train.jsonl:2: unknown key(s) ['respones']; expected {VALID_KEYS} "
         "(anything else goes under 'meta')", bad_row({"prompt": "x", "respones": "y", "reward": 1.0})),
    Case("non-utf8", "lol-rl: {tmp}/train.jsonl:2: not valid UTF-8 (invalid continuation byte at byte 15)",
         bad_row(NON_UTF8)),
    Case("reward-nan", "lol-rl: {tmp}/train.jsonl:2: key 'reward': reward must be finite, got nan", bad_row(NAN_IN_DATA)),
    Case("blank-lines-are-counted", "lol-rl: {tmp}/train.jsonl:3: key 'reward': reward must be finite, got inf",
         rows("train", [ROWS["train"][0], "", '{"prompt": "x", "response": "y", "reward": Infinity}'])),
    Case("reward-minus-inf", "lol-rl: {tmp}/validation.jsonl:2: key 'reward': reward must be finite, got -inf",
         bad_row('{"prompt": "x", "response": "y", "reward": -Infinity}', "validation")),
    Case("reward-string", "lol-rl: {tmp}/train.jsonl:2: key 'reward': expected a number, got str 'high'",
         bad_row({"prompt": "x", "response": "y", "reward": "high"})),
    Case("reward-bool", "lol-rl: {tmp}/train.jsonl:2: key 'reward': expected a number, got bool True",
         bad_row({"prompt": "x", "response": "y", "reward": True})),
    Case("component-reward-nan", "lol-rl: {tmp}/train.jsonl:2: key 'rewards.polite': reward must be finite, got nan",
         bad_row('{"prompt": "x", "response": "y", "rewards": {"polite": NaN}}')),
    Case("rewards-not-an-object", "lol-rl: {tmp}/train.jsonl:2: key 'rewards' must be a non-empty object of name: number",
         bad_row({"prompt": "x", "response": "y", "rewards": 0.5})),
    Case("rejected-empty", "lol-rl: {tmp}/train.jsonl:2: key 'rejected' must be a non-empty string",
         bad_row({"prompt": "x", "response": "y", "reward": 1.0, "rejected": ""})),
    Case("ranking-of-one", "lol-rl: {tmp}/train.jsonl:2: key 'ranking' must be a list of 2 or more non-empty strings",
         bad_row({"prompt": "x", "response": "y", "reward": 1.0, "ranking": ["y"]})),
    Case("meta-not-an-object", "lol-rl: {tmp}/train.jsonl:2: key 'meta' must be an object",
         bad_row({"prompt": "x", "response": "y", "reward": 1.0, "meta": "note"})),
    Case("id-null", "lol-rl: {tmp}/train.jsonl:2: key 'id' must be a non-empty string or an integer, got None",
         bad_row({"id": None, "prompt": "x", "response": "y", "reward": 1.0})),
    Case("duplicate-id", "lol-rl: {tmp}/train.jsonl:3: duplicate id 'r0' (first at line 1)",
         rows("train", [ROWS["train"][0], ROWS["train"][1], {**ROWS["train"][2], "id": "r0"}])),
    Case("duplicate-default-id", "lol-rl: {tmp}/train.jsonl:2: duplicate id '0' (first at line 1)",
         rows("train", [{"prompt": "a", "response": "b", "reward": 1.0}, {"id": 0, "prompt": "c", "response": "d",
                                                                          "reward": 1.0}])),
    # ---- the splits
    Case("empty-split", "lol-rl: {tmp}/validation.jsonl: no rows", rows("validation", [])),
    Case("blank-lines-only", "lol-rl: {tmp}/test.jsonl: no rows", rows("test", ["", "   "])),
    Case("missing-file", "lol-rl: {tmp}/tset.jsonl: no such file", overrides=("task.test={tmp}/tset.jsonl",)),
    Case("every-reward-zero", "lol-rl: algo alol keeps the train rows with A = R - V(x) > 0, but every train row of "
         "task jsonl has the data's lowest reward 0.0, below every V(x): no row would be kept; give rewards that "
         "vary, or an algorithm that keeps every row (algo=nll)",
         rows("train", [{"prompt": f"p{i}", "response": "r", "reward": 0.0} for i in range(8)]), error=ConfigError),
    Case("alol-on-every-row", "lol-rl: algo alol: keep=all would hand the loss rows with A <= 0, whose gradient pushes "
         "their responses' probability down without bound; A-LOL trains on the rows with A > 0 "
         "(keep=positive_advantage)", overrides=("algo.keep=all",), error=ConfigError),
    Case("a-dir-as-file", "lol-rl: {tmp}: is a directory, expected a file", overrides=("task.test={tmp}",)),
    Case("reward-beyond-any-float", "lol-rl: {tmp}/train.jsonl:2: key 'reward': reward 100000000000... (401 digits) "
         "is too large to train on in float32 (|reward| <= 1.84e+19); rescale the rewards",
         bad_row('{"prompt": "x", "response": "y", "reward": 1' + "0" * 400 + '}')),
    Case("duplicate-key", "lol-rl: {tmp}/train.jsonl:2: key 'reward' appears twice in one object",
         bad_row('{"prompt": "x", "response": "y", "reward": 0.1, "reward": 0.9}')),
    Case("lone-surrogate", "lol-rl: {tmp}/validation.jsonl:2: key 'response' holds a lone surrogate '\\ud800' at "
         "character 2, which is not text (an escape from a broken UTF-16 source?)",
         bad_row('{"prompt": "x", "response": "ab\\ud800c", "reward": 0.5}', "validation")),
    Case("split-not-given", "lol-rl: task jsonl needs task.test=<path to a jsonl file>", overrides=("task.test=null",)),
    Case("no-reward-and-no-scorer", "lol-rl: task jsonl: split 'train' row id 'r1' has no 'reward' and no reward "
         "components are configured; give every train and validation row a reward, or name a scorer with "
         "reward=[<component or module:function>]", bad_row({"id": "r1", "prompt": "x", "response": "y"})),
    Case("template-unknown-field", "lol-rl: task jsonl: prompt_template 'Q: {{question}}' cannot be formatted "
         "(KeyError: 'question'); its one field is {{prompt}}, and a literal brace is written {{{{ or }}}}",
         overrides=("task.prompt_template='Q: {question}'",)),
    Case("template-without-prompt", "lol-rl: task jsonl: prompt_template 'Answer politely:' has no {{prompt}}, so "
         "every prompt would be dropped", overrides=("task.prompt_template='Answer politely:'",)),
    # ---- rewards and scorers
    Case("reward-model-not-offline", f"lol-rl: reward component 'judge': model 'no-such-org/no-such-model' {NOT_OFFLINE}",
         overrides=("task.rewards=[{name:judge,use:hf_classifier,model:'no-such-org/no-such-model'}]",),
         error=RewardError),
    Case("scorer-range-infinite", "lol-rl: reward component 'bad_input_scorer:score' declares the range [0.0, inf]; "
         "it needs finite numbers min_value < max_value", overrides=("reward=bad_input_scorer:score",),
         setup=lambda tmp: (tmp / "bad_input_scorer.py").write_text(
             "def score(prompts, responses):\n    return [0.5 for _ in responses]\n\n\nscore.max_value = float('inf')\n"),
         error=RewardError),
    # ---- what the algorithm needs, and its parameters
    Case("dpo-without-pairs", "lol-rl: dpo needs preference pairs; task jsonl has none",
         overrides=("algo=dpo", "task.rewards=[polite]"), error=ConfigError),
    Case("dpo-ref-free-without-pairs", "lol-rl: dpo_ref_free needs preference pairs; task jsonl has none",
         overrides=("algo=dpo_ref_free", "task.rewards=[polite]"), error=ConfigError),
    Case("pro-without-rankings", "lol-rl: pro needs rankings of the same length; task jsonl has none",
         overrides=("algo=pro", "task.rewards=[polite]"), error=ConfigError),
    Case("ppo-without-a-scorer", "lol-rl: ppo needs a reward scorer for new responses (reward components, not only "
         "the data's rewards); task jsonl has none", overrides=("algo=ppo",), error=ConfigError),
    Case("alol-eps-zero", f"lol-rl: algo alol: params.eps must be in (0, 1], got 0 ({CLIP_ZERO})",
         overrides=("algo.params.eps=0",), error=ConfigError),
    Case("alol-seq-eps-negative", f"lol-rl: algo alol_seq: params.eps must be in (0, 1], got -0.1 ({CLIP_ZERO})",
         overrides=("algo=alol_seq", "algo.params.eps=-0.1"), error=ConfigError),
    Case("rlol-eps-above-one", "lol-rl: algo rlol: params.eps must be in (0, 1], got 1.5 (the lower clip 1 - eps "
         "would be negative)", overrides=("algo=rlol", "algo.params.eps=1.5"), error=ConfigError),
    Case("ppo-clip-zero", "lol-rl: algo.params.clip=0.0 is out of range; expected 0 < algo.params.clip <= 1",
         overrides=("algo=ppo", "algo.params.clip=0.0", "task.rewards=[polite]"), error=ConfigError),
    Case("ppo-value-clip-negative", "lol-rl: algo.params.value_clip=-1.0 is out of range; expected 0 < algo.params.value_clip",
         overrides=("algo=ppo", "algo.params.value_clip=-1", "task.rewards=[polite]"), error=ConfigError),
    Case("eps-not-a-number", "lol-rl: algo alol: params.eps must be in (0, 1], got 'wide' (not a number)",
         overrides=("algo.params.eps=wide",), error=ConfigError),
    Case("param-typo", "lol-rl: algo alol: unknown params ['epz']; loss alol takes ['eps']",
         overrides=("~algo.params.eps", "+algo.params.epz=0.5"), error=ConfigError),
    Case("param-missing", "lol-rl: algo dpo: missing params ['beta']; loss dpo takes ['beta']",
         overrides=("algo=dpo", "~algo.params.beta"), error=ConfigError),
    Case("unknown-loss", "lol-rl: algo alol: unknown loss 'alol2'; valid: ['alol', 'alol_kl', 'alol_ref_free', "
         "'alol_seq', 'dpo', 'dpo_ref_free', 'gold', 'kto', 'nll', 'pro', 'rlol', 'wbc']",
         overrides=("algo.loss=alol2",), error=ConfigError),
    Case("kto-weight-zero", "lol-rl: algo kto: params.undesirable_weight must be a number > 0, got 0.0",
         overrides=("algo=kto", "algo.params.undesirable_weight=0.0"), error=ConfigError),
    # ---- a config value out of its range, or not one of its choices: stops before the data is read
    *(Case(f"config-{key}", f"lol-rl: {key}={shown} is {why}", overrides=(f"{key}={value}",), error=ConfigError)
      for key, value, shown, why in [
          ("sft.steps", "-5", "-5", "out of range; expected 0 <= sft.steps"),
          ("sft.batch_size", "0", "0", "out of range; expected 1 <= sft.batch_size"),
          ("rl.batch_size", "-4", "-4", "out of range; expected 1 <= rl.batch_size"),
          ("rl.lr", "-1", "-1.0", "out of range; expected 0 < rl.lr"),
          ("rl.val_interval", "0", "0", "out of range; expected 1 <= rl.val_interval"),
          ("value.heldout_fraction", "1.0", "1.0", "out of range; expected 0 < value.heldout_fraction < 1"),
          ("value.samples_per_prompt", "0", "0", "out of range; expected 1 <= value.samples_per_prompt"),
          ("generation.max_new_tokens", "0", "0", "out of range; expected 1 <= generation.max_new_tokens"),
          ("value.temperature", "0", "0.0", "out of range; expected 0 < value.temperature"),
          ("eval.test_prompts", "-1", "-1", "out of range; expected 1 <= eval.test_prompts"),
          ("sft.schedule", "foo", "'foo'", "not allowed; expected one of ['linear', 'cosine', 'cosine_with_restarts', "
           "'polynomial', 'constant', 'constant_with_warmup', 'inverse_sqrt', 'reduce_lr_on_plateau', "
           "'cosine_with_min_lr', 'cosine_warmup_with_min_lr', 'warmup_stable_decay', 'greedy']"),
          ("logger", "foo", "'foo'", "not allowed; expected one of ['jsonl', 'wandb']"),
          ("device", "tpu", "'tpu'", "not allowed; expected auto, cpu, cuda or cuda:<index>"),
          ("algo.sampling", "advantge", "'advantge'", "not allowed; expected one of ['uniform', 'shuffle', 'advantage', "
           "'reward']"),
          ("algo.keep", "positive", "'positive'", "not allowed; expected one of ['all', 'positive_advantage']"),
          ("model.max_prompt_tokens", "0", "0", "out of range; expected 1 <= model.max_prompt_tokens"),
      ]),
    Case("config-unknown-model-key", "lol-rl: model.lora_r: Key 'lora_r' not in 'FromConfigModel'",
         overrides=("+model.lora_r=8",), error=ConfigError),
    Case("config-longer-than-the-context", "lol-rl: model tiny: max_prompt_tokens + max_response_tokens = 148 exceeds "
         "n_positions 128; lower one of them or raise model.n_positions", overrides=("model.max_prompt_tokens=100",),
         error=ConfigError),
    Case("config-generation-longer-than-the-context", "lol-rl: model tiny: max_prompt_tokens + generation.max_new_tokens"
         " = 164 exceeds n_positions 128; lower one of them or raise model.n_positions",
         overrides=("generation.max_new_tokens=100",), error=ConfigError),
    Case("config-value-heads", "lol-rl: value.heads=3 must divide model.n_embd=128", overrides=("value.heads=3",),
         error=ConfigError),
    Case("reward-beyond-float32", "lol-rl: {tmp}/train.jsonl:2: key 'reward': reward 1e+300 is too large to train on "
         "in float32 (|reward| <= 1.84e+19); rescale the rewards", bad_row({"prompt": "x", "response": "y", "reward": 1e300})),
    Case("reward-squared-beyond-float32", "lol-rl: {tmp}/train.jsonl:2: key 'reward': reward 1e+30 is too large to "
         "train on in float32 (|reward| <= 1.84e+19); rescale the rewards",
         bad_row({"prompt": "x", "response": "y", "reward": 1e30})),
    Case("one-validation-row", "lol-rl: task jsonl: the value stage fits V(x) on some validation prompts and chooses "
         "its epoch on the others (value.heldout_fraction), so it needs at least 2 validation rows; split "
         "'validation' has 1", rows("validation", [{"prompt": "x", "response": "y", "reward": 0.5}]),
         error=ConfigError),
    # ---- the cache dir
    Case("cache-dir-is-a-file", f"lol-rl: cache_dir {{tmp}}/cache is a file, not a directory; {WRITABLE}",
         lambda tmp: (tmp / "cache").write_text("not a dir"), error=CacheError),
]


class StageRan(AssertionError):
    pass


def _tripwire(*args, **kwargs):
    raise StageRan("a stage started: the bad input was not caught before the work")


@pytest.fixture
def no_stages(monkeypatch):
    """Any stage that starts fails the test: every case must stop before the work."""
    replace_stage_runs(monkeypatch, {name: _tripwire for name in pipeline.BY_NAME})


def config(tmp: Path, *overrides: str):
    splits = [f"task.{split}={tmp / f'{split}.jsonl'}" for split in ROWS]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["task=jsonl", *splits, f"cache_dir={tmp / 'cache'}", "device=cpu",
                                            *overrides])


def failure_line(tmp: Path, error: type, *overrides: str) -> str:
    run_dir = tmp / "run"
    run_dir.mkdir(exist_ok=True)
    cfg = config(tmp, *overrides)
    with pytest.raises(error) as info:
        run_train(cfg, run_dir)
    message = str(info.value)
    assert "\n" not in message  # one line
    return f"lol-rl: {message}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_stops_before_any_stage_with_one_exact_line(case, tmp_path, no_stages, monkeypatch):
    write_splits(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # a `reward=module:function` of the case
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in case.overrides]
    assert failure_line(tmp_path, case.error, *overrides) == case.expected.format(tmp=tmp_path)
    if case.error is not CacheError:  # nothing was written to the cache: it stopped before it was opened
        assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- scores outside what a component declares

def scorer(values, **declared):
    def score(prompts, responses):
        return values

    for name, value in declared.items():
        setattr(score, name, value)
    return score


OUTSIDE = "(a scorer declares it with `min_value`/`max_value`)"
SCORE_CASES = [
    ("nan", scorer([0.5, float("nan")]), "reward component 'judge' returned nan for prompt id r1 ('p1')"),
    ("inf", scorer([float("inf"), 0.5]), "reward component 'judge' returned inf for prompt id r0 ('p0')"),
    ("above-max", scorer([0.5, 1.5]),
     f"reward component 'judge' returned 1.5 for prompt id r1 ('p1'), outside its range [0.0, 1.0] {OUTSIDE}"),
    ("below-min", scorer([-0.25, 1.5], max_value=2.0),
     f"reward component 'judge' returned -0.25 for prompt id r0 ('p0'), outside its range [0.0, 2.0] {OUTSIDE}"),
    ("below-declared-min", scorer([-0.5, -3.0], min_value=-2.0),
     f"reward component 'judge' returned -3.0 for prompt id r1 ('p1'), outside its range [-2.0, 1.0] {OUTSIDE}"),
]


@pytest.mark.parametrize("judge, expected", [(s, e) for _, s, e in SCORE_CASES], ids=[i for i, _, _ in SCORE_CASES])
def test_a_score_outside_the_components_range_names_component_and_row(judge, expected):
    """Scores come only from stages (value samples, validation, test); the reward's own check is
    what stops them, naming the component and the prompt, whichever stage asks."""
    reward = CompositeReward({"polite": scorer([0.5, 0.5]), "judge": judge})
    with pytest.raises(RewardError) as info:
        reward.score(["p0", "p1"], ["a", "b"], ids=["r0", "r1"])
    assert str(info.value) == expected


def test_a_declared_range_is_honoured_not_only_zero_to_one():
    reward = CompositeReward({"judge": scorer([-1.5, 2.0 + 1e-9], min_value=-2.0, max_value=2.0)})
    total, _ = reward.score(["p0", "p1"], ["a", "b"])
    np.testing.assert_allclose(total, [-1.5, 2.0])
    assert (reward.min_total, reward.max_total) == (-2.0, 2.0)  # the value head's output range


# ---------------------------------------------------------------- the model, the cache, truncation: the sft stage

class StopAfterSft(Exception):
    pass


def _stop(*args, **kwargs):
    raise StopAfterSft


@pytest.fixture
def sft_only(monkeypatch):
    """The real sft stage; any later stage stops the run."""
    replace_stage_runs(monkeypatch, {name: _stop for name in pipeline.BY_NAME if name != "sft"})


SMALL_MODEL = ("model.n_layer=1", "model.n_embd=32", "model.n_head=2", "sft.batch_size=4", "sft.log_interval=1",
               "sft.warmup_steps=0")


@pytest.mark.parametrize("overrides, expected", [
    (("model=gpt2", "model.path=no-such-org/no-such-model"),
     "lol-rl: model gpt2: cannot load the tokenizer of no-such-org/no-such-model (OSError: *); it must be a local "
     "directory or already in the offline Hugging Face cache (HF_HUB_OFFLINE=1)"),
], ids=["policy-not-offline"])
def test_a_model_that_cannot_run_stops_before_sft_computes(overrides, expected, tmp_path, sft_only):
    write_splits(tmp_path)
    line = failure_line(tmp_path, ModelError, *overrides)
    pattern = ".*".join(re.escape(part) for part in expected.format(tmp=tmp_path).split("*"))
    assert re.fullmatch(pattern, line), line
    assert not any((tmp_path / "cache" / "sft").iterdir())  # no artifact, no half-written temp dir


def test_prompts_longer_than_configured_are_left_truncated_and_counted(tmp_path, sft_only):
    long_prompt = " ".join(f"turn {i} of a very long conversation" for i in range(40))
    train = [{"id": "short", "prompt": "hi", "response": "Hello!", "reward": 1.0},
             {"id": "long-1", "prompt": long_prompt, "response": "Hello!", "reward": 1.0},
             {"id": "long-2", "prompt": "again " + long_prompt, "response": "Hi! " * 40, "reward": 1.0}]
    write_splits(tmp_path)
    write_split(tmp_path, "train", train)
    cfg = config(tmp_path, *SMALL_MODEL, "sft.steps=2", "model.max_prompt_tokens=16", "model.max_response_tokens=24")
    (tmp_path / "run").mkdir()
    with pytest.raises(StopAfterSft):
        run_train(cfg, tmp_path / "run")
    [sft_dir] = (tmp_path / "cache" / "sft").iterdir()
    summary = json.loads((sft_dir / "summary.json").read_text())
    assert (summary["truncated_prompts"], summary["truncated_responses"]) == (2, 1)


def _stub_sft(stage):
    (stage.out / "policy.bin").write_bytes(bytes(64))


@pytest.mark.parametrize("damage, expected", [
    (lambda sft: (sft / "policy.bin").unlink(), f"is damaged: policy.bin is missing; {DELETE}"),
    (lambda sft: (sft / "policy.bin").write_bytes(bytes(10)), f"is damaged: policy.bin has 10 bytes, not 64; {DELETE}"),
    (lambda sft: (sft / "manifest.json").unlink(), f"has no readable manifest.json, so it is incomplete or damaged; {DELETE}"),
], ids=["file-missing", "file-truncated", "no-manifest"])
def test_a_damaged_cache_artifact_is_refused_naming_its_dir(damage, expected, tmp_path, monkeypatch):
    write_splits(tmp_path)
    replace_stage_runs(monkeypatch, {name: _stop for name in pipeline.BY_NAME} | {"sft": _stub_sft})
    (tmp_path / "run").mkdir()
    with pytest.raises(StopAfterSft):  # builds the (stub) sft artifact, then stops
        run_train(config(tmp_path), tmp_path / "run")
    [sft_dir] = (tmp_path / "cache" / "sft").iterdir()
    damage(sft_dir)
    replace_stage_runs(monkeypatch, {"sft": _tripwire})  # it must not be silently rebuilt or reused either
    assert failure_line(tmp_path, CacheError) == f"lol-rl: cache artifact {sft_dir} {expected}"


def test_a_read_only_cache_dir_stops_at_the_start(tmp_path, no_stages):
    write_splits(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        try:
            (cache / "probe").mkdir()
        except PermissionError:
            line = failure_line(tmp_path, CacheError)
        else:
            pytest.skip("this user writes to read-only dirs (root with CAP_DAC_OVERRIDE)")
    finally:
        cache.chmod(0o755)
    assert line == f"lol-rl: cache_dir {cache} is not writable (Permission denied); {WRITABLE}"


# ---------------------------------------------------------------- the command: Hydra's strict config, one line and exit 2

CLI_CASES = [
    ("misspelled-key-in-a-group", ["model.n_layr=2"], 1,
     ["Could not override 'model.n_layr'.", "To append to your config use +model.n_layr=2",
      "Key 'n_layr' is not in struct", "    full_key: model.n_layr"]),
    ("wrong-type", ["sft.steps=many"], 1,
     ["Error merging override sft.steps=many", "Value 'many' of type 'str' could not be converted to Integer",
      "    full_key: sft.steps"]),
    ("non-utf8-row", ["task.validation={tmp}/bad.jsonl"], 2,
     ["lol-rl: {tmp}/bad.jsonl:2: not valid UTF-8 (invalid continuation byte at byte 15)"]),
    ("eps-zero", ["algo.params.eps=0"], 2, [f"lol-rl: algo alol: params.eps must be in (0, 1], got 0 ({CLIP_ZERO})"]),
    ("cache-dir-is-a-file", ["cache_dir={tmp}/bad.jsonl"], 2,
     [f"lol-rl: cache_dir {{tmp}}/bad.jsonl is a file, not a directory; {WRITABLE}"]),
]


@pytest.mark.parametrize("overrides, code, lines", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_the_command_prints_the_error_not_a_traceback(overrides, code, lines, tmp_path):
    write_splits(tmp_path)
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(ROWS["validation"][0]).encode() + b"\n" + NON_UTF8 + b"\n")
    splits = {split: f"task.{split}={tmp_path / f'{split}.jsonl'}" for split in ROWS}
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    for override in overrides:  # a split the case gives replaces the good one (Hydra refuses a key twice)
        splits.pop(override.partition("=")[0].removeprefix("task."), None)
    proc = lol_rl("train", "task=jsonl", *splits.values(), *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                  cache=tmp_path / "cache", timeout=120)
    output = proc.stdout.splitlines()
    assert proc.returncode == code, proc.stdout[-3000:]
    for line in lines:
        assert line.replace("{tmp}", str(tmp_path)) in output, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_a_config_value_out_of_range_is_one_line_from_the_command(tmp_path):
    proc = lol_rl("train", "sft.steps=-5", f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1] == "lol-rl: sft.steps=-5 is out of range; expected 0 <= sft.steps"
    assert "Traceback" not in proc.stdout and not (tmp_path / "cache").exists()
