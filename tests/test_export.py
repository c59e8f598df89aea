"""`lol-rl export` end to end: two tiny chains trained by the CLI (full weights on the embedded
task; LoRA over a local pretrained checkpoint on the jsonl example, which has no scorer, so the
last rl step is kept and the adapter is a trained one, not peft's no-op start), exported merged
and as base + adapter, then loaded in a process that imports transformers and not lol_rl."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from lol_rl import artifacts
from lol_rl.export import ExportError, open_run, train_texts, verify
from lol_rl.export import main as export_main
from lol_rl.models import build_from_config, load_policy, train_tokenizer
from test_cli import ROOT, TINY, lol_rl

CPU = torch.device("cpu")
SMALLER = {"task.sizes.train": 64, "task.sizes.validation": 16, "task.sizes.test": 16, "sft.steps": 6,
           "rl.steps": 4, "rl.val_interval": 2, "rl.log_interval": 2, "rl.val_prompts": 8}
FULL_RUN = [o for o in TINY if o.split("=")[0] not in SMALLER] + [f"{k}={v}" for k, v in SMALLER.items()] + ["algo=nll"]
SUPPORT = ROOT / "examples" / "support"
LORA_RUN = [
    "task=jsonl", *(f"task.{split}={SUPPORT / split}.jsonl" for split in ("train", "validation", "test")),
    "model=causal_lm_lora", "model.lora.r=4", "model.max_prompt_tokens=32", "model.max_response_tokens=24",
    "sft.steps=6", "sft.batch_size=8", "sft.lr=1e-3", "sft.log_interval=3",
    "value.epochs=2", "value.heads=2", "rl.steps=4", "rl.batch_size=4", "rl.lr=1e-2", "rl.log_interval=2",
    "generation.max_new_tokens=8", "algo=alol",
]
# loads every export with transformers alone and saves its logits (and, under an adapter, pi_ref's)
PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
inputs = torch.load(sys.argv[1])
out = {}
for name, path in inputs["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out[name] = [model(ids[None]).logits[0] for ids in inputs["ids"][name]]
assert not any(m == "lol_rl" or m.startswith("lol_rl.") for m in sys.modules), "lol_rl was imported"
torch.save(out, sys.argv[2])
"""


