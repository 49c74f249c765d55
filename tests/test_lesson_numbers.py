"""The READMEs' measured numbers agree with the results files bench/lesson_numbers.py wrote, and were measured
on today's tiny recipe (see that script's docstring). Reads files only: no model is run here."""
import re

import pytest

from lessons.grading import ROOT, load_module

numbers = load_module(ROOT / "bench" / "lesson_numbers.py", "lesson_numbers")

RESULT_FILES = sorted(numbers.RESULTS.glob("*.md"))


def blocks():
    """(README, name, contents) of every number block."""
    for path in numbers.readme_files():
        for match in numbers.BLOCK.finditer(path.read_text()):
            yield path.relative_to(ROOT), match[1], match[2]


def test_every_measurement_has_results_and_is_quoted():
    quoted = {name for _, name, _ in blocks()}
    written = {p.stem for p in RESULT_FILES}
    assert written == set(numbers.MEASUREMENTS), "run python bench/lesson_numbers.py for the missing ones"
    assert quoted == written, f"results quoted by no README: {written - quoted}; blocks without results: {quoted - written}"


@pytest.mark.parametrize("readme,name,contents", list(blocks()), ids=lambda x: str(x))
def test_readme_block_matches_results(readme, name, contents):
    expected = (numbers.RESULTS / f"{name}.md").read_text()
    assert contents == expected, (f"{readme}'s numbers block '{name}' differs from bench/results/numbers/{name}.md: "
                                  "run python bench/lesson_numbers.py --readmes (or measure again)")


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.stem)
def test_results_measured_on_todays_recipe(path):
    first = path.read_text().splitlines()[0]
    command = f"python bench/lesson_numbers.py {path.stem}"
    assert first.startswith(f"Measured by `{command}`"), (
        f"{path.name} was not written by `{command}` (its first line names another command): measure it with that")
    words, fingerprint = numbers.recipe_of(path.stem)
    recorded = re.search(rf"{words} (\w+)", first)
    assert recorded, f"{path.name} does not say which recipe it was measured on: measure it with `{command}`"
    train = "python train.py --stage body" if path.stem in numbers.BODY else "python train.py"
    assert recorded[1] == fingerprint, (
        f"the {words}'s recipe changed since {path.name} was measured: train again ({train}) and run "
        f"{command}, in the same commit as the recipe change")


def test_block_syntax_is_not_mistyped():
    """A block the regular expression does not see would never be checked."""
    for path in numbers.readme_files():
        text = path.read_text()
        assert text.count("<!-- numbers:") == text.count("<!-- /numbers -->") == len(numbers.BLOCK.findall(text)), path


def test_training_time_measured_on_todays_recipe():
    """The README's training time comes from bench/train_speed.py, whose "after" recipe must be today's tiny preset."""
    text = (ROOT / "bench" / "results" / "train_speed.md").read_text()
    recorded = re.search(r"after = the tiny preset (\w+)", text)
    assert recorded and recorded[1] == numbers.recipe_fingerprint(), (
        "the tiny preset changed since bench/results/train_speed.md was measured: run "
        "python bench/train_speed.py --recipes before after --seeds 0 1 2 in the same commit as the recipe change")
