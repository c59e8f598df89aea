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


def follow_umask(root: Path) -> None:
    """Give every file under `root` the mode the umask gives a new file: some writers (transformers'
    model.safetensors) create 0600 files, which another user of a shared cache cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def atomic_link(path: Path, target: Path) -> str:
    """`path` -> `target`, replacing whatever `path` was in one rename: a symlink, relative when
    the two share a root (the pair can move together), else absolute; where symlinks cannot be
    made (some filesystems, Windows without the privilege) a small text file holding the target's
    absolute path. Returns "symlink" or "file"."""
    target = Path(os.path.abspath(target))
    try:
        link = Path(os.path.relpath(target, Path(os.path.abspath(path)).parent))
    except ValueError:  # another drive
        link = target
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if temp.is_symlink() or temp.exists():
        temp.unlink()
    try:
        os.symlink(link, temp, target_is_directory=True)
        kind = "symlink"
    except OSError:
        temp.write_text(f"{target}\n", encoding="utf-8")
        kind = "file"
    os.replace(temp, path)
    return kind
