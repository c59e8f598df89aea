"""GPU check (not a test): what a QLoRA A-LOL run costs on one NVIDIA GPU, as one JSON.

    bash scripts/gpu_check.sh [out.json]               # one GPU, under 8 minutes (default gpu_check.json)
    bash scripts/gpu_check.sh --cpu-smoke out.json     # the same code path on CPU, a tiny LLaMA, seconds

Nothing is downloaded or installed: a LLaMA-architecture model of about 1.1B parameters
(LLaMA-3.2-1B's shape with LLaMA-2's 32K vocabulary, untied) is built from config with random
weights, saved once in bf16 to a temp dir and loaded the way every stage loads pi_ref
(models.load_base: bitsandbytes NF4 4-bit with double quantization), with a fresh LoRA adapter
(models.add_adapter). Everything else is the paper's HHA run (`+experiment=table2`, validated as
`lol-rl train` validates it): LoRA r 64 over all linear layers, paged AdamW 32-bit, gradient
checkpointing, 16 rows of 640 prompt + 128 response tokens per step, greedy generation of 128
tokens for 32 prompts. Phases, each with its peak memory reset before it:
  train    NLL, A-LOL and DPO steps, each the training loop's own (offline.loss_on_batch: one
           forward on the project's log-prob path and the loss from lol_rl.losses;
           loop.guarded_update: backward, clip, optimizer step), on fixed random rows with
           reference log-probs cached once with the adapter disabled; warm-up, then interleaved
           rounds timed between torch.cuda.synchronize() calls, median step;
  generate greedy decoding with the KV cache, every row exactly max_new_tokens long;
  MFU      model FLOPs over the GPU's dense bf16 peak (PEAK_TFLOPS, by device name; an unknown
           name falls back to a bf16 matmul rate measured here, and peak_tflops_source says so).
The JSON is rewritten after every phase, so a run stopped early keeps what it measured. The
GPU machine's image may lack hydra-core, omegaconf and bitsandbytes: `make gpu-check-deps`
copies them into .gpu-deps/ (or $GPU_CHECK_DEPS), which this script puts on sys.path after
site-packages. Without bitsandbytes the run goes on without 4-bit and says so in `quantization`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPS = Path(os.environ.get("GPU_CHECK_DEPS", ROOT / ".gpu-deps"))  # what `make gpu-check-deps` writes
if DEPS.is_dir():  # after site-packages: only what the machine lacks comes from here
    sys.path.append(str(DEPS))

import torch  # noqa: E402

try:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
except ModuleNotFoundError as err:
    sys.exit(f"gpu_check: {err.name} is not installed here and not in {DEPS}; run `make gpu-check-deps` on a "
             f"machine that has lol-rl's dependencies installed and carry .gpu-deps/ with the working tree")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lol_rl.algorithms import algorithm  # noqa: E402
from lol_rl.cli import CONF_DIR  # noqa: E402
from lol_rl.config import validate  # noqa: E402
from lol_rl.data import REJECTED, TokenizedRows  # noqa: E402
from lol_rl.logprobs import pad_batch, response_logprobs, to_device  # noqa: E402
from lol_rl.loop import guarded_update  # noqa: E402
from lol_rl.losses import LOSSES  # noqa: E402
from lol_rl.models import (_maybe_checkpointing, add_adapter, autocast, compute_dtype, load_base,  # noqa: E402
                           make_optimizer, quantization_config, reference_policy)
from lol_rl.offline import loss_on_batch  # noqa: E402
from peak_memory import peak_memory, reset_peak_memory  # noqa: E402  (scripts/peak_memory.py)

# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOPS; first match wins
PEAK_TFLOPS = [
    (r"H200.*NVL", 835.0), (r"GH200|H200", 989.0), (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0),
    (r"H100|H800", 989.0), (r"B200", 2250.0), (r"A100|A800", 312.0), (r"L40S", 362.0), (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0), (r"\bA10\b", 125.0),
]
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
ALGOS = ["nll", "alol", "dpo"]
# the GPU run: table2's settings as they are; the smoke shrinks every size so that it takes seconds
SMOKE_OVERRIDES = ["device=cpu", "rl.batch_size=2", "model.max_prompt_tokens=12", "model.max_response_tokens=8",
                   "model.lora.r=8", "generation.batch_size=2", "generation.max_new_tokens=8"]
# steps per round shrink when the warm-up says the timed rounds would take over train_budget_s, and
# generation repeats when they would take over generation_budget_s
GPU_STEPS = {"warmup": 3, "rounds": 4, "steps_per_round": 5, "train_budget_s": 180, "generation_repeats": 3,
             "generation_budget_s": 60}
SMOKE_STEPS = {"warmup": 1, "rounds": 2, "steps_per_round": 2, "train_budget_s": 60, "generation_repeats": 2,
               "generation_budget_s": 30}
PAD, EOS = 0, 2  # token ids of the random model; data ids start above them
FLOPS_CONVENTION = ("training: 6 x parameters x tokens per step (prompt + response tokens of every sequence; with a "
                    "frozen base and gradient checkpointing a step does about that: forward, recomputed forward, "
                    "input gradients); generation: 2 x parameters x (prompt + generated tokens)")
MEMORY = {"cuda": "torch.cuda.max_memory_allocated, reset before each phase (bitsandbytes' paged optimizer state "
                  "is not in it)",
          "cpu": "peak RSS of the process (VmHWM), reset before each phase"}


def run_config(name: str, smoke: bool):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=table2", f"algo={name}", *(SMOKE_OVERRIDES if smoke else [])])
    return validate(cfg)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor() or "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The rate of a square matmul in the run's dtype here, median of timed repeats."""
    n, repeats = (8192, 10) if device.type == "cuda" else (512, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e12


def peak_tflops(name: str, measured: float) -> tuple[float, str]:
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops, f"datasheet dense bf16 peak for {pattern!r} (scripts/gpu_check.py PEAK_TFLOPS)"
    return measured, (f"unknown device name {name!r}: not in PEAK_TFLOPS, so MFU is over the matmul rate "
                      f"measured here (matmul_tflops_measured), not a datasheet peak")


def build_checkpoint(shape: dict, dtype: torch.dtype, device: torch.device, path: Path) -> int:
    """A random LLaMA saved as a plain checkpoint; its parameter count (before quantization)."""
    config = LlamaConfig(**shape, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    with torch.device(device):  # initialised where it runs: seconds on a GPU for 1B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n_params


def bitsandbytes_problem() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a native library that does not load
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def load_policy(path: Path, model_cfg, device: torch.device) -> tuple[torch.nn.Module, str]:
    """pi_ref as the stages load it (4-bit on a GPU), a fresh LoRA adapter over it, and what
    quantization it got. models.quantization_config refuses 4-bit on a CPU as a run setting; the
    smoke asks it for the same NF4 config and loads it on the CPU, which bitsandbytes >= 0.45 can."""
    problem = bitsandbytes_problem()
    if problem is None:
        try:
            if device.type == "cuda":
                base, quantization = load_base(path, model_cfg, device), "nf4 (bitsandbytes, double quantization)"
            else:
                base = AutoModelForCausalLM.from_pretrained(
                    path, dtype=compute_dtype(model_cfg, device), device_map={"": "cpu"},
                    quantization_config=quantization_config(model_cfg, torch.device("cuda")))
                quantization = "nf4 (bitsandbytes, double quantization, on CPU)"
        except Exception as err:  # a native library that does not load, a kernel this device lacks
            problem = f"4-bit load failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if problem is not None:
        print(f"gpu_check: no 4-bit ({problem}); LoRA over {compute_dtype(model_cfg, device)} weights", file=sys.stderr)
        with open_dict(model_cfg):
            model_cfg.quantization = None
        base = load_base(path, model_cfg, device)
        quantization = "none (cpu smoke)" if device.type == "cpu" else f"none (bitsandbytes: {problem})"
    policy = _maybe_checkpointing(add_adapter(base, model_cfg), model_cfg)
    return policy, quantization


def random_rows(batch_size: int, prompt_tokens: int, response_tokens: int, vocab: int, seed: int) -> TokenizedRows:
    """Fixed random rows of exactly these lengths (no padding: every token counts), with a rejected
    response each for DPO."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[list[int]]:
        return torch.randint(EOS + 1, vocab, (batch_size, length), generator=generator).tolist()

    return TokenizedRows(ids(prompt_tokens), ids(response_tokens), PAD,
                         extra_responses={REJECTED: ids(response_tokens)})


def train_setup(policy, rows: TokenizedRows, cfg, device: torch.device) -> dict:
    """An algorithm's batch (its response groups, their reference log-probs under the
    adapter-disabled policy, advantages and rewards), loss and params."""
    algo = algorithm(cfg.algo)
    batch = to_device(rows.batch(list(range(len(rows))), algo.groups), device)
    policy.eval()
    with torch.no_grad(), reference_policy(policy) as reference, autocast(device):
        batch["ref_logprobs"] = response_logprobs(reference, batch)[0].float()
    weights = torch.linspace(0.1, 1.0, len(rows), device=device)
    batch.update(advantages=weights, rewards=weights)
    return {"batch": batch, "groups": algo.groups, "loss": LOSSES[algo.loss], "params": dict(algo.params),
            "sequences": len(algo.groups) * len(rows)}


def train_phase(policy, setups: dict, optimizer, grad_clip: float, device: torch.device, steps: dict) -> dict:
    """Median step seconds and peak memory per algorithm, over interleaved rounds."""
    def step(setup: dict) -> None:
        policy.train()

        def backward() -> torch.Tensor:  # the loop's step with grad_accum 1: one forward, one backward
            loss, _ = loss_on_batch(policy, setup["batch"], setup["groups"], setup["loss"], setup["params"])
            loss.backward()
            return loss.detach()

        guarded_update(backward, optimizer, grad_clip, False,
                       lambda what, value, norm: f"gpu check: non-finite {what} (loss {value}, grad norm {norm})")

    times = {name: [] for name in setups}
    peaks = {name: 0 for name in setups}
    per_round = steps["steps_per_round"]
    for round_ in range(steps["rounds"] + 1):  # round 0 is the warm-up
        for name, setup in setups.items():
            reset_peak_memory(device)
            for _ in range(steps["warmup"] if round_ == 0 else per_round):
                synchronize(device)
                started = time.perf_counter()
                step(setup)
                synchronize(device)
                times[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks[name], peak_memory(device))
        if round_ == 0:  # a slower GPU times fewer steps per round, so that the whole check fits its 8 minutes
            last_warmup = sum(times[name][-1] for name in setups)
            per_round = max(1, min(per_round, int(steps["train_budget_s"] / (steps["rounds"] * last_warmup))))
            times = {name: [] for name in setups}
    return {name: {"step_seconds": statistics.median(times[name]), "timed_steps": len(times[name]),
                   "peak_memory_mib": peaks[name] / 2**20} for name in setups}


def generation_phase(policy, batch_size: int, prompt_tokens: int, new_tokens: int, vocab: int,
                     device: torch.device, repeats: int, budget_s: float) -> dict:
    """Greedy decoding with the KV cache, as generate.generate calls it (left padding, no
    sampling, one beam); min_new_tokens keeps a random model from stopping at EOS early."""
    prompts = torch.randint(EOS + 1, vocab, (batch_size, prompt_tokens), generator=torch.Generator().manual_seed(1))
    enc = to_device(pad_batch(prompts.tolist(), [[] for _ in range(batch_size)], PAD, side="left"), device)
    policy.eval()

    def run(n: int) -> float:
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad():
            out = policy.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, num_beams=1, use_cache=True, pad_token_id=PAD,
                                  eos_token_id=EOS)
        synchronize(device)
        if out.shape[1] != prompt_tokens + n:
            raise RuntimeError(f"generated {out.shape[1] - prompt_tokens} tokens, expected {n}")
        return time.perf_counter() - started

    run(min(4, new_tokens))  # warm-up
    reset_peak_memory(device)
    runs = [run(new_tokens)]
    while len(runs) < repeats and sum(runs) + runs[0] <= budget_s:  # fewer repeats on a slow GPU
        runs.append(run(new_tokens))
    seconds = statistics.median(runs)
    return {"batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "seconds": seconds,
            "generated_tokens_per_s": batch_size * new_tokens / seconds, "repeats": len(runs),
            "peak_memory_mib": peak_memory(device) / 2**20}


def versions() -> dict:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                            capture_output=True, text=True).stdout.strip()
    bitsandbytes = version("bitsandbytes") if bitsandbytes_problem() is None else "not importable"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "transformers": version("transformers"), "peft": version("peft"), "bitsandbytes": bitsandbytes,
            "lol-rl": commit or "unknown"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="gpu_check.json", type=Path, help="the JSON (default gpu_check.json)")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny LLaMA on CPU: the same code path, seconds")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); "
                 "use --cpu-smoke to check the code path on CPU")
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:  # one thread: a tiny model gains nothing from more, and a shared CPU loses much to them
        torch.set_num_threads(1)
    configs = {name: run_config(name, smoke) for name in ALGOS}
    cfg = configs["alol"]
    dtype = compute_dtype(cfg.model, device)
    steps = SMOKE_STEPS if smoke else GPU_STEPS
    shape = LLAMA_TINY if smoke else LLAMA_1B
    batch_size, prompt_tokens, response_tokens = (cfg.rl.batch_size, cfg.model.max_prompt_tokens,
                                                  cfg.model.max_response_tokens)
    torch.manual_seed(0)

    label = device_name(device)
    measured = matmul_tflops(device, dtype)
    peak, peak_source = peak_tflops(label, measured) if not smoke else (
        measured, "cpu smoke: no datasheet peak for a CPU, so MFU is over the matmul rate measured here")
    report = {"mode": "cpu smoke" if smoke else "gpu", "complete": False, "device": label, "versions": versions(),
              "settings": " ".join(["+experiment=table2", *(SMOKE_OVERRIDES if smoke else [])]),
              "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "peak_tflops": peak, "peak_tflops_source": peak_source, "matmul_tflops_measured": measured,
              "flops_convention": FLOPS_CONVENTION, "memory": MEMORY[device.type], "steps": steps}

    def write() -> None:
        report.pop("wall_seconds", None)  # kept last
        report["wall_seconds"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    reset_peak_memory(device)
    load_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as checkpoint:
        n_params = build_checkpoint(shape, dtype, device, Path(checkpoint))
        policy, quantization = load_policy(Path(checkpoint), cfg.model, device)
    load_seconds = time.perf_counter() - load_started
    optimizer_name = "adamw" if smoke or "none" in quantization else cfg.model.optimizer
    optimizer = make_optimizer(policy, cfg.rl, optimizer_name)
    report["model"] = {"arch": "llama", **shape, "tie_word_embeddings": False, "parameters": n_params,
                       "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad)}
    quantized = sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
                    for m in policy.modules())  # bitsandbytes' layers, not peft's LoRA wrappers of them
    if quantized:
        report["model"]["linear_4bit_modules"] = quantized
    report.update(quantization=quantization, lora=dict(cfg.model.lora), optimizer=optimizer_name,
                  gradient_checkpointing=bool(cfg.model.gradient_checkpointing),
                  load={"seconds": load_seconds, "peak_memory_mib": peak_memory(device) / 2**20})
    write()

    rows = random_rows(batch_size, prompt_tokens, response_tokens, shape["vocab_size"], seed=0)
    setups = {name: train_setup(policy, rows, configs[name], device) for name in ALGOS}
    train = train_phase(policy, setups, optimizer, cfg.rl.grad_clip, device, steps)
    for name, result in train.items():
        tokens = setups[name]["sequences"] * (prompt_tokens + response_tokens)
        result.update(sequences_per_step=setups[name]["sequences"], tokens_per_step=tokens,
                      tokens_per_s=tokens / result["step_seconds"],
                      mfu=6 * n_params * tokens / result["step_seconds"] / (peak * 1e12))
    report["train"] = train
    report["alol_over_nll_step"] = train["alol"]["step_seconds"] / train["nll"]["step_seconds"]
    report["dpo_over_nll_step"] = train["dpo"]["step_seconds"] / train["nll"]["step_seconds"]
    write()

    generation = generation_phase(policy, cfg.generation.batch_size, prompt_tokens, cfg.generation.max_new_tokens,
                                  shape["vocab_size"], device, steps["generation_repeats"],
                                  steps["generation_budget_s"])
    processed = generation["batch_size"] * (prompt_tokens + generation["new_tokens"])
    generation["mfu"] = 2 * n_params * processed / generation["seconds"] / (peak * 1e12)
    report["generation"] = generation
    report["complete"] = True
    write()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
