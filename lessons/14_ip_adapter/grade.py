"""Grade lesson 14:  python lessons/14_ip_adapter/grade.py  (add -v for details).

The reference is the library's DecoupledCrossAttention (minildm/adapters/ip_adapter.py) built around the
same weights; each check puts your function where one of the common mistakes shows.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `lessons` and `minildm`

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.adapters.ip_adapter import DecoupledCrossAttention  # noqa: E402
from minildm.modules.attention import Attention  # noqa: E402

C, CC, HEADS, DIM_HEAD = 12, 10, 2, 4  # query width, context width, heads, channels per head


def reference(x, text, text_mask, image_tokens, w, heads, ip_lambda):
    """The library's decoupled layer with the weights of `w` (same signature as the exercise)."""
    base = Attention(x.shape[-1], text.shape[-1], heads, w["to_q"].out_features // heads)
    layer = DecoupledCrossAttention(base, {"ip": image_tokens.shape[1]})
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v", "to_out"):
            getattr(base, name).load_state_dict(w[name].state_dict())
        layer.streams["to_k_ip"].weight.copy_(w["to_k_ip"].weight)
        layer.streams["to_v_ip"].weight.copy_(w["to_v_ip"].weight)
    layer.lambdas["ip"] = ip_lambda
    with torch.no_grad():
        return layer(x, torch.cat([text, image_tokens], dim=1), text_mask)


REFERENCE = {"decoupled_cross_attention": reference}  # the library's solution


def weights(seed=0):
    """Random projections; to_out has a non-zero bias (it shows where the sum goes through to_out)."""
    torch.manual_seed(seed)
    inner = HEADS * DIM_HEAD
    w = {"to_q": nn.Linear(C, inner, bias=False), "to_k": nn.Linear(CC, inner, bias=False),
         "to_v": nn.Linear(CC, inner, bias=False), "to_k_ip": nn.Linear(CC, inner, bias=False),
         "to_v_ip": nn.Linear(CC, inner, bias=False), "to_out": nn.Linear(inner, C)}
    with torch.no_grad():
        w["to_out"].bias.uniform_(0.5, 1.0)
    return w


def inputs(m=5, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, C, generator=g)
    text = torch.randn(2, m, CC, generator=g)
    image = torch.randn(2, n, CC, generator=g)
    mask = torch.ones(2, m, dtype=torch.bool)
    mask[0, m - 2:] = False  # the first prompt ends in two padding tokens
    return x, text, mask, image


def close(got, want, atol=1e-5):
    assert torch.is_tensor(got) and got.shape == want.shape, f"expected shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}"
    assert torch.allclose(got, want, atol=atol), f"largest difference {(got - want).abs().max().item():.3g}"


def run(fn, x, text, mask, image, w, ip_lambda):
    with torch.no_grad():
        return fn(x, text, mask, image, w, HEADS, ip_lambda)


def check_matches_the_layer(fn):
    w = weights()
    x, text, mask, image = inputs()
    for ip_lambda in (0.7, 1.5):
        close(run(fn, x, text, mask, image, w, ip_lambda), reference(x, text, mask, image, w, HEADS, ip_lambda))
    close(run(fn, x, text, None, image, w, 1.0), reference(x, text, None, image, w, HEADS, 1.0))


def check_lambda_zero_is_text_only(fn):
    w = weights(seed=2)
    x, text, mask, image = inputs(seed=3)
    base = Attention(C, CC, HEADS, DIM_HEAD)
    for name in ("to_q", "to_k", "to_v", "to_out"):
        setattr(base, name, w[name])
    with torch.no_grad():
        close(run(fn, x, text, mask, image, w, 0.0), base(x, text, mask), atol=1e-6)


def check_one_plus_lambda(fn):
    """W'_k = W_k, W'_v = W_v and image tokens = text tokens: Z = (1 + lambda) Z_text, then ONE to_out."""
    w = weights(seed=4)
    w["to_k_ip"], w["to_v_ip"] = w["to_k"], w["to_v"]
    x, text, _, _ = inputs(seed=5)
    base = Attention(C, CC, HEADS, DIM_HEAD)
    for name in ("to_q", "to_k", "to_v", "to_out"):
        setattr(base, name, w[name])
    with torch.no_grad():
        z_text = base.attend(base.to_q(x), base.to_k(text), base.to_v(text))  # before to_out
        close(run(fn, x, text, None, text, w, 0.5), w["to_out"](1.5 * z_text))


def check_text_mask_only_on_text(fn):
    """As many text as image tokens, text padded: the image branch still attends to all its tokens."""
    w = weights(seed=6)
    x, text, mask, image = inputs(m=4, n=4, seed=7)
    close(run(fn, x, text, mask, image, w, 1.0), reference(x, text, mask, image, w, HEADS, 1.0))


def check_image_branch_reads_image_tokens(fn):
    """K' = image_tokens W'_k and V' = image_tokens W'_v (same number of text and image tokens, so shapes fit)."""
    w = weights(seed=8)
    x, text, _, image = inputs(m=4, n=4, seed=9)
    for ip_lambda in (1.0, 2.0):
        close(run(fn, x, text, None, image, w, ip_lambda), reference(x, text, None, image, w, HEADS, ip_lambda))


def check_two_softmaxes(fn):
    """Text keys that match every query strongly must not crowd out the image term (decoupled, not concatenated)."""
    w = weights(seed=10)
    x, text, _, image = inputs(seed=11)
    with torch.no_grad():
        w["to_k"].weight.mul_(8.0)  # sharp text attention
    close(run(fn, x, text, None, image, w, 1.0), reference(x, text, None, image, w, HEADS, 1.0), atol=1e-4)


CHECKS = [
    Check("decoupled_cross_attention", check_matches_the_layer,
          "compare with eq. 5: two attention terms with the same queries and heads, added, then the output projection"),
    Check("decoupled_cross_attention", check_lambda_zero_is_text_only,
          "lambda weighs the image term only: at lambda = 0 the layer must be the original text cross-attention"),
    Check("decoupled_cross_attention", check_one_plus_lambda,
          "the two terms are summed BEFORE to_out (one output projection, one bias), not after"),
    Check("decoupled_cross_attention", check_text_mask_only_on_text,
          "the padding mask belongs to the text keys; every image token is real, so the image branch has no mask"),
    Check("decoupled_cross_attention", check_image_branch_reads_image_tokens,
          "the image branch's keys and values are the image tokens through the adapter's own projections"),
    Check("decoupled_cross_attention", check_two_softmaxes,
          "decoupled means two separate softmaxes, one over the text keys and one over the image keys"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
