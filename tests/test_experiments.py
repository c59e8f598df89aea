"""The paper's tables as sweeps (conf/experiment/), the Slurm launcher configs, and the wandb
run's name and group: composed as `lol-rl train` composes them, without running a stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class

import lol_rl.cli  # noqa: F401  (registers the config schema)
from lol_rl import tracking
from test_cli import ROOT

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PUBLISHED = {"table2": "table2", "table4": "table4"}  # the tables PAPER.md transcribes


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)


def sweep_jobs(cfg) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of the experiment's sweep params."""
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    jobs = [[]]
    for override in OverridesParser.create().parse_overrides(params):
        jobs = [job + [f"{override.get_key_element()}={value}"] for job in jobs for value in override.sweep_string_iterator()]
    return jobs


def test_every_paper_table_has_an_experiment_and_a_toy_stand_in():
    assert {"table2", "table4", "commonsense", "wow"} <= set(EXPERIMENTS)
    assert {f"toy_{name}" for name in ("table2", "table4", "commonsense", "wow")} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_job_of_an_experiment_names_known_algos_and_tasks(name):
    cfg = compose_experiment(name)
    assert cfg.hydra.sweep.dir == f"multirun/{name}"  # fixed: `lol-rl report multirun/<name>` finds it
    jobs = sweep_jobs(cfg)
    for job in jobs:
        for override in job:
            group, _, option = override.partition("=")
            if group in ("algo", "task"):
                assert (CONF / group / f"{option}.yaml").is_file(), override
    assert {o for job in jobs for o in job if o.startswith("seed=")} == {"seed=1", "seed=2", "seed=3"}
    first = compose_experiment(name, *jobs[0])  # one whole job, as the sweep composes it
    assert first.paper == PUBLISHED.get(name)  # published rows only beside the paper's own configuration


def test_the_paper_grids():
    """Table 2: the 12 HHA methods x 3 seeds; Table 4: both polarities, the reward-based
    methods and the A-LOL variants; each toy stand-in runs on a CPU model."""
    table2 = compose_experiment("table2")
    assert len(sweep_jobs(table2)) == 36
    assert (table2.task.name, table2.model.name, table2.sft.steps) == ("hha", "llama7b_qlora", 0)
    assert (table2.rl.epochs, table2.rl.validations_per_epoch) == (1, 10)  # 9000 x kept-fraction steps for A-LOL
    table4 = compose_experiment("table4")
    assert len(sweep_jobs(table4)) == 2 * 8 * 3
    assert {j[0] for j in sweep_jobs(table4)} == {"task=reddit_pos", "task=reddit_neg"}
    assert (table4.generation.num_beams, table4.generation.repetition_penalty) == (2, 2.5)
    assert (table4.sft.epochs, table4.rl.epochs, table4.rl.validations_per_epoch) == (6, 3, 2)
    assert len(sweep_jobs(compose_experiment("toy_table2"))) == 36
    assert len(sweep_jobs(compose_experiment("toy_table4"))) == 48
    for name in ("toy_table2", "toy_table4", "toy_commonsense", "toy_wow"):
        cfg = compose_experiment(name)
        assert (cfg.model.name, cfg.device) == ("tiny", "auto")
    assert list(compose_experiment("toy_commonsense").reward) == ["correct"]  # one scorer, as the critic


@pytest.mark.parametrize("launcher,gpus", [("slurm_hha", 1), ("slurm_small", 1)])
def test_slurm_launchers_compose_onto_submitit(launcher, gpus):
    cfg = compose_experiment("table2", f"hydra/launcher={launcher}")
    conf = cfg.hydra.launcher
    assert conf._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert get_class(conf._target_).__name__ == "SlurmLauncher"  # the plugin is installed, not only named
    assert conf.gpus_per_node == gpus and conf.timeout_min > 0 and conf.mem_gb > 0
    assert conf.max_num_timeout > 0  # a run cut by the time limit is requeued and resumes
    assert conf.submitit_folder == "multirun/table2/.submitit/%j"  # job logs beside the sweep's runs


def test_wandb_run_is_named_by_task_algo_seed_and_grouped_by_sweep(monkeypatch, tmp_path):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or _FakeRun())
    cfg = compose_experiment("toy_table2", "hydra.mode=MULTIRUN")
    HydraConfig.instance().set_config(cfg)
    try:
        logger = tracking.MetricsLogger(Path(tmp_path) / "metrics.jsonl", use_wandb=True, run_name="toy-alol-s2",
                                        tags=["toy", "alol"])
        logger.log("rl", 1, loss=0.5)
        logger.close()
    finally:
        HydraConfig.instance().cfg = None
    assert calls[0]["name"] == "toy-alol-s2" and calls[0]["group"] == "multirun/toy_table2"
    assert calls[0]["tags"] == ["toy", "alol"] and calls[0]["project"] == "lol-rl"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # jsonl is written with wandb too


def test_a_single_run_has_no_wandb_group():
    HydraConfig.instance().cfg = None
    assert tracking.sweep_group() is None


class _FakeRun:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass
