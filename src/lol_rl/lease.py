"""Who owns a dir that only one live process may write: a resumable build (`.partial-<key>/`) or
a run dir. The owner file names `host`, `pid` and the process's start time, and its mtime is a
lease the owner renews every `RENEW_SECONDS` while it works.

An owner is live when, on this host, its pid runs and started when the file says (a pid reused
by an unrelated process is not the owner); on another host, where no pid can be probed, when
its lease was renewed within `LEASE_SECONDS`. A claim is atomic (see `Lease`), so two
processes never both take a dir."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RENEW_SECONDS = 10.0
LEASE_SECONDS = 60.0  # a renewal more than this old: the owner on another host is gone


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or
    None where /proc cannot say; with the pid it names one process, not whoever reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # fields after the command name, which may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str | None

    @staticmethod
    def me() -> "Owner":
        return Owner(socket.gethostname(), os.getpid(), process_start(os.getpid()))

    @staticmethod
    def parse(text: str) -> "Owner":
        try:
            record = json.loads(text)
            return Owner(str(record["host"]), int(record["pid"]), record.get("started"))
        except (ValueError, KeyError, TypeError):  # an older `<host>:<pid>` line, or garbage: nobody
            host, _, pid = text.strip().rpartition(":")
            return Owner(host, int(pid) if pid.isdigit() else 0, None)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


def owner_alive(owner: Owner, renewed_seconds_ago: float) -> bool:
    if owner.host != socket.gethostname():
        return renewed_seconds_ago < LEASE_SECONDS
    if owner.pid <= 0 or not _pid_alive(owner.pid):
        return False
    now = process_start(owner.pid)
    return owner.started is None or now is None or now == owner.started


def read_owner(path: Path) -> tuple[Owner, float] | None:
    """The owner recorded in `path` and how long ago it renewed its lease; None if no file."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    return Owner.parse(text), max(0.0, time.time() - mtime)


def generations(path: Path) -> list[tuple[int, Path]]:
    """The owner files of `path`, oldest first: `<name>.<n>`, the highest the current owner's
    (a bare `<name>`, as older versions wrote it, is generation 0)."""
    found = []
    for candidate in path.parent.glob(f"{path.name}*"):
        suffix = candidate.name[len(path.name):]
        if suffix == "" or (suffix[:1] == "." and suffix[1:].isdigit()):
            found.append((int(suffix[1:] or 0), candidate))
    return sorted(found)


def holder(path: Path) -> Owner | None:
    """Who holds `path` now (live or not), or None."""
    found = generations(path)
    current = read_owner(found[-1][1]) if found else None
    return current[0] if current else None


class Lease:
    """This process's claim on the owner files `path.<n>`: `claim()` takes it (False while another
    live process holds it), renewals run on a daemon thread, `release()` removes it.

    Taking over generation n means creating `path.<n+1>`, whole, with one `os.link` (which fails
    if the name exists): of several processes that find the same stale owner, one link succeeds;
    the others see a live owner when they look again."""

    def __init__(self, path: Path):
        self.path = path
        self.me = Owner.me()
        self.file: Path | None = None  # the owner file this process holds
        self.holder: Owner | None = None  # who held it when a claim failed, for the caller's message
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mine(self, owner: Owner) -> bool:
        return (owner.host, owner.pid) == (self.me.host, self.me.pid)

    def claim(self) -> bool:
        while self.file is None:
            found = generations(self.path)
            if found:
                current = read_owner(found[-1][1])
                if current is None:
                    continue  # released or superseded meanwhile: look again
                owner, age = current
                if self._mine(owner):
                    self.file = found[-1][1]
                    break
                if owner_alive(owner, age):
                    self.holder = owner
                    return False
            target = self.path.with_name(f"{self.path.name}.{found[-1][0] + 1 if found else 1}")
            draft = self.path.with_name(f".{self.path.name}.draft-{uuid.uuid4().hex[:8]}")
            draft.write_text(json.dumps({"host": self.me.host, "pid": self.me.pid, "started": self.me.started}))
            try:
                os.link(draft, target)  # the whole record appears at once, or not at all
            except FileExistsError:
                continue  # another claimer took this generation first: look again (it is live)
            finally:
                draft.unlink()
            self.file = target
            for _, stale in found:
                stale.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.path}", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                os.utime(self.file)
            except OSError:  # the dir was renamed into place or removed: nothing left to hold
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            self.file = None
