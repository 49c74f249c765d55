"""IP-Adapter: decoupled cross-attention identities, install/remove, gradients, adapter files."""
import copy
import math

import pytest
import torch
from einops import rearrange

from minildm.adapters.ip_adapter import (
    DecoupledCrossAttention,
    ImageProjection,
    IPAdapterConfig,
    decoupled_cross_attention,
    drop_conditions,
    install_ip_adapter,
    ip_adapter_parameters,
    ip_adapter_state_dict,
    load_ip_adapter,
    new_ip_adapter,
    remove_ip_adapter,
    set_ip_lambda,
)
from minildm.checkpoint import load_checkpoint, save_checkpoint
from minildm.modules.attention import KERNELS, Attention
from minildm.modules.attention_maps import AttentionMaps, cross_attention_layers
from minildm.modules.unet import UNet, UNetConfig

CTX = 16  # context width of the tiny UNet


def tiny_unet(context_dim: int = CTX, dim_head: int = 8) -> UNet:
    """A tiny UNet whose weights are all random (no zero-initialised layers), so every branch matters."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), heads=2, dim_head=dim_head, context_dim=context_dim, norm_groups=8))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" UNet: zero-inits are gone
    return unet.eval()


def inputs(batch: int = 2, text_len: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([3, 500])[:batch]
    text = torch.randn(batch, text_len, CTX, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, 3:] = False  # the first prompt has two padding tokens
    tokens = torch.randn(batch, 4, CTX, generator=g)
    return x, t, text, mask, tokens


def randomise_adapter(unet: UNet) -> None:
    """Move W'_k, W'_v away from their copies of W_k, W_v (as training would)."""
    with torch.no_grad():
        for layer in unet.modules():
            if isinstance(layer, DecoupledCrossAttention):
                for p in layer.streams.parameters():
                    p.add_(0.2 * torch.randn_like(p))


def reference_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt d) V written with torch.softmax; mask [B, M] True = attend."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_pure_function_matches_the_formula_and_ignores_the_text_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 8, generator=g)
    k, v = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    k_ip, v_ip = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    z = decoupled_cross_attention(q, k, v, k_ip, v_ip, 0.6, mask)
    # the image branch has 4 tokens and no mask; the text mask [B, 5] applies to the text keys only
    expected = reference_attention(q, k, v, mask) + 0.6 * reference_attention(q, k_ip, v_ip)
    assert torch.allclose(z, expected, atol=1e-6)
    # changing the text mask changes the text term only
    z_other = decoupled_cross_attention(q, k, v, k_ip, v_ip, 0.6, None)
    assert torch.allclose(z - z_other, reference_attention(q, k, v, mask) - reference_attention(q, k, v), atol=1e-6)


def test_two_extra_streams_add_two_terms():
    """BoLID's three-stream attention: A(Q,K_t,V_t) + lambda_ref A(Q,K_ref,V_ref) + lambda_b A(Q,K_b,V_b)."""
    torch.manual_seed(0)
    base = Attention(12, CTX, heads=2, dim_head=8)
    layer = DecoupledCrossAttention(base, {"ip": 4, "body": 3})
    with torch.no_grad():
        for p in layer.streams.parameters():
            p.add_(0.3 * torch.randn_like(p))
    layer.lambdas.update(ip=0.5, body=2.0)
    x, text, ref, body = torch.randn(2, 6, 12), torch.randn(2, 5, CTX), torch.randn(2, 4, CTX), torch.randn(2, 3, CTX)
    z = layer.attend_streams(x, torch.cat([text, ref, body], dim=1))

    def heads(t):
        return rearrange(t, "b m (h d) -> b h m d", h=2)

    def term(to_k, to_v, tokens):
        return reference_attention(heads(base.to_q(x)), heads(to_k(tokens)), heads(to_v(tokens)))

    s = layer.streams
    expected = (term(base.to_k, base.to_v, text) + 0.5 * term(s["to_k_ip"], s["to_v_ip"], ref)
                + 2.0 * term(s["to_k_body"], s["to_v_body"], body))
    assert torch.allclose(z, rearrange(expected, "b h n d -> b n (h d)"), atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_copied_weights_and_text_as_image_tokens_give_one_plus_lambda(kernel):
    torch.manual_seed(0)
    base = Attention(12, CTX, heads=2, dim_head=8, kernel=kernel)
    layer = DecoupledCrossAttention(base, {"ip": 5})  # W'_k = W_k, W'_v = W_v at initialisation
    assert torch.equal(layer.streams["to_k_ip"].weight, base.to_k.weight)
    assert torch.equal(layer.streams["to_v_ip"].weight, base.to_v.weight)
    layer.lambdas["ip"] = 0.7
    x, text = torch.randn(2, 9, 12), torch.randn(2, 5, CTX)
    z = layer.attend_streams(x, torch.cat([text, text], dim=1))  # image tokens = text tokens, no mask
    z_text = base.attend(base.to_q(x), base.to_k(text), base.to_v(text))
    assert torch.allclose(z, 1.7 * z_text, atol=1e-6)  # (1 + lambda) * text-only, before to_out
    # the sum goes through to_out once: W_O (1 + lambda) z + b_O, not (1 + lambda) (W_O z + b_O)
    assert torch.allclose(layer(x, torch.cat([text, text], dim=1)), base.to_out(1.7 * z_text), atol=1e-6)


def test_lambda_zero_is_the_text_only_unet_exactly():
    unet = tiny_unet()
    x, t, text, mask, tokens = inputs()
    with torch.no_grad():
        text_only = unet(x, t, text, mask)
        install_ip_adapter(unet)
        randomise_adapter(unet)
        set_ip_lambda(unet, 0.0)
        assert torch.equal(unet(x, t, torch.cat([text, tokens], dim=1), mask), text_only)
        set_ip_lambda(unet, 1.0)
        assert not torch.allclose(unet(x, t, torch.cat([text, tokens], dim=1), mask), text_only, atol=1e-4)


def test_zero_tokens_remove_the_term_per_sample():
    """A missing reference image (all-zero tokens) zeroes its term: no bias, so K' = V' = 0."""
    unet = tiny_unet()
    x, t, text, mask, tokens = inputs()
    tokens[1] = 0.0
    with torch.no_grad():
        text_only = unet(x, t, text, mask)
        install_ip_adapter(unet)
        randomise_adapter(unet)
        out = unet(x, t, torch.cat([text, tokens], dim=1), mask)
    assert torch.allclose(out[1], text_only[1], atol=1e-6)
    assert not torch.allclose(out[0], text_only[0], atol=1e-4)


def test_context_and_mask_mistakes_are_refused():
    unet = tiny_unet()
    x, t, text, mask, tokens = inputs()
    install_ip_adapter(unet)
    with pytest.raises(ValueError, match="text mask only"):
        unet(x, t, text, mask)  # forgot the image tokens: the mask no longer fits the text part
    with pytest.raises(ValueError, match="torch.cat"):
        unet(x, t, text[:, :3], None)  # not even room for the 4 image tokens
    with pytest.raises(ValueError, match="already has IP-Adapter"):
        install_ip_adapter(unet)


def test_only_adapter_parameters_receive_gradients():
    unet = tiny_unet()
    x, t, text, mask, _ = inputs()
    names = install_ip_adapter(unet)
    assert len(names) == 4 and all(name.endswith("attn2") for name in names)  # 2 down/up levels x ... + middle
    projection = ImageProjection(8, CTX, num_tokens=4)
    image_emb = torch.randn(2, 8)
    loss = unet(x, t, torch.cat([text, projection(image_emb)], dim=1), mask).square().mean()
    loss.backward()
    trainable = {id(p) for p in ip_adapter_parameters(unet, projection)}
    assert len(trainable) == 2 * len(names) + 4  # W'_k, W'_v per layer + Linear (w, b) + LayerNorm (w, b)
    for name, p in unet.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for p in projection.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_install_remove_round_trip():
    unet = tiny_unet()
    x, t, text, mask, tokens = inputs()
    originals = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
    with torch.no_grad():
        before = unet(x, t, text, mask)
        install_ip_adapter(unet)
        randomise_adapter(unet)
        assert not torch.allclose(unet(x, t, torch.cat([text, tokens], dim=1), mask), before, atol=1e-4)
        remove_ip_adapter(unet)
        assert torch.equal(unet(x, t, text, mask), before)
    assert [m.attn2 for m in unet.modules() if hasattr(m, "attn2")] == originals  # the very same layers


def test_attention_maps_still_record_the_text_probabilities():
    """AttentionMaps hooks the modules named attn2: an adapter layer hands the hook to its text term only."""
    unet = tiny_unet()
    x, t, text, mask, tokens = inputs()
    install_ip_adapter(unet)
    randomise_adapter(unet)
    with torch.no_grad():
        plain = unet(x, t, torch.cat([text, tokens], dim=1), mask)
        with AttentionMaps(unet) as maps:
            assert torch.equal(unet(x, t, torch.cat([text, tokens], dim=1), mask), plain)
    assert [name for name, _ in maps.records] == [name for name, _ in cross_attention_layers(unet)]  # one each
    probs = maps.records[0][1]  # [B, H, N, M_text]: text maps, image tokens excluded
    assert probs.shape[0] == 2 and probs.shape[-1] == text.shape[1]
    assert torch.allclose(probs.sum(-1), torch.ones(()))
    assert torch.all(probs[0, ..., 3:] == 0)  # padded text tokens get no weight


def test_adapter_state_round_trips_through_a_file_and_mismatches_are_refused(tmp_path):
    base = tiny_unet()
    x, t, text, mask, _ = inputs()
    trained = copy.deepcopy(base)
    install_ip_adapter(trained)
    randomise_adapter(trained)
    projection = ImageProjection(8, CTX)
    with torch.no_grad():
        projection.norm.bias.normal_()
    image_emb = torch.randn(2, 8)
    path = save_checkpoint(tmp_path / "ip.pt", "ip-adapter", ip_adapter_state_dict(trained, projection))
    state = load_checkpoint(path, "ip-adapter")
    layer_names = install_ip_adapter(copy.deepcopy(base))
    assert set(state["weights"]) == {f"{n}.{p}_ip" for n in layer_names for p in ("to_k", "to_v")}

    fresh = copy.deepcopy(base)
    fresh_projection = new_ip_adapter(fresh, IPAdapterConfig(d_img=8, context_dim=CTX))
    load_ip_adapter(fresh, fresh_projection, state)
    with torch.no_grad():
        want = trained(x, t, torch.cat([text, projection(image_emb)], dim=1), mask)
        got = fresh(x, t, torch.cat([text, fresh_projection(image_emb)], dim=1), mask)
    assert torch.equal(got, want)

    with pytest.raises(ValueError, match="projection has"):
        load_ip_adapter(fresh, ImageProjection(8, CTX, num_tokens=2), state)
    other = tiny_unet(dim_head=4)  # same layers, narrower attention: W'_k has another shape
    install_ip_adapter(other)
    before = [p.clone() for p in ip_adapter_parameters(other, fresh_projection)]
    with pytest.raises(ValueError, match="another UNet"):
        load_ip_adapter(other, ImageProjection(8, CTX), state)
    assert all(torch.equal(a, b) for a, b in zip(before, ip_adapter_parameters(other, fresh_projection)))
    with pytest.raises(ValueError, match="no IP-Adapter layers"):
        load_ip_adapter(tiny_unet(), ImageProjection(8, CTX), state)
    with pytest.raises(ValueError, match="context_dim"):
        new_ip_adapter(tiny_unet(), IPAdapterConfig(d_img=8, context_dim=CTX + 1))


def test_image_projection_shapes_and_layernorm():
    projection = ImageProjection(8, CTX, num_tokens=4)
    tokens = projection(torch.randn(3, 8))
    assert tokens.shape == (3, 4, CTX)
    assert torch.allclose(tokens.mean(-1), torch.zeros(3, 4), atol=1e-5)  # LayerNorm at init: mean 0 per token
    with pytest.raises(ValueError, match="clip.encode_image"):
        projection(torch.randn(3, 7))


def test_drop_conditions_frequencies():
    g = torch.Generator().manual_seed(0)
    drop_text, drop_image = drop_conditions(40_000, 0.05, generator=g)
    text_only, image_only, both = drop_text & ~drop_image, drop_image & ~drop_text, drop_text & drop_image
    for case in (text_only, image_only, both):
        assert abs(case.float().mean().item() - 0.05) < 0.005
    none_text, none_image = drop_conditions(100, 0.0, generator=g)
    assert not none_text.any() and not none_image.any()
    with pytest.raises(ValueError, match="drop_prob"):
        drop_conditions(4, 0.5)
