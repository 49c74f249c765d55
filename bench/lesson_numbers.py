"""The numbers the READMEs quote about the trained tiny model, measured by one command, written where a test
can compare them with the READMEs.

    python train.py                                   # runs/tiny (the numbers are about this model)
    python bench/lesson_numbers.py                    # every measurement -> bench/results/numbers/<name>.md
    python bench/lesson_numbers.py lesson11_ddim      # one of them
    python bench/lesson_numbers.py lesson13_lora lesson14_ip_adapter   # the adapters: they train, ~15 min
    python train.py --stage body && python bench/lesson_numbers.py lesson15_body   # runs/body, ~2 h + 6 min
    python bench/lesson_numbers.py --readmes          # copy the results into the READMEs' number blocks

A README quotes a result inside a block

    <!-- numbers: lesson11_ddim -->
    ...the contents of bench/results/numbers/lesson11_ddim.md...
    <!-- /numbers -->

and tests/test_lesson_numbers.py fails when a block differs from its results file, when a results file is
quoted nowhere, or when the tiny preset (the recipe `python train.py` follows) is no longer the one the
numbers were measured on: change the recipe and the numbers must be measured again in the same commit.

Each measurement calls the same function the lesson itself runs (with the library's reference solutions), so
a learner who runs the lesson on their own `python train.py` model sees these numbers up to training noise.
Lessons 13 and 14 quote benchmarks instead: lesson13_lora and lesson14_ip_adapter call bench/lora.py and
bench/ip_adapter.py, which train a LoRA and an IP-Adapter (with its CLIPs) of the stages' recipes on the frozen
model and measure them (the scripts' own command lines print the same tables for other settings). Lesson 15
quotes bench/body.py on runs/body, the model `python train.py --stage body` trains: its numbers are tied to
the body stage's recipe (BodyStageConfig, with its base preset) the same way.
"""
from __future__ import annotations

import argparse
import os
import hashlib
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from machine import commit, shown  # noqa: E402  (bench/machine.py)

RESULTS = ROOT / "bench" / "results" / "numbers"
BLOCK = re.compile(r"<!-- numbers: (\w+) -->\n(.*?)<!-- /numbers -->", re.S)


def _fingerprint(recipe) -> str:
    """A short hash of a recipe dataclass (every hyperparameter in it)."""
    return hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]


def recipe_fingerprint() -> str:
    """The tiny preset's fingerprint (every hyperparameter of `python train.py`): the numbers' recipe."""
    from minildm.config import tiny

    return _fingerprint(tiny())


def body_fingerprint() -> str:
    """The body stage's fingerprint (every hyperparameter of `python train.py --stage body`, its base preset too)."""
    from minildm.train.body import body_stage_config

    return _fingerprint(body_stage_config("body"))


BODY = {"lesson15_body"}  # measured on runs/body; every other measurement on runs/tiny


def recipe_of(name: str) -> tuple[str, str]:
    """(the words a results file's first line must contain, today's fingerprint) of a measurement's recipe."""
    return ("body stage", body_fingerprint()) if name in BODY else ("tiny preset", recipe_fingerprint())


def _lesson(name: str):
    """(lesson.py module, the library's reference functions) of lessons/<name>."""
    from lessons.grading import load_module

    folder = ROOT / "lessons" / name
    return load_module(folder / "lesson.py", f"numbers_{name}"), load_module(folder / "grade.py").REFERENCE


def lesson09_attention(pipe) -> str:
    """Lesson 09: how the pixels' cross-attention splits over each prompt's tokens (finest level, last step)."""
    lesson, _ = _lesson("09_unet_cross_attention")
    _, extras = pipe.generate(lesson.PROMPTS, steps=lesson.STEPS, guidance_scale=3.0, seed=0,
                              return_attention=True)
    tokens = pipe.tokenizer.encode(lesson.PROMPTS)
    lines = ["| prompt | mean attention weight per token |", "|---|---|"]
    for prompt, row, ids in zip(lesson.PROMPTS, extras["attention"], tokens):
        words = [pipe.tokenizer.words[i] for i in ids.tolist() if i != 0]
        share = row[: len(words)].flatten(1).mean(dim=1)
        lines.append(f"| {prompt} | " + " ".join(f"{w} {s:.2f}" for w, s in zip(words, share)) + " |")
    return "\n".join(lines)


def lesson11_ddim(pipe) -> str:
    """Lesson 11: prompt accuracy for 5/10/25/50 DDIM steps at eta 0 and 1, and the t - T // n pitfall."""
    lesson, fns = _lesson("11_ddim")
    results, _ = lesson.sweep(pipe, fns)
    wrong, right, relative = lesson.pitfall_accuracy(pipe, fns)
    head = " | ".join(f"{s} steps" for s in lesson.STEP_COUNTS)
    lines = [f"| {len(lesson.PROMPTS)} seen prompts, guidance {lesson.GUIDANCE:g} | {head} |",
             "|---|" + "---|" * len(lesson.STEP_COUNTS)]
    for eta, rows in results.items():
        lines.append(f"| eta = {eta:g} | " + " | ".join(f"{acc:.2f}" for _, acc, _ in rows) + " |")
    lines.append("")
    lines.append(f"7 steps landing on t - T // n: prompt accuracy {wrong:.2f} (from the list: {right:.2f}); the "
                 f"final latents differ by {relative:.1%} (relative norm).")
    return "\n".join(lines)


