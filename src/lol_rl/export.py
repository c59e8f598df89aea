"""`lol-rl export`: a finished run's trained policy as a model dir a user can hand on.

    lol-rl export outputs/2026-12-03/18-24-21 --out exported/toy-alol            # one standalone model
    lol-rl export outputs/2026-12-03/18-24-21 --out exported/toy-alol --adapter  # base weights + LoRA adapter
    lol-rl export <run dir> --out <non-empty dir> --force                         # replace what is there
    HF_HUB_OFFLINE=0 lol-rl export <run dir> --out exported/x --push-to-hub you/toy-alol  # then upload it

Default: the policy as full weights (a LoRA adapter merged into its base, pi_ref), in
safetensors, with its tokenizer (and chat template, if it has one), a generation_config of the
run's greedy decoding, the model card README.md and the run's resolved config
(lol_rl_config.yaml). `AutoModelForCausalLM.from_pretrained(dir)` loads it; lol-rl is not needed.

--adapter (a LoRA run only): the dir holds the base weights (pi_ref, the sft artifact's
config.json and safetensors) and the trained adapter beside them (adapter_config.json,
adapter_model.safetensors). transformers, with peft installed, loads a dir holding both as the
base from the dir itself with the adapter over it, so `from_pretrained(dir)` works from anywhere
and no path is written: `base_model_name_or_path` is "." (this dir). `disable_adapters()` on the
loaded model (peft >= 0.22) gives pi_ref back, as lol-rl's reference is the adapter-disabled policy.

The export is built in a temp dir beside --out, reloaded with AutoModelForCausalLM, and its
logits on the first train prompts are compared with the policy's as the rl stage saved it
(models.load_policy); it is renamed into place only when they agree within TOLERANCE.

--push-to-hub REPO then uploads the checked dir, as one commit, through huggingface_hub
(create_repo, exist_ok, then upload_folder) with the token huggingface_hub finds (HF_TOKEN, or
`hf auth login`'s file). The repo id, the token and the hub's online mode are checked before
anything is built; an export that fails its check uploads nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import __version__, artifacts
from .errors import LolRlError
from .tables import markdown_table

log = logging.getLogger(__name__)

RL, SFT = "rl", "sft"  # their labels in stages.json, as stages/rl.py and stages/sft.py declare them
TOLERANCE = 1e-5  # max |logit difference| (absolute and relative) between the export and the policy
CHECK_PROMPTS = 4  # train prompts the logits are compared on
ADAPTER_BASE = "."  # an --adapter export's base_model_name_or_path: its own dir holds the base weights
RERUN = "re-running `lol-rl train` with the same config (its config.yaml) rebuilds it from the cache"


class ExportError(LolRlError):
    """A run dir that cannot be exported, or an export that does not reproduce the policy."""


@dataclass
class FinishedRun:
    """What an export reads of a finished `lol-rl train` run."""

    run_dir: Path
    cfg: DictConfig  # the resolved config (config.yaml)
    rl_dir: Path
    sft_dir: Path
    results: dict  # eval.json: {"reference": metrics, "policy": metrics}
    best: dict  # best.json of the rl artifact: {"step", "validation_reward"}
    overrides: list[str] | None  # the command line's overrides, when Hydra recorded them


def _stage_dir(run: Path, stages: dict, label: str) -> Path:
    entry = stages.get(label)
    if not isinstance(entry, dict) or "dir" not in entry:
        raise ExportError(f"{run / artifacts.RUN_STAGES} names no {label!r} stage; is {run} a `lol-rl train` run dir?")
    path = Path(entry["dir"])
    if not path.is_dir():
        where = "" if path.is_absolute() else f" (relative to the dir `lol-rl train` ran in; run export there)"
        raise ExportError(f"the {label} artifact of {run} is gone: {path}{where} was deleted or moved; {RERUN}")
    return path


def open_run(run_dir: Path) -> FinishedRun:
    """The finished run in `run_dir`, or one line saying why it cannot be exported."""
    if not run_dir.is_dir():
        raise ExportError(f"no run dir {run_dir} (give the dir `lol-rl train` wrote, e.g. outputs/<date>/<time>)")
    if not (run_dir / artifacts.RUN_CONFIG).is_file():
        raise ExportError(f"{run_dir} has no {artifacts.RUN_CONFIG}: not a `lol-rl train` run dir")
    missing = [name for name in (artifacts.RUN_EVAL, artifacts.RUN_STAGES) if not (run_dir / name).is_file()]
    if missing:
        raise ExportError(f"{run_dir} is not a finished run (no {' or '.join(missing)}: `lol-rl train` writes them "
                          f"when its eval ends); re-run the same `lol-rl train` command, it resumes from the cache")
    try:
        stages, results = artifacts.run_stages(run_dir), artifacts.run_eval(run_dir)
    except json.JSONDecodeError as err:
        raise ExportError(f"{run_dir}: a damaged {artifacts.RUN_STAGES} or {artifacts.RUN_EVAL} ({err})") from None
    rl_dir, sft_dir = _stage_dir(run_dir, stages, RL), _stage_dir(run_dir, stages, SFT)
    if not artifacts.policy_dir(rl_dir).is_dir() or not (rl_dir / artifacts.BEST).is_file():
        raise ExportError(f"the rl artifact {rl_dir} of {run_dir} has no {artifacts.POLICY}/ or {artifacts.BEST} "
                          f"(damaged); delete {rl_dir}: {RERUN}")
    overrides_file = run_dir / artifacts.RUN_OVERRIDES
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else None
    return FinishedRun(run_dir, OmegaConf.load(run_dir / artifacts.RUN_CONFIG), rl_dir, sft_dir, results,
                       artifacts.best_checkpoint(rl_dir), overrides)


def check_out(out: Path, force: bool, run: FinishedRun | None = None) -> None:
    """Refuse an existing non-empty --out unless --force, and never one holding the run or its artifacts."""
    if run is not None:
        target = out.resolve()
        for path in (run.run_dir, run.rl_dir, run.sft_dir):
            if path.resolve() == target or target in path.resolve().parents:
                raise ExportError(f"--out {out} holds {path}, which the export reads; give another --out")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise ExportError(f"--out {out} exists and is not empty; give a new --out, or --force to replace it")


# what is exported


def export_model_config(cfg: DictConfig) -> DictConfig:
    """The run's model config, loaded as a user will: full precision (fp32), never 4-bit."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(quantization=None, dtype="fp32")
    return OmegaConf.create(model_cfg)


