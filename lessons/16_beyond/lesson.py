"""Lesson 16: beyond the lecture. How good is a text-to-image model (FID, IS, CLIP-T, prompt accuracy), what a
training run's diagnostics say, and why a decoder-only LLM is an awkward prompt encoder.

    python lessons/16_beyond/lesson.py            (a few minutes on a CPU; longer the first time, when the
                                                   feature net and the CLIP are trained and cached)
    python lessons/16_beyond/lesson.py --quick    (under a minute: micro model, short-trained judges)

1. FID by hand with YOUR frechet_distance (exercises.py; the library's until you fill it in): the finite-N
   floor, noise, mode dropping, and a model that ignores its prompts.
2. The evaluation table of the trained model (lessons.common.trained_run()) next to two deliberately
   broken samplers (the prompt ignored: s = 0; too few steps: 2 DDIM steps) and real shapes.
3. The diagnostics of minildm/diagnostics.py on the trained model.
4. Positional bias: the same prompt encoder with a causal (decoder-only) mask.
Figures go to lessons/16_beyond/out/.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lessons.common import QUICK, exercise_functions, out_dir, save_figure, trained_run  # noqa: E402
from minildm import diagnostics, evaluate, metrics  # noqa: E402
from minildm.clip import load_clip  # noqa: E402
from minildm.train.clip import train_clip  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.data.describe import prompt_accuracy  # noqa: E402
from minildm.feature_net import FeatureNetConfig, embed, train_feature_net  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.viz import save_grid  # noqa: E402

torch.set_num_threads(1)
OUT = out_dir(__file__)
START = time.time()
frechet_distance = exercise_functions(__file__)["frechet_distance"]  # yours once filled in, the library's until then

# --- 0. The model and the two judges ----------------------------------------------------------------------
RUN = trained_run()
pipe = LatentDiffusion.load(RUN)
if QUICK and not (RUN.parent / "feature_net.pt").is_file():
    print("quick mode: a short-trained feature net and CLIP (not cached; the full ones take a minute each)")
    feature_net, _ = train_feature_net(steps=100, batch_size=48, lr=5e-3, progress=False,
                                       cfg=FeatureNetConfig(widths=(8, 16, 16), feature_dim=32))
    clip = load_clip(RUN / "clip.pt") if (RUN / "clip.pt").is_file() else train_clip(20, 32, progress=False)[:2]
else:
    feature_net, clip = evaluate.load_judges(RUN, progress=not QUICK)
print(f"model: {RUN}; feature net: {feature_net.cfg.feature_dim} features, {feature_net.cfg.num_classes} classes")


# --- 1. FID by hand ---------------------------------------------------------------------------------------
def fid(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """FID-shapes with your frechet_distance: features -> Gaussian fit -> Frechet distance. Images in [0, 1]."""
    mu_a, sigma_a = metrics.feature_statistics(embed(feature_net, images_a * 2 - 1)[0])
    mu_b, sigma_b = metrics.feature_statistics(embed(feature_net, images_b * 2 - 1)[0])
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def is_score(images: torch.Tensor) -> float:
    return metrics.inception_score(embed(feature_net, images * 2 - 1)[1])[0]


ALL = shapes.SEEN + shapes.HELD_OUT
n_demo = 2 if QUICK else 4
real_a = evaluate.real_shapes(ALL, n_demo, stream=0)  # [90 n, 3, 32, 32] in [0, 1]
real_b = evaluate.real_shapes(ALL, n_demo, stream=1)
noise = torch.randn(real_a.shape, generator=torch.Generator().manual_seed(0))
half = evaluate.real_shapes(ALL[:45], 2 * n_demo, stream=1)  # only half the combinations, as many images
wrong = evaluate.real_shapes(ALL[45:] + ALL[:45], n_demo, stream=1)  # perfect shapes, every prompt answered wrongly
prompts = [shapes.caption(*c) for c in ALL for _ in range(n_demo)]
half_prompts = [shapes.caption(*c) for c in ALL[:45] for _ in range(2 * n_demo)]
rows = [("a second real set (the floor)", real_b, prompts),
        ("real + noise, std 0.05", (real_b + 0.05 * noise).clamp(0, 1), prompts),
        ("real + noise, std 0.2", (real_b + 0.2 * noise).clamp(0, 1), prompts),
        ("half the combinations (mode dropping)", half, half_prompts),
        ("every prompt answered wrongly", wrong, prompts)]
print(f"\n1. FID-shapes and IS-shapes against {len(real_a)} fresh real shapes (your frechet_distance)")
print(f"   {'image set':<40}{'FID-shapes':>11}{'IS-shapes':>11}{'prompt acc.':>13}")
for name, images, asked in rows:
    print(f"   {name:<40}{fid(real_a, images):>11.2f}{is_score(images):>11.1f}{prompt_accuracy(images, asked):>13.3f}")
library = metrics.fid_from_features(embed(feature_net, real_a * 2 - 1)[0], embed(feature_net, real_b * 2 - 1)[0])
print(f"   (the library's frechet_distance on the first row: {library:.2f})")
print("   Each number is blind to something. FID and IS never read the prompts: the last row draws perfect shapes\n"
      "   for the wrong prompts and scores like real data. Prompt accuracy never sees diversity: dropping half the\n"
      "   combinations keeps it at 1 while FID and IS notice. Hence one table with all of them.")

sizes = (1, 2, 4) if QUICK else (1, 2, 4, 8)
floors = [fid(evaluate.real_shapes(ALL, k, stream=0), evaluate.real_shapes(ALL, k, stream=1)) for k in sizes]
counts = [90 * k for k in sizes]
fig, ax = plt.subplots(figsize=(5, 3.4))
ax.loglog(counts, floors, "o-", label="real vs real")
ax.loglog(counts, [floors[0] * counts[0] / c for c in counts], "k--", lw=1, label="~ 1 / N")
ax.set(xlabel="images per set N", ylabel="FID-shapes", title="FID's floor: two real sets are not at 0")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, OUT / "fid_floor.png")
print("   real vs real at N = " + ", ".join(f"{c}: {f:.2f}" for c, f in zip(counts, floors))
      + "  -> out/fid_floor.png (compare FIDs only at the same N)")

# --- 2. The evaluation table: trained vs broken -----------------------------------------------------------
steps = 20 if QUICK else 50
configs = {f"s = 3, DDIM {steps}": dict(steps=steps, guidance_scale=3.0),  # healthy
           f"broken: s = 0, DDIM {steps}": dict(steps=steps, guidance_scale=0.0),  # the unconditional model: no prompt
           "broken: s = 3, DDIM 2": dict(steps=2, guidance_scale=3.0)}  # far too few steps
print(f"\n2. The evaluation table of {RUN.name} (1 sample per prompt, 90 images per column; "
      "python -m minildm.evaluate --n 4 for the full benchmark)")
columns = {"real shapes": evaluate.real_reference(feature_net, clip, n=1)}
grid = []
for name, kwargs in configs.items():
    columns[name] = evaluate.evaluation_report(pipe, feature_net, clip, n=1, progress=False, **kwargs)
    grid.append(pipe.generate([shapes.caption(*c) for c in ALL[::9]], seed=0, **kwargs))
print(evaluate.format_evaluation(columns))
save_grid(torch.cat([(evaluate.real_shapes(ALL[::9], 1)), *grid]), OUT / "samples.png", nrow=10, upscale=2)
print("   -> out/samples.png (rows: real, " + ", ".join(configs) + "; every 9th combination)")

# --- 3. Diagnostics ---------------------------------------------------------------------------------------
print("\n3. Diagnostics (minildm/diagnostics.py; python -m minildm.diagnostics --run RUN does the same)")
images, captions = diagnostics.fresh_shapes(64 if QUICK else 256)
results = {
    "latent_stats": diagnostics.latent_stats(pipe.autoencoder, images, OUT / "latent_stats.png"),
    "loss_by_timestep": diagnostics.loss_by_timestep(pipe, images, captions, out=OUT / "loss_by_timestep.png"),
    "x0_predictions": diagnostics.x0_predictions(pipe, images[:3], captions[:3], out=OUT / "x0_predictions.png"),
    "guidance_sweep": diagnostics.guidance_sweep(pipe, scales=(0, 1, 3, 8) if QUICK else diagnostics.SWEEP_SCALES,
                                                 steps=10 if QUICK else 25, out=OUT / "guidance_sweep.png"),
}
print(diagnostics.format_diagnostics(results))
print("   -> out/latent_stats.png, loss_by_timestep.png, x0_predictions.png, guidance_sweep.png (README: how to read them)")


# --- 4. Positional bias of a decoder-only (causal) prompt encoder -----------------------------------------
@torch.no_grad()
def encode(tokens: torch.Tensor, causal: bool) -> torch.Tensor:
    """The trained prompt encoder's forward pass, with a causal mask if asked: token i then sees tokens <= i only,
    as in a decoder-only LLM. tokens [B, L] -> features [B, L, d]."""
    encoder = pipe.text_encoder
    L = tokens.shape[1]
    mask = (tokens != 0)[:, None, None, :]  # [B, 1, 1, L] key padding
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool).tril()  # [B, 1, L, L]: query i, keys j <= i
    x = encoder.token_emb(tokens) + encoder.pos_emb[:L]
    for block in encoder.blocks:
        x = block(x, mask)
    return encoder.norm(x)


print("\n4. Positional bias: change one word; how much does each token feature change? ||h_i(1) - h_i(2)|| / ||h_i(1)||")
for first, second in (("a red circle on the left", "a red circle on the right"),
                      ("a red circle on the left", "a blue circle on the left")):
    tokens = pipe.tokenizer.encode([first, second])
    words = ["<s>"] + first.split()
    print(f"   '{first}' vs '{second}'")
    print("     token          " + "".join(f"{w:>8}" for w in words))
    for causal in (False, True):
        h = encode(tokens, causal)[:, :len(words)]
        change = (h[0] - h[1]).norm(dim=-1) / h[0].norm(dim=-1)
        print(f"     {'causal (LLM)' if causal else 'bidirectional':<15}" + "".join(f"{v:8.2f}" for v in change.tolist()))
print("   With the causal mask, every token before the changed word is identical for both prompts: 'red' cannot know\n"
      "   whether a circle or a square follows, and only the last tokens have read the whole prompt (Ma et al. 2024, LI-DiT).")
print(f"\ndone in {time.time() - START:.0f} s; figures in {OUT}")
