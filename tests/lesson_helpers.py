"""What the lesson-grader tests share: each lesson's grade.py and exercises.py, and which checks a set of
functions fails.

Every lessons/NN_x/grade.py exposes CHECKS and REFERENCE (the library's solutions in the exercises'
signatures); a namespace is anything `lessons.grading.grade` accepts (a dict or the exercises module).
"""
from __future__ import annotations

from collections import Counter
from functools import cache
from types import ModuleType
from typing import Any, Callable

from lessons.grading import ROOT, grade, load_module

LESSONS = ROOT / "lessons"
ALL_LESSONS = sorted(path.parent.name for path in LESSONS.glob("[0-9][0-9]_*/grade.py"))


@cache
def grader(name: str) -> ModuleType:
    """lessons/<name>/grade.py, loaded once per test session."""
    return load_module(LESSONS / name / "grade.py", f"grade_{name}")


def stubs(name: str) -> ModuleType:
    """lessons/<name>/exercises.py as a learner finds it."""
    return load_module(LESSONS / name / "exercises.py", f"exercises_{name}")


def exercise_names(name: str) -> list[str]:
    """The exercises lesson <name> grades, in the order of its checks."""
    return list(dict.fromkeys(check.exercise for check in grader(name).CHECKS))


def failed(name: str, namespace: Any = None, only: str | None = None, **replaced: Callable) -> set[str]:
    """Labels ("q_sample #2") of the checks of lesson <name> that fail: on `namespace`, or on the REFERENCE with
    the exercises named in `replaced` swapped for the given functions; `only` grades one exercise's checks."""
    if namespace is None:
        namespace = {**grader(name).REFERENCE, **replaced}
    checks = [c for c in grader(name).CHECKS if only is None or c.exercise == only]
    return {label for label, (ok, _) in grade(checks, namespace).items() if not ok}


def assert_two_wrong_versions_each(wrong: list[tuple], names: list[str]) -> None:
    """Every exercise of the lessons `names` has at least two wrong versions in `wrong`, rows (lesson, exercise, fn)."""
    counts = Counter((name, exercise) for name, exercise, _ in wrong)
    for name in names:
        for exercise in exercise_names(name):
            assert counts[(name, exercise)] >= 2, f"{name}: {exercise} has {counts[(name, exercise)]} wrong versions"
