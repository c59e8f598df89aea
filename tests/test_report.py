"""The sweep summary: one row per setting (seeds aggregated), each reference policy once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lol_rl.report import collect_runs, format_summary, run_label, summary_rows


def metrics(reward: float, length: float = 5.0) -> dict:
    return {"reward": reward, "rewards": {"a": reward / 2, "b": reward / 2}, "length": length,
            "distinct": [0.1, 0.2, 0.3], "n": 10}


def fake_run(sweep: Path, job: int, algo: str, seed: int, overrides: list[str], reward: float, ref: str) -> None:
    run = sweep / str(job)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"algo": {"name": algo}, "seed": seed}), run / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"algo={algo}", f"seed={seed}", *overrides]), run / ".hydra" / "overrides.yaml")
    (run / "stages.json").write_text(json.dumps({"eval_ref": {"dir": ref}}))
    (run / "eval.json").write_text(json.dumps({"reference": metrics(2.0), "policy": metrics(reward)}))


def test_summary_aggregates_seeds_and_keeps_settings_apart(tmp_path):
    fake_run(tmp_path, 0, "alol", 1, [], 2.5, "ref0")
    fake_run(tmp_path, 1, "alol", 2, [], 2.7, "ref0")
    fake_run(tmp_path, 2, "dpo", 1, ["rl.lr=1e-05"], 2.2, "ref0")
    fake_run(tmp_path, 3, "dpo", 1, ["rl.lr=3e-05"], 1.8, "ref0")
    rows = summary_rows(collect_runs(tmp_path))
    assert list(rows) == ["pi_ref", "alol", "dpo rl.lr=1e-05", "dpo rl.lr=3e-05"]
    assert len(rows["pi_ref"]) == 1  # the shared reference is counted once
    table = format_summary(rows)
    assert "| alol | 2 | 2.600 +- 0.141 | 1.300 +- 0.071 | 1.300 +- 0.071 | 5.000 +- 0.000 | 0.100/0.200/0.300 |" in table
    assert "| dpo rl.lr=3e-05 | 1 | 1.800 |" in table


def test_run_label_drops_seed_algo_and_hydra_overrides():
    assert run_label("alol", ["algo=alol", "seed=3", "hydra.run.dir=x", "cache_dir=/c", "algo.params.eps=0.2"]) == \
        "alol algo.params.eps=0.2"


# ---------------------------------------------------------------- lol-rl report

from lol_rl.report import ReportError, build_sections, format_csv, format_markdown, main, write_report  # noqa: E402

HHA_SEGMENTS = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")


def hha_metrics(reward: float) -> dict:
    return {"reward": reward, "rewards": {"hha_reward": reward}, "length": 40.0, "distinct": [0.1, 0.4, 0.7],
            "n": 8, "segments": {s: {"reward": reward + i / 100, "n": 2} for i, s in enumerate(HHA_SEGMENTS)}}


def report_run(sweep: Path, job: int, task: str, algo: str, seed: int, policy: dict, reference: dict,
               paper: str | None = None, validation: list[tuple[int, float]] = (), advantage: Path | None = None):
    """A finished run as `lol-rl train` leaves it: config, overrides, stages, eval, metrics."""
    run = sweep / str(job)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"algo": {"name": algo}, "task": {"name": task}, "seed": seed, "paper": paper}),
                   run / "config.yaml")
    overrides = [f"task={task}", f"algo={algo}", f"seed={seed}", "+experiment=x"]
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    stages = {"eval_ref": {"dir": f"eval/ref-{task}"}}
    if advantage is not None:
        stages["advantage"] = {"dir": str(advantage)}
    (run / "stages.json").write_text(json.dumps(stages))
    (run / "eval.json").write_text(json.dumps({"reference": reference, "policy": policy}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"stage": "rl/validation", "step": step, "reward": reward}) + "\n" for step, reward in validation))


def advantage_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cache" / "advantage" / "abc"
    folder.mkdir(parents=True)
    rows = [{"reward": r, "advantage": a, "kept": a > 0} for r, a in [(0.2, -0.3), (0.9, 0.4), (0.7, 0.1), (0.4, -0.1)]]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_report_puts_tasks_apart_in_the_papers_row_order_with_published_rows_beside(tmp_path):
    sweep = tmp_path / "multirun"
    ref = hha_metrics(0.45)
    job = 0
    for algo, rewards in [("alol", (0.57, 0.59)), ("nll", (0.50, 0.52)), ("dpo", (0.55, 0.57))]:
        for seed, reward in enumerate(rewards, start=1):
            report_run(sweep, job, "hha", algo, seed, hha_metrics(reward), ref, paper="table2")
            job += 1
    reddit = {"reward": 3.0, "rewards": {"fluency": 0.9, "safety": 0.8, "engagement": 0.5, "upvote": 0.5, "tfidf": 0.3},
              "length": 12.0, "distinct": [0.1, 0.4, 0.6], "n": 5}
    report_run(sweep, job, "reddit_pos", "wbc", 1, reddit, reddit, paper="table4")
    sections = build_sections(collect_runs(sweep))
    assert [s.task for s in sections] == ["hha", "reddit_pos"]
    hha = sections[0]
    assert [r.name for r in hha.rows] == ["test good responses (paper)", "test bad responses (paper)", "pi_ref",
                                          "pi_ref (paper)", "nll", "nll (paper)", "dpo", "dpo (paper)", "alol",
                                          "alol (paper)"]
    assert [c.key for c in hha.columns][:5] == [*(f"segment/{s}" for s in HHA_SEGMENTS), "reward"]
    markdown = format_markdown(sections)
    # ours on the paper's x100 scale, mean +- std over 2 seeds; the paper's as printed
    assert "| alol | 2 | 58.0 +- 1.4 | 59.0 +- 1.4 | 60.0 +- 1.4 | 61.0 +- 1.4 | 58.0 +- 1.4 | 40.0 +- 0.0 |" in markdown
    assert "| test bad responses (paper) |  | 50.0 | 34.3 | 59.4 | 45.3 | 45.4 | 45.3 | 0.099 |" in markdown
    assert "| alol (paper) | 3 | 64.3 | 50.3 | 61.1 | 55.8 | 57.3 +- 0.3 | 42.3 +- 1.9 |" in markdown
    assert "## reddit_pos (trained on upvoted)" in markdown
    assert "| wbc | 1 | 3.000 | 0.900 | 0.800 | 0.500 | 0.500 | 0.300 | 12.0 |" in markdown  # one column per component
    assert "| wbc (paper) |  | 2.97 | 0.92 | 0.85 | 0.49 | 0.45 | 0.25 | 15.3 |" in markdown
    csv_lines = format_csv(sections).splitlines()
    assert csv_lines[0].startswith("task,group,source,policy,n_seeds,reward_scale,segment/harmless_base_mean,")
    assert any(line.startswith("hha,,ours,alol,2,100.0,58.0") for line in csv_lines)


def test_report_without_a_paper_has_no_published_rows(tmp_path):
    sweep = tmp_path / "multirun"
    report_run(sweep, 0, "toy", "alol", 1, metrics(2.8), metrics(2.6))
    report_run(sweep, 1, "toy", "alol", 2, metrics(3.0), metrics(2.6))
    markdown = format_markdown(build_sections(collect_runs(sweep)))
    assert "(paper)" not in markdown
    assert "every run: `task=toy +experiment=x`" in markdown  # what all runs share is said once, not in each row name
    assert "| alol | 2 | 2.900 +- 0.141 | 1.450 +- 0.071 | 1.450 +- 0.071 | 5.0 +- 0.0 |" in markdown


def test_report_writes_tables_and_both_figures(tmp_path):
    sweep = tmp_path / "multirun"
    advantage = advantage_dir(tmp_path)
    for seed in (1, 2):
        report_run(sweep, seed, "toy", "alol", seed, metrics(2.8), metrics(2.6),
                   validation=[(10, 2.6), (20, 2.7 + seed / 100)], advantage=advantage)
    report_run(sweep, 3, "toy", "dpo", 1, metrics(2.7), metrics(2.6), validation=[(10, 2.65)], advantage=advantage)
    out = tmp_path / "report"
    markdown = write_report(sweep, out)
    assert (out / "table.md").read_text() == markdown
    assert (out / "table.csv").read_text().count("\n") == 4  # header, pi_ref, dpo, alol
    for figure in ("fig2_validation_toy.png", "fig1_distributions_toy.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert sorted(p.name for p in out.iterdir()) == ["fig1_distributions_toy.png", "fig2_validation_toy.png",
                                                     "table.csv", "table.md"]  # no temp file left behind


def test_seed_band_is_mean_min_max_over_the_seeds_that_logged_each_step():
    from lol_rl.report import seed_band

    steps, mean, low, high = seed_band([{10: 1.0, 20: 2.0}, {10: 3.0}])
    assert (steps, mean, low, high) == ([10, 20], [2.0, 2.0], [1.0, 2.0], [3.0, 2.0])


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "nowhere", "nowhere: no such directory"),
    (lambda tmp: (tmp / "eval.json").write_text("{}") and tmp / "eval.json",
     "eval.json: not a directory (give a run dir, a sweep dir, or a dir above them)"),
    (lambda tmp: tmp, "no finished run in it or below it (a run dir holds eval.json and stages.json"),
])
def test_report_of_a_missing_or_empty_sweep_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as info:
        main([str(make(tmp_path))])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lol-rl: ") and message in err and err.count("\n") == 1


def test_report_names_a_corrupt_eval_file(tmp_path):
    report_run(tmp_path, 0, "toy", "alol", 1, metrics(2.8), metrics(2.6))
    (tmp_path / "0" / "eval.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"0/eval.json: not valid JSON"):
        write_report(tmp_path, tmp_path / "report")


def test_a_run_that_reused_a_cached_rl_stage_has_its_curve_from_the_artifact(tmp_path):
    from lol_rl.report import validation_curve

    artifact = tmp_path / "cache" / "rl" / "abc"
    artifact.mkdir(parents=True)
    records = [{"stage": "rl/validation", "step": 4, "reward": 2.5}, {"stage": "rl/validation", "step": 8, "reward": 2.6},
               {"stage": "rl/validation", "step": 8, "reward": 2.7}]  # a resumed build logged step 8 again
    (artifact / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")  # the run built nothing: no validation of its own
    assert validation_curve({"run_dir": run_dir, "stages": {"rl": {"dir": str(artifact)}}}) == {4: 2.5, 8: 2.7}
    # an artifact from before rl artifacts kept their records: the run's own metrics
    (artifact / "validation.jsonl").unlink()
    (run_dir / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert validation_curve({"run_dir": run_dir, "stages": {"rl": {"dir": str(artifact)}}}) == {4: 2.5}


def test_report_names_a_broken_metrics_line_and_a_run_without_its_config(tmp_path):
    report_run(tmp_path, 0, "toy", "alol", 1, metrics(2.8), metrics(2.6), validation=[(10, 2.6)])
    with (tmp_path / "0" / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "rl/valid\n')  # a line cut short
    with pytest.raises(ReportError, match=r"0/metrics.jsonl:2: not valid JSON"):
        write_report(tmp_path, tmp_path / "report")
    (tmp_path / "0" / "config.yaml").unlink()
    with pytest.raises(ReportError, match=r"0: has eval.json but no config.yaml"):
        write_report(tmp_path, tmp_path / "report")


def test_the_report_says_when_a_method_never_beat_pi_ref(tmp_path):
    for job, (algo, seed, best) in enumerate([("nll", 1, 0), ("nll", 2, 40), ("alol", 1, 60)]):
        report_run(tmp_path, job, "toy", algo, seed, metrics(2.0), metrics(2.1))
        rl = tmp_path / "cache" / f"rl-{job}"
        rl.mkdir(parents=True)
        (rl / "best.json").write_text(json.dumps({"step": best, "validation_reward": 1.0}))
        stages = json.loads((tmp_path / str(job) / "stages.json").read_text())
        (tmp_path / str(job) / "stages.json").write_text(json.dumps({**stages, "rl": {"dir": str(rl)}}))
    text = format_markdown(build_sections(collect_runs(tmp_path)))
    assert "`nll`: 1 of 2 seeds never beat pi_ref on validation (the policy kept is pi_ref itself, step 0)" in text
    assert "`alol`:" not in text


# ---------------------------------------------------------------- which runs are compared

def jsonl_run(root: Path, name: str, fingerprint: str | None, reward, scored: bool, n_layer: int = 1,
              algo: str = "alol", seed: int = 1) -> Path:
    """A finished task=jsonl run in its own outputs/<date>/<time> dir, as `lol-rl train` leaves it."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"algo": {"name": algo}, "seed": seed, "reward": reward, "paper": None,
           "task": {"name": "jsonl", "loader": "jsonl", "train": "data/train.jsonl", "rewards": []},
           "model": {"name": "tiny", "n_layer": n_layer, "n_embd": 32}}
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    OmegaConf.save(OmegaConf.create(["task=jsonl", "task.train=data/train.jsonl"]), run / ".hydra" / "overrides.yaml")
    (run / "stages.json").write_text(json.dumps({"eval_ref": {"dir": f"cache/eval/ref-{fingerprint}-{n_layer}-{reward}"}}))
    unscored = {"reward": None, "rewards": {}, "length": 5.0, "distinct": [0.1, 0.2, 0.3], "n": 10}
    score = lambda r: {**unscored, "reward": r, "rewards": {"a": r / 2, "b": r / 2}}
    (run / "eval.json").write_text(json.dumps({"reference": score(2.0) if scored else unscored,
                                               "policy": score(2.5) if scored else unscored}))
    if fingerprint is not None:
        (run / "data.json").write_text(json.dumps({"fingerprint": fingerprint, "rows": {"train": 8}}))
    return run