def lesson12_guidance(pipe) -> str:
    """Lesson 12: prompt accuracy and pixel saturation over the guidance scale s."""
    lesson, fns = _lesson("12_classifier_free_guidance")
    _, accuracy, saturation = lesson.sweep(pipe, fns["guided_eps"])
    head = " | ".join(f"s = {s:g}" for s in accuracy)
    lines = [f"| {len(lesson.PROMPTS)} seen prompts, DDIM {lesson.STEPS} | {head} |", "|---|" + "---|" * len(accuracy),
             "| prompt accuracy | " + " | ".join(f"{a:.2f}" for a in accuracy.values()) + " |",
             "| mean pixel saturation | " + " | ".join(f"{v:.3f}" for v in saturation.values()) + " |"]
    return "\n".join(lines)


def autoencoder(pipe) -> str:
    """The first stage on held-back shapes, as `python train.py` prints it at the end of the autoencoder stage."""
    from minildm.config import tiny
    from minildm.train.autoencoder import evaluate_autoencoder, held_back_shapes

    preset = tiny()
    images = held_back_shapes(preset, preset.vq_train.eval_images)
    summary = evaluate_autoencoder(pipe.autoencoder, images)
    return (f"Autoencoder on {len(images)} held-back shapes: PSNR "
            f"{summary['psnr']:.1f} dB, {summary['codes_used']}/{preset.vq.num_codes} codes in use, perplexity "
            f"{summary['perplexity']:.0f}, latent scale factor {float(pipe.autoencoder.scale_factor):.2f}.")


def evaluation(pipe) -> str:
    """`python -m minildm.evaluate --run runs/tiny --n 4`'s table (DDIM 50, guidance 3, 360 images)."""
    from minildm.evaluate import evaluation_report, format_evaluation, load_judges, real_reference

    feature_net, clip = load_judges(pipe.run, progress=False)
    columns = {"real shapes": real_reference(feature_net, clip, n=4),
               "tiny": evaluation_report(pipe, feature_net, clip, n=4, progress=False)}
    return format_evaluation(columns)


def lesson16_broken(pipe) -> str:
    """Lesson 16 part 2: the evaluation table at 1 sample per prompt for a healthy and two broken samplers (the
    same calls as lessons/16_beyond/lesson.py)."""
    from minildm.evaluate import evaluation_report, format_evaluation, load_judges, real_reference

    feature_net, clip = load_judges(pipe.run, progress=False)
    configs = {"s = 3, DDIM 50": dict(steps=50, guidance_scale=3.0),
               "broken: s = 0, DDIM 50": dict(steps=50, guidance_scale=0.0),
               "broken: s = 3, DDIM 2": dict(steps=2, guidance_scale=3.0)}
    columns = {"real shapes": real_reference(feature_net, clip, n=1)}
    for name, kwargs in configs.items():
        columns[name] = evaluation_report(pipe, feature_net, clip, n=1, progress=False, **kwargs)
    return format_evaluation(columns)


def _bench(name: str):
    """bench/<name>.py as a module (its functions measure; its CLI prints the same for other settings)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lesson13_lora(pipe) -> str:
    """Lesson 13: a rank-8 LoRA learns the word "corner" (the preset's recipe, as `train.py --stage lora` trains
    it): its cost, the concept and base-prompt accuracy before and after (bench/lora.py)."""
    return _bench("lora").measure(pipe.run)


def lesson14_ip_adapter(pipe) -> str:
    """Lesson 14: an IP-Adapter (and its CLIP, and a judge CLIP) trained afresh on the frozen model: image-prompt
    fidelity, the lambda sweep of text + image, CLIP-T / CLIP-I (bench/ip_adapter.py)."""
    return _bench("ip_adapter").measure(pipe.run)


def samplers(pipe) -> str:
    """The README's sampler table: DDIM 10 / 25 / 50 (eta 0 and 1) and DDPM 1000, time and accuracy
    (bench/samplers.py)."""
    return _bench("samplers").measure(pipe)


def lesson15_body(run: Path) -> str:
    """Lesson 15: identity retrieval from c_body and the body shape of generated people, on runs/body at
    bench/body.py's defaults (20 unseen people, 8 samples per pose prompt, DDIM 25, guidance 3)."""
    return _bench("body").measure(run)


def diagnostics(pipe) -> str:
    """`python -m minildm.diagnostics --run runs/tiny` (and lesson 16 part 3): the four diagnostics' numbers."""
    import tempfile

    from minildm.diagnostics import format_diagnostics, run_all

    with tempfile.TemporaryDirectory() as tmp:
        return "```\n" + format_diagnostics(run_all(pipe, tmp)).rstrip() + "\n```"


