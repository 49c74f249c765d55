"""What every lesson's grader shares.

A lesson folder holds `exercises.py` (stubs you fill in between `# TODO begin` and `# TODO end`) and
`grade.py`, which lists its checks and ends with `main(CHECKS, __file__)`. Run it with

    python lessons/07_ddpm_forward/grade.py     # -v: what differed; --reference: grade the library's solutions

Each check compares your function with the library's reference on inputs where the common mistakes show.
A failing check prints a hint that points at the concept, never at the answer.

Tests (tests/test_lessons_*.py) call `grade(checks, namespace)` with the reference solutions (all must
pass), the untouched stubs (all must fail) and realistic wrong versions (each must fail).
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `python lessons/NN_x/grade.py` finds the minildm package
    sys.path.insert(0, str(ROOT))


@dataclass
class Check:
    """One graded exercise: `test(fn)` raises AssertionError when `fn` is wrong; `hint` is printed then."""
    exercise: str  # the function's name in exercises.py (e.g. "q_sample", or "LoRALinear.forward")
    test: Callable[[Callable], None]
    hint: str


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a file by path (lesson folders start with digits, so they are not importable by name)."""
    path = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(name or f"lesson_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lookup(namespace: Any, dotted: str) -> Any:
    """'LoRALinear.forward' -> namespace.LoRALinear.forward (namespace: a module, class or dict)."""
    obj = namespace
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def is_stub(fn: Any) -> bool:
    """True while the exercise still raises NotImplementedError (i.e. the learner has not filled it in);
    a class is a stub while any of its methods is."""
    if inspect.isclass(fn):
        return any(is_stub(method) for method in vars(fn).values() if inspect.isfunction(method))
    try:
        return "raise NotImplementedError" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


def mine_or_reference(exercises: ModuleType | None, name: str, reference: Any) -> Any:
    """lesson.py uses your version of an exercise once you have written it, the library's until then."""
    if exercises is None or not hasattr(exercises, name.split(".")[0]):
        return reference
    candidate = lookup(exercises, name)
    return reference if is_stub(candidate) else candidate


def grade(checks: list[Check], namespace: Any, verbose: bool = False) -> dict[str, tuple[bool, str]]:
    """Run every check against `namespace`; returns {check label: (passed, message)}."""
    results = {}
    for i, check in enumerate(checks):
        label = f"{check.exercise} #{sum(c.exercise == check.exercise for c in checks[:i]) + 1}"
        try:
            fn = lookup(namespace, check.exercise)
        except (AttributeError, KeyError):
            results[label] = (False, f"{check.exercise} is missing from exercises.py")
            continue
        try:
            check.test(fn)
            results[label] = (True, "ok")
        except NotImplementedError:
            results[label] = (False, "not implemented yet: fill in the TODO region")
        except AssertionError as e:
            results[label] = (False, f"{check.hint}" + (f" ({e})" if str(e) and verbose else ""))
        except Exception as e:  # a crash is a failure too, with the error to help
            results[label] = (False, f"raised {type(e).__name__}: {e}. Hint: {check.hint}")
            if verbose:
                traceback.print_exc()
    return results


def main(checks: list[Check], grade_file: str) -> int:
    """Grade the exercises.py next to `grade_file` (with --reference: the library's solutions, REFERENCE in
    grade.py, as CI does), print a report, return the exit code (0 = all pass)."""
    lesson_dir = Path(grade_file).resolve().parent
    if "--reference" in sys.argv:
        what, namespace = "the library's reference solutions", load_module(grade_file).REFERENCE
    else:
        what, namespace = f"{lesson_dir.name}/exercises.py", load_module(lesson_dir / "exercises.py")
    verbose = "-v" in sys.argv
    results = grade(checks, namespace, verbose=verbose)
    width = max(len(k) for k in results)
    print(f"grading {what}")
    for label, (ok, message) in results.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {label:<{width}}  {'' if ok else message}")
    passed = sum(ok for ok, _ in results.values())
    print(f"{passed}/{len(results)} checks pass" + ("" if passed == len(results) else "  (run with -v for details)"))
    return 0 if passed == len(results) else 1
