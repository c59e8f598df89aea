"""The paper's published numbers (Baheti et al., ICLR 2024), transcribed from PAPER.md's
Tables 2 and 4, so that `lol-rl report` can print them beside a sweep that reproduces them.
Keys are the report's column keys (`segment/<name>`, `reward`, `reward/<component>`,
`length`, `distinct-1..3`) and method keys are our algo names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PublishedRow:
    method: str                 # our algo name, `pi_ref`, or a row we have no run of (`test_good`)
    label: str                  # as the paper names the row
    values: dict[str, float]    # column key -> the published value, on the paper's scale
    std: dict[str, float] = field(default_factory=dict)  # the +- the paper gives (over seeds)


@dataclass(frozen=True)
class PublishedTable:
    source: str                 # where in the paper
    section: str                # what the paper calls this part of the table
    reward_scale: float         # the paper's rewards are ours x this
    seeds: int | None           # seeds the published means are over (None: not stated)
    rows: tuple[PublishedRow, ...]

    def row(self, method: str) -> PublishedRow | None:
        return next((r for r in self.rows if r.method == method), None)


HHA_SEGMENTS = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")  # tasks/hha.py's names
REDDIT_COMPONENTS = ("fluency", "safety", "engagement", "upvote", "tfidf")               # conf/task/reddit_*.yaml


def _distinct(d1: float, d2: float, d3: float) -> dict[str, float]:
    return {"distinct-1": d1, "distinct-2": d2, "distinct-3": d3}


def _table2_row(method, label, segments, reward, length, distinct, reward_std=None, length_std=None) -> PublishedRow:
    values = {**{f"segment/{s}": v for s, v in zip(HHA_SEGMENTS, segments)}, "reward": reward, "length": length,
              **_distinct(*distinct)}
    std = {k: v for k, v in (("reward", reward_std), ("length", length_std)) if v is not None}
    return PublishedRow(method, label, values, std)


def _table4_row(method, label, reward, components, length, distinct) -> PublishedRow:
    values = {"reward": reward, **{f"reward/{c}": v for c, v in zip(REDDIT_COMPONENTS, components)}, "length": length,
              **_distinct(*distinct)}
    return PublishedRow(method, label, values)


TABLE2 = PublishedTable(
    source="Table 2 (HHA test, mean over 3 seeds)", section="HHA", reward_scale=100.0, seeds=3, rows=(
        _table2_row("test_good", "test good responses", (54.8, 40.3, 61.6, 50.5), 50.3, 46.7, (.099, .471, .773)),
        _table2_row("test_bad", "test bad responses", (50.0, 34.3, 59.4, 45.3), 45.4, 45.3, (.099, .468, .771)),
        _table2_row("pi_ref", "pi_ref (LLaMA-7B)", (54.8, 36.5, 49.4, 41.5), 44.7, 51.1, (.067, .246, .404)),
        _table2_row("nll", "+ NLL", (60.7, 44.0, 56.5, 49.5), 51.9, 43.3, (.084, .336, .552), 0.5, 3.5),
        _table2_row("pro", "+ PRO", (63.0, 46.4, 57.6, 51.8), 54.1, 43.4, (.084, .339, .560), 0.6, 2.5),
        _table2_row("dpo_ref_free", "+ DPO (ref. free)", (53.6, 50.1, 54.4, 52.3), 52.3, 90.5, (.049, .226, .432), 1.4, 1.1),
        _table2_row("dpo", "+ DPO", (60.9, 55.2, 61.0, 58.5), 58.6, 66.7, (.065, .288, .503), 0.8, 5.9),
        _table2_row("wbc", "+ wBC", (62.4, 47.0, 59.7, 53.2), 54.8, 42.7, (.091, .380, .622), 0.4, 1.1),
        _table2_row("gold", "+ R GOLD", (62.7, 46.7, 59.0, 52.6), 54.5, 44.2, (.086, .355, .584), 0.3, 3.1),
        _table2_row("rlol", "+ R-LOL", (63.7, 47.0, 59.4, 53.1), 55.1, 38.6, (.095, .394, .640), 0.6, 2.4),
        _table2_row("alol_ref_free", "+ A-LOL (ref. free)", (63.8, 49.2, 60.7, 54.7), 56.4, 40.7, (.095, .400, .651), 0.6, 1.7),
        _table2_row("alol", "+ A-LOL", (64.3, 50.3, 61.1, 55.8), 57.3, 42.3, (.094, .403, .657), 0.3, 1.9),
        _table2_row("alol_seq", "+ A-LOL seq.", (64.4, 50.9, 62.2, 55.8), 57.6, 40.1, (.105, .464, .727), 0.5, 2.4),
        _table2_row("alol_kl", "+ A-LOL KL", (65.7, 50.7, 61.1, 56.2), 57.9, 44.0, (.090, .387, .639), 0.3, 1.7),
        _table2_row("ppo", "+ PPO", (64.0, 39.7, 45.9, 42.8), 48.0, 16.9, (.123, .381, .546), 0.2, 0.6),
    ))

TABLE4_UPVOTED = PublishedTable(
    source="Table 4 (Reddit test)", section="trained on upvoted", reward_scale=1.0, seeds=None, rows=(
        _table4_row("pi_ref", "pi_ref (DialoGPT)", 2.93, (.92, .84, .47, .43, .26), 14.7, (.137, .409, .609)),
        _table4_row("nll", "+ NLL", 2.95, (.92, .84, .48, .44, .25), 15.2, (.143, .426, .626)),
        _table4_row("wbc", "+ wBC", 2.97, (.92, .85, .49, .45, .25), 15.3, (.154, .448, .648)),
        _table4_row("gold", "+ R GOLD", 3.03, (.94, .89, .50, .44, .26), 13.9, (.120, .300, .412)),
        _table4_row("rlol", "+ R-LOL", 2.95, (.93, .86, .44, .44, .27), 9.6, (.159, .423, .598)),
        _table4_row("alol_ref_free", "+ A-LOL (ref. free)", 3.15, (.95, .90, .55, .48, .27), 14.1, (.146, .405, .587)),
        _table4_row("alol", "+ A-LOL", 3.15, (.93, .88, .55, .51, .29), 11.4, (.186, .502, .698)),
        _table4_row("alol_seq", "+ A-LOL seq", 3.28, (.93, .88, .62, .57, .27), 15.9, (.191, .519, .707)),
        _table4_row("alol_kl", "+ A-LOL KL", 3.18, (.94, .87, .58, .53, .27), 14.5, (.168, .467, .669)),
    ))

TABLE4_DOWNVOTED = PublishedTable(
    source="Table 4 (Reddit test)", section="trained on downvoted", reward_scale=1.0, seeds=None, rows=(
        _table4_row("pi_ref", "pi_ref (DialoGPT)", 2.87, (.91, .81, .49, .39, .27), 13.6, (.128, .369, .548)),
        _table4_row("wbc", "+ wBC", 2.93, (.92, .80, .53, .42, .26), 14.8, (.145, .422, .614)),
        _table4_row("gold", "+ R GOLD", 3.05, (.94, .87, .52, .42, .29), 11.0, (.123, .297, .401)),
        _table4_row("rlol", "+ R-LOL", 2.91, (.91, .83, .49, .41, .28), 10.6, (.179, .488, .666)),
        _table4_row("alol_ref_free", "+ A-LOL (ref. free)", 3.13, (.94, .87, .56, .47, .29), 11.3, (.165, .441, .622)),
        _table4_row("alol", "+ A-LOL", 3.14, (.93, .87, .57, .47, .30), 10.0, (.199, .517, .688)),
        _table4_row("alol_seq", "+ A-LOL seq", 3.18, (.93, .89, .58, .48, .30), 10.2, (.207, .527, .713)),
        _table4_row("alol_kl", "+ A-LOL KL", 3.18, (.93, .88, .60, .49, .28), 17.4, (.127, .333, .454)),
    ))

# a run's `paper` -> its task name -> the published part of that table
PUBLISHED: dict[str, dict[str, PublishedTable]] = {
    "table2": {"hha": TABLE2},
    "table4": {"reddit_pos": TABLE4_UPVOTED, "reddit_neg": TABLE4_DOWNVOTED},
}