def generation_config(cfg: DictConfig, tokenizer):
    """The run's validation and eval decoding: greedy (or beam search), its penalty and budget."""
    from transformers import GenerationConfig

    settings = cfg.generation
    return GenerationConfig(max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                            repetition_penalty=settings.repetition_penalty, do_sample=False,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def train_texts(cfg: DictConfig, n: int) -> list[str]:
    """The first `n` train rows as the policy saw them: formatted prompt, then the response. The
    split comes from the task's loader alone: building the task's rewards is not needed here."""
    from .tasks import LOADERS, DataError

    task = cfg.task
    if task.loader not in LOADERS:
        raise DataError(f"unknown task loader {task.loader!r}; valid: {sorted(LOADERS)}")
    rows = LOADERS[task.loader](task)["train"][:n]
    prefix = task.get("response_prefix", " ")
    return [task.prompt_template.format(prompt=row.prompt) + prefix + row.response for row in rows]


def _token_ids(tokenizer, texts: list[str], model_cfg, model_config) -> list:
    import torch

    limit = model_cfg.max_prompt_tokens + model_cfg.max_response_tokens
    positions = getattr(model_config, "max_position_embeddings", None)  # GPT-2's n_positions too
    limit = min(limit, positions) if positions else limit
    return [torch.tensor(tokenizer(text)["input_ids"][-limit:]) for text in texts]


def _logits(model, inputs: list) -> list:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(ids[None]).logits[0].float() for ids in inputs]


