"""Reward components: the HF classifier scorer on tiny random classifiers saved to disk (RoBERTa
with two labels, GPT-2 with one logit as DialogRPT, OpenAssistant's GPT-NeoX reward model in its
released layout, the ToxiChat and COMET critic layouts), the spec format of build_reward, and
TF-IDF diversity against hand-computed values."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

from lol_rl.rewards import CompositeReward, RewardError, build_reward, import_object
from lol_rl.rewards.hf import (
    CometCritic,
    CometCriticHead,
    GPTNeoXRewardConfig,
    GPTNeoXRewardModel,
    HFClassifier,
    ToxiChatOffensiveClassifier,
    merge_comet_critic,
)
from lol_rl.rewards.registry import COMPONENTS
from lol_rl.rewards.tfidf import TfidfDiversity

WORDS = ("the cat sat on a mat dog ran far away big small red blue green apple tree house car "
         "good bad day night sun moon fish bird").split()
PROMPTS = ["the cat", "a dog ran far away", "red", "the big blue house", "sun", "green tree", "night day"]
RESPONSES = ["sat on a mat", "good", "the small red car ran far away", "bad day", "moon fish bird sun",
             "apple", "the dog sat on the mat and the cat ran"]
INIT = 0.3  # a wide random init: logits differ by whole units, so wrong pooling or padding shows


def word_tokenizer(specials: dict[str, str], roberta_template: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: special tokens first, then WORDS, unknown words -> unk."""
    vocab = {tok: i for i, tok in enumerate(list(specials.values()) + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if roberta_template:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"],
                                   **specials)


def roberta_tokenizer():
    return word_tokenizer({"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}, True)


def gpt_tokenizer():
    """GPT-2 style: EOS only, no pad token (as DialogRPT's and DialoGPT's)."""
    return word_tokenizer({"eos_token": "<|endoftext|>", "unk_token": "<unk>"}, False)


def neox_tokenizer():
    return word_tokenizer({"eos_token": "<|endoftext|>", "pad_token": "<|padding|>", "unk_token": "<unk>"}, False)


def roberta_config(**kwargs) -> RobertaConfig:
    return RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, initializer_range=INIT, **kwargs)


def gpt2_config(**kwargs) -> GPT2Config:
    return GPT2Config(vocab_size=40, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                      eos_token_id=0, initializer_range=INIT, **kwargs)


def oasst_layout(model: GPTNeoXRewardModel, path) -> None:
    """Save as the released OpenAssistant checkpoints are: pytorch_model.bin written by
    transformers 4.28 (with its per-layer attention buffers) and a config.json in that era's
    keys (rotary_pct, rotary_emb_base)."""
    state = dict(model.state_dict())
    n_pos = model.config.max_position_embeddings
    for i in range(model.config.num_hidden_layers):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool))[None, None]
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    path.mkdir()
    torch.save(state, path / "pytorch_model.bin")
    config = {
        "architectures": ["GPTNeoXRewardModel"], "model_type": "gpt_neox_reward_model", "pooling": "last",
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 16, "intermediate_size": 32,
        "initializer_range": 0.02, "layer_norm_eps": 1e-5, "max_position_embeddings": n_pos,
        "num_attention_heads": 2, "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 0.25,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.28.0.dev0",
        "use_cache": True, "use_parallel_residual": True, "vocab_size": 40,
    }
    (path / "config.json").write_text(json.dumps(config))
    neox_tokenizer().save_pretrained(path)


