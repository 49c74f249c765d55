"""The KL autoencoder of LDM / SD: posterior, KL closed form, shapes, CompVis layout, a few training steps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minildm.autoencoder.kl import AutoencoderKL, DiagonalGaussian, KLConfig

SMALL = KLConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=4)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g)
    q = DiagonalGaussian(moments)
    normal = torch.distributions.Normal(q.mean, q.std)
    ref = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), ref, atol=1e-5)
    assert torch.allclose(DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl(), torch.zeros(2))  # N(0, I) has KL 0


def test_sample_is_reparameterised_and_mode_is_the_mean():
    moments = torch.cat([torch.full((2, 4, 8, 8), 3.0), torch.full((2, 4, 8, 8), 2 * torch.log(torch.tensor(0.5)))], 1)
    q = DiagonalGaussian(moments)
    z = q.sample(torch.Generator().manual_seed(0))
    assert torch.equal(q.mode(), q.mean)
    assert abs(z.mean().item() - 3.0) < 0.1 and abs(z.std().item() - 0.5) < 0.05  # mean 3, sigma 0.5


def test_sd_v1_size_and_original_names():
    with torch.device("meta"):
        model = AutoencoderKL(KLConfig.sd_v1())
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # SD v1's kl-f8 autoencoder
    names = set(model.state_dict())
    for name in ("encoder.down.0.block.0.norm1.weight", "encoder.down.2.downsample.conv.weight",
                 "encoder.mid.attn_1.q.weight", "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.conv2.bias",
                 "encoder.down.1.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.weight"):
        assert name in names, name


def test_shapes_and_asymmetric_downsampling():
    model = AutoencoderKL(SMALL).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    q = model.encode(x)
    assert q.mean.shape == (2, 4, 8, 12) and model.decode(q.mode()).shape == x.shape
    down = model.encoder.down[0].downsample
    y = torch.randn(1, 32, 6, 6)
    assert torch.allclose(down(y), F.conv2d(F.pad(y, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))


def test_a_few_steps_lower_the_reconstruction_loss():
    torch.manual_seed(0)
    model = AutoencoderKL(SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    losses = []
    for _ in range(30):
        x_rec, kl, _ = model(x)
        loss = (x_rec - x).abs().mean() + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]  # measured 0.35 from 0.56
    scale = model.compute_scale_factor([x])
    assert abs(scale - 1 / model.encode(x).sample().std().item()) / scale < 0.1 and model.scale_factor == scale
