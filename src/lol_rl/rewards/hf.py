"""Learned rewards: any Hugging Face sequence classifier as a reward component.

`HFClassifier` scores `(prompt, response)` rows with a checkpoint (hub id or local directory)
that loads on the first call, so building a task loads no model. What the classifier reads is
set by `inputs`: the response, the (prompt, response) sentence pair, or a task's function
`f(prompt, response) -> str | (str, str)` named by import path. The score is one logit,
through a sigmoid, a softmax (the probability of `label`), or raw.

Three released reward checkpoints are not transformers architectures; the classes below match
their weight names and pooling, so they load with every weight:
- `GPTNeoXRewardModel`: OpenAssistant's pythia reward models (the HHA rewards). Registered
  with the Auto classes under its `model_type`, as their config.json names it.
- `ToxiChatOffensiveClassifier`: the ToxiChat offensive classifier (a DialoGPT) of the Reddit
  safety reward; its config says `gpt2`, so it is chosen by `model_class`.
- `CometCritic`: West et al.'s COMET critic (RoBERTa-large), chosen by `model_class`;
  `merge_comet_critic` turns the authors' converted copy into one checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Model,
    GPTNeoXConfig,
    GPTNeoXModel,
    RobertaModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXPreTrainedModel
from transformers.models.roberta.modeling_roberta import RobertaPreTrainedModel

from . import RewardError, import_object

TRANSFORMS = {
    "sigmoid": lambda logits, label: torch.sigmoid(logits[:, label]),
    "softmax": lambda logits, label: torch.softmax(logits, dim=-1)[:, label],
    "raw": lambda logits, label: logits[:, label],
}
INPUTS = {
    "response": lambda prompt, response: response,
    "prompt_response": lambda prompt, response: (prompt, response),
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def last_attended(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of each row's last attended token (B, T, H) -> (B, H). The first argmax of
    the mask's running sum is the last 1, under right or left padding."""
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.cumsum(dim=1).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@strict
class GPTNeoXRewardConfig(GPTNeoXConfig):
    """Config of OpenAssistant's reward models: GPT-NeoX plus the pooling of the score head."""

    model_type = "gpt_neox_reward_model"
    pooling: str = "last"  # "last" attended token or "mean" over attended tokens


