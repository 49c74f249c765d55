"""The Python version pyproject.toml declares is the one the code is written for.

requires-python is >= 3.10: the torch this project is developed and tested with (2.13) needs 3.10, so 3.9
could not be tested here. The checks: every source file parses as the declared oldest Python, and every file
that writes `X | None` in an annotation has `from __future__ import annotations` (the convention throughout)."""
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


def _union_annotations(tree: ast.AST) -> bool:
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.returns]
    return any(isinstance(b, ast.BinOp) and isinstance(b.op, ast.BitOr) for a in annotations for b in ast.walk(a))


def test_union_annotations_come_with_the_future_import():
    missing = [str(p.relative_to(ROOT)) for p in FILES
               if _union_annotations(ast.parse(p.read_text())) and "from __future__ import annotations" not in p.read_text()]
    assert not missing, missing
