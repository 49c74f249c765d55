"""BoLID body-condition module: three-stream cross-attention on IP-Adapter's layers, and the objective eq. 14."""
import numpy as np
import pytest
import torch

from minildm.adapters.body import (BODY, body_adapter_parameters, body_context, BodyAdapterConfig, BodyProjection,
                                   bolid_loss, clip_text_loss, install_body_adapter, keypoint_id_loss,
                                   new_body_adapter, predicted_x0_image, set_body_lambdas)
from minildm.adapters.body_vae import BodyVAE, BodyVAEConfig, keypoints_to_pixels, keypoints_to_unit, reparameterize
from minildm.adapters.keypoint_regressor import KeypointRegressor
from minildm.adapters.ip_adapter import IP, DecoupledCrossAttention, ImageProjection
from minildm.autoencoder.vqvae import VQVAE, VQConfig
from minildm.clip import CLIP, CLIPConfig
from minildm.data.body_render import BodiesDataset
from minildm.diffusion.schedule import NoiseSchedule
from minildm.modules.unet import UNet, UNetConfig

CTX, N_REF, N_BODY = 16, 4, 3  # context width; reference and body tokens (different, so a swap shows)


def tiny_unet() -> UNet:
    """A tiny UNet with all weights random (no zero-initialised layers), so every branch matters."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), heads=2, dim_head=8, context_dim=CTX, norm_groups=8))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet.eval()


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([3, 500])[:batch]
    text = torch.randn(batch, 5, CTX, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False  # the first prompt has two padding tokens
    ref = torch.randn(batch, N_REF, CTX, generator=g)
    body = torch.randn(batch, N_BODY, CTX, generator=g)
    return x, t, text, mask, ref, body


def installed_unet() -> UNet:
    """A UNet with the body adapter whose W'_k, W'_v have moved away from their copies (as after training)."""
    unet = tiny_unet()
    install_body_adapter(unet, ref_tokens=N_REF, body_tokens=N_BODY)
    with torch.no_grad():
        for layer in unet.modules():
            if isinstance(layer, DecoupledCrossAttention):
                for p in layer.streams.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    return unet


def test_both_lambdas_zero_is_the_text_only_unet_exactly():
    x, t, text, mask, ref, body = inputs()
    unet = tiny_unet()
    with torch.no_grad():
        text_only = unet(x, t, text, mask)
    unet = installed_unet()
    context = body_context(unet, text, body, ref)
    with torch.no_grad():
        set_body_lambdas(unet, ref_lambda=0.0, body_lambda=0.0)
        assert torch.equal(unet(x, t, context, mask), text_only)
        for ref_lambda, body_lambda in ((1.0, 0.0), (0.0, 1.0)):  # each stream on its own changes the output
            set_body_lambdas(unet, ref_lambda, body_lambda)
            assert not torch.allclose(unet(x, t, context, mask), text_only, atol=1e-4)


def test_lambda_b_zero_and_no_reference_is_the_text_only_unet_exactly():
    """Whatever ref_lambda is, no reference image (zero tokens) and body_lambda = 0 give the base UNet bit for bit."""
    x, t, text, mask, _, body = inputs()
    with torch.no_grad():
        text_only = tiny_unet()(x, t, text, mask)
        unet = installed_unet()
        for ref_lambda in (1.0, 2.5):
            set_body_lambdas(unet, ref_lambda=ref_lambda, body_lambda=0.0)
            assert torch.equal(unet(x, t, body_context(unet, text, body, None), mask), text_only)
            absent = torch.tensor([False, False])
            ref = torch.randn(2, N_REF, CTX)
            assert torch.equal(unet(x, t, body_context(unet, text, body, ref, ref_present=absent), mask), text_only)


def test_three_streams_sum_before_to_out():
    """Copied K/V and equal tokens: Z' = (1 + lambda_ref + lambda_b) A(Q, K_t, V_t) before to_out, then ONE to_out."""
    unet = tiny_unet()
    install_body_adapter(unet, ref_tokens=4, body_tokens=4, ref_lambda=0.7, body_lambda=1.9)
    layer = next(m for m in unet.modules() if isinstance(m, DecoupledCrossAttention))
    base = layer.base
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 9, base.to_q.in_features, generator=g), torch.randn(2, 4, CTX, generator=g)
    with torch.no_grad():
        context = body_context(unet, text, text, text)  # c_ref = c_b = c_t, no mask
        z = layer.attend_streams(x, context)
        z_text = base.attend(base.to_q(x), base.to_k(text), base.to_v(text))
        assert torch.allclose(z, 3.6 * z_text, atol=1e-5)
        assert torch.allclose(layer(x, context), base.to_out(3.6 * z_text), atol=1e-5)  # W_O (3.6 z) + b_O
        assert not torch.allclose(layer(x, context), 3.6 * base.to_out(z_text), atol=1e-3)  # not summed after to_out


