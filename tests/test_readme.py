"""The README and the docs cannot go stale silently: every command they show parses (`--help`), and every relative
link points at a file of the repository (issue 27)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    REPO / "README.md",
    REPO / "results" / "README.md",
    REPO / "benchmarks" / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
]
_BLOCK = re.compile(r"```(?:bash|sh)?\n(.*?)```", re.S)
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def readme_commands() -> list[str]:
    """The `clarify <command>` subcommands the README's shell blocks run."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = []
    for block in _BLOCK.findall(text):
        for line in block.splitlines():
            m = re.match(r"\s*clarify\s+([a-z]+)\b", line)
            if m and m.group(1) not in found:
                found.append(m.group(1))
    return found


def test_the_readme_shows_commands():
    assert {"simulate", "fit"} <= set(readme_commands())


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command, capsys):
    from clarify_lit.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files(page):
    missing = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        if not (page.parent / target).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"
