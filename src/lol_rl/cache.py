"""Content-addressed stage artifacts: `<root>/<stage>/<key>/`, key = hash of exactly the config
(and upstream keys) the stage reads. An artifact is built in a temp dir and renamed into place,
so a directory under its key is always complete; a killed build leaves only a temp dir, which
is ignored and cleared. A resumable stage (rl) builds in `.partial-<key>/` instead, which
outlives a killed or failed build so that the next run continues from its checkpoint; one live
process at a time owns it (lease.py), on any host sharing the cache. An artifact's
`manifest.json` lists every file with its size and SHA-256, checked before the artifact is
reused: one damaged afterwards (a file deleted, cut short, edited, a flipped byte) is refused,
never used. Hashing a 500 MB file takes 0.4-0.7 s on 2 cores (scripts/bench_cache.py), a
small price next to the stage it saves, so every reuse checks every byte."""

from __future__ import annotations

import errno
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
from .files import follow_umask
from .lease import LEASE_SECONDS, RENEW_SECONDS, Lease, _pid_alive

log = logging.getLogger(__name__)

OWNER = "owner.pid"  # in a resumable build dir: the process building it (lease.Owner), its mtime the lease

# bump when an artifact's format or meaning changes, so old artifacts are not reused
CACHE_VERSION = 4  # 3: every artifact has a manifest.json; 4: with each file's SHA-256
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


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.timings: dict[str, dict] = {}
        # a cache that holds every artifact a run needs is read only: a read-only mount is refused
        # at the first stage that has to be built, not before
        self.unwritable = check_writable(self.root)

    def path(self, stage: str, parts: dict) -> Path:
        return self.root / stage / config_key(stage, parts)

    def _clear_stale_temps(self, stage_dir: Path, key: str) -> None:
        """Temp dirs `.tmp-<key>-<pid>@<host>-<id>` of dead processes of this host (another host's
        pid cannot be probed from here: its temps are left to it)."""
        for temp in stage_dir.glob(f".tmp-{key}-*"):
            pid_text, _, host = temp.name[len(f".tmp-{key}-"):].rpartition("-")[0].partition("@")
            if pid_text.isdigit() and (host or socket.gethostname()) == socket.gethostname() \
                    and not _pid_alive(int(pid_text)):
                log.info("removing half-written %s (its process %s is gone)", temp, pid_text)
                shutil.rmtree(temp, ignore_errors=True)

    def _resumable_dir(self, final: Path, key: str) -> tuple[Path, Lease] | None:
        """`.partial-<key>/` and this process's lease on it; None while another live process
        holds it. An owner on another host is waited for one lease period: a requeued Slurm job
        whose old node died resumes its build, one whose owner renews its lease builds apart."""
        partial = final.parent / f".partial-{key}"
        partial.mkdir(exist_ok=True)
        lease = Lease(partial / OWNER)
        waited = 0.0
        while not lease.claim():
            if lease.holder.host == socket.gethostname() or waited > LEASE_SECONDS or final.is_dir():
                return None
            log.info("%s is built by %s (another host); waiting for its lease to lapse", partial, lease.holder)
            time.sleep(RENEW_SECONDS)
            waited += RENEW_SECONDS
        if _has_progress(partial):
            log.info("resuming the build in %s (its previous process is gone)", partial)
        return partial, lease

    def stage(self, stage: str, parts: dict, build: Callable[[Path], None], label: str | None = None,
              resumable: bool = False, parallel: bool = False) -> Path:
        """The artifact dir of `stage` for `parts`, building it with `build(work_dir)` if missing.
        A `resumable` build keeps its work dir when it is killed or fails, for the next run.

        Under several processes (distributed.py) the main process owns the cache: it alone
        builds a stage while the others wait, except a `parallel` stage (a data-parallel training
        loop, a one-pass stage sharded by batch), whose `build` every process runs in the main
        process's work dir (writing is the main process's part of it)."""
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
            path = self._stage(stage, parts, build_together if parallel else build, label, resumable)
        except BaseException:
            # the others wait for a build of the main process alone; a parallel build that fails in a
            # sharded pass fails on every process (distributed.map_batches), with nobody to wait for
            if not parallel:
                distributed.barrier()
            raise
        distributed.barrier()
        return path

    def _stage(self, stage: str, parts: dict, build: Callable[[Path], None], label: str | None,
               resumable: bool) -> Path:
        label = label or stage
        key = config_key(stage, parts)
        final = self.root / stage / key
        if final.is_dir():
            return self._reuse(final, label)
        if self.unwritable:
            raise CacheError(f"stage {label} is not in cache_dir {self.root} and cannot be built there: "
                             f"{self.unwritable}")
        final.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale_temps(final.parent, key)
        claimed = self._resumable_dir(final, key) if resumable else None
        if resumable and claimed is None and final.is_dir():  # the owner we waited for finished it
            return self._reuse(final, label)
        temp, lease = claimed if claimed else (None, None)
        if temp is None:
            temp = final.parent / f".tmp-{key}-{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            temp.mkdir()
        log.info("stage %-10s building %s", label, final)
        started = time.perf_counter()
        try:
            (temp / "stage.json").write_text(json.dumps({"stage": stage, "key": key, **_plain(parts)}, indent=2, default=str))
            build(temp)
            if lease is not None:
                lease.release()
            follow_umask(temp)
            write_manifest(temp)
            kill_point(f"{stage}:rename")
            os.rename(temp, final)
        except OSError as err:
            if final.is_dir():  # another process finished the same artifact first: keep theirs
                shutil.rmtree(temp, ignore_errors=True)
            else:
                self._keep_or_remove(temp, lease, label)
                if err.errno in (errno.ENOSPC, errno.EDQUOT):  # the rerun resumes; say so, not a traceback
                    kept = f"; the next run resumes from {temp}" if lease is not None and temp.is_dir() else ""
                    raise CacheError(f"stage {label}: no space left writing {err.filename or temp}{kept}") from None
                raise err
        except BaseException:
            self._keep_or_remove(temp, lease, label)
            raise
        seconds = time.perf_counter() - started
        log.info("stage %-10s done     in %.1f s", label, seconds)
        self.timings[label] = {"dir": str(final), "cached": False, "seconds": seconds}
        return final


    def _reuse(self, final: Path, label: str) -> Path:
        check_complete(final)
        log.info("stage %-10s cached   %s (reused)", label, final)
        self.timings[label] = {"dir": str(final), "cached": True, "seconds": 0.0}
        return final

    @staticmethod
    def _keep_or_remove(temp: Path, lease: Lease | None, label: str) -> None:
        """After a failed build: a resumable one with a checkpoint stays for the next run."""
        if lease is not None:
            lease.release()
            if _has_progress(temp):
                log.info("stage %s: kept %s; the next run resumes from its checkpoint", label, temp)
                return
        shutil.rmtree(temp, ignore_errors=True)


