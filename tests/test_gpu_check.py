"""scripts/gpu_check.sh: the GPU check's code path, run on CPU with --cpu-smoke through the one
command (also as on an image that lacks hydra and bitsandbytes, with what `make gpu-check-deps`
copies), and its peak-FLOPS table on hand-written device names."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASE_KEYS = {"step_seconds", "timed_steps", "peak_memory_mib", "sequences_per_step", "tokens_per_step",
              "tokens_per_s", "mfu"}


def figures(node, where=""):
    """(path, value) of every number in the JSON (booleans are flags, not figures)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from figures(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from figures(value, f"{where}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield where, node


def test_cpu_smoke_writes_one_json_of_positive_finite_figures(tmp_path):
    out = tmp_path / "nested" / "out.json"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(run.stdout[run.stdout.index("{"):]) == report  # the JSON is also printed

    assert report["mode"] == "cpu smoke" and report["complete"] is True
    assert report["quantization"] in ("nf4 (bitsandbytes, double quantization, on CPU)", "none (cpu smoke)")
    if report["quantization"].startswith("nf4"):
        assert report["model"]["linear_4bit_modules"] == 7 * report["model"]["num_hidden_layers"]
    for key in ("device", "versions", "peak_tflops", "peak_tflops_source", "matmul_tflops_measured",
                "flops_convention", "memory", "model", "lora", "optimizer", "load", "train", "generation",
                "alol_over_nll_step", "dpo_over_nll_step", "wall_seconds"):
        assert key in report, key
    assert set(report["train"]) == {"nll", "alol", "dpo"}
    for name, phase in report["train"].items():
        assert PHASE_KEYS <= set(phase), (name, PHASE_KEYS - set(phase))
    assert report["train"]["dpo"]["sequences_per_step"] == 2 * report["train"]["nll"]["sequences_per_step"]
    assert {"seconds", "generated_tokens_per_s", "peak_memory_mib", "mfu"} <= set(report["generation"])
    assert report["alol_over_nll_step"] == pytest.approx(
        report["train"]["alol"]["step_seconds"] / report["train"]["nll"]["step_seconds"])
    # the parameter count is the model's own: embeddings, lm_head, 7 linear layers and 2 norms per layer, final norm
    m = report["model"]
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    per_layer = (2 * m["hidden_size"] ** 2 + 2 * m["hidden_size"] * m["num_key_value_heads"] * head_dim
                 + 3 * m["hidden_size"] * m["intermediate_size"] + 2 * m["hidden_size"])
    embeddings_and_head = 2 * m["vocab_size"] * m["hidden_size"]
    assert m["parameters"] == embeddings_and_head + m["num_hidden_layers"] * per_layer + m["hidden_size"]

    found = dict(figures(report))
    assert len(found) > 30
    bad = {path: value for path, value in found.items() if not (math.isfinite(value) and value > 0)}
    assert not bad, bad


# a sitecustomize that hides packages installed here, as a GPU image without them would lack them
HIDE = """import sys
from importlib.machinery import PathFinder
HIDDEN = {"hydra", "omegaconf", "antlr4", "bitsandbytes"}
class Hide:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] not in HIDDEN or path is not None:
            return None
        spec = PathFinder.find_spec(name, [p for p in sys.path if "site-packages" not in p])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return spec
sys.meta_path.insert(0, Hide)
"""


def test_on_an_image_without_hydra_or_bitsandbytes_the_copied_deps_run_it(tmp_path):
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide"), "GPU_CHECK_DEPS": str(tmp_path / "deps")}
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path / "out.json")]
    bare = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "make gpu-check-deps" in bare.stderr, bare.stderr[-2000:]

    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_deps.py"), "--out", str(tmp_path / "deps")],
                   check=True, capture_output=True)
    assert not list((tmp_path / "deps" / "bitsandbytes").glob("libbitsandbytes_cuda12*"))  # only CUDA 13 and CPU
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["complete"] is True and report["quantization"].startswith("nf4")


@pytest.fixture()
def peak_tflops():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gpu_check import peak_tflops
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return peak_tflops


@pytest.mark.parametrize("name, datasheet", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                             ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200 NVL", 835.0),
                                             ("NVIDIA A100-SXM4-80GB", 312.0),
                                             ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA A10", 125.0)])
def test_peak_tflops_by_device_name(peak_tflops, name, datasheet):
    peak, source = peak_tflops(name, measured=1.0)
    assert peak == datasheet and "datasheet" in source


def test_an_unknown_device_falls_back_to_the_measured_rate_and_says_so(peak_tflops):
    for name in ("NVIDIA A10G", "Tesla T4", "NVIDIA GeForce RTX 4090"):
        peak, source = peak_tflops(name, measured=42.0)
        assert peak == 42.0 and "unknown device name" in source and name in source
