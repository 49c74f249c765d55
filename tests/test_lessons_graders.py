"""Every lesson's grader passes the library's solutions (REFERENCE) and fails the untouched stubs on every
check. The realistic wrong versions of each exercise are in tests/test_lessons_{a,b,ip,lora,body,beyond}.py."""
import pytest

from lesson_helpers import ALL_LESSONS, exercise_names, grader, stubs
from lessons.grading import grade


def test_every_lesson_has_a_grader():
    assert len(ALL_LESSONS) == 18, ALL_LESSONS


@pytest.mark.parametrize("name", ALL_LESSONS)
def test_reference_solutions_pass(name):
    assert set(grader(name).REFERENCE) == set(exercise_names(name))
    results = grade(grader(name).CHECKS, grader(name).REFERENCE, verbose=True)
    assert all(ok for ok, _ in results.values()), {k: m for k, (ok, m) in results.items() if not ok}


@pytest.mark.parametrize("name", ALL_LESSONS)
def test_untouched_stubs_fail_every_check(name):
    exercises = stubs(name)
    for exercise in exercise_names(name):
        assert callable(getattr(exercises, exercise.split(".")[0])), f"{exercise} is missing from {name}/exercises.py"
    results = grade(grader(name).CHECKS, exercises)
    assert not any(ok for ok, _ in results.values()), [k for k, (ok, _) in results.items() if ok]
