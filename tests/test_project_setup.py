"""The README's two commands, .ci/run and packaging stay in sync."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_opens_with_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.+?)\n```", head, flags=re.S)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    assert text.index("```bash") < 200


def test_ci_runs_the_readmes_test_command_and_fails_on_no_tests():
    test_command = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    install, _, run = test_command.rpartition(" && ")
    assert install in ci and run in ci
    assert '"$rc" -eq 5' in ci and "exit 1" in ci


def test_py_typed_marker_is_shipped():
    assert (ROOT / "gradand" / "py.typed").exists()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()
