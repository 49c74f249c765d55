"""VQ-VAE: nearest-code quantisation, straight-through gradients, the two loss terms on the right sides,
codebook statistics, dead-code restarts, EMA updates, shapes for f = 2, 4, 8, and that training learns."""
import numpy as np
import pytest
import torch
from einops import rearrange

from minildm.autoencoder.vqvae import VQConfig, VQVAE, VectorQuantizer, codebook_stats, nearest_code_indices
from minildm.data.shapes import sample_batch


def small_cfg(**overrides) -> VQConfig:
    base = dict(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, z_channels=4, num_codes=32)
    base.update(overrides)
    return VQConfig(**base)


def brute_force_nearest(z_flat, codebook):
    dist = ((z_flat[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # [N, K] by the definition
    return dist.argmin(dim=1)


def test_quantizer_returns_nearest_codebook_vector():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, dim=4).eval()
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(2, 4, 3, 5)
    z_q, _, info = vq(z)
    z_flat = rearrange(z, "b d h w -> (b h w) d")
    expected = brute_force_nearest(z_flat, vq.codebook.detach())
    assert torch.equal(info["indices"].flatten(), expected)
    assert torch.allclose(rearrange(z_q, "b d h w -> (b h w) d"), vq.codebook.detach()[expected])
    assert torch.allclose(vq.lookup(info["indices"]), z_q)


def test_chunked_nearest_equals_unchunked():
    torch.manual_seed(1)
    z_flat, codebook = torch.randn(103, 4), torch.randn(50, 4)
    full = nearest_code_indices(z_flat, codebook, chunk_size=103)
    for chunk in (1, 7, 64):
        assert torch.equal(nearest_code_indices(z_flat, codebook, chunk_size=chunk), full)
    assert torch.equal(full, brute_force_nearest(z_flat, codebook))
    with pytest.raises(ValueError):
        nearest_code_indices(z_flat, codebook, chunk_size=0)


def test_gradient_reaches_encoder_only_through_straight_through_path():
    torch.manual_seed(2)
    model = VQVAE(small_cfg()).eval()
    z_e = torch.randn(2, 4, 8, 8, requires_grad=True)
    z_q, _, _ = model.quantize(z_e)
    z_q.retain_grad()
    model.decoder(z_q).pow(2).sum().backward()  # a downstream loss, without the VQ loss
    assert z_e.grad is not None and z_e.grad.abs().sum() > 0
    assert torch.allclose(z_e.grad, z_q.grad)  # d z_q / d z_e = identity
    assert model.quantizer.codebook.grad is None  # the decoder loss alone never moves the codebook
    # the forward value is the codebook vector, not z_e
    assert torch.allclose(z_q, model.quantizer.lookup(model.quantizer.nearest(z_e)), atol=1e-6)


def test_codebook_and_commitment_terms_sit_on_the_right_sides():
    """loss = ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2: the encoder gets only beta x the commitment
    gradient, the codebook only the (weight-1) codebook gradient. beta on the wrong term fails both checks."""
    torch.manual_seed(3)
    beta = 0.25
    vq = VectorQuantizer(num_codes=8, dim=3, beta=beta).train()
    with torch.no_grad():
        vq.codebook.normal_()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    _, loss, info = vq(z_e)
    loss.backward()
    n = z_e.numel()
    e = vq.codebook.detach()
    z_q = vq.lookup(info["indices"]).detach()
    # commitment term only: d/dz_e beta mean((z_e - z_q)^2) = 2 beta (z_e - z_q) / n
    assert torch.allclose(z_e.grad, 2 * beta * (z_e.detach() - z_q) / n, atol=1e-7)
    # codebook term only: d/de_k mean((e_k - z)^2) = sum over vectors assigned to k of 2 (e_k - z) / n
    z_flat = rearrange(z_e.detach(), "b d h w -> (b h w) d")
    idx = info["indices"].flatten()
    expected = torch.zeros_like(e).index_add_(0, idx, 2 * (e[idx] - z_flat) / n)
    assert torch.allclose(vq.codebook.grad, expected, atol=1e-7)


def test_ema_quantizer_loss_is_commitment_only_and_codebook_has_no_gradient():
    torch.manual_seed(4)
    vq = VectorQuantizer(num_codes=8, dim=3, beta=0.25, use_ema=True).eval()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss, _ = vq(z_e)
    assert not vq.codebook.requires_grad
    assert torch.allclose(loss, 0.25 * ((z_e - z_q.detach()) ** 2).mean())


def test_perplexity_and_usage():
    k = 16
    ppl, usage = codebook_stats(torch.full((k,), 5))
    assert ppl.item() == pytest.approx(k) and usage.item() == 1.0
    ppl, usage = codebook_stats(torch.tensor([0, 7] + [0] * (k - 2)))
    assert ppl.item() == pytest.approx(1.0) and usage.item() == pytest.approx(1 / k)
    ppl, _ = codebook_stats(torch.tensor([1, 1, 2, 0]))  # exp(H) with p = (1/4, 1/4, 1/2)
    assert ppl.item() == pytest.approx(np.exp(-(0.5 * np.log(0.25) + 0.5 * np.log(0.5))))
    # through the quantiser: every code hit exactly once -> perplexity K
    vq = VectorQuantizer(num_codes=k, dim=4).eval()
    with torch.no_grad():
        vq.codebook.normal_()
    z = rearrange(vq.codebook.detach(), "(h w) d -> 1 d h w", h=4)  # each code once, as a 4x4 latent image
    _, _, info = vq(z)
    assert info["perplexity"].item() == pytest.approx(k, rel=1e-5) and info["usage"].item() == 1.0
    _, _, info = vq(z[:, :, :1, :1].expand(1, 4, 4, 4))  # one code everywhere
    assert info["perplexity"].item() == pytest.approx(1.0) and info["usage"].item() == pytest.approx(1 / k)


def test_dead_codes_are_restarted_onto_encoder_outputs_in_training_only():
    torch.manual_seed(5)
    vq = VectorQuantizer(num_codes=8, dim=2, dead_code_threshold=2)
    with torch.no_grad():
        vq.codebook.zero_()
        vq.codebook[1:] = 100.0  # codes 1..7 are far from all data: never used
    z = torch.randn(1, 2, 4, 4) * 0.1
    z_flat = rearrange(z, "b d h w -> (b h w) d")
    vq.eval()
    for _ in range(3):
        vq(z)
    assert torch.all(vq.codebook.detach()[1:] == 100.0)  # eval mode: nothing changes
    vq.train()
    vq(z)
    assert torch.all(vq.codebook.detach()[1:] == 100.0)  # unused for 1 call < threshold 2
    vq(z)
    moved = vq.codebook.detach()[1:]
    dist_to_data = torch.cdist(moved, z_flat).min(dim=1).values
    assert torch.all(dist_to_data < 1e-6)  # every dead code now sits on a current encoder output
    assert torch.equal(vq.codebook.detach()[0], torch.zeros(2))  # the live code is untouched
    assert torch.all(vq.unused_calls == 0)


def test_ema_update_moves_codes_towards_assigned_means():
    torch.manual_seed(6)
    decay = 0.9
    vq = VectorQuantizer(num_codes=2, dim=2, use_ema=True, ema_decay=decay, eps=0.0).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        vq.ema_embed_sum.copy_(vq.codebook)
    points = torch.tensor([[2.0, 1.0], [3.0, 1.0], [-2.0, -1.0]])  # two points for code 1, one for code 0
    z = rearrange(points, "(h w) d -> 1 d h w", h=1)
    vq(z)
    # hand-computed EMA: N = d*1 + (1-d)*n, m = d*e + (1-d)*sum z, e = m / N (eps = 0: no smoothing shift)
    n1, n0 = decay + (1 - decay) * 2, decay + (1 - decay) * 1
    e1 = (decay * torch.tensor([1.0, 0.0]) + (1 - decay) * torch.tensor([5.0, 2.0])) / n1
    e0 = (decay * torch.tensor([-1.0, 0.0]) + (1 - decay) * torch.tensor([-2.0, -1.0])) / n0
    assert torch.allclose(vq.codebook.detach(), torch.stack([e0, e1]), atol=1e-6)
    for _ in range(300):
        vq(z)
    assert torch.allclose(vq.codebook.detach(), torch.tensor([[-2.0, -1.0], [2.5, 1.0]]), atol=1e-3)


def test_kmeans_init_runs_once_in_training_mode():
    torch.manual_seed(7)
    vq = VectorQuantizer(num_codes=16, dim=4, kmeans_iters=5)
    z = torch.randn(4, 4, 8, 8) * 3.0 + 5.0
    vq.eval()
    _, loss_before, _ = vq(z)
    assert not bool(vq.initialized)
    vq.train()
    _, loss_after, _ = vq(z)
    assert bool(vq.initialized)
    assert loss_after < 0.25 * loss_before  # codes moved from ~0 into the data
    codes = vq.codebook.detach().clone()
    vq(z)
    assert torch.equal(vq.codebook.detach(), codes)  # no second initialisation (no EMA, no dead codes)


@pytest.mark.parametrize("mult, f", [((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_encoder_decoder_shapes(mult, f):
    cfg = small_cfg(channel_mult=mult)
    assert cfg.downsample_factor == f
    model = VQVAE(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 32 // f, 32 // f)
    x_rec, vq_loss, info = model(x)
    assert x_rec.shape == x.shape and vq_loss.dim() == 0 and info["indices"].shape == (2, 32 // f, 32 // f)
    assert torch.allclose(model.decode(z), x_rec, atol=1e-6)  # decode snaps z to the codebook
    assert torch.allclose(model.decode_indices(info["indices"]), x_rec, atol=1e-4)  # exact codes vs straight-through
    with pytest.raises(ValueError):
        model.encode(torch.zeros(2, 3, 30, 30) if f > 2 else torch.zeros(2, 3, 31, 31))


def test_config_validation_and_presets():
    with pytest.raises(ValueError):
        VQConfig(channels=10, norm_groups=8)
    tiny, big = VQConfig.tiny(), VQConfig.f8_8192()
    assert (tiny.downsample_factor, tiny.z_channels) == (4, 4) and tiny.num_codes >= 128
    assert (big.downsample_factor, big.z_channels, big.num_codes, big.resolution) == (8, 4, 8192, 256)


def test_scale_factor_is_inverse_std_of_latents():
    torch.manual_seed(8)
    model = VQVAE(small_cfg())
    assert model.scale_factor.item() == 1.0
    batches = [torch.rand(3, 3, 16, 16) * 2 - 1 for _ in range(3)]
    scale = model.compute_scale_factor(batches)
    with torch.no_grad():
        z = torch.cat([model.encode(x) for x in batches])
    assert scale == pytest.approx(1.0 / z.std(unbiased=False).item(), rel=1e-4)
    assert model.scale_factor.item() == pytest.approx(scale)


def test_decode_passes_gradient_to_latents():
    model = VQVAE(small_cfg()).eval()
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    model.decode(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_a_few_training_steps_lower_the_reconstruction_loss():
    torch.manual_seed(9)
    model = VQVAE(small_cfg(use_ema=True, kmeans_iters=5, dead_code_threshold=5))
    x, _ = sample_batch(8, np.random.default_rng(0), size=16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def rec_loss():
        with torch.no_grad():
            return (model(x)[0] - x).abs().mean().item()

    before = rec_loss()
    for _ in range(25):
        x_rec, vq_loss, _ = model(x)
        loss = (x_rec - x).abs().mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert rec_loss() < 0.35 * before  # about 0.15 in practice
