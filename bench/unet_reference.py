"""Our UNet's training step against diffusers' `UNet2DConditionModel` built with the same configuration.

    python bench/unet_reference.py            # writes bench/results/unet_reference.md
    python bench/unet_reference.py --threads 2 --rounds 12 --batch 64

diffusers is an optional reference (pip install -e ".[parity]"); without it the script says so and stops.
Both models are built from the tiny preset's UNet configuration (the script checks the parameter counts are
equal), and one forward + backward of the v-prediction loss at batch 64 on 8x8x4 latents with a 12-token
context is timed for each, the models *interleaved* round by round in one process so that whatever else the
machine is doing lands on all alike. Reported: the best and the median of the rounds, and ours / reference
on the best (on a shared machine the best round is the one least disturbed), per attention kernel of ours
in the default (NCHW) memory format and with `UNetConfig(channels_last=True)` (oneDNN's preferred layout for
convolutions on a CPU), the layout and kernel the tiny preset trains with. Then torch.profiler's table of
where the preset's step spends its time (the top operators), and GroupNorm alone in each layout on each of the
UNet's feature-map shapes (the operator channels_last slows down).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from minildm.config import tiny
from minildm.modules.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from machine import commit, machine  # noqa: E402  (bench/machine.py)


def reference_unet(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel with our config's layout (SD's block types, conv proj_in/out)."""
    from diffusers import UNet2DConditionModel

    levels = range(len(cfg.channel_mult))
    down = tuple("CrossAttnDownBlock2D" if lvl in cfg.attention_levels else "DownBlock2D" for lvl in levels)
    up = tuple("CrossAttnUpBlock2D" if lvl in cfg.attention_levels else "UpBlock2D" for lvl in reversed(levels))
    return UNet2DConditionModel(
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_attention else None,
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.heads, norm_num_groups=cfg.norm_groups, transformer_layers_per_block=1,
        flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
    )


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_step(model, x, t, context, v, ours: bool):
    """One training step's compute: forward, the v-prediction MSE, backward (gradients zeroed first)."""
    def step():
        model.zero_grad(set_to_none=True)
        out = model(x, t, context) if ours else model(x, t, encoder_hidden_states=context).sample
        torch.nn.functional.mse_loss(out, v).backward()
    return step


CATEGORIES = (  # (label, substrings of aten operator names), first match wins
    ("convolutions (forward + backward)", ("convolution",)),
    ("attention kernel", ("scaled_dot_product", "softmax", "_attention")),
    ("linear layers and other matmuls", ("::mm", "addmm", "bmm", "matmul", "linear")),
    ("GroupNorm / LayerNorm", ("group_norm", "layer_norm")),
    ("activations (SiLU, GELU of GEGLU)", ("silu", "gelu")),
    ("copies and layout changes (cat, copy_, contiguous)", ("copy_", "cat", "clone", "contiguous", "_to_copy")),
    ("element-wise arithmetic (add, mul)", ("::add", "::mul", "::sub", "::div")),
)


