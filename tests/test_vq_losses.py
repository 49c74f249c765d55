"""VQGAN losses: hinge reference values, the adaptive weight as a ratio of gradient norms, the frozen seeded
perceptual metric (and loading a VGG16 state dict), the PatchGAN shape, and the disc_start switch."""
import pytest
import torch

from minildm.autoencoder.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    VQGANLoss,
    VQGANLossConfig,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)


def test_hinge_losses_reference_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # real: max(0, 1 - r) = 0, 0.5, 2 -> mean 2.5/3 ; fake: max(0, 1 + f) = 0, 1, 2.5 -> mean 3.5/3
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.0)
    assert hinge_g_loss(fake).item() == pytest.approx(0.5 / 3)
    # a confident, correct discriminator has zero loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight_is_ratio_of_gradient_norms_at_last_layer():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    rec = (w * torch.tensor([3.0, 0.0, 4.0])).sum()  # grad = (3, 0, 4), norm 5
    gan = (w**2).sum() * 0.5 * 0.2  # grad = 0.2 w = (0.2, 0.4, 0.6), norm 0.2 sqrt(14)
    lam = adaptive_weight(rec, gan, w)
    assert lam.item() == pytest.approx(5.0 / (0.2 * 14**0.5 + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    # a vanishing GAN gradient is clamped to max_weight
    flat = (w * 0.0).sum()
    assert adaptive_weight(rec, flat, w, max_weight=1e4).item() == pytest.approx(1e4)
    assert w.grad is None  # computing the weight does not touch .grad


def test_perceptual_loss_zero_for_identical_positive_otherwise():
    torch.manual_seed(0)
    perc = PerceptualLoss(width=0.125)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert perc(x, x).item() == pytest.approx(0.0, abs=1e-7)
    d = perc(x, y)
    assert d.item() > 1e-3
    assert perc(y, x).item() == pytest.approx(d.item(), rel=1e-5)  # symmetric
    assert perc(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)) < d  # closer images, smaller distance


def test_perceptual_loss_is_frozen_seeded_and_passes_gradients_to_images():
    perc_a, perc_b = PerceptualLoss(width=0.125, seed=0), PerceptualLoss(width=0.125, seed=0)
    perc_c = PerceptualLoss(width=0.125, seed=1)
    assert sum(p.numel() for p in perc_a.parameters() if p.requires_grad) == 0
    for (name, a), (_, b) in zip(perc_a.state_dict().items(), perc_b.state_dict().items()):
        assert torch.equal(a, b), name  # same seed -> same network, whatever the global RNG did
    assert not torch.equal(perc_a.features[0].weight, perc_c.features[0].weight)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    y = torch.zeros(1, 3, 16, 16, requires_grad=True)
    perc_a(x, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_perceptual_loss_loads_a_torchvision_format_vgg16_state_dict(tmp_path):
    source = PerceptualLoss(width=1.0, seed=3)  # the real VGG16 layer sizes
    state = {f"features.{k}": v for k, v in source.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files also hold the classifier: ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    loaded = PerceptualLoss(vgg16_path=str(path))
    assert torch.equal(loaded.features[28].weight, source.features[28].weight)
    conv_indices = [i for i, m in enumerate(loaded.features) if isinstance(m, torch.nn.Conv2d)]
    assert conv_indices == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's vgg16().features
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError):
        PerceptualLoss(vgg16_path=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError):
        PerceptualLoss(width=0.5, vgg16_path=str(path))


def test_patch_discriminator_outputs_a_logit_map():
    disc = PatchDiscriminator(3, channels=8, num_layers=2)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # 32 / 2^2 - 2
    disc3 = PatchDiscriminator(3, channels=8, num_layers=3)
    assert disc3(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # 64 / 2^3 - 2
    assert all(p.requires_grad for p in disc.parameters())


def make_loss(disc_start: int) -> VQGANLoss:
    torch.manual_seed(0)
    cfg = VQGANLossConfig(l1_weight=1.0, perceptual_weight=0.5, perceptual_width=0.125, codebook_weight=2.0,
                          disc_weight=0.7, disc_start=disc_start, disc_channels=8, disc_layers=2)
    return VQGANLoss(cfg)


def test_generator_loss_before_and_after_disc_start():
    loss_fn = make_loss(disc_start=100)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    last_layer = torch.randn(3, 8, 3, 3, requires_grad=True)  # stands in for the decoder's last conv
    features = torch.randn(2, 8, 16, 16)
    x_rec = torch.tanh(torch.nn.functional.conv2d(features, last_layer, padding=1))
    vq_loss = torch.tensor(0.3)
    rec = (x - x_rec).abs().mean() + 0.5 * loss_fn.perceptual(x, x_rec)

    loss, logs = loss_fn.generator_loss(x, x_rec, vq_loss, step=99, last_layer=last_layer)
    assert loss.item() == pytest.approx((rec + 2.0 * 0.3).item(), rel=1e-6)
    assert "gan" not in logs and not loss_fn.disc_active(99)

    loss, logs = loss_fn.generator_loss(x, x_rec, vq_loss, step=100, last_layer=last_layer)
    gan = hinge_g_loss(loss_fn.discriminator(x_rec))
    d_weight = 0.7 * adaptive_weight(rec, gan, last_layer)
    assert loss.item() == pytest.approx((rec + 2.0 * 0.3 + d_weight * gan).item(), rel=1e-5)
    assert logs["d_weight"] == pytest.approx(d_weight.item(), rel=1e-5)
    assert all(isinstance(v, float) for v in logs.values())


def test_discriminator_loss_is_off_before_start_and_detached_from_the_generator():
    loss_fn = make_loss(disc_start=10)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec = torch.zeros(2, 3, 32, 32, requires_grad=True)
    loss, _ = loss_fn.discriminator_loss(x, x_rec, step=9)
    assert loss.item() == 0.0
    loss, logs = loss_fn.discriminator_loss(x, x_rec, step=10)
    expected = hinge_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(x_rec))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert x_rec.grad is None  # the discriminator step never moves the autoencoder
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_discriminator_training_separates_real_from_fake():
    loss_fn = make_loss(disc_start=0)
    torch.manual_seed(2)
    real = torch.zeros(8, 3, 16, 16)
    real[:, :, 4:12, 4:12] = 1.0  # bright squares
    fake = (real + 0.5 * torch.randn_like(real)).clamp(-1, 1)  # noisy copies
    opt = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        loss, logs = loss_fn.discriminator_loss(real, fake, step=0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert logs["logits_real"] > logs["logits_fake"]


def test_tiny_preset_keeps_the_gan_off_and_f8_preset_turns_it_on():
    assert not VQGANLoss(VQGANLossConfig.tiny()).disc_active(10**6)
    big = VQGANLossConfig.f8_8192()
    assert big.disc_weight > 0 and big.perceptual_width == 1.0