MEASUREMENTS = {f.__name__: f for f in (autoencoder, evaluation, lesson09_attention, lesson11_ddim,
                                         lesson12_guidance, lesson13_lora, lesson14_ip_adapter, lesson15_body,
                                         lesson16_broken, diagnostics, samplers)}


def provenance(name: str, run: Path) -> str:
    """The first line of every results file: the command, the model (its preset and recipe, its training steps)
    and the code it came from. Only a run of today's recipe gets "tiny preset <fingerprint>" (or "body stage
    <fingerprint>"), which the test requires: an older run never passes for today's."""
    from dataclasses import asdict

    from minildm.config import tiny
    from minildm.train.body import body_stage_config

    state = torch.load(run / "ldm.pt", map_location="cpu", weights_only=True)
    first = torch.load(run / "autoencoder.pt", map_location="cpu", weights_only=True)
    preset = state.get("preset", "?")
    words, fingerprint = recipe_of(name)
    cfg = body_stage_config("body") if name in BODY else None
    today = cfg.base if cfg else tiny()  # the text-to-image model the measurement reads
    # what the checkpoints record of their recipe
    todays = (preset == today.name and state.get("unet_config") == asdict(today.unet)
              and state.get("step") == today.ldm.steps and first.get("config") == asdict(today.vq)
              and first.get("step") == today.vq_train.steps)
    if cfg:  # and the body stage's own steps on top of its base model
        adapter = torch.load(run / "body_adapter.pt", map_location="cpu", weights_only=True)
        todays = todays and adapter.get("train_config") == asdict(cfg) and adapter.get("step") == cfg.adapter_steps
    wrong = f"not the recipe of today's {'minildm/train/body.py' if cfg else 'minildm/config.py'}"
    recipe = f"{words} {fingerprint}" if todays else f"preset {preset}, {wrong}"
    return (f"Measured by `python bench/lesson_numbers.py {name}` on `{shown(run)}` ({recipe}, LDM trained "
            f"{state.get('step', '?')} steps; code at commit {commit()}).")


def measure(names: list[str], run: Path, body_run: Path) -> None:
    from minildm.pipeline import LatentDiffusion

    torch.set_grad_enabled(False)
    if set(names) - BODY:
        pipe = LatentDiffusion.load(run)
        pipe.label, pipe.run = "runs/tiny", run
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"measuring {name}")
        torch.manual_seed(0)
        if name in BODY:
            text = provenance(name, body_run) + "\n\n" + MEASUREMENTS[name](body_run) + "\n"
        else:
            text = provenance(name, run) + "\n\n" + MEASUREMENTS[name](pipe) + "\n"
        (RESULTS / f"{name}.md").write_text(text)
        print(text)


def readme_files() -> list[Path]:
    """Every markdown file that may quote numbers."""
    return [p for p in ROOT.glob("**/*.md") if "results" not in p.parts and ".cache" not in p.parts]


def fill_readmes() -> list[Path]:
    """Replace every number block's contents with its results file; returns the files changed."""
    changed = []
    for path in readme_files():
        text = path.read_text()
        def filled(m):
            result = RESULTS / f"{m[1]}.md"
            if not result.is_file():
                print(f"{path.relative_to(ROOT)}: no {result.relative_to(ROOT)} yet (measure {m[1]}); "
                      "block left as it is")
                return m[0]
            return f"<!-- numbers: {m[1]} -->\n{result.read_text()}<!-- /numbers -->"

        new = BLOCK.sub(filled, text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main() -> int:
    p = argparse.ArgumentParser(description="Measure the numbers the READMEs quote (see the module docstring).")
    p.add_argument("names", nargs="*", help=f"which measurements (default all): {', '.join(MEASUREMENTS)}")
    p.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    p.add_argument("--body-run", default=str(ROOT / "runs" / "body"), help="(lesson15_body) the body stage's run")
    p.add_argument("--readmes", action="store_true", help="only copy bench/results/numbers/*.md into the READMEs")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in MEASUREMENTS]
    if unknown:
        p.error(f"unknown measurement {', '.join(unknown)}: choose from {', '.join(MEASUREMENTS)}.")
    if not args.readmes:
        names = args.names or list(MEASUREMENTS)
        # not resolve(): a symlinked runs/ still reads "runs/tiny"
        run, body_run = Path(os.path.abspath(args.run)), Path(os.path.abspath(args.body_run))
        needed = ([(run / "ldm.pt", "python train.py")] if set(names) - BODY else []) + (
            [(body_run / "body_adapter.pt", "python train.py --stage body")] if set(names) & BODY else [])
        for path, command in needed:
            if not path.is_file():
                print(f"error: no trained model in {path.parent}: run `{command}` first.", file=sys.stderr)
                return 2
        measure(names, run, body_run)
    for path in fill_readmes():
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
