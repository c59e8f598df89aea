"""What a hostile or careless working directory and command line cannot do: shadow an installed
module, leave a pasted API key in a file, or leave artifacts other users of a cache cannot read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lol_rl.cache import StageCache
from lol_rl.rewards import import_object

ENV = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def lol_rl_from(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI as its console script runs it: -P keeps Python from putting the cwd first itself."""
    return subprocess.run([sys.executable, "-P", "-m", "lol_rl.cli", *args], cwd=cwd, env=ENV, text=True,
                          capture_output=True, timeout=120)


def test_a_module_in_the_working_directory_never_shadows_an_installed_one(tmp_path):
    (tmp_path / "tqdm.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('shadowed')\n")
    proc = lol_rl_from(tmp_path, "train", "sft.steps=-5", f"hydra.run.dir={tmp_path / 'run'}",
                       f"cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2 and "sft.steps" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "ran").exists()


def test_a_scorer_in_the_working_directory_still_imports_and_leaves_sys_path_alone(tmp_path, monkeypatch):
    (tmp_path / "my_scorer_mod.py").write_text("def score(prompts, responses):\n    return [1.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert import_object("my_scorer_mod:score", "reward")(("p",), ("r",)) == [1.0]
    assert sys.path == before


@pytest.mark.parametrize("command", [["judge", "pairwise", "a=x", "b=y", "out={tmp}/out"], ["train"]])
def test_an_api_key_pasted_as_a_variable_name_is_refused_and_written_nowhere(tmp_path, command):
    key = "sk-proj-" + "A1b2C3d4" * 6
    args = [a.format(tmp=tmp_path) for a in command]
    proc = lol_rl_from(tmp_path, *args, f"judge.api_key_env={key}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"lol-rl: judge.api_key_env must name an environment variable (e.g. "
                                   f"OPENAI_API_KEY) that holds the key, not the key itself; the value given "
                                   f"({len(key)} characters, not shown) is not a variable name and was written nowhere")
    assert key not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and key in p.read_text(errors="ignore")]
    assert written == []


def test_artifact_files_follow_the_umask_whatever_mode_their_writer_chose(tmp_path):
    def build(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "model.safetensors").chmod(0o600)  # as transformers' save_pretrained leaves it
    mask = os.umask(0o022)
    try:
        built = StageCache(tmp_path).stage("sft", {"sft": 1}, build)
    finally:
        os.umask(mask)
    assert stat.S_IMODE((built / "model.safetensors").stat().st_mode) == 0o644
