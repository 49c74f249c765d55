"""How far apart, in the latents the LDM learns, are two prompts that differ in one word?

    python bench/attribute_gaps.py                  # on runs/tiny's autoencoder -> bench/results/attribute_gaps.md
    python bench/attribute_gaps.py --runs DIR ...   # one row per run's autoencoder

Every one of the 90 colour x shape x position combinations is rendered once without jitter and encoded as the
LDM's latent cache encodes its training set: z = scale_factor * E(x) (train/ldm.py, std ~ 1). For each attribute,
over every pair of combinations that differ in that attribute alone, the table gives the mean squared
difference per element, in the latents and in the pixels (x in [-1, 1]):

    gap(a, b) = mean over elements of (z_a - z_b)^2

Why it matters to training: a model that has not learnt a word draws the average of the pictures the word
would pick between. At high noise (where v-prediction's target is ~ -x0) that costs
mean((z_a + z_b) / 2 - z_a)^2 = gap / 4 per element, which is all the loss gains by learning the word. The
smaller the gap, the weaker the gradient that teaches it, and the later a run learns it.
The gaps belong to an autoencoder, not to the data alone: the same recipe on another seed can shrink or widen
them (the rows of bench/results/attribute_gaps.md), so a first stage can be checked before an LDM is trained on it.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import commit, cpu_name, shown  # noqa: E402  (bench/machine.py)


def encode_all(run: Path) -> tuple[dict, dict]:
    """({combo: z [c, h, w]}, {combo: x [3, H, W]}) of the 90 unjittered combinations through run's autoencoder."""
    from minildm.data import shapes
    from minildm.pipeline import load_autoencoder
    from minildm.train.ldm import encode_latent_cache

    autoencoder = load_autoencoder(run, torch.device("cpu"))
    combos = shapes.ALL_COMBOS
    x = shapes.render_combos(combos, rng=None)  # [90, 3, H, W] in [-1, 1], no jitter
    z = encode_latent_cache(autoencoder, x, show_progress=False)
    return dict(zip(combos, z)), dict(zip(combos, x))


def gaps(values: dict, attribute: int, a: str | None = None, b: str | None = None) -> float:
    """Mean over pairs of combinations differing only in `attribute` (0 colour, 1 shape, 2 position) of the
    per-element mean squared difference; a, b: only the pairs with those two values of the attribute."""
    out = []
    for u, v in itertools.combinations(values, 2):
        others_equal = all(u[i] == v[i] for i in range(3) if i != attribute)
        if others_equal and u[attribute] != v[attribute] and (a is None or {u[attribute], v[attribute]} == {a, b}):
            out.append((values[u] - values[v]).pow(2).mean().item())
    return sum(out) / len(out)


PAIRS = (("circle / square", 1, "circle", "square"), ("circle / triangle", 1, "circle", "triangle"),
         ("square / triangle", 1, "square", "triangle"), ("colour (any two)", 0, None, None),
         ("position (any two)", 2, None, None))


def measure(runs: list[Path]) -> str:
    """One row per run's autoencoder (and one for the pixels themselves): the mean gap of each kind of pair."""
    header = ["| latents of | " + " | ".join(label for label, *_ in PAIRS) + " | mean square |",
              "|---|" + "---|" * (len(PAIRS) + 1)]
    rows = []
    for i, run in enumerate(runs):
        z, x = encode_all(run)
        if i == 0:  # the renders do not depend on the autoencoder
            rows.append("| (the pixels themselves, x in [-1, 1]) | "
                        + " | ".join(f"{gaps(x, *pair[1:]):.3f}" for pair in PAIRS)
                        + f" | {torch.stack(list(x.values())).pow(2).mean().item():.2f} |")
        rows.append(f"| {shown(run)} | " + " | ".join(f"{gaps(z, *pair[1:]):.3f}" for pair in PAIRS)
                    + f" | {torch.stack(list(z.values())).pow(2).mean().item():.2f} |")
    return "\n".join(header + rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=[str(ROOT / "runs" / "tiny")],
                   help="run directories with an autoencoder.pt (one row each)")
    args = p.parse_args()
    runs = [Path(run).absolute() for run in args.runs]
    for run in runs:
        if not (run / "autoencoder.pt").is_file():
            raise SystemExit(f"error: {shown(run)}/autoencoder.pt is missing: train it with "
                             f"`python train.py --stage autoencoder --out {shown(run)}`.")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    text = "\n".join([
        "# Latent gaps between prompts that differ in one word",
        "",
        f"`python bench/attribute_gaps.py --runs {' '.join(str(shown(run)) for run in runs)}` at commit {commit()}; "
        f"{cpu_name()}, torch "
        f"{torch.__version__}. The 90 combinations rendered without jitter, encoded as the LDM's latent cache; "
        "the mean over all pairs of combinations that differ in the one attribute (module docstring).",
        "",
        measure(runs),
    ])
    out = ROOT / "bench" / "results" / "attribute_gaps.md"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
