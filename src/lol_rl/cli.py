"""The `lol-rl` command.

    lol-rl train                               # the embedded task, A-LOL, seed 1
    lol-rl train task=toy algo=nll seed=2      # any config override (Hydra syntax)
    lol-rl train -m algo=alol,nll seed=1,2,3   # a sweep; shared stages are built once

    lol-rl judge a=<run dir> b=test_good n=400 judge=gpt4 out=judged/x   # pairwise win rates, LLM judge
    lol-rl judge export a=<run dir> b=test_good out=human/x              # forms for human annotators
    lol-rl judge import out=human/x answers=[a1.csv,a2.csv,a3.csv] verdicts=judged/x/verdicts.jsonl

    lol-rl train -m +experiment=toy_table2     # a paper table as a sweep (conf/experiment/)
    lol-rl report <run dir | sweep dir | outputs/>   # the paper's layout: tables (md, csv) and plots (png)
    lol-rl audit task=toy                      # the lowest-advantage train rows, the drop and its precision
    lol-rl export <run dir> --out <dir>        # the trained policy as a Hugging Face model dir with a model card
    lol-rl export <run dir> --out <dir> --push-to-hub <user>/<name>   # and upload it (HF_TOKEN, HF_HUB_OFFLINE=0)

Configs: conf/ at the repository root, shipped inside the package as lol_rl/conf (config.yaml
lists every key of train, judge.yaml of judge; `lol-rl train --help` shows them with their
comments; `export` and `import` after `judge` are the same as mode=export / mode=import).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import register as _register_schema



def conf_dir() -> Path:
    """$LOL_RL_CONF, else the copy an installed package carries (lol_rl/conf, put there by the
    wheel build: pyproject.toml maps conf/ onto it), else conf/ of the source tree this module
    runs from (a checkout, an editable install)."""
    if os.environ.get("LOL_RL_CONF"):
        return Path(os.environ["LOL_RL_CONF"])
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if (packaged / "config.yaml").is_file() else here.parents[1] / "conf"


CONF_DIR = conf_dir()
_register_schema()  # conf/config.yaml's defaults name it; anyone composing the config imports this module
COMMANDS = ("train", "judge", "report", "audit", "export")
JUDGE_MODES = ("export", "import")  # `lol-rl judge export ...`: sub-modes of one Hydra app


class _GenerateMaskNotice(logging.Filter):
    """transformers' generate() drops an all-ones attention mask, then warns about the pad
    tokens of rows that finished early; our prompts are masked, so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