def test_runs_whose_data_or_reward_differ_are_never_one_row(tmp_path):
    """outputs/<date>/: a jsonl run scored by a scorer and one on the data's own rewards, with the
    same overrides; once merged into one `pi_ref | 2 | n/a` row."""
    day = tmp_path / "outputs" / "2026-12-03"
    jsonl_run(day, "10-00-00", "aaaa1111", "examples.support.score:score", scored=True)
    jsonl_run(day, "11-00-00", "bbbb2222", None, scored=False)
    sections = build_sections(collect_runs(day))
    assert [(s.task, s.group) for s in sections] == [
        ("jsonl", "data aaaa1111, reward reward=examples.support.score:score"),
        ("jsonl", "data bbbb2222, reward none (the data's rewards)")]
    assert [[(r.name, r.n_seeds) for r in s.rows] for s in sections] == [[("pi_ref", 1), ("alol", 1)]] * 2
    markdown = format_markdown(sections)
    assert "## jsonl: data aaaa1111, reward reward=examples.support.score:score\n" in markdown
    assert ("group 2 of the 2 groups of task jsonl's runs, which differ in their data and reward: not comparable, "
            "never aggregated together") in markdown
    assert "| pi_ref | 2 |" not in markdown and "| pi_ref | 1 | 2.000 |" in markdown
    assert format_csv(sections).splitlines()[1].startswith("jsonl,\"data aaaa1111, reward reward=examples")
    out = tmp_path / "report"
    write_report(day, out)
    assert {p.name for p in out.glob("*.md")} == {"table.md"}

    # the same data and reward, another model: two groups again, told apart by the model key that differs
    other = tmp_path / "models"
    jsonl_run(other, "a", "aaaa1111", None, scored=True, n_layer=1)
    jsonl_run(other, "b", "aaaa1111", None, scored=True, n_layer=2)
    jsonl_run(other, "c", "aaaa1111", None, scored=True, n_layer=2, seed=2)
    groups = [(s.group, [r.n_seeds for r in s.rows]) for s in build_sections(collect_runs(other))]
    assert groups == [("model.n_layer=1", [1, 1]), ("model.n_layer=2", [1, 2])]

    # one group: no group line, as before
    same = tmp_path / "same"
    jsonl_run(same, "a", "aaaa1111", None, scored=True)
    jsonl_run(same, "b", "aaaa1111", None, scored=True, seed=2)
    (section,) = build_sections(collect_runs(same))
    assert section.group == "" and "groups of task" not in format_markdown([section])


