"""`lol-rl train --help` (and audit's, judge's): the config groups a run picks from and what each
key means, read from the yaml files themselves. Every key in conf/ carries a comment on its line
(STYLE.md); this module turns those comments into the help, so the help cannot drift from the
config. Hydra's own help (a dump of the composed config) stays at `--hydra-help`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# `key: value  # comment`, or `key:` opening a section; a value may hold a quoted '#'
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
_COMMENT = re.compile(r"^\s*#\s?(?P<text>.*)$")


@dataclass
class KeyDoc:
    key: str  # dotted
    value: str  # as written in the yaml ("" for a section)
    comment: str


def _split_comment(rest: str) -> tuple[str, str]:
    """`value  # comment` -> (value, comment), a '#' inside quotes kept in the value."""
    quote = None
    for i, char in enumerate(rest):
        if char in "'\"" and quote in (None, char):
            quote = None if quote == char else char
        elif char == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def key_docs(path: Path, skip: tuple[str, ...] = ("defaults", "hydra")) -> list[KeyDoc]:
    """Every key of a yaml file with its value and comment, sections included, in file order.
    A comment-only line indented under a key's comment continues it; top-level sections named in
    `skip` (Hydra's own) are left out, and so are list items (the defaults list)."""
    docs: list[KeyDoc] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open sections
    skipping = False
    last: KeyDoc | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := _KEY.match(line):
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            if indent == 0:
                skipping = match["key"] in skip
            value, comment = _split_comment(match["rest"])
            dotted = ".".join([*(k for _, k in stack), match["key"]])
            stack.append((indent, match["key"]))
            last = None if skipping else KeyDoc(dotted, value, comment)
            if last is not None:
                docs.append(last)
        elif (match := _COMMENT.match(line)) and last is not None and line.index("#") > 0:
            last.comment = f"{last.comment} {match['text'].strip()}".strip()  # a wrapped comment
        elif line.strip() and not line.lstrip().startswith("#"):
            last = None  # a list item or a block scalar: nothing to continue
    return docs


def header_comment(path: Path) -> str:
    """The first comment line of a yaml file (what a group option is), '' when it has none."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# @package"):
            continue
        match = _COMMENT.match(line)
        return match["text"].strip() if match else ""
    return ""


def group_defaults(path: Path) -> dict[str, str]:
    """`- group: option` entries of a config's defaults list."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"^\s*-\s*(?P<group>[\w/]+):\s*(?P<option>[\w/]+)", line):
            found[match["group"]] = match["option"]
    return found


def _wrap_key(doc: KeyDoc, width: int) -> str:
    left = f"  {doc.key}" + (f"={doc.value}" if doc.value else "")
    if not doc.comment:
        return left
    return f"{left:<{width}}  {doc.comment}" if len(left) <= width else f"{left}\n{'':<{width}}  {doc.comment}"


def format_keys(docs: list[KeyDoc], prefix: str = "") -> list[str]:
    width = min(44, max((len(d.key) + len(prefix) + len(d.value) + 3 for d in docs), default=0))
    return [_wrap_key(KeyDoc(prefix + d.key, d.value, d.comment), width) for d in docs]


def chosen_groups(conf: Path, config_name: str, argv: list[str]) -> dict[str, str]:
    """The option of each config group this command line picks (`task=hha`), else the default."""
    chosen = group_defaults(conf / f"{config_name}.yaml")
    for arg in argv:
        group, _, option = arg.lstrip("+").partition("=")
        if option and (conf / group).is_dir():
            chosen[group] = option
    return {g: o for g, o in chosen.items() if (conf / g).is_dir() and o != "null"}


def command_help(command: str, conf: Path, config_name: str, argv: list[str], usage: str,
                 own_section: str | None = None, extra_groups: tuple[str, ...] = ()) -> str:
    """The help of a Hydra command: usage, its config groups and their options (each with its
    yaml's first comment line), then every key with its default and comment: the command's own
    section first when it has one (audit), then the chosen group options' keys."""
    groups = [g for g in [*group_defaults(conf / f"{config_name}.yaml"), *extra_groups] if (conf / g).is_dir()]
    chosen = chosen_groups(conf, config_name, argv)
    adds = "".join(f", `+{g}=` adds one" for g in extra_groups)
    lines = [usage.strip(), "", f"config groups ({conf}; pick an option with group=option{adds}):"]
    for group in groups:
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        default = group_defaults(conf / f"{config_name}.yaml").get(group)
        if group not in chosen:
            mark = ""
        elif chosen[group] == default:
            mark = f" (default {default})"
        else:
            mark = f" (this command line: {chosen[group]}" + (f"; default {default})" if default else ")")
        lines.append(f"  {group}{mark}:")
        width = max(len(o) for o in options) + 4
        lines += [f"    {option:<{width}}{header_comment(conf / group / f'{option}.yaml')}".rstrip()
                  for option in options]
    docs = key_docs(conf / f"{config_name}.yaml")
    if own_section is not None:
        own = [d for d in docs if d.key == own_section or d.key.startswith(own_section + ".")]
        lines += ["", f"keys of `lol-rl {command}` ({config_name}.yaml, section {own_section}):", *format_keys(own)]
        docs = [d for d in docs if d not in own]
    lines += ["", f"keys ({config_name}.yaml; set any with key=value, e.g. "
                  f"{next((d.key for d in docs if '.' in d.key), docs[0].key if docs else 'key')}=...):",
              *format_keys(docs)]
    for group, option in chosen.items():
        path = conf / group / f"{option}.yaml"
        if path.is_file():
            top = "# @package _global_" in path.read_text(encoding="utf-8")  # its keys are the run's own
            lines += ["", f"keys of {group}={option} ({group}/{option}.yaml; set with "
                          f"{'<key>' if top else group + '.<key>'}=...):",
                      *format_keys(key_docs(path), prefix="" if top else f"{group}.")]
        else:
            lines += ["", f"{group}={option}: there is no {group}/{option}.yaml; the options of {group} are above"]
    lines += ["", "Hydra's own flags and the composed config: --hydra-help, --cfg job"]
    return "\n".join(lines)