def _hydra_app(config_name: str, run: Callable[[Any, Path], Any]):
    """A Hydra app over conf/<config_name>.yaml that calls `run(cfg, run dir)`; a LolRlError
    (anything the user can fix) is one line on stderr and exit status 2, never a traceback."""
    # bitsandbytes looks for an optional hub kernel on import and logs its absence on CPU: harmless noise
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from transformers.utils import logging as hf_logging

    from .errors import LolRlError

    hf_logging.disable_progress_bar()
    logging.getLogger("transformers.modeling_utils").addFilter(_GenerateMaskNotice())

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def app(cfg) -> None:
        try:
            run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except LolRlError as err:
            print(f"lol-rl: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return app


def _train(cfg, run_dir: Path):
    from .pipeline import run_train

    return run_train(cfg, run_dir)


def _audit(cfg, run_dir: Path):
    from .audit import run_audit

    return run_audit(cfg, run_dir)


def _judge(cfg, run_dir: Path):
    from .judge import run

    return run(cfg, run_dir)


APPS = {"train": ("config", _train), "audit": ("config", _audit), "judge": ("judge", _judge)}
USAGE = {
    "train": """lol-rl train [group=option ...] [key=value ...]       one run (outputs/<date>/<time>/)
lol-rl train -m algo=alol,nll seed=1,2,3              a sweep (multirun/<date>/<time>/<job>/)

The chain sft -> value -> reference -> advantage -> rl -> eval, every stage cached by the config it
reads; the run dir gets config.yaml, eval.json, stages.json, metrics.jsonl and a `policy` link.""",
    "audit": """lol-rl audit [group=option ...] [key=value ...]

Builds (or reuses) sft -> value -> reference -> advantage of the same config as `lol-rl train` and
prints the lowest-advantage train rows, the fraction dropped (A <= 0) and, on the embedded task,
the drop's precision and recall. It takes every key of train; its own are audit.*.""",
    "judge": """lol-rl judge a=<run dir> b=test_good judge=gpt4 out=<dir>   pairwise win rates, LLM judge
lol-rl judge export a=<run dir> b=test_good out=<dir>          forms for human annotators
lol-rl judge import out=<dir> answers=[a1.csv,...] verdicts=<verdicts.jsonl>""",
}
OWN_SECTION = {"audit": "audit"}
EXTRA_GROUPS = {"train": ("experiment",)}  # groups a command line adds (`+experiment=toy_table2`)


def print_help(command: str, argv: list[str]) -> None:
    from .config_help import command_help

    print(command_help(command, CONF_DIR, APPS[command][0], argv, USAGE[command], OWN_SECTION.get(command),
                       EXTRA_GROUPS.get(command, ())))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if len(sys.argv) == 2 and sys.argv[1] == "--version":
        from importlib.metadata import version

        print(f"lol-rl {version('lol-rl')}")
        return
    if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}; `lol-rl <command> --help` for each")
        return
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\ncommands: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    if not (CONF_DIR / "config.yaml").is_file():
        raise SystemExit(f"lol-rl: no config.yaml in {CONF_DIR}: set LOL_RL_CONF to a conf/ dir, or reinstall "
                         f"lol-rl (its wheel carries conf/ as lol_rl/conf)")
    command = sys.argv.pop(1)
    sys.argv[0] = f"lol-rl {command}"
    if command == "judge" and len(sys.argv) > 1 and sys.argv[1] in JUDGE_MODES:
        sys.argv.append(f"mode={sys.argv.pop(1)}")
    if command in APPS and ("--help" in sys.argv or "-h" in sys.argv):  # the keys and what they mean, not a dump
        print_help(command, sys.argv[1:])
        return
    if command == "judge" and not any(arg.startswith("out=") for arg in sys.argv) and "--hydra-help" not in sys.argv:
        # Hydra's run dir is `out`; without it Hydra fails with a page of traceback
        print("lol-rl: judge needs out=<dir> (the verdicts go there; the same out continues a killed run)", file=sys.stderr)
        raise SystemExit(2)
    if command == "report":  # not a Hydra app: it reads finished runs, it composes no config
        from .report import main as report_main

        report_main(sys.argv[1:])
        return
    if command == "export":  # not a Hydra app either: it reads one finished run
        from .export import main as export_main

        export_main(sys.argv[1:])
        return
    from .config import check_env_overrides
    from .errors import LolRlError

    try:
        check_env_overrides(sys.argv[1:])
    except LolRlError as err:
        print(f"lol-rl: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if command in ("train", "audit"):
        share_output_dirs()
    from . import distributed

    try:
        _hydra_app(*APPS[command])()
    finally:
        distributed.shutdown()


def share_output_dirs() -> None:
    """Under `accelerate launch` every process starts Hydra: give them the main process's run
    and sweep dirs (conf/config.yaml reads these), or each would read its own clock."""
    from . import distributed

    if distributed.launched():
        stamp = distributed.broadcast(time.strftime(f"%Y-%m-%d/%H-%M-%S-{os.getpid()}") if distributed.is_main() else None)
        os.environ.setdefault("LOL_RL_RUN_DIR", f"outputs/{stamp}")
        os.environ.setdefault("LOL_RL_SWEEP_DIR", f"multirun/{stamp}")


if __name__ == "__main__":
    main()