def _tiny_checkpoint(path: Path) -> Path:
    """A causal LM saved as a hub checkpoint is (config, weights, tokenizer), built offline."""
    texts = [row["prompt"] + " " + row["response"] for row in artifacts.read_jsonl(SUPPORT / "train.jsonl")]
    tokenizer = train_tokenizer(texts, 300)
    cfg = OmegaConf.create({"arch": "gpt2", "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "dropout": 0.0,
                           "activation": "gelu_new"})
    torch.manual_seed(0)
    build_from_config(cfg, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both runs trained by the CLI, exported three ways, and loaded by plain transformers in a subprocess."""
    ws = tmp_path_factory.mktemp("export")
    cache = ws / "cache"
    pretrained = _tiny_checkpoint(ws / "tiny-gpt2")
    full, lora = ws / "full_run", ws / "lora_run"
    for run_dir, overrides in ((full, FULL_RUN), (lora, [f"model.path={pretrained}", *LORA_RUN])):
        proc = lol_rl("train", *overrides, f"hydra.run.dir={run_dir}", cache=cache)
        assert proc.returncode == 0, proc.stdout[-4000:]
    dirs = {"full": ws / "out" / "full", "lora": ws / "out" / "lora", "lora_adapter": ws / "out" / "lora_adapter"}
    # in-process: the argv of `lol-rl export` (cli.py dispatches it; the subprocess tests below go through it)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_main([str(lora), "--out", str(dirs["lora"])])
        export_main([str(lora), "--out", str(dirs["lora_adapter"]), "--adapter"])
        export_main([str(full), "--out", str(dirs["full"])])

    runs = {"full": full, "lora": lora, "lora_adapter": lora}
    policies, ids = {}, {}
    for name, run_dir in (("full", full), ("lora", lora)):
        run = open_run(run_dir)  # the policy as the rl stage saved it, and pi_ref
        model_cfg = OmegaConf.merge(run.cfg.model, {"dtype": "fp32"})
        policy, tokenizer = load_policy(run.rl_dir / artifacts.POLICY, CPU, model_cfg)
        reference, _ = load_policy(run.sft_dir, CPU, model_cfg)
        ids[name] = [torch.tensor(tokenizer(t)["input_ids"][-48:]) for t in train_texts(run.cfg, 3)]
        with torch.no_grad():
            policies[name] = [policy.eval()(x[None]).logits[0] for x in ids[name]]
            policies[name + "/reference"] = [reference.eval()(x[None]).logits[0] for x in ids[name]]
    ids["lora_adapter"], policies["lora_adapter"] = ids["lora"], policies["lora"]
    torch.save({"dirs": {k: str(v) for k, v in dirs.items()}, "ids": ids}, ws / "inputs.pt")
    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(ws / "inputs.pt"), str(ws / "plain.pt")],
                           cwd=ws, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert plain.returncode == 0, plain.stdout[-4000:]
    return SimpleNamespace(ws=ws, cache=cache, lines=printed.getvalue().splitlines(), runs=runs, dirs=dirs, policies=policies,
                           plain=torch.load(ws / "plain.pt"))


def test_exports_load_with_transformers_alone_and_give_the_policys_logits(exported):
    assert all("its logits equal the policy's on 4 train prompts" in line for line in exported.lines)
    for name in exported.dirs:
        for got, expected in zip(exported.plain[name], exported.policies[name], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)
    # the LoRA policy is not pi_ref (its adapter trained), so equal logits say the merge kept it
    trained = max(float((p - r).abs().max()) for p, r in zip(exported.policies["lora"], exported.policies["lora/reference"]))
    assert trained > 1e-3
    # beside the adapter lie pi_ref's weights, as the sft stage saved them
    sft_dir = open_run(exported.runs["lora"]).sft_dir
    assert (exported.dirs["lora_adapter"] / "model.safetensors").read_bytes() == (sft_dir / "model.safetensors").read_bytes()


def test_export_layout(exported):
    merged, adapter = exported.dirs["lora"], exported.dirs["lora_adapter"]
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json"} <= {
        p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "."
    for out, run in ((merged, exported.runs["lora"]), (exported.dirs["full"], exported.runs["full"])):
        generation = json.loads((out / "generation_config.json").read_text())
        cfg = OmegaConf.load(run / "config.yaml")
        assert generation["max_new_tokens"] == cfg.generation.max_new_tokens
        assert generation.get("do_sample", False) is False and generation.get("num_beams", 1) == cfg.generation.num_beams
        copied = OmegaConf.load(out / artifacts.EXPORT_CONFIG)
        assert "cache_dir" not in copied and copied.algo == cfg.algo and copied.rl == cfg.rl
    assert not list((exported.ws / "out").glob(".*"))  # no temp dir left behind


def test_model_card_names_the_run(exported):
    card = (exported.dirs["full"] / "README.md").read_text()
    results = json.loads((exported.runs["full"] / "eval.json").read_text())
    best = artifacts.best_checkpoint(open_run(exported.runs["full"]).rl_dir)
    assert "**nll**" in card and "**toy**" in card and "seed 1" in card
    assert f"| reward | {results['reference']['reward']:.4f} | {results['policy']['reward']:.4f} |" in card
    assert f"step {best['step']} of 4" in card
    assert "lol-rl train " in card and "algo=nll" in card and "hydra.run.dir" not in card
    lora_card = (exported.dirs["lora_adapter"] / "README.md").read_text()
    assert "**alol**" in lora_card and "library_name: peft" in lora_card and "r=4" in lora_card


def test_no_exported_file_holds_a_cache_path(exported):
    cache = [str(exported.cache).encode(), str(exported.cache.resolve()).encode()]
    for out in exported.dirs.values():
        for path in out.rglob("*"):
            data = path.read_bytes()
            assert not any(c in data for c in cache), path


def test_existing_out_is_refused_unless_forced(exported, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = lol_rl("export", str(exported.runs["full"]), "--out", str(out), cache=exported.cache)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert proc.stdout.strip().splitlines() == [f"lol-rl: --out {out} exists and is not empty; give a new --out, "
                                                f"or --force to replace it"]
    assert (out / "keep.txt").read_text() == "mine"
    export_main([str(exported.runs["full"]), "--out", str(out), "--force"])
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_missing_run_dir_is_one_line(tmp_path):
    proc = lol_rl("export", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), cache=tmp_path / "c")
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    assert proc.stdout.strip().splitlines() == [f"lol-rl: no run dir {tmp_path / 'nope'} (give the dir `lol-rl train` "
                                                f"wrote, e.g. outputs/<date>/<time>)"]


def test_unfinished_or_moved_runs_say_what_to_do(exported, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(exported.runs["full"], unfinished)
    (unfinished / "stages.json").unlink()
    with pytest.raises(ExportError, match=r"is not a finished run \(no stages.json"):
        open_run(unfinished)

    moved = tmp_path / "moved"
    shutil.copytree(exported.runs["full"], moved)
    stages = json.loads((moved / "stages.json").read_text())
    stages["rl"]["dir"] = str(tmp_path / "elsewhere" / "rl")
    (moved / "stages.json").write_text(json.dumps(stages))
    with pytest.raises(ExportError) as err:
        open_run(moved)
    message = str(err.value)
    assert "the rl artifact" in message and str(tmp_path / "elsewhere" / "rl") in message
    assert "re-running `lol-rl train` with the same config" in message and "\n" not in message


def test_full_weights_have_no_adapter_to_export(exported, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        export_main([str(exported.runs["full"]), "--out", str(tmp_path / "x"), "--adapter"])
    assert exit_.value.code == 2 and not (tmp_path / "x").exists()


def test_verify_fails_on_other_logits(exported):
    out = exported.dirs["full"]
    ids = [torch.tensor([0, 5, 7, 9])]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = [model(ids[0][None]).logits[0]]
    assert verify(out, ids, logits) == 0.0
    with pytest.raises(ExportError, match="logits differ from the policy's by up to"):
        verify(out, ids, [logits[0] + 1e-3])


def test_exports_generate_through_the_text_generation_pipeline(exported):
    """What a user does first with the dir: `pipeline("text-generation", model=dir)`, greedy by
    the export's generation_config, the same text as generate() on the plain model."""
    from transformers import AutoTokenizer, pipeline

    from lol_rl.tasks import LOADERS

    for name in ("full", "lora", "lora_adapter"):
        out, task = exported.dirs[name], open_run(exported.runs[name]).cfg.task
        prompt = task.prompt_template.format(prompt=LOADERS[task.loader](task)["train"][0].prompt)
        generator = pipeline("text-generation", model=str(out), device="cpu")
        text = generator(prompt, return_full_text=False)[0]["generated_text"]
        model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            expected = model.generate(**ids)[0, ids["input_ids"].shape[1]:]
        assert text and text == tokenizer.decode(expected, skip_special_tokens=True), name
        assert generator.model.generation_config.max_new_tokens == json.loads(
            (out / "generation_config.json").read_text())["max_new_tokens"]


class StubHub:
    """huggingface_hub.HfApi with the network replaced by a dir: what create_repo and
    upload_folder were called with, and the files an upload would have committed."""

    calls: list = []
    fail: Exception | None = None

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, token=None, **kwargs):  # HfApi(token=...)
        StubHub.calls.append(("HfApi", token))
        return self

    def create_repo(self, repo_id, **kwargs):
        StubHub.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        StubHub.calls.append(("upload_folder", repo_id, folder_path, kwargs))
        if StubHub.fail is not None:
            raise StubHub.fail
        shutil.copytree(folder_path, self.root / repo_id)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    stub = StubHub(tmp_path / "hub")
    StubHub.calls, StubHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", stub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_stub_token")
    return stub


