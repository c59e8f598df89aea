"""Peak memory of one phase of a benchmark script: peak allocated GPU memory on a GPU, peak RSS
on a CPU (Linux). Reset it before the phase, read it after; imported by the scripts beside it."""

from __future__ import annotations

import ctypes
import gc

import torch


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: give freed heap back to the OS, then reset the process's peak RSS (VmHWM)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device) -> int:
    """Bytes: torch.cuda.max_memory_allocated() on a GPU, VmHWM on a CPU, since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