def _has_progress(build_dir: Path) -> bool:
    """Whether a failed resumable build wrote anything to resume from (a checkpoint, a policy)."""
    return any(not p.name.startswith((OWNER, f".{OWNER}")) and p.name != "stage.json" for p in build_dir.iterdir())


def check_writable(root: Path) -> str:
    """Why artifacts cannot be written under `root` ('' when they can). A file where the dir
    should be is an error at once: nothing could be read from it either."""
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache_dir {root} is a file, not a directory; set cache_dir=<a writable dir> or LOL_RL_CACHE")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=".probe-", dir=root).cleanup()
    except OSError as err:
        return f"cache_dir {root} is not writable ({err.strerror or err}); set cache_dir=<a writable dir> or LOL_RL_CACHE"
    return ""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(artifact: Path) -> None:
    files = {str(p.relative_to(artifact)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(artifact.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (artifact / MANIFEST).write_text(json.dumps(files, indent=1))


def check_complete(artifact: Path) -> None:
    """Every file the manifest lists is there with its size and content (a later stage would
    otherwise fail deep inside a loader, or quietly use what is left or what was changed)."""
    advice = "delete that dir to rebuild it"
    try:
        files = json.loads((artifact / MANIFEST).read_text())
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise CacheError(f"cache artifact {artifact} has no readable {MANIFEST}, so it is incomplete or damaged; "
                         f"{advice}") from None
    for name, (size, digest) in expected.items():
        path = artifact / name
        if not path.is_file():
            raise CacheError(f"cache artifact {artifact} is damaged: {name} is missing; {advice}")
        if path.stat().st_size != size:
            raise CacheError(f"cache artifact {artifact} is damaged: {name} has {path.stat().st_size} bytes, "
                             f"not {size}; {advice}")
        if file_sha256(path) != digest:
            raise CacheError(f"cache artifact {artifact} is damaged: {name} is not what was built (its SHA-256 "
                             f"differs from the manifest's); {advice}")