def test_context_order_is_text_reference_body():
    unet = installed_unet()
    layer = next(m for m in unet.modules() if isinstance(m, DecoupledCrossAttention))
    base, s = layer.base, layer.streams
    _, _, text, mask, ref, body = inputs()
    x = torch.randn(2, 6, base.to_q.in_features)
    set_body_lambdas(unet, ref_lambda=0.5, body_lambda=2.0)
    with torch.no_grad():
        z = layer.attend_streams(x, body_context(unet, text, body, ref), mask)
        q = base.to_q(x)
        expected = (base.attend(q, base.to_k(text), base.to_v(text), mask)
                    + 0.5 * base.attend(q, s[f"to_k_{IP}"](ref), s[f"to_v_{IP}"](ref))
                    + 2.0 * base.attend(q, s[f"to_k_{BODY}"](body), s[f"to_v_{BODY}"](body)))
    assert torch.allclose(z, expected, atol=1e-5)


def test_a_missing_reference_zeroes_its_term():
    unet = installed_unet()
    x, t, text, mask, ref, body = inputs()
    with torch.no_grad():
        set_body_lambdas(unet, ref_lambda=0.0, body_lambda=1.3)
        without_ref_term = unet(x, t, body_context(unet, text, body, ref), mask)
        set_body_lambdas(unet, ref_lambda=1.7, body_lambda=1.3)
        assert torch.equal(unet(x, t, body_context(unet, text, body, None), mask), without_ref_term)
        per_sample = unet(x, t, body_context(unet, text, body, ref, ref_present=torch.tensor([True, False])), mask)
    assert torch.equal(per_sample[1], without_ref_term[1])  # sample 1 has no reference
    assert not torch.allclose(per_sample[0], without_ref_term[0], atol=1e-4)


def test_context_mistakes_are_refused():
    unet = installed_unet()
    _, _, text, _, ref, body = inputs()
    with pytest.raises(ValueError, match="body_tokens"):
        body_context(unet, text, ref, ref)  # 4 tokens where the body stream has 3
    with pytest.raises(ValueError, match="ref_tokens"):
        body_context(unet, text, body, body)
    with pytest.raises(ValueError, match="ref_present"):
        body_context(unet, text, body, ref, ref_present=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="install_body_adapter"):
        body_context(tiny_unet(), text, body)
    with pytest.raises(ValueError, match="context_dim"):
        new_body_adapter(tiny_unet(), BodyAdapterConfig(latent_dim=8, context_dim=CTX + 1))