def test_a_run_from_before_data_json_is_grouped_by_its_task_config(tmp_path):
    from lol_rl.report import run_group

    first, second = jsonl_run(tmp_path, "a", None, None, True), jsonl_run(tmp_path, "b", None, None, True)
    cfg = OmegaConf.load(second / "config.yaml")
    cfg.task.train = "data/other.jsonl"
    OmegaConf.save(cfg, second / "config.yaml")
    groups = [run_group(OmegaConf.load(run / "config.yaml"), None) for run in (first, second)]
    assert groups[0]["data"] is None and groups[0]["task_config"].startswith("task config ")
    assert groups[0]["task_config"] != groups[1]["task_config"]
    # beside a run that records its fingerprint, runs of the same task config stay one group
    third = jsonl_run(tmp_path, "c", "aaaa1111", None, True)
    sections = build_sections(collect_runs(tmp_path))
    assert [(s.group, [r.n_seeds for r in s.rows]) for s in sections] == [
        (f"data {groups[0]['task_config']}", [2, 2]), (f"data {groups[1]['task_config']}", [1, 1])]
    assert {r["run_dir"].name for r in sections[0].runs} == {"a", "c"}


def test_report_takes_a_run_dir_a_sweep_or_a_tree_of_them(tmp_path, capsys):
    single = jsonl_run(tmp_path / "outputs" / "2026-12-03", "10-00-00", "aaaa1111", None, scored=True)
    for job in (0, 1, 2, 10):  # a sweep's jobs, 10 after 2
        report_run(tmp_path / "multirun" / "x", job, "toy", "alol", job + 1, metrics(2.8), metrics(2.6))
    (tmp_path / "outputs" / ".lol-rl-cache" / "eval" / "k").mkdir(parents=True)  # searched through: no
    main([str(single)])
    assert "## jsonl" in capsys.readouterr().out and (single / "report" / "table.md").is_file()
    assert [r["run_dir"].name for r in collect_runs(tmp_path / "multirun" / "x")] == ["0", "1", "2", "10"]
    runs = collect_runs(tmp_path)  # the whole tree: single runs and the sweep's
    assert [r["run_dir"].relative_to(tmp_path).as_posix() for r in runs] == [
        "multirun/x/0", "multirun/x/1", "multirun/x/2", "multirun/x/10", "outputs/2026-12-03/10-00-00"]
    markdown = write_report(tmp_path, tmp_path / "report")
    assert "## toy" in markdown and "## jsonl" in markdown
    assert "| alol | 4 |" in markdown  # the sweep's four seeds in one row


def test_the_sweep_summary_keeps_groups_apart_too(tmp_path):
    from lol_rl.report import sweep_summary_rows

    jsonl_run(tmp_path, "0", "aaaa1111", None, scored=True)
    jsonl_run(tmp_path, "1", "aaaa1111", None, scored=True, seed=2)
    jsonl_run(tmp_path, "2", "bbbb2222", None, scored=True)
    rows = sweep_summary_rows(collect_runs(tmp_path))
    assert {name: len(metrics) for name, metrics in rows.items()} == {
        "pi_ref [jsonl: data aaaa1111]": 1, "alol [jsonl: data aaaa1111]": 2,
        "pi_ref [jsonl: data bbbb2222]": 1, "alol [jsonl: data bbbb2222]": 1}
    assert "| alol [jsonl: data bbbb2222] | 1 | 2.500 |" in format_summary(rows)
    from lol_rl.report import SweepSummary

    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "| pi_ref [jsonl: data bbbb2222] | 1 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "report" / "table.md").read_text().count("## jsonl: data ") == 2