def test_push_to_hub_uploads_the_checked_export_as_one_commit(exported, hub, tmp_path, capsys):
    out = tmp_path / "pushed"
    export_main([str(exported.runs["full"]), "--out", str(out), "--push-to-hub", "me/toy-nll"])
    assert capsys.readouterr().out.splitlines()[-1] == f"pushed {out} to the hub: https://huggingface.co/me/toy-nll/commit/abc123"
    (_, token), (_, repo, created), (_, pushed, folder, upload) = StubHub.calls
    assert token == "hf_stub_token" and repo == pushed == "me/toy-nll" and created["exist_ok"] is True
    assert Path(folder) == out and upload["repo_type"] == "model" and "toy-nll-s1" in upload["commit_message"]
    uploaded = hub.root / "me" / "toy-nll"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(p.name for p in out.iterdir())
    assert (uploaded / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("setup, message", [
    (lambda mp, hub_module: mp.delenv("HF_TOKEN"),
     "lol-rl: --push-to-hub me/x: no Hugging Face token is set (HF_TOKEN, or `hf auth login`); nothing was exported"),
    (lambda mp, hub_module: mp.setattr(hub_module.constants, "HF_HUB_OFFLINE", True),
     "lol-rl: --push-to-hub me/x: HF_HUB_OFFLINE is on (lol-rl turns it on unless the environment sets it): "
     "run with HF_HUB_OFFLINE=0 to upload; nothing was exported"),
])
def test_push_without_a_token_or_offline_is_one_line_before_any_work(exported, hub, tmp_path, monkeypatch, capsys,
                                                                     setup, message):
    import huggingface_hub

    setup(monkeypatch, huggingface_hub)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        export_main([str(exported.runs["full"]), "--out", str(out), "--push-to-hub", "me/x"])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines() == [message]
    assert not out.exists() and StubHub.calls == [] and not hub.root.exists()


def test_push_names_a_bad_repo_id_and_a_failed_upload(exported, hub, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        export_main([str(exported.runs["full"]), "--out", str(tmp_path / "a"), "--push-to-hub", "not a repo"])
    assert capsys.readouterr().err.splitlines() == [
        "lol-rl: --push-to-hub 'not a repo' is not a Hugging Face repo id (<user or org>/<name>: letters, digits, "
        "'-', '_', '.'); nothing was exported"]
    assert not (tmp_path / "a").exists()

    StubHub.fail = ConnectionError("hub unreachable\nsecond line")
    out = tmp_path / "b"
    with pytest.raises(SystemExit) as exit_:
        export_main([str(exported.runs["full"]), "--out", str(out), "--push-to-hub", "me/x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"lol-rl: --push-to-hub me/x: the upload failed (ConnectionError: hub unreachable); the export is in {out}, "
        f"upload it again with `hf upload me/x {out}`"]
    assert (out / "model.safetensors").is_file() and not hub.root.exists()

    # an export that fails its check is never uploaded
    StubHub.calls, StubHub.fail = [], None

    def differs(*args):
        raise ExportError("the exported model's logits differ")

    monkeypatch.setattr("lol_rl.export.verify", differs)
    with pytest.raises(SystemExit):
        export_main([str(exported.runs["full"]), "--out", str(tmp_path / "c"), "--push-to-hub", "me/x"])
    assert not (tmp_path / "c").exists() and not any(call[0] == "upload_folder" for call in StubHub.calls)
