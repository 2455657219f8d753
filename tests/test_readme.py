"""The README's command table says what each command's `--help` says: the same commands, the
same arguments and flags, the same metavars and choices."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from lbs_tune.cli import build_parser

README = Path(__file__).parent.parent / "README.md"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def _items(usage: str) -> list[str]:
    """A synopsis split into its items: `SPEC`, `[--out DIR]`, `-o DIR`, `[KEY=VALUE ...]`."""
    found, depth, current = [], 0, ""
    for char in " ".join(usage.split()) + " ":
        if char == " " and depth == 0:
            if current:
                found.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        current += char
    # A required option and its value are one item: `-o DIR`.
    merged = []
    for item in found:
        if merged and merged[-1].startswith("-") and " " not in merged[-1] and item[0] not in "[-":
            merged[-1] += f" {item}"
        else:
            merged.append(item)
    return merged


def _from_help(parser: argparse.ArgumentParser) -> list[str]:
    """The items of a command's usage line as `--help` prints it, without `[-h]`; choices as
    `a|b` (the README's way)."""
    usage = parser.format_usage().split(" ", 3)[3]  # after "usage: lbs-tune CMD"
    items = [i for i in _items(usage) if i != "[-h]"]
    return [re.sub(r"\{([^}]*)\}", lambda m: m.group(1).replace(",", "|"), i) for i in items]


def _appended(parser: argparse.ArgumentParser) -> set[str]:
    return {a.option_strings[-1] for a in parser._actions if isinstance(a, argparse._AppendAction)}


def _readme_rows() -> dict[str, list[str]]:
    """Command -> the items of its synopsis in the README's command table."""
    rows = {}
    for line in README.read_text().splitlines():
        match = re.match(r"^\| `lbs-tune (\w+)(.*?)` \|", line)
        if match:
            rows[match.group(1)] = _items(match.group(2).replace("\\|", "|"))
    return rows


def test_the_readme_lists_every_command_once():
    assert sorted(_readme_rows()) == sorted(_subcommands())


def test_each_readme_synopsis_has_the_arguments_and_flags_of_its_help():
    rows = _readme_rows()
    for name, parser in _subcommands().items():
        readme = []
        for item in rows[name]:
            flag = item.strip("[]").split(" ")[0]
            # A repeatable flag: the README says so with `...`, which argparse's usage does not.
            if flag in _appended(parser) and item.endswith(" ...]"):
                item = item.removesuffix(" ...]") + "]"
            readme.append(item)
        expected = _from_help(parser)
        assert sorted(readme) == sorted(expected), f"lbs-tune {name}: README {rows[name]}"
        positionals = [i for i in expected if not i.lstrip("[").startswith("-")]
        assert [i for i in readme if not i.lstrip("[").startswith("-")] == positionals, name
        # A repeatable flag is marked as one in the README.
        for flag in _appended(parser):
            assert any(i.startswith(f"[{flag} ") and i.endswith(" ...]") for i in rows[name]), flag


def test_the_two_meanings_of_set_are_explained():
    text = " ".join(README.read_text().split())
    assert "`lbs-tune train --set` sets a key of the trial config" in text
    assert "`lbs-tune run --set` sets a key of the sweep file" in text
    train, run = _subcommands()["train"], _subcommands()["run"]
    assert "trial config" in train.format_help() and "base." in run.format_help()
