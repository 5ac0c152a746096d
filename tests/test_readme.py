"""The README stays true: every flag of the command is in it, it stays a page a newcomer reads
(at most 250 lines, no dated notes, no issue numbers, no link out of the repository), every page it
links exists, and CI runs its test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

from gconv_rewrite.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_flag_of_the_command_is_in_the_readme():
    flags = {opt for param in main.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}
    missing = sorted(flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README))
    assert not missing, missing


def test_the_readme_is_short_and_has_no_lab_notes():
    assert len(README.splitlines()) <= 250
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README)  # no dated notes
    assert not re.search(r"\bissues? #?\d+", README, re.IGNORECASE)
    assert not re.search(r"https?://", README)  # no link out of the repository


def test_every_page_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links, "the README links its docs"
    assert [link for link in links if not (ROOT / link).exists()] == []


def test_ci_runs_the_readmes_test_command_verbatim():
    setup = [line for line in README.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(setup) == 2, setup
    assert setup[1] in (ROOT / ".ci" / "run").read_text()