def time_by_category(prof) -> list[tuple[str, float]]:
    """Self CPU time of the profiled steps summed per kind of operator: [(label, seconds)], largest first."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        label = next((lbl for lbl, keys in CATEGORIES if any(k in event.key for k in keys)), "everything else")
        totals[label] = totals.get(label, 0.0) + event.self_cpu_time_total / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])


def group_norm_by_layout(groups: int, rounds: int = 30) -> list[str]:
    """Table rows: GroupNorm forward + backward at batch 64 on each feature-map shape of the tiny UNet, in NCHW
    and in channels_last (median of `rounds`). The one operator the preset's layout makes slower."""
    rows = []
    for channels, side in ((32, 8), (64, 8), (96, 8), (64, 4), (128, 4), (64, 2), (128, 2)):
        norm = torch.nn.GroupNorm(groups, channels)
        times = {}
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(64, channels, side, side).contiguous(memory_format=layout).requires_grad_()
            grad = torch.randn_like(x)
            ts = []
            for _ in range(rounds + 2):  # 2 warm-up rounds
                t0 = time.perf_counter()
                norm(x).backward(grad)
                ts.append(time.perf_counter() - t0)
                x.grad = None
            times[layout] = statistics.median(ts[2:])
        nchw, cl = times[torch.contiguous_format], times[torch.channels_last]
        rows.append(f"| {channels} x {side} x {side} | {nchw * 1e6:.0f} us | {cl * 1e6:.0f} us | {cl / nchw:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=5)
    args = ap.parse_args()
    try:
        import diffusers
    except ImportError:
        raise SystemExit("bench/unet_reference.py needs diffusers (pip install -e '.[parity]').") from None
    torch.set_num_threads(args.threads)
    preset_cfg = tiny().unet  # what `python train.py` trains
    cfg = replace(preset_cfg, kernel="naive", channels_last=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, 8, 8, generator=g)
    v = torch.randn(args.batch, cfg.in_channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    context = torch.randn(args.batch, 12, cfg.context_dim, generator=g)

    torch.manual_seed(0)
    ref = reference_unet(cfg).train()
    kernels = ("naive", "sdpa", "chunked")
    ours = {k: UNet(replace(cfg, kernel=k)).train() for k in kernels}
    counts = {k: n_params(m) for k, m in ours.items()}
    channels_last = UNet(replace(cfg, kernel="sdpa", channels_last=True)).train()
    assert len(set(counts.values())) == 1 and counts["naive"] == n_params(ref), (counts, n_params(ref))

    steps = {"diffusers": make_step(ref, x, t, context, v, ours=False)}
    steps.update({f"ours ({k})": make_step(m, x, t, context, v, ours=True) for k, m in ours.items()})
    cl_name = "ours (sdpa, channels_last)" + (" = the tiny preset" if (preset_cfg.kernel, preset_cfg.channels_last)
                                              == ("sdpa", True) else "")
    steps[cl_name] = make_step(channels_last, x, t, context, v, ours=True)  # the UNet converts x itself
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up: allocator, oneDNN kernel selection
        step(), step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}

    from torch.profiler import ProfilerActivity, profile
    profiles = {}
    for name in ("diffusers", cl_name):
        with profile(activities=[ProfilerActivity.CPU]) as profiles[name]:
            for _ in range(args.profile_steps):
                steps[name]()
    table = profiles[cl_name].key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    group_norm = group_norm_by_layout(cfg.norm_groups)
    categories = time_by_category(profiles[cl_name])
    total = sum(sec for _, sec in categories)
    reference = dict(time_by_category(profiles["diffusers"]))
    per_step = args.profile_steps / 1000  # seconds over the profiled steps -> ms per step

    rows = [f"| {name} | {best[name] * 1000:.0f} ms | {med[name] * 1000:.0f} ms | {best[name] / best['diffusers']:.2f} |"
            for name in steps]
    text = "\n".join([
        "# Our UNet against diffusers' UNet2DConditionModel, same configuration",
        "",
        f"`python bench/unet_reference.py --threads {args.threads} --rounds {args.rounds} --batch {args.batch}` "
        f"at commit {commit()}; {machine()}; diffusers {diffusers.__version__}.",
        "",
        f"Tiny preset UNet ({counts['naive']:,} parameters in both), forward + backward of an MSE loss, batch "
        f"{args.batch}, 8x8x4 latents, 12 context tokens of width {cfg.context_dim}; the models take turns "
        f"every round ({args.rounds} rounds after 2 warm-up steps each).",
        "",
        "| model | best step | median step | best / diffusers' best |",
        "|---|---|---|---|",
        *rows,
        "",
        f"## Where our step spends its time (sdpa kernel, channels_last, {args.profile_steps} steps, torch.profiler, "
        "self CPU time)",
        "",
        "| kind of operator | share of the step | ms per step | diffusers' ms per step (profiled the same way) |",
        "|---|---|---|---|",
        *[f"| {label} | {sec / total:.0%} | {sec / per_step:.1f} | {reference.get(label, 0.0) / per_step:.1f} |"
          for label, sec in categories],
        "",
        "```",
        table,
        "```",
        "",
        f"## GroupNorm by memory format (forward + backward, batch 64, {cfg.norm_groups} groups, median of 30)",
        "",
        "channels_last makes the convolutions faster and GroupNorm slower where a group spans few channels of a "
        "large map: PyTorch's channels_last GroupNorm kernel on the CPU.",
        "",
        "| channels x side x side | NCHW | channels_last | channels_last / NCHW |",
        "|---|---|---|---|",
        *group_norm,
    ])
    out = ROOT / "bench" / "results" / "unet_reference.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
