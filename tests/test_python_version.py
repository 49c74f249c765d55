"""The Python version pyproject.toml declares is the one the code is written for.

requires-python is >= 3.10: the torch this project is developed and tested with (2.13) needs 3.10, so 3.9
could not be tested here. The check: every source file parses as the declared oldest Python (3.10 runs
`X | None` annotations without the future import, which most files still have)."""
import ast
import re

from lessons.grading import ROOT

FILES = sorted(p for folder in ("minildm", "lessons", "bench", "tests") for p in (ROOT / folder).rglob("*.py")) + \
    [ROOT / "train.py", ROOT / "sample.py"]


def declared_minimum() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    major, minor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', text).groups()
    return int(major), int(minor)


def test_every_file_parses_as_the_oldest_declared_python():
    version = declared_minimum()
    assert version >= (3, 10), "3.9 needs `from __future__ import annotations` everywhere and a torch below 2.9"
    for path in FILES:
        ast.parse(path.read_text(), filename=str(path), feature_version=version)

