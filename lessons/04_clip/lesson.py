"""Lesson 04: CLIP, a joint space for images and captions.

    python lessons/04_clip/lesson.py            (about two minutes on a CPU)
    python lessons/04_clip/lesson.py --quick    (seconds; a barely trained CLIP)

Trains the small CLIP of minildm/clip.py on the shapes, then draws what it learned: the similarity matrix of
twelve images against their twelve captions, and zero-shot picks (each image's most similar captions among
all 90). Figures go to lessons/04_clip/out/.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lessons.common import QUICK, exercise_functions, out_dir, save_figure  # noqa: E402
from minildm import clip as clip_lib  # noqa: E402
from minildm.data import shapes  # noqa: E402
from minildm.train.clip import evaluate_clip, train_clip  # noqa: E402
from minildm.progress import step_rng  # noqa: E402

OUT = out_dir(__file__)
clip_loss = exercise_functions(__file__)["clip_loss"]  # yours once filled in, the library's until then
torch.manual_seed(0)

# --- 1. The loss at chance level -------------------------------------------------------------------------
BATCH = 32 if QUICK else 64
images, captions = clip_lib.distinct_batch(BATCH, step_rng(0, 0, stream=2))
tokenizer = clip_lib.shapes_tokenizer()
untrained = clip_lib.CLIP(clip_lib.CLIPConfig(), tokenizer.vocab_size).eval()
with torch.no_grad():
    loss0 = clip_loss(*untrained(images, tokenizer.encode(captions)))
print(f"untrained CLIP, a batch of {BATCH} distinct pairs: loss {loss0.item():.3f}  (chance: log B = {math.log(BATCH):.3f})")

# --- 2. Train ----------------------------------------------------------------------------------------------
steps = 30 if QUICK else 300
print(f"training the CLIP for {steps} steps (batches of {BATCH} distinct combinations, the symmetric loss) ...")
model, tokenizer, log = train_clip(steps=steps, batch_size=BATCH, progress=not QUICK)
with torch.no_grad():
    image_emb, text_emb, s = model(images, tokenizer.encode(captions))
    print(f"trained: loss {clip_loss(image_emb, text_emb, s).item():.3f} on the same batch; "
          f"learned 1/temperature exp(s) = {s.exp().item():.1f} (it started at 1/0.07 = 14.3, clamped at 100)")
steps_, losses = zip(*log.history["loss"])
fig = plt.figure(figsize=(5, 3))
plt.plot(steps_, losses, label="clip_loss")
plt.axhline(math.log(BATCH), color="gray", ls="--", label=f"chance log {BATCH}")
plt.xlabel("step")
plt.ylabel("loss")
plt.legend()
plt.tight_layout()
save_figure(fig, OUT / "loss.png")

# --- 3. The similarity matrix: 12 images x their 12 captions ----------------------------------------------
rng = np.random.default_rng(4)
combos = [shapes.ALL_COMBOS[i] for i in rng.choice(len(shapes.ALL_COMBOS), 12, replace=False)]
picture = torch.stack([torch.from_numpy(shapes.render(*c, rng=rng)).permute(2, 0, 1) for c in combos]).float() / 127.5 - 1
names = [shapes.caption(*c) for c in combos]
with torch.no_grad():
    I = F.normalize(model.encode_image(picture), dim=-1)  # [12, D] unit image embeddings
    T = F.normalize(model.encode_text(tokenizer.encode(names)), dim=-1)  # [12, D] unit caption embeddings
similarity = (I @ T.T).numpy()  # cos(image_i, caption_j): CLIP training makes the diagonal stand out
fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(9, 8), sharey=True, gridspec_kw={"width_ratios": [1, 12]})
column = torch.cat(list((picture + 1) / 2), dim=1)  # the 12 images stacked vertically: [3, 12 * 32, 32]
ax_img.imshow(column.permute(1, 2, 0).numpy(), extent=(0, 1, 11.5, -0.5))
ax_img.set_axis_off()
ax.imshow(similarity, cmap="viridis")
ax.set_xticks(range(12), [n.removeprefix("a ") for n in names], rotation=60, ha="right", fontsize=7)
for i in range(12):
    for j in range(12):
        ax.text(j, i, f"{similarity[i, j]:.2f}", ha="center", va="center", fontsize=6,
                color="black" if similarity[i, j] > similarity.mean() else "white")
ax.set_title("cosine similarity: images (rows) x captions (columns)")
fig.tight_layout()
save_figure(fig, OUT / "similarity.png")
hits = (similarity.argmax(axis=1) == np.arange(12)).sum()
print(f"similarity matrix: {hits}/12 images are closest to their own caption among these 12 -> out/similarity.png")

# --- 4. Zero-shot picks among all 90 captions -------------------------------------------------------------
all_captions = [shapes.caption(*c) for c in shapes.ALL_COMBOS]
with torch.no_grad():
    T_all = F.normalize(model.encode_text(tokenizer.encode(all_captions)), dim=-1)  # [90, D]
    probs = torch.softmax(s.exp() * I @ T_all.T, dim=-1)  # p(caption | image): the softmax of the logits
fig, axes = plt.subplots(2, 4, figsize=(12, 5.5))
for ax, i in zip(axes.flat, range(8)):
    top = probs[i].topk(3)
    ax.imshow(((picture[i] + 1) / 2).permute(1, 2, 0).numpy())
    ax.set_axis_off()
    lines = [f"{'*' if all_captions[j] == names[i] else ' '} {p:.2f} {all_captions[j].removeprefix('a ')}"
             for p, j in zip(top.values.tolist(), top.indices.tolist())]
    ax.set_title("\n".join(lines), fontsize=7, family="monospace", loc="left")
fig.suptitle("zero-shot picks: the 3 most likely of 90 captions (* = the true one)")
fig.tight_layout()
save_figure(fig, OUT / "zero_shot.png")
accuracy = evaluate_clip(model, tokenizer, rounds=1 if QUICK else 2)
print(f"zero-shot accuracy on fresh images, all 90 captions as classes: {accuracy:.3f} (chance {1 / 90:.3f}) "
      "-> out/zero_shot.png")

# which attribute does CLIP confuse? compare the picked caption with the truth, attribute by attribute
picked = [shapes.ALL_COMBOS[j] for j in probs.argmax(dim=-1).tolist()]
for k, attribute in enumerate(("colour", "shape", "position")):
    agree = np.mean([p[k] == c[k] for p, c in zip(picked, combos)])
    print(f"  {attribute:<8} right in {agree:.2f} of the 12 picks")
