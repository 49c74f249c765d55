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

import ast
import functools
import importlib.util
import inspect
import sys
import textwrap
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
    """True while an exercise is as the learner found it: a `# TODO begin` ... `# TODO end` region that still holds
    nothing but `raise NotImplementedError` (or, without such a region, a body that is only that raise). A
    finished function that raises NotImplementedError for a case it does not support is not a stub. A class is
    a stub while any of its methods is."""
    if inspect.isclass(fn):
        return any(is_stub(method) for method in vars(fn).values() if inspect.isfunction(method))
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    regions, region = [], None
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("# TODO begin"):
            region = []
        elif text.startswith("# TODO end") and region is not None:
            regions.append(region)
            region = None
        elif region is not None and text and not text.startswith("#"):
            region.append(text)
    if regions:
        return any(len(r) == 1 and r[0].startswith("raise NotImplementedError") for r in regions)
    try:
        body = ast.parse(textwrap.dedent(source)).body[0].body
    except (SyntaxError, IndexError, AttributeError):
        return False
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def mine_or_reference(exercises: ModuleType | None, name: str, reference: Any) -> Any:
    """lesson.py uses your version of an exercise once you have written it, the library's until then."""
    if exercises is None or not hasattr(exercises, name.split(".")[0]):
        return reference
    candidate = lookup(exercises, name)
    return reference if is_stub(candidate) else candidate


class ContractBroken(AssertionError):
    """The function broke a rule every exercise shares (inputs left unchanged, randomness from the generator)."""


class TypeMismatch(AssertionError):
    """An output whose values may be right but whose type, dtype or shape is not what the docstring asks for."""


def assert_same_kind(mine: Any, ref: Any, what: str = "output") -> None:
    """Raise TypeMismatch when `mine` is not a tensor like `ref` (type, dtype, shape), before any value check."""
    import torch

    if torch.is_tensor(ref):
        if not torch.is_tensor(mine):
            raise TypeMismatch(f"{what}: expected a torch.Tensor ({ref.dtype}), got {type(mine).__name__}")
        if mine.dtype != ref.dtype:
            raise TypeMismatch(f"{what}: dtype {mine.dtype}, the docstring asks for {ref.dtype}")
        if mine.shape != ref.shape:
            raise TypeMismatch(f"{what}: shape {list(mine.shape)}, expected {list(ref.shape)}")


def assert_unchanged(before: Any, after: Any, what: str = "an input") -> None:
    """Inputs (tensors, or lists / dicts of them) must not be changed in place by an exercise."""
    import torch

    if torch.is_tensor(before):
        assert torch.equal(before, after), f"{what} was changed in place: return a new tensor instead"
    elif isinstance(before, (list, tuple)):
        for b, a in zip(before, after):
            assert_unchanged(b, a, what)
    elif isinstance(before, dict):
        for key in before:
            assert_unchanged(before[key], after[key], f"{what} ({key})")


def snapshot(*values: Any) -> Any:
    """Deep copies of the tensors among `values` (for assert_unchanged after the call)."""
    import copy

    return copy.deepcopy(values)