def oasst_weight_names(n_layers: int) -> set[str]:
    """The released checkpoints' weight names (GPTNeoXModel of transformers 4.28 + out_proj)."""
    names = {"gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
             "out_proj.weight", "out_proj.bias"}
    for i in range(n_layers):
        for module in ("input_layernorm", "post_attention_layernorm", "attention.query_key_value",
                       "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            names |= {f"gpt_neox.layers.{i}.{module}.weight", f"gpt_neox.layers.{i}.{module}.bias"}
    return names


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random classifiers saved once per module: {kind: directory}."""
    root = tmp_path_factory.mktemp("classifiers")
    torch.manual_seed(0)
    paths = {kind: root / kind for kind in ("roberta", "gpt2", "oasst", "toxichat", "comet_authors", "comet")}

    roberta = RobertaForSequenceClassification(
        roberta_config(num_labels=2, id2label={0: "unacceptable", 1: "acceptable"})).eval()
    roberta.save_pretrained(paths["roberta"])
    roberta_tokenizer().save_pretrained(paths["roberta"])

    GPT2ForSequenceClassification(gpt2_config(num_labels=1)).save_pretrained(paths["gpt2"])  # no pad_token_id
    gpt_tokenizer().save_pretrained(paths["gpt2"])

    neox = GPTNeoXRewardModel(GPTNeoXRewardConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, initializer_range=INIT))
    oasst_layout(neox, paths["oasst"])

    # the authors' GPT2ForOC_S_offensive: a GPT2LMHeadModel with an off_classifier, config model_type gpt2
    toxichat = GPT2LMHeadModel(gpt2_config())
    toxichat.off_classifier = torch.nn.Linear(16, 2)
    torch.nn.init.normal_(toxichat.off_classifier.weight, std=INIT)
    toxichat.save_pretrained(paths["toxichat"])
    gpt_tokenizer().save_pretrained(paths["toxichat"])

    # the authors' converted COMET critic: a RobertaModel directory + the head's state dict
    RobertaModel(roberta_config(num_labels=1), add_pooling_layer=True).save_pretrained(paths["comet_authors"])
    roberta_tokenizer().save_pretrained(paths["comet_authors"])
    head = CometCriticHead(16, 512)
    torch.nn.init.normal_(head.out_proj.weight, std=INIT)
    torch.save(head.state_dict(), paths["comet_authors"] / "custom_roberta_classification_head.pt")
    merge_comet_critic(paths["comet_authors"], paths["comet"])
    return paths


def manual_logits(model, tokenizer, *texts) -> torch.Tensor:
    """One unpadded, untruncated forward pass, as a reference."""
    with torch.no_grad():
        return model(**tokenizer(*texts, return_tensors="pt")).logits[0].float()


def loaded(clf: HFClassifier):
    """The (tokenizer, model) the scorer loaded (after a first call)."""
    return clf._loaded[0], clf._loaded[1]


# ------------------------------------------------------------------ HFClassifier

@pytest.mark.parametrize("kind, options", [
    ("roberta", dict(transform="softmax", label=1)),
    ("roberta", dict(transform="softmax", label=1, inputs="prompt_response")),
    ("gpt2", dict(transform="sigmoid")),
    ("oasst", dict(transform="sigmoid")),
    ("toxichat", dict(transform="softmax", model_class="lol_rl.rewards.hf:ToxiChatOffensiveClassifier")),
    ("comet", dict(transform="sigmoid", inputs="prompt_response", model_class="lol_rl.rewards.hf:CometCritic")),
])
def test_batched_equals_one_by_one_in_input_order(checkpoints, kind, options):
    clf = HFClassifier(model=str(checkpoints[kind]), batch_size=3, **options)
    batched = clf(PROMPTS, RESPONSES)
    one_by_one = [clf([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert np.ptp(one_by_one) > 1e-2  # the rows score differently, so a mix-up would show
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(clf(PROMPTS[::-1], RESPONSES[::-1]), batched[::-1], atol=1e-5)


def test_transforms_and_labels_match_a_manual_forward(checkpoints):
    path = str(checkpoints["roberta"])
    model = RobertaForSequenceClassification.from_pretrained(path).eval()
    tokenizer = roberta_tokenizer()
    logits = torch.stack([manual_logits(model, tokenizer, r) for r in RESPONSES])
    expected = {
        "sigmoid": torch.sigmoid(logits[:, 1]),
        "softmax": torch.softmax(logits, dim=-1)[:, 1],
        "raw": logits[:, 1],
    }
    for transform, values in expected.items():
        for label in (1, "acceptable"):
            clf = HFClassifier(model=path, transform=transform, label=label, max_value=5.0)
            np.testing.assert_allclose(clf(PROMPTS, RESPONSES), values.numpy(), atol=1e-5)
    p0 = HFClassifier(model=path, transform="softmax", label="unacceptable")(PROMPTS, RESPONSES)
    np.testing.assert_allclose(p0, 1 - expected["softmax"].numpy(), atol=1e-5)


def test_max_value(checkpoints):
    assert HFClassifier(model="m").max_value == 1.0
    assert HFClassifier(model="m", transform="raw", max_value=4).max_value == 4.0
    with pytest.raises(ValueError, match="max_value"):
        HFClassifier(model="m", transform="raw")


def test_sentence_pairs_are_encoded_as_pairs(checkpoints):
    path = str(checkpoints["roberta"])
    model = RobertaForSequenceClassification.from_pretrained(path).eval()
    tokenizer = roberta_tokenizer()
    pair = torch.stack([manual_logits(model, tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)])
    paired = HFClassifier(model=path, transform="raw", max_value=10, label=0, inputs="prompt_response")
    scores = paired(PROMPTS, RESPONSES)
    np.testing.assert_allclose(scores, pair[:, 0].numpy(), atol=1e-5)
    alone = HFClassifier(model=path, transform="raw", max_value=10, label=0)(PROMPTS, RESPONSES)
    assert np.abs(scores - alone).max() > 1e-2


def test_inputs_from_an_import_path(checkpoints, tmp_path, monkeypatch):
    (tmp_path / "my_task_inputs.py").write_text(
        "def reply_then_prompt(prompt, response):\n    return response + ' ' + prompt\n\n"
        "def broken(prompt, response):\n    return 3\n\n"
        "def strict(prompt, response):\n    if not prompt:\n        raise ValueError('no prompt')\n    return response\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = str(checkpoints["gpt2"])
    clf = HFClassifier(model=path, inputs="my_task_inputs:reply_then_prompt")
    direct = HFClassifier(model=path)([""] * len(PROMPTS), [f"{r} {p}" for p, r in zip(PROMPTS, RESPONSES)])
    np.testing.assert_allclose(clf(PROMPTS, RESPONSES), direct, atol=1e-6)
    with pytest.raises(RewardError, match="string or a pair of strings"):
        HFClassifier(model=path, inputs="my_task_inputs:broken")(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match=r"inputs 'my_task_inputs:strict' failed on row 1 \(ValueError: no prompt\)"):
        HFClassifier(model=path, inputs="my_task_inputs:strict")(["a", ""], ["b", "c"])
    with pytest.raises(RewardError, match="my_task_inputs:missing"):
        HFClassifier(model=path, inputs="my_task_inputs:missing")(PROMPTS, RESPONSES)


def test_left_truncation_keeps_the_end(checkpoints):
    path = str(checkpoints["roberta"])
    tail = "red blue green apple"  # <s> + 4 words + </s> = max_length 6
    long_a, long_b = f"cat dog sat on the mat {tail}", f"sun moon {tail}"
    left = HFClassifier(model=path, transform="raw", max_value=10, max_length=6, truncation_side="left")
    scores = left(["", "", ""], [long_a, long_b, tail])
    np.testing.assert_allclose(scores, scores[2], atol=1e-5)
    right = HFClassifier(model=path, transform="raw", max_value=10, max_length=6)
    right_scores = right(["", ""], [long_a, long_b])
    assert abs(right_scores[0] - right_scores[1]) > 1e-2


def test_gpt2_without_pad_token_pads_with_eos(checkpoints):
    clf = HFClassifier(model=str(checkpoints["gpt2"]))
    scores = clf(PROMPTS, RESPONSES)
    tokenizer, model = loaded(clf)
    assert tokenizer.pad_token == "<|endoftext|>" and model.config.pad_token_id == tokenizer.eos_token_id
    reference = GPT2ForSequenceClassification.from_pretrained(str(checkpoints["gpt2"])).eval()
    expected = [torch.sigmoid(manual_logits(reference, gpt_tokenizer(), r)[0]).item() for r in RESPONSES]
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_oasst_reward_model_loads_its_released_layout(checkpoints):
    path = checkpoints["oasst"]
    clf = HFClassifier(model=str(path))  # the Auto classes find GPTNeoXRewardModel by model_type
    scores = clf(PROMPTS, RESPONSES)
    _, model = loaded(clf)
    assert type(model) is GPTNeoXRewardModel and model.config.pooling == "last"
    assert set(model.state_dict()) == oasst_weight_names(2)
    released = torch.load(path / "pytorch_model.bin")
    assert all(torch.equal(model.state_dict()[k], released[k]) for k in oasst_weight_names(2))
    # the score is out_proj of the last token's hidden state
    tokenizer = neox_tokenizer()
    expected = []
    with torch.no_grad():
        for r in RESPONSES:
            hidden = model.gpt_neox(**tokenizer(r, return_tensors="pt")).last_hidden_state
            expected.append(torch.sigmoid(model.out_proj(hidden[0, -1])).item())
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_oasst_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    model = GPTNeoXRewardModel(GPTNeoXRewardConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        initializer_range=INIT, pooling="mean")).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        short = model(input_ids=ids[1:, :2]).logits
    torch.testing.assert_close(batched[1], short[0], atol=1e-5, rtol=0)


def test_toxichat_safety_reads_the_responses_eos(checkpoints, tmp_path, monkeypatch):
    (tmp_path / "thread_inputs.py").write_text(
        "def thread(prompt, response):\n    return prompt + ' <|endoftext|> ' + response + ' <|endoftext|>'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward([{"name": "safety", "use": "toxichat_safety", "model": str(checkpoints["toxichat"]),
                            "inputs": "thread_inputs:thread", "batch_size": 4}], device="cpu")
    _, parts = reward.score(PROMPTS, RESPONSES)
    # the authors' reading: softmax of off_classifier at every EOS, index 0 (safe) at the last one
    model = ToxiChatOffensiveClassifier.from_pretrained(str(checkpoints["toxichat"])).eval()
    tokenizer = gpt_tokenizer()
    expected = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = tokenizer(f"{p} <|endoftext|> {r} <|endoftext|>", return_tensors="pt")["input_ids"]
            hidden = model.transformer(ids).last_hidden_state[0]
            eos_positions = (ids[0] == tokenizer.eos_token_id).nonzero().ravel()
            expected.append(torch.softmax(model.off_classifier(hidden[eos_positions]), -1)[-1, 0].item())
    np.testing.assert_allclose(parts["safety"], expected, atol=1e-5)


def test_a_head_without_weights_is_an_error_not_noise(checkpoints):
    # the ToxiChat checkpoint says gpt2: the Auto class would give a GPT2ForSequenceClassification
    # whose `score` head is not in the checkpoint
    clf = HFClassifier(model=str(checkpoints["toxichat"]), name="safety")
    with pytest.raises(RewardError, match=r"'safety'.*no weights for \['score.weight'\].*model_class"):
        clf(PROMPTS, RESPONSES)


def test_comet_critic_merged_from_the_authors_layout(checkpoints):
    authors = checkpoints["comet_authors"]
    body = RobertaModel.from_pretrained(str(authors)).eval()
    head = CometCriticHead(16, 512)
    head.load_state_dict(torch.load(authors / "custom_roberta_classification_head.pt"))
    tokenizer = roberta_tokenizer()
    with torch.no_grad():
        expected = [torch.sigmoid(head(body(**tokenizer(p, r, return_tensors="pt")).pooler_output))[0, 0].item()
                    for p, r in zip(PROMPTS, RESPONSES)]
    reward = build_reward([{"use": "comet_critic", "model": str(checkpoints["comet"]), "inputs": "prompt_response"}])
    np.testing.assert_allclose(reward.components["comet_critic"](PROMPTS, RESPONSES), expected, atol=1e-5)
    assert isinstance(loaded(reward.components["comet_critic"])[1], CometCritic)


@pytest.mark.parametrize("options, message", [
    (dict(label="grammatical"), r"label 'grammatical' is not one of the model's labels \['acceptable', 'unacceptable'\]"),
    (dict(label=2), "label 2 is out of range for 2 logit"),
])
def test_bad_labels(checkpoints, options, message):
    with pytest.raises(RewardError, match=message):
        HFClassifier(model=str(checkpoints["roberta"]), **options)(PROMPTS, RESPONSES)


def test_softmax_over_one_logit_is_refused(checkpoints):
    with pytest.raises(RewardError, match="single logit"):
        HFClassifier(model=str(checkpoints["gpt2"]), transform="softmax")(PROMPTS, RESPONSES)


def test_building_loads_nothing_and_a_missing_model_is_one_clear_error(checkpoints):
    reward = build_reward([{"name": "judge", "use": "hf_classifier", "model": "no-such-org/no-such-model"},
                           {"name": "local", "use": "hf_classifier", "model": str(checkpoints["gpt2"])}])
    judge, local = reward.components["judge"], reward.components["local"]
    assert not judge.loaded and not local.loaded
    local(PROMPTS[:1], RESPONSES[:1])
    assert local.loaded
    with pytest.raises(RewardError) as err:
        reward.score(PROMPTS, RESPONSES)
    assert "'judge'" in str(err.value) and "'no-such-org/no-such-model'" in str(err.value)
    assert "neither a local path nor in the offline Hugging Face cache" in str(err.value)
    assert "\n" not in str(err.value)


def test_availability_is_checked_without_loading_weights(checkpoints):
    reward = build_reward([{"name": "local", "use": "hf_classifier", "model": str(checkpoints["roberta"])},
                           {"name": "oasst", "use": "hha_rm", "model": str(checkpoints["oasst"])}, "concise"])
    reward.check_available()
    assert not any(getattr(c, "loaded", False) for c in reward.components.values())
    missing = build_reward([{"name": "judge", "use": "hf_classifier", "model": "no-such-org/no-such-model"}])
    with pytest.raises(RewardError, match="'judge': model 'no-such-org/no-such-model' is neither a local path"):
        missing.check_available()


def test_presets_take_yaml_options_and_the_run_device_and_load_nothing():
    reward = build_reward(["hha_rm", "cola", "dialogrpt_updown", "faithcritic",
                           {"use": "toxichat_safety", "model": "/models/toxichat", "batch_size": 3}], device="cpu")
    safety = reward.components["toxichat_safety"]
    assert (safety.model, safety.batch_size, safety.device) == ("/models/toxichat", 3, "cpu")
    assert all(c.device == "cpu" for c in reward.components.values())
    assert reward.max_total == 5.0 and not any(c.loaded for c in reward.components.values())


@pytest.mark.parametrize("preset", sorted(n for n, f in COMPONENTS.items() if isinstance(f, partial)))
def test_preset_import_paths_resolve(preset):
    """The tasks' input functions and the custom model classes a preset names exist."""
    defaults = COMPONENTS[preset].keywords
    for key in ("inputs", "model_class"):
        if ":" in defaults.get(key, ""):
            assert callable(import_object(defaults[key], preset))


# ------------------------------------------------------------------ spec format and the composite

def test_specs_strings_mappings_and_omegaconf(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\nlength.max_value = 3.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = OmegaConf.create(["concise", "my_scores:length", {"name": "judge", "use": "hf_classifier", "model": "m"},
                              {"use": "hf_classifier", "model": "n", "device": "cuda:1"}])
    reward = build_reward(specs, device="cpu")
    assert list(reward.components) == ["concise", "my_scores:length", "judge", "hf_classifier"]
    judge, other = reward.components["judge"], reward.components["hf_classifier"]
    assert (judge.name, judge.device, judge.model) == ("judge", "cpu", "m")
    assert other.device == "cuda:1"  # an option given in the spec wins over build_reward's
    assert reward.max_total == 1.0 + 3.0 + 1.0 + 1.0
    assert list(build_reward("concise").components) == ["concise"]


def test_an_unset_environment_variable_in_a_spec_is_one_line(monkeypatch):
    monkeypatch.delenv("LOL_RL_TEST_TOXICHAT", raising=False)
    specs = OmegaConf.create({"rewards": [{"use": "toxichat_safety", "model": "${oc.env:LOL_RL_TEST_TOXICHAT}"}]})
    with pytest.raises(RewardError, match="Environment variable 'LOL_RL_TEST_TOXICHAT' not found"):
        build_reward(specs.rewards)


@pytest.mark.parametrize("specs, message", [
    (["correct", "nicety", {"name": "x", "use": "polit"}],
     r"unknown reward component\(s\) \['nicety', 'polit'\]; valid: \["),
    ([{"name": "x", "model": "m"}], "a mapping needs `use:"),
    ([{"use": "cola", "temperature": 2}], r"unexpected keyword argument 'temperature'; 'cola' takes \['model'"),
    ([{"use": "toxichat_safety"}], "missing a required argument: 'model'"),
    ([{"use": "hf_classifier", "model": "m", "transform": "tanh"}], "transform 'tanh'"),
    (["correct", {"name": "correct", "use": "concise"}], "column 'correct' is already used"),
    ([{"use": "lol_rl.rewards.toy:conciseness", "scale": 2}], "a 'module:function' scorer takes none"),
    (["no_such_module_xyz:score"], "reward 'no_such_module_xyz:score': cannot import it"),
    ([42], "expected a component name"),
    ([], "at least one component"),
    (["tfidf_diversity"], "'tfidf_diversity' must be fit on the train responses"),
])
def test_spec_errors_are_one_line(specs, message):
    with pytest.raises(RewardError, match=message) as err:
        build_reward(specs)
    assert "\n" not in str(err.value)


def test_composite_sums_components_and_reports_each(checkpoints):
    train = ["the cat sat", "the dog sat", "the cat ran"]
    reward = build_reward([{"name": "fluency", "use": "hf_classifier", "model": str(checkpoints["roberta"]),
                            "transform": "softmax", "label": "acceptable"},
                           {"name": "diversity", "use": "tfidf_diversity"}, "concise"], fit_texts=train)
    assert isinstance(reward, CompositeReward) and list(reward.components) == ["fluency", "diversity", "concise"]
    prompts = ["repeat: cat"] * 3
    responses = ["the cat", "cat", "the cat sat dog ran"]
    total, parts = reward.score(prompts, responses)
    np.testing.assert_allclose(total, parts["fluency"] + parts["diversity"] + parts["concise"])
    np.testing.assert_allclose(parts["fluency"], HFClassifier(
        model=str(checkpoints["roberta"]), transform="softmax", label=1)(prompts, responses))
    assert parts["diversity"][1] == pytest.approx(0.1)  # fit on the train responses: one known term
    assert reward.max_total == 3.0


# ------------------------------------------------------------------ TF-IDF diversity

def test_tfidf_diversity_by_hand():
    # train: the (df 3), cat (2), sat (2), dog (1), ran (1), n = 3; smooth idf = ln((1 + n) / (1 + df)) + 1
    scorer = TfidfDiversity().fit(["the cat sat", "the dog sat", "the cat ran"])
    idf = {"the": 1.0, "cat": math.log(4 / 3) + 1, "sat": math.log(4 / 3) + 1,
           "dog": math.log(2) + 1, "ran": math.log(2) + 1}

    def expected(terms: list[str]) -> float:
        """l2-normalised tf-idf of distinct terms (tf 1 each), mean x length penalty."""
        values = np.array([idf[t] for t in terms])
        mean = (values / np.linalg.norm(values)).mean()
        return mean * (len(terms) / 10 if len(terms) < 5 else 1.0)

    responses = ["the cat", "The CAT!", "cat cat", "the cat sat dog", "the cat sat dog ran", "zebra", "", "a b c"]
    scores = scorer(["p"] * len(responses), responses)
    assert scores[0] == pytest.approx(expected(["the", "cat"]))  # x 2/10
    assert scores[1] == pytest.approx(scores[0])  # lowercased, punctuation dropped
    assert scores[2] == pytest.approx(0.1)  # one term: normalised value 1, x 1/10
    assert scores[3] == pytest.approx(expected(["the", "cat", "sat", "dog"]))  # x 4/10
    assert scores[4] == pytest.approx(expected(["the", "cat", "sat", "dog", "ran"]))  # 5 terms: no penalty
    assert scores[4] > scores[3] > scores[0]
    assert list(scores[5:]) == [0.0, 0.0, 0.0]  # unknown words, nothing, one-letter words
    assert scorer.max_value == 1.0


def test_tfidf_needs_fitting():
    with pytest.raises(RewardError, match="not fitted"):
        TfidfDiversity()(["p"], ["the cat"])
    with pytest.raises(RewardError, match="cannot fit"):
        TfidfDiversity().fit(["a", "b"])


def _reverses(prompts, responses):
    responses.reverse()
    return [0.5] * len(responses)


def _exits(prompts, responses):
    import sys

    sys.exit(3)


@pytest.mark.parametrize("scorer, message", [
    (_reverses, "reward component 'c' raised AttributeError('tuple' object has no attribute 'reverse') on a batch "
                "of 2 (it gets tuples of the prompts and responses, to read, not to change)"),
    (_exits, "reward component 'c' raised SystemExit(3) on a batch of 2 (it gets tuples of the prompts and "
             "responses, to read, not to change)"),
    (lambda p, r: (0.5 for _ in r), "reward component 'c' returned a generator, expected a list or array of 2 "
                                    "numbers, one per response, in order"),
    (lambda p, r: {"a": 0.5, "b": 0.5}, "reward component 'c' returned a dict, expected a list or array of 2 "
                                        "numbers, one per response, in order"),
    (lambda p, r: ["high", "low"], "reward component 'c' returned values that are not numbers (could not convert "
                                   "string to float: 'high')"),
])
def test_a_misbehaving_scorer_is_one_line_naming_it(scorer, message):
    with pytest.raises(RewardError) as err:
        CompositeReward({"c": scorer}).score(["p1", "p2"], ["r1", "r2"])
    assert str(err.value) == message