def _copy_weights(source: Path, target: Path) -> None:
    """The base's config and safetensors, as they are (no reload, no cast)."""
    names = [p.name for p in source.iterdir() if p.name == "config.json" or p.name.startswith("model")
             and (p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json")]
    if not any(name.endswith(".safetensors") for name in names):
        raise ExportError(f"the sft artifact {source} has no safetensors weights to put beside the adapter; "
                          f"export without --adapter")
    for name in names:
        shutil.copy2(source / name, target / name)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_model(run: FinishedRun, temp: Path, adapter: bool) -> tuple[list, list]:
    """The policy into `temp` (merged, or base + adapter); returns (token ids of the check
    prompts, the policy's logits on them), taken before any merge."""
    import torch

    from .models import is_adapter, load_policy

    policy_dir = artifacts.policy_dir(run.rl_dir)
    if adapter and not is_adapter(policy_dir):
        raise ExportError(f"the run in {run.run_dir} trained full weights (model.lora is null): there is no adapter "
                          f"to export; drop --adapter")
    if run.cfg.get("threads"):
        torch.set_num_threads(run.cfg.threads)
    model_cfg = export_model_config(run.cfg)
    policy, tokenizer = load_policy(policy_dir, torch.device("cpu"), model_cfg)
    inputs = _token_ids(tokenizer, train_texts(run.cfg, CHECK_PROMPTS), model_cfg, policy.config)
    expected = _logits(policy, inputs)
    generation = generation_config(run.cfg, tokenizer)
    if adapter:
        _copy_weights(run.sft_dir, temp)
        policy.save_pretrained(temp)  # adapter_config.json, adapter_model.safetensors
        _edit_json(temp / "adapter_config.json", lambda config: config.update(base_model_name_or_path=ADAPTER_BASE))
    else:
        if is_adapter(policy_dir):
            policy = policy.merge_and_unload()
        policy.generation_config = generation
        policy.save_pretrained(temp)  # safetensors
    generation.save_pretrained(temp)
    tokenizer.save_pretrained(temp)  # its chat template too, when it has one
    # loaded from a local dir, the tokenizer records that; a copy on the hub must not insist on it
    _edit_json(temp / "tokenizer_config.json", lambda config: [config.pop(k, None) for k in ("is_local", "local_files_only")])
    return inputs, expected


def verify(temp: Path, inputs: list, expected: list) -> float:
    """Reload the export with plain transformers; its logits must be the policy's. Returns the
    largest absolute difference."""
    import torch
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(temp, dtype=torch.float32)
    got = _logits(exported, inputs)
    worst = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    if not all(torch.allclose(g, e, atol=TOLERANCE, rtol=TOLERANCE) for g, e in zip(got, expected)):
        raise ExportError(f"the exported model's logits differ from the policy's by up to {worst:.2e} (tolerance "
                          f"{TOLERANCE:g}) on {len(inputs)} train prompts; nothing was exported")
    return worst


# the model card


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _params(params) -> str:
    items = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else params or {}
    return ", ".join(f"{k}={v}" for k, v in items.items()) or "-"


def base_model(model_cfg) -> str:
    """`model.name` and where its weights came from."""
    if model_cfg.kind == "from_config":
        return (f"{model_cfg.name}: a {model_cfg.arch} built from config (n_layer={model_cfg.n_layer}, "
                f"n_embd={model_cfg.n_embd}, n_head={model_cfg.n_head}), its tokenizer trained on the task text")
    source = (f"{model_cfg.gguf_file} from the Python package {model_cfg.gguf_package}"
              if model_cfg.get("gguf_package") else f"`{model_cfg.path}`")
    adapter = f", with the SFT adapter `{model_cfg.sft_adapter}`" if model_cfg.get("sft_adapter") else ""
    return f"{model_cfg.name}: {source}{adapter}"


def train_command(overrides: list[str] | None) -> str | None:
    """`lol-rl train ...` with the run's overrides; where the run was written and the cache are left out."""
    if overrides is None:
        return None
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "cache_dir="))]
    return " ".join(["lol-rl train", *map(shlex.quote, kept)])


def _metric_rows(results: dict) -> list[list[str]]:
    ref, policy = results["reference"], results["policy"]
    rows = [["reward", ref.get("reward"), policy.get("reward")]]
    rows += [[f"reward/{name}", ref.get("rewards", {}).get(name), value]
             for name, value in (policy.get("rewards") or {}).items()]
    rows.append(["length", ref.get("length"), policy.get("length")])
    rows += [[f"distinct-{n + 1}", (ref.get("distinct") or [None] * 3)[n], (policy.get("distinct") or [None] * 3)[n]]
             for n in range(3)]
    rows.append(["test prompts", ref.get("n"), policy.get("n")])
    return [[name, _cell(a), _cell(b)] for name, a, b in rows if a is not None or b is not None]


