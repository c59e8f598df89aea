"""lol_rl.lease: one live owner per dir, on one host or several, and run dirs that never collide."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from lol_rl.lease import Lease, process_start
from test_cli import lol_rl


def _claim(path: str, start, results) -> None:
    start.wait()
    results.put(Lease(Path(path)).claim())
    time.sleep(0.5)  # hold it while the others try


def test_of_processes_claiming_one_stale_dir_at_once_exactly_one_wins(tmp_path):
    owner = tmp_path / "owner"
    owner.write_text(json.dumps({"host": "another-node", "pid": 1, "started": "1"}))
    os.utime(owner, (0, 0))  # a lease that lapsed long ago: everyone may try to take it
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    claimers = [context.Process(target=_claim, args=(str(owner), start, results)) for _ in range(6)]
    for claimer in claimers:
        claimer.start()
    start.set()
    won = [results.get(timeout=30) for _ in claimers]
    for claimer in claimers:
        claimer.join()
    assert won.count(True) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["owner.1"]  # the winner's; the stale one and every draft gone


def test_a_lease_is_renewed_while_held_and_gone_once_released(tmp_path, monkeypatch):
    from lol_rl import lease as lease_module

    monkeypatch.setattr(lease_module, "RENEW_SECONDS", 0.05)
    held = Lease(tmp_path / "owner")
    assert held.claim() and held.file == tmp_path / "owner.1"
    os.utime(held.file, (0, 0))
    time.sleep(0.3)
    assert time.time() - held.file.stat().st_mtime < 1.0
    held.release()
    assert list(tmp_path.iterdir()) == []


def test_the_default_run_dir_is_one_per_process():
    from hydra import compose, initialize_config_dir

    from lol_rl.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith(f"-{os.getpid()}") and cfg.hydra.sweep.dir.endswith(f"-{os.getpid()}")


def test_a_run_dir_a_live_run_holds_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run_dir / ".owner.1").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                                    "started": process_start(sleeper.pid)}))
        proc = lol_rl("train", f"hydra.run.dir={run_dir}", cache=tmp_path / "cache")
    finally:
        sleeper.kill()
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1] == (f"lol-rl: run dir {run_dir} belongs to the live run "
                                                    f"{socket.gethostname()}:{sleeper.pid}; give this run its own "
                                                    f"hydra.run.dir=<dir>")
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
