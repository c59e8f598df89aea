"""Content-addressed stage artifacts: `<root>/<stage>/<key>/`, key = hash of exactly the config
(and upstream keys) the stage reads. An artifact is built in a temp dir and renamed into place,
so a directory under its key is always complete; a killed build leaves only a temp dir, which
is ignored and cleared. A resumable stage (rl) builds in `.partial-<key>/` instead, which
outlives a killed or failed build so that the next run continues from its checkpoint. An
artifact's `manifest.json` lists every file and its size: one damaged afterwards (a file
deleted, a copy cut short) is refused, never reused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from . import distributed
from .errors import LolRlError
from .faults import kill_point

log = logging.getLogger(__name__)

OWNER = "owner.pid"  # in a resumable build dir: the process building it, as <host>:<pid>

# bump when an artifact's format or meaning changes, so old artifacts are not reused
CACHE_VERSION = 3  # 3: every artifact has a manifest.json
MANIFEST = "manifest.json"


class CacheError(LolRlError, RuntimeError):
    """The cache dir is not writable, or an artifact in it is damaged; names the dir."""


def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_key(stage: str, parts: dict) -> str:
    payload = json.dumps({"stage": stage, "version": CACHE_VERSION, **_plain(parts)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.timings: dict[str, dict] = {}
        check_writable(self.root)

    def path(self, stage: str, parts: dict) -> Path:
        return self.root / stage / config_key(stage, parts)

    def _clear_stale_temps(self, stage_dir: Path, key: str) -> None:
        for temp in stage_dir.glob(f".tmp-{key}-*"):
            pid = int(temp.name.rsplit("-", 2)[-2])
            if not _pid_alive(pid):
                log.info("removing half-written %s (its process %d is gone)", temp, pid)
                shutil.rmtree(temp, ignore_errors=True)

    def _resumable_dir(self, final: Path, key: str) -> Path | None:
        """`.partial-<key>/`, claimed for this process; None while another live process builds it."""
        partial = final.parent / f".partial-{key}"
        owner = partial / OWNER
        if owner.is_file():
            host, _, pid_text = owner.read_text().rpartition(":")
            pid = int(pid_text or 0)
            # a pid means something on its own host only: a build owned elsewhere (a requeued
            # Slurm job that lands on another node) is taken to be gone
            if (host or socket.gethostname()) == socket.gethostname() and pid != os.getpid() and _pid_alive(pid):
                return None
            log.info("resuming the build in %s (its process %s:%d is gone)", partial, host or "?", pid)
        partial.mkdir(exist_ok=True)
        owner.write_text(f"{socket.gethostname()}:{os.getpid()}")
        return partial

    def stage(self, stage: str, parts: dict, build: Callable[[Path], None], label: str | None = None,
              resumable: bool = False, parallel: bool = False) -> Path:
        """The artifact dir of `stage` for `parts`, building it with `build(work_dir)` if missing.
        A `resumable` build keeps its work dir when it is killed or fails, for the next run.

        Under several processes (distributed.py) the main process owns the cache: it alone
        builds a stage while the others wait, except a `parallel` stage (a data-parallel training
        loop), whose `build` every process runs in the main process's work dir (writing is the
        main process's part of it)."""
        if distributed.world_size() == 1:
            return self._stage(stage, parts, build, label, resumable)
        if distributed.broadcast(self.path(stage, parts).is_dir() if distributed.is_main() else None):
            parallel = False  # built already: the main process checks it, nobody builds
        if not distributed.is_main():
            if parallel:
                build(distributed.broadcast())  # the main process's work dir
                distributed.barrier()
            distributed.barrier()  # until the main process has the artifact in place
            return self.path(stage, parts)

        def build_together(work_dir: Path) -> None:
            distributed.broadcast(work_dir)
            build(work_dir)
            distributed.barrier()  # every process's part done before the manifest and rename

        try:
            return self._stage(stage, parts, build_together if parallel else build, label, resumable)
        finally:
            distributed.barrier()

    def _stage(self, stage: str, parts: dict, build: Callable[[Path], None], label: str | None,
               resumable: bool) -> Path:
        label = label or stage
        key = config_key(stage, parts)
        final = self.root / stage / key
        if final.is_dir():
            check_complete(final)
            log.info("stage %-10s cached   %s (reused)", label, final)
            self.timings[label] = {"dir": str(final), "cached": True, "seconds": 0.0}
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale_temps(final.parent, key)
        temp = self._resumable_dir(final, key) if resumable else None
        keep_on_failure = temp is not None
        if temp is None:
            temp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            temp.mkdir()
        log.info("stage %-10s building %s", label, final)
        started = time.perf_counter()
        try:
            (temp / "stage.json").write_text(json.dumps({"stage": stage, "key": key, **_plain(parts)}, indent=2, default=str))
            build(temp)
            (temp / OWNER).unlink(missing_ok=True)
            write_manifest(temp)
            kill_point(f"{stage}:rename")
            os.rename(temp, final)
        except OSError as err:
            if final.is_dir():  # another process finished the same artifact first: keep theirs
                shutil.rmtree(temp, ignore_errors=True)
            else:
                if not keep_on_failure:
                    shutil.rmtree(temp, ignore_errors=True)
                raise err
        except BaseException:
            if keep_on_failure and _has_progress(temp):
                log.info("stage %s: kept %s; the next run resumes from its checkpoint", label, temp)
            else:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        log.info("stage %-10s done     in %.1f s", label, seconds)
        self.timings[label] = {"dir": str(final), "cached": False, "seconds": seconds}
        return final


def _has_progress(build_dir: Path) -> bool:
    """Whether a failed resumable build wrote anything to resume from (a checkpoint, a policy)."""
    return any(p.name not in (OWNER, "stage.json") for p in build_dir.iterdir())


def check_writable(root: Path) -> None:
    """Fail at the start, not when the first stage is done, where artifacts cannot be written."""
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache_dir {root} is a file, not a directory; set cache_dir=<a writable dir> or LOL_RL_CACHE")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=".probe-", dir=root).cleanup()
    except OSError as err:
        raise CacheError(f"cache_dir {root} is not writable ({err.strerror or err}); "
                         "set cache_dir=<a writable dir> or LOL_RL_CACHE") from None


def write_manifest(artifact: Path) -> None:
    files = {str(p.relative_to(artifact)): p.stat().st_size for p in sorted(artifact.rglob("*")) if p.is_file()}
    (artifact / MANIFEST).write_text(json.dumps(files, indent=1))


def check_complete(artifact: Path) -> None:
    """Every file the manifest lists is there with its size (a later stage would otherwise fail
    deep inside a loader, or quietly use what is left)."""
    advice = "delete that dir to rebuild it"
    try:
        files = json.loads((artifact / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CacheError(f"cache artifact {artifact} has no readable {MANIFEST}, so it is incomplete or damaged; "
                         f"{advice}") from None
    for name, size in files.items():
        path = artifact / name
        if not path.is_file():
            raise CacheError(f"cache artifact {artifact} is damaged: {name} is missing; {advice}")
        if path.stat().st_size != size:
            raise CacheError(f"cache artifact {artifact} is damaged: {name} has {path.stat().st_size} bytes, "
                             f"not {size}; {advice}")