def _settings_rows(cfg: DictConfig, adapter_export: bool, validated: bool) -> list[list[str]]:
    model, rl, sft, gen = cfg.model, cfg.rl, cfg.sft, cfg.generation
    lora = model.get("lora")
    rows = [
        ["task", cfg.task.name],
        ["algorithm", f"{cfg.algo.name} (loss {cfg.algo.get('loss', '-')}, {cfg.algo.get('trainer', 'offline')})"],
        ["algorithm params", _params(cfg.algo.get("params"))],
        ["seed", cfg.seed],
        ["base model", base_model(model)],
        ["LoRA", f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets {lora.target_modules}"
                 + (" (kept as an adapter)" if adapter_export else " (merged)") if lora else "none (full weights)"],
        ["pi_ref (sft)", f"{sft.steps} steps, batch {sft.batch_size}, lr {sft.lr}"],
        ["rl", f"{rl.steps} steps, batch {rl.batch_size}, lr {rl.lr}, {rl.schedule} (warm-up {rl.warmup_steps})"],
        ["checkpoint choice", f"best validation reward, every {rl.val_interval} steps on {rl.val_prompts} prompts "
                              f"(step 0, pi_ref, included)" if validated else "the last step (no reward scorer)"],
        ["token budgets", f"prompt {model.max_prompt_tokens} (cut from the left), response {model.max_response_tokens}"],
        ["decoding", f"greedy, num_beams {gen.num_beams}, repetition_penalty {gen.repetition_penalty}, "
                     f"max_new_tokens {gen.max_new_tokens} (generation_config.json)"],
    ]
    return [[name, str(value)] for name, value in rows]


def model_card(run: FinishedRun, adapter: bool) -> str:
    cfg = run.cfg
    title = f"{cfg.task.name}-{cfg.algo.name}-s{cfg.seed}"
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "pipeline_tag: text-generation",
             f"tags: [lol-rl, offline-rl, {cfg.algo.name}, {cfg.task.name}]", "---"]
    best = run.best
    best_line = (f"step {best['step']} of {cfg.rl.steps}, validation reward {_cell(best['validation_reward'])}"
                 if best.get("validation_reward") is not None else
                 f"step {best['step']} (the task has no reward scorer: the last step, no validation)")
    template = ("the tokenizer's chat template (`apply_chat_template(messages, add_generation_prompt=True)`)"
                if cfg.model.get("chat_template") else None)
    load = (["from transformers import AutoModelForCausalLM, AutoTokenizer  # and `pip install peft`", "",
             'model = AutoModelForCausalLM.from_pretrained("<this dir>")  # the base here, the adapter over it',
             'tokenizer = AutoTokenizer.from_pretrained("<this dir>")',
             "# model.disable_adapters() (peft >= 0.22) gives the reference policy pi_ref"] if adapter else
            ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("<this dir>")',
             'tokenizer = AutoTokenizer.from_pretrained("<this dir>")'])
    prompt = cfg.task.prompt_template.format(prompt="...") + cfg.task.get("response_prefix", " ")
    command = train_command(run.overrides)
    lines = [
        *front, "",
        f"# {title}",
        "",
        f"A policy trained by offline RL with lol-rl {__version__}: algorithm "
        f"**{cfg.algo.name}** on the task **{cfg.task.name}**, seed {cfg.seed}, from the reference policy pi_ref "
        f"(NLL training of {cfg.model.name} on the task's train responses). "
        + ("This dir holds pi_ref's weights and the trained LoRA adapter beside them."
           if adapter else "The weights are the whole policy" + (" (the LoRA adapter merged)." if cfg.model.get("lora") else ".")),
        "",
        "## Use",
        "",
        "```python", *load,
        f"prompt = {prompt!r}  # formatted as below",
        'inputs = tokenizer(prompt, return_tensors="pt")',
        "output = model.generate(**inputs)  # the run's decoding, from generation_config.json",
        "```",
        "",
        "Prompts were formatted as " + (template or "(the response follows the last character):"),
        *([] if template else ["", "```", prompt, "```"]),
        "",
        "## Test metrics",
        "",
        f"The run's test split through the same eval (eval.json); pi_ref is the model it started from.",
        "",
        markdown_table(["metric", "pi_ref", f"{cfg.algo.name} (this model)"], _metric_rows(run.results)),
        "",
        f"Kept checkpoint: {best_line}.",
        "",
        "## Training",
        "",
        markdown_table(["setting", "value"], _settings_rows(cfg, adapter, best.get("validation_reward") is not None)),
        "",
        "## Reproduce",
        "",
        f"`{artifacts.EXPORT_CONFIG}` is the run's resolved config (every key; `cache_dir` left out). "
        + ("With the same lol-rl version and conf/:" if command else
           "The run's command-line overrides were not recorded (no .hydra/overrides.yaml)."),
        *(["", "```", command, "```"] if command else []),
        "",
    ]
    return "\n".join(lines)