class GPTNeoXRewardModel(GPTNeoXPreTrainedModel):
    """OpenAssistant's `GPTNeoXRewardModel` (model_training/models/reward_model.py): a GPT-NeoX
    body `gpt_neox`, a pooled hidden state, and `out_proj` Linear(hidden, 1) giving the score."""

    config_class = GPTNeoXRewardConfig

    def __init__(self, config: GPTNeoXRewardConfig):
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None) -> SequenceClassifierOutput:
        hidden = self.gpt_neox(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.pooling == "last":
            pooled = last_attended(hidden, attention_mask)
        elif self.config.pooling == "mean":
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        else:
            raise ValueError(f"unknown pooling {self.config.pooling!r}; expected 'last' or 'mean'")
        return SequenceClassifierOutput(logits=self.out_proj(pooled))


AutoConfig.register(GPTNeoXRewardConfig.model_type, GPTNeoXRewardConfig, exist_ok=True)
AutoModelForSequenceClassification.register(GPTNeoXRewardConfig, GPTNeoXRewardModel, exist_ok=True)


class ToxiChatOffensiveClassifier(GPT2PreTrainedModel):
    """The ToxiChat offensive classifier (Baheti et al. 2021; the authors' `GPT2ForOC_S_offensive`):
    a DialoGPT body `transformer` and `off_classifier` Linear(hidden, 2) over [safe, offensive],
    read at each utterance's EOS. The reward reads the thread's last EOS, i.e. the response's,
    so its input ends with EOS and the last attended token is that EOS."""

    def __init__(self, config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.off_classifier = nn.Linear(config.n_embd, 2)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None) -> SequenceClassifierOutput:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutput(logits=self.off_classifier(last_attended(hidden, attention_mask)))


class CometCriticHead(nn.Module):
    """The critic's head on RoBERTa's pooler output: Linear(hidden, 512), gelu, Linear(512, 1)."""

    def __init__(self, hidden_size: int, middle_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, middle_size)
        self.out_proj = nn.Linear(middle_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(nn.functional.gelu(self.dense(pooled)))


class CometCritic(RobertaPreTrainedModel):
    """West et al. (2022)'s COMET critic, a RoBERTa-large-MNLI fine-tuned in Keras, as the authors
    converted it (convert_keras_roberta_to_huggingface.py): RoBERTa with its pooler, then
    `CometCriticHead`; P(valid) is the sigmoid of the logit."""

    def __init__(self, config):
        super().__init__(config)
        self.roberta = RobertaModel(config, add_pooling_layer=True)
        self.classifier = CometCriticHead(config.hidden_size, getattr(config, "critic_middle_size", 512))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None) -> SequenceClassifierOutput:
        pooled = self.roberta(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def merge_comet_critic(authors_dir: str | Path, out_dir: str | Path) -> None:
    """The authors' converted critic is a RobertaModel directory plus the head's state dict in
    `custom_roberta_classification_head.pt`; save both as one `CometCritic` checkpoint (once)."""
    authors_dir = Path(authors_dir)
    critic = CometCritic.from_pretrained(authors_dir)
    head = torch.load(authors_dir / "custom_roberta_classification_head.pt", map_location="cpu")
    critic.classifier.load_state_dict(head)
    critic.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(authors_dir).save_pretrained(out_dir)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def label_index(label: int | str, config, component: str) -> int:
    """An index as given, or a label name looked up in the checkpoint's config.id2label."""
    if isinstance(label, int):
        return label
    name_to_index = {name: int(index) for index, name in (getattr(config, "id2label", None) or {}).items()}
    if label not in name_to_index:
        raise RewardError(f"reward component '{component}': label {label!r} is not one of the model's labels "
                          f"{sorted(name_to_index)}")
    return name_to_index[label]


def check_texts(texts: list, component: str) -> bool:
    """Every classifier input is a string, or every one a pair of strings; returns 'pairs'."""
    if all(isinstance(t, str) for t in texts):
        return False
    if all(isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts):
        return True
    bad = next(t for t in texts if not isinstance(t, str))
    raise RewardError(f"reward component '{component}': inputs must give a string or a pair of strings "
                      f"for every row, got {bad!r}")


class HFClassifier:
    """One logit of a sequence classifier, through a sigmoid, a softmax or as it is, as a reward.

    model: hub id (from the offline cache) or local directory. label: logit index or label name.
    transform: sigmoid | softmax | raw. inputs: response | prompt_response | 'module:function'.
    max_length, truncation_side: tokens kept, from the end ('left') or the start ('right').
    model_class: 'module:Class' for checkpoints the Auto class cannot build (None: Auto).
    dtype: auto = bfloat16 on CUDA, float32 on CPU. max_value: required for raw scores; min_value
    (default 0) too where a raw score can be negative: a score outside [min_value, max_value] stops the run.
    """

    def __init__(
        self, *, model: str, label: int | str = 0, transform: str = "sigmoid", inputs: str = "response",
        max_length: int = 512, truncation_side: str = "right", batch_size: int = 16, device: str = "auto",
        dtype: str = "auto", max_value: float | None = None, model_class: str | None = None, name: str | None = None,
        min_value: float = 0.0,
    ):
        if transform not in TRANSFORMS:
            raise ValueError(f"transform {transform!r}; expected one of {sorted(TRANSFORMS)}")
        if inputs not in INPUTS and ":" not in inputs:
            raise ValueError(f"inputs {inputs!r}; expected one of {sorted(INPUTS)} or 'module:function'")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side {truncation_side!r}; expected 'left' or 'right'")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}; expected one of {list(DTYPES)}")
        if transform == "raw" and max_value is None:
            raise ValueError("a raw score needs max_value (the value head's output range)")
        if not isinstance(label, (int, str)) or isinstance(label, bool):
            raise ValueError(f"label {label!r}; expected a logit index or a label name")
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"max_length {max_length} and batch_size {batch_size} must be positive")
        self.model, self.label, self.transform, self.inputs = model, label, transform, inputs
        self.max_length, self.truncation_side, self.batch_size = max_length, truncation_side, batch_size
        self.device, self.dtype, self.model_class = device, dtype, model_class
        self.name = name or model
        self.max_value = 1.0 if max_value is None else float(max_value)
        self.min_value = float(min_value)
        self._loaded = None  # (tokenizer, model, label index, inputs function) after the first call

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def _load(self):
        if self._loaded is None:
            build = INPUTS.get(self.inputs) or import_object(self.inputs, f"reward component '{self.name}': inputs")
            model_cls = (AutoModelForSequenceClassification if self.model_class is None
                         else import_object(self.model_class, f"reward component '{self.name}': model_class"))
            device = resolve_device(self.device)
            tokenizer, model = self._from_pretrained(model_cls, resolve_dtype(self.dtype, device), device)
            tokenizer.padding_side = "right"  # decoder position ids stay those of the unpadded text
            tokenizer.truncation_side = self.truncation_side
            if tokenizer.pad_token is None:  # GPT-2 style (DialogRPT): pad with EOS
                if tokenizer.eos_token is None:
                    raise RewardError(f"reward component '{self.name}': tokenizer of {self.model!r} has no pad or eos token")
                tokenizer.pad_token = tokenizer.eos_token
            if model.config.pad_token_id is None:  # GPT2ForSequenceClassification pools at the last non-pad token
                model.config.pad_token_id = tokenizer.pad_token_id
            model.eval()
            self._loaded = (tokenizer, model, label_index(self.label, model.config, self.name), build)
        return self._loaded

    def check_available(self) -> None:
        """Fail now, not after hours of sft, when the model is not here: reads only its config."""
        try:
            AutoConfig.from_pretrained(self.model)
        except (OSError, ValueError) as err:
            raise self._unavailable(err) from err

    def _unavailable(self, err: Exception) -> RewardError:
        if Path(self.model).is_dir():
            return RewardError(f"reward component '{self.name}': cannot load {self.model!r} ({err})")
        return RewardError(
            f"reward component '{self.name}': model {self.model!r} is neither a local path nor in the "
            "offline Hugging Face cache (download it once where there is network, or give a local path)")

    def _from_pretrained(self, model_cls, dtype: torch.dtype, device: torch.device):
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model)
            model, info = model_cls.from_pretrained(  # straight onto the device: a 6.9B model needs no host copy
                self.model, dtype=dtype, device_map=str(device), output_loading_info=True)
        except (OSError, ValueError) as err:
            raise self._unavailable(err) from err
        missing = sorted(info["missing_keys"])
        if missing:  # a head initialised at random would score noise without a word
            raise RewardError(
                f"reward component '{self.name}': {self.model!r} has no weights for {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''} in {model_cls.__name__}; a wrong model_class?"
            )
        return tokenizer, model

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if not len(prompts):
            return np.zeros(0)
        tokenizer, model, label, build = self._load()
        texts = [self._input(build, i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
        pairs = check_texts(texts, self.name)
        length = (lambda t: len(t[0]) + len(t[1])) if pairs else len
        # longest first: similar lengths share a batch (less padding) and memory peaks at once
        order = sorted(range(len(texts)), key=lambda i: -length(texts[i]))
        scores = np.empty(len(texts))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            scores[rows] = self._score_batch([texts[i] for i in rows], pairs, tokenizer, model, label)
        return scores

    def _input(self, build, row: int, prompt: str, response: str):
        try:
            return build(prompt, response)
        except Exception as err:  # a task's input function: name the row, not a traceback
            raise RewardError(f"reward component '{self.name}': inputs {self.inputs!r} failed on row {row} "
                              f"({type(err).__name__}: {err})") from err

    def _score_batch(self, texts: list, pairs: bool, tokenizer, model, label: int) -> np.ndarray:
        columns = [list(c) for c in zip(*texts)] if pairs else [texts]
        encoded = tokenizer(*columns, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**encoded.to(model.device)).logits.float()
        n_logits = logits.shape[-1]
        if not 0 <= label < n_logits:
            raise RewardError(f"reward component '{self.name}': label {self.label!r} is out of range "
                              f"for {n_logits} logit(s)")
        if self.transform == "softmax" and n_logits == 1:
            raise RewardError(f"reward component '{self.name}': softmax over a single logit is always 1; use sigmoid")
        return TRANSFORMS[self.transform](logits, label).cpu().numpy()

