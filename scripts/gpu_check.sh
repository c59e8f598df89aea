#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py says what it measures):
#   bash scripts/gpu_check.sh [out.json]              # one NVIDIA GPU, under 8 minutes
#   bash scripts/gpu_check.sh --cpu-smoke [out.json]  # the same code path on CPU, a tiny LLaMA
# Installs and downloads nothing: it runs the python already there (torch, transformers, peft,
# bitsandbytes, hydra-core) over this checkout's src/, plus .gpu-deps/ if `make gpu-check-deps`
# made one for a machine that lacks some of them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled HF_HUB_DISABLE_PROGRESS_BARS=1
python="${PYTHON:-$(command -v python3 || command -v python)}"
# a hard stop at 8 minutes; the JSON is rewritten after each phase, so what finished is kept
exec timeout --signal=INT --kill-after=15 480 "$python" "$root/scripts/gpu_check.py" "$@"