def config_copy(cfg: DictConfig) -> str:
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree.pop("cache_dir", None)  # a path on the machine that trained
    return (f"# the resolved config of the `lol-rl train` run this model comes from (lol-rl {__version__}); "
            f"cache_dir left out\n" + OmegaConf.to_yaml(OmegaConf.create(tree)))


# the hub


def hub_token(repo: str) -> str:
    """The token to push `repo` with, after checking the id and that the hub may be reached:
    one line naming what is missing, before any work."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ExportError(f"--push-to-hub {repo!r} is not a Hugging Face repo id (<user or org>/<name>: letters, "
                          f"digits, '-', '_', '.'); nothing was exported") from None
    token = huggingface_hub.get_token()
    if not token:
        raise ExportError(f"--push-to-hub {repo}: no Hugging Face token is set (HF_TOKEN, or `hf auth login`); "
                          f"nothing was exported")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is on (lol-rl turns it on unless the environment "
                          f"sets it): run with HF_HUB_OFFLINE=0 to upload; nothing was exported")
    return token


def push(out: Path, repo: str, token: str, title: str) -> str:
    """Upload the export in `out` to the model repo `repo` (made if missing) as one commit;
    returns the commit's URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(out),
                                   commit_message=f"lol-rl {__version__} export: {title}")
    except Exception as err:  # HTTP errors (401, 403, 404), a lost connection: the commit was not made
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExportError(f"--push-to-hub {repo}: the upload failed ({type(err).__name__}: {first}); the export "
                          f"is in {out}, upload it again with `hf upload {repo} {out}`") from None
    return getattr(commit, "commit_url", None) or f"{repo}"


# the command


def _place(temp: Path, out: Path) -> None:
    """Rename the finished export into place; a replaced --out goes only after the new one is there."""
    if not out.exists():
        os.rename(temp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(temp, out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def export(run_dir: Path, out: Path, adapter: bool = False, force: bool = False, push_to: str | None = None) -> str:
    """Export the run in `run_dir` to `out` (and upload it to the hub repo `push_to`); returns
    the line that says what was written."""
    check_out(out, force)
    token = hub_token(push_to) if push_to else None
    run = open_run(run_dir)
    check_out(out, force, run)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        inputs, expected = write_model(run, temp, adapter)
        (temp / artifacts.EXPORT_CONFIG).write_text(config_copy(run.cfg), encoding="utf-8")
        (temp / artifacts.EXPORT_CARD).write_text(model_card(run, adapter), encoding="utf-8")  # after peft's own card
        worst = verify(temp, inputs, expected)
        check_out(out, force)  # another process may have written it meanwhile
        _place(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    kind = "base weights + LoRA adapter" if adapter else "standalone model"
    line = (f"exported the {run.cfg.algo.name} policy of {run_dir} to {out} ({kind}); its logits equal the "
            f"policy's on {len(inputs)} train prompts (max |difference| {worst:.1e})")
    if push_to:
        title = f"{run.cfg.task.name}-{run.cfg.algo.name}-s{run.cfg.seed}"
        line += f"\npushed {out} to the hub: {push(out, push_to, token, title)}"
    return line


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lol-rl export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished `lol-rl train` run dir (config.yaml, eval.json, stages.json)")
    parser.add_argument("--out", type=Path, required=True, help="the model dir to write (must not exist, or be empty)")
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA run: keep the adapter, beside pi_ref's weights, instead of merging it")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="then upload --out to this Hugging Face model repo (HF_TOKEN or `hf auth login`; "
                             "HF_HUB_OFFLINE=0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        line = export(args.run_dir, args.out, adapter=args.adapter, force=args.force, push_to=args.push_to_hub)
    except LolRlError as err:
        print(f"lol-rl: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(line)
