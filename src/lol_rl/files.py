"""Whole files or nothing: a file is written to a temp file beside it and renamed into place,
so a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temp path)`, then one rename onto `path` (a figure's savefig, a text)."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temp)
    os.replace(temp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))