def describe_value(value: Any, limit: int = 12) -> str:
    """A short description of an argument for -v: small tensors in full, big ones by shape, dtype and range."""
    import torch

    if torch.is_tensor(value):
        if value.numel() <= limit:
            return f"tensor({value.tolist()}, dtype={value.dtype})"
        flat = value.detach().float()
        return (f"tensor{list(value.shape)} {value.dtype}, min {flat.min().item():.4g}, max {flat.max().item():.4g}"
                + (", requires_grad" if value.requires_grad else ""))
    if isinstance(value, torch.Generator):
        return "torch.Generator"
    if isinstance(value, (list, tuple)) and len(value) > limit:
        return f"{type(value).__name__} of {len(value)}: {describe_value(value[0])}, ..."
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}(" + ", ".join(describe_value(v) for v in value) + ")"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensors(value: Any) -> list:
    import torch

    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class Recorder:
    """Wraps an exercise function for every check of every lesson:

    - with -v, a failing check shows the call it failed on (the last one);
    - a function that changes a tensor it was given (in place) fails: the docstrings ask for new tensors;
    - a function given a torch.Generator that draws from torch's global RNG instead fails: the same generator
      must give the same result, whatever else the program has drawn.
    """

    def __init__(self, fn: Callable, name: str = ""):
        self.fn, self.name, self.last = fn, name or getattr(fn, "__name__", "fn"), None
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        import torch

        self.last = (args, kwargs)
        inputs = _tensors(list(args) + list(kwargs.values()))
        before = [t.detach().clone() for t in inputs]
        has_generator = any(isinstance(v, torch.Generator) for v in list(args) + list(kwargs.values()))
        rng = torch.get_rng_state() if has_generator else None
        out = self.fn(*args, **kwargs)
        for i, (t, b) in enumerate(zip(inputs, before)):
            same = t.shape == b.shape and bool(((t.detach() == b) | (t.detach().isnan() & b.isnan())).all())
            if not same:
                raise ContractBroken(f"input {i + 1} ({describe_value(b)}) was changed in place: leave the caller's "
                                     "tensors as they are and return new ones")
        if has_generator and not torch.equal(rng, torch.get_rng_state()):
            raise ContractBroken(
                "random numbers were drawn from torch's global RNG: draw every one from the generator you are given "
                "(generator=generator), so that the same generator gives the same result")
        return out

    def describe(self) -> str:
        if self.last is None:
            return ""
        args, kwargs = self.last
        parts = [describe_value(a) for a in args] + [f"{k}={describe_value(v)}" for k, v in kwargs.items()]
        return f"last call: {self.name}(" + ", ".join(parts) + ")"


TYPE_WORDS = ("dtype", "expected a tensor", "expected a torch", "return LongTensors", "expected a bool tensor")
DTYPE_WORDS = ("dtype", "expected scalar type", "did not match", "Float but found", "Long but found",
               "Double but found", "must have the same dtype")


def grade(checks: list[Check], namespace: Any, verbose: bool = False) -> dict[str, tuple[bool, str]]:
    """Run every check against `namespace`; returns {check label: (passed, message)}.

    A failure prints the check's hint, or a hint about types when only the type, dtype or shape is wrong; with
    `verbose` also the assertion's detail and the call the function failed on."""
    results = {}
    for i, check in enumerate(checks):
        label = f"{check.exercise} #{sum(c.exercise == check.exercise for c in checks[:i]) + 1}"
        try:
            fn = lookup(namespace, check.exercise)
        except (AttributeError, KeyError):
            results[label] = (False, f"{check.exercise} is missing from exercises.py")
            continue
        wrapped = Recorder(fn, check.exercise) if inspect.isfunction(fn) or inspect.ismethod(fn) else fn
        detail = (lambda: f" [{wrapped.describe()}]" if verbose and isinstance(wrapped, Recorder) and wrapped.last
                  else "")
        try:
            check.test(wrapped)
            results[label] = (True, "ok")
        except NotImplementedError as e:
            if is_stub(fn):
                results[label] = (False, "not implemented yet: fill in the TODO region")
            else:
                results[label] = (False, f"raised NotImplementedError({e}) on an input the docstring allows. "
                                         f"Hint: {check.hint}{detail()}")
        except ContractBroken as e:
            results[label] = (False, f"{e}{detail()}")
        except TypeMismatch as e:
            results[label] = (False, f"the values may be right, but the type is not: {e}{detail()}")
        except AssertionError as e:
            if any(word in str(e) for word in TYPE_WORDS):  # a check's own type or dtype assertion
                results[label] = (False, f"the values may be right, but the type is not: {e}{detail()}")
            else:
                results[label] = (False, f"{check.hint}" + (f" ({e})" if str(e) and verbose else "") + detail())
        except Exception as e:  # a crash is a failure too, with the error to help
            if any(word in str(e) for word in DTYPE_WORDS):
                results[label] = (False, f"raised {type(e).__name__}: {e}. Hint: check the dtype of what you "
                                         f"return or compute with (float64 tables, float32 images, long indices)."
                                         f"{detail()}")
            else:
                results[label] = (False, f"raised {type(e).__name__}: {e}. Hint: {check.hint}{detail()}")
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