def test_only_adapter_and_vae_parameters_get_gradients():
    """c_body from the body VAE -> body tokens -> UNet: the UNet stays frozen, the adapter and the VAE learn."""
    unet = tiny_unet()
    projection = new_body_adapter(unet, BodyAdapterConfig(latent_dim=8, context_dim=CTX, ref_tokens=N_REF,
                                                          body_tokens=N_BODY))
    ref_projection = ImageProjection(6, CTX, N_REF)
    torch.manual_seed(0)
    vae = BodyVAE(BodyVAEConfig(image_size=32, channels=(8, 16), feature_dim=32, latent_dim=8, keypoint_sigma=2.0))
    data = BodiesDataset(2, 3, size=32)
    views = [data.sample_views(i, 3, np.random.default_rng(i)) for i in range(2)]
    images, kp, vis = (torch.stack([v[k] for v in views]) for k in ("image", "keypoints", "visible"))
    x, t, text, mask, _, _ = inputs()

    mu, logvar = vae.encode(images, kp, vis)
    body = projection(reparameterize(mu, logvar))  # c_b = LayerNorm(W c_body)
    ref = ref_projection(torch.randn(2, 6))
    unet(x, t, body_context(unet, text, body, ref), mask).square().mean().backward()

    trainable = body_adapter_parameters(unet, projection, ref_projection)
    layers = [m for m in unet.modules() if isinstance(m, DecoupledCrossAttention)]
    assert len({id(p) for p in trainable}) == len(trainable) == 4 * len(layers) + 2 * 4  # W'_k, W'_v x 2 streams + 2 projections
    trainable_ids = {id(p) for p in trainable}
    for name, p in unet.named_parameters():
        if id(p) in trainable_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for p in list(projection.parameters()) + list(ref_projection.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for module in (vae.view_encoder, vae.to_mu, vae.to_logvar):  # the encoder learns through c_body
        assert all(p.grad is not None for p in module.parameters())


def test_body_projection_makes_layer_normed_tokens():
    torch.manual_seed(0)
    projection = BodyProjection(8, CTX, num_tokens=N_BODY)
    tokens = projection(torch.randn(5, 8))
    assert tokens.shape == (5, N_BODY, CTX)
    assert torch.allclose(tokens.mean(-1), torch.zeros(5, N_BODY), atol=1e-5)  # LayerNorm at init (gain 1, bias 0)
    assert torch.allclose(tokens.var(-1, unbiased=False), torch.ones(5, N_BODY), atol=1e-3)
    with pytest.raises(ValueError, match="c_body"):
        projection(torch.randn(5, 9))


# ---------------------------------------------------------------------------------------------------
# The objective, eq. 14
# ---------------------------------------------------------------------------------------------------
def objective_parts():
    torch.manual_seed(3)
    regressor = KeypointRegressor(width=4).eval().requires_grad_(False)
    clip = CLIP(CLIPConfig(widths=(4, 8), d_img=8, text_dim=8, text_depth=1, text_heads=2, embed_dim=6),
                vocab_size=10).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    eps, eps_hat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x0_image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    ref_kp = torch.rand(2, 17, 2, generator=g) * 31
    ref_vis = torch.rand(2, 17, generator=g) > 0.3
    text_emb = torch.randn(2, 6, generator=g)
    return dict(eps_hat=eps_hat, eps=eps, x0_image=x0_image, regressor=regressor, ref_keypoints=ref_kp,
                ref_visible=ref_vis, clip=clip, text_emb=text_emb)


def test_each_objective_term_switches():
    parts = objective_parts()
    l_diff = (parts["eps"] - parts["eps_hat"]).pow(2).mean()
    unit, _ = parts["regressor"](parts["x0_image"])
    ref = keypoints_to_unit(parts["ref_keypoints"], 32, 32)
    l_id = (((unit - ref) ** 2).sum(-1) * parts["ref_visible"]).sum(-1).mean()  # sum_k over visible, mean over B
    l_clip = (1 - torch.cosine_similarity(parts["clip"].encode_image(parts["x0_image"]), parts["text_emb"])).mean()

    total, logs = bolid_loss(parts["eps_hat"], parts["eps"])  # both off: nothing else needed
    assert torch.equal(total, l_diff) and set(logs) == {"diff", "loss"}
    total, logs = bolid_loss(**parts)  # weights default to 0: the extra inputs are ignored
    assert torch.equal(total, l_diff)
    total, logs = bolid_loss(**parts, alpha_id=0.3)
    assert torch.allclose(total, l_diff + 0.3 * l_id) and set(logs) == {"diff", "id", "loss"}
    total, logs = bolid_loss(**parts, beta_clip=2.0)
    assert torch.allclose(total, l_diff + 2.0 * l_clip) and set(logs) == {"diff", "clip", "loss"}
    total, logs = bolid_loss(**parts, alpha_id=0.3, beta_clip=2.0)
    assert torch.allclose(total, l_diff + 0.3 * l_id + 2.0 * l_clip)
    assert logs["id"] == pytest.approx(l_id.item()) and logs["clip"] == pytest.approx(l_clip.item())
    with pytest.raises(ValueError, match="regressor"):
        bolid_loss(parts["eps_hat"], parts["eps"], parts["x0_image"], alpha_id=1.0)
    with pytest.raises(ValueError, match="x0_image"):
        bolid_loss(parts["eps_hat"], parts["eps"], beta_clip=1.0, clip=parts["clip"], text_emb=parts["text_emb"])


def test_l_id_is_zero_for_identical_keypoints_and_counts_visible_keypoints_only():
    p = torch.rand(3, 17, 2)
    vis = torch.rand(3, 17) > 0.5
    assert torch.equal(keypoint_id_loss(p, p.clone(), vis), torch.zeros(3))
    p_ref = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [10.0, 10.0]]])
    l_id = keypoint_id_loss(torch.zeros(1, 3, 2), p_ref, torch.tensor([[True, True, False]]))
    assert l_id.tolist() == [26.0]  # 3^2 + 4^2 + 1^2; the invisible third keypoint counts 0
    parts = objective_parts()  # the regressor's own keypoints as the reference: L_id = 0 through bolid_loss
    own, _ = parts["regressor"](parts["x0_image"])
    parts["ref_keypoints"] = keypoints_to_pixels(own, 32, 32)
    _, logs = bolid_loss(**parts, alpha_id=1.0)
    assert logs["id"] == pytest.approx(0.0, abs=1e-10)


def test_l_clip_is_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    assert torch.allclose(clip_text_loss(a, b), torch.tensor([0.0, 1.0, 2.0]))


def test_predicted_x0_image_decodes_property_3_and_passes_gradients():
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(channels=8, channel_mult=(1, 2), num_codes=16)).eval().requires_grad_(False)
    schedule = NoiseSchedule(1000, "linear")
    g = torch.Generator().manual_seed(5)
    z0, eps = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    z_t = schedule.q_sample(z0, t, eps)
    image = predicted_x0_image(schedule, vq, z_t, t, eps)  # the true noise gives back z0
    assert torch.allclose(image, vq.decode(z0 / vq.scale_factor), atol=1e-4)
    eps_hat = eps.clone().requires_grad_(True)
    parts = objective_parts()
    parts.update(eps_hat=eps_hat, eps=eps, x0_image=predicted_x0_image(schedule, vq, z_t, t, eps_hat))
    bolid_loss(**{k: v for k, v in parts.items() if k not in ("clip", "text_emb")}, alpha_id=1.0)[0].backward()
    l_diff_grad = 2 * (eps_hat - eps).detach() / eps.numel()  # zero here: only L_id pulls on eps_hat
    assert eps_hat.grad is not None and (eps_hat.grad - l_diff_grad).abs().sum() > 0
