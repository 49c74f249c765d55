"""BoLID body adapter: Gaussian keypoint weights (eqs. 11-13), image weighting, the body VAE, the keypoint regressor."""
import math

import numpy as np
import pytest
import torch

from minildm.adapters.body_vae import (BodyVAE, BodyVAEConfig, gaussian_keypoint_weights, keypoint_gaussians,
                                       keypoints_to_pixels, keypoints_to_unit, kl_divergence, reparameterize,
                                       weight_image)
from minildm.adapters.keypoint_regressor import KeypointRegressor, peak_soft_argmax
from minildm.data.bodies import MEAN_SHAPE, SHAPE_RANGES, identity, shape_vector
from minildm.data.body_render import BodiesDataset, render_identities
from minildm.train.body_models import train_keypoint_regressor


def weights_reference(keypoints, visible, height, width, sigma):
    """Slow per-pixel loop written straight from eqs. 11-13 (the 'no visible keypoint -> ones' guard too)."""
    out = torch.zeros(keypoints.shape[0], height, width, dtype=torch.float64)
    for b in range(keypoints.shape[0]):
        for y in range(height):
            for x in range(width):
                best = 0.0
                for i in range(keypoints.shape[1]):
                    if visible[b, i]:
                        xi, yi = keypoints[b, i].tolist()
                        best = max(best, math.exp(-((x - xi) ** 2 + (y - yi) ** 2) / (2 * sigma ** 2)))
                out[b, y, x] = best
        peak = out[b].max()
        out[b] = out[b] / peak if peak > 0 else torch.ones(height, width)
    return out


def test_weights_peak_at_one_and_equal_exp_minus_half_at_sigma():
    sigma = 2.5
    kp = torch.tensor([[10.0, 7.0]], dtype=torch.float64)
    w = gaussian_keypoint_weights(kp, torch.tensor([True]), 20, 24, sigma)
    assert w.shape == (20, 24)
    assert w[7, 10].item() == pytest.approx(1.0, abs=1e-12)
    assert w.max().item() == pytest.approx(1.0, abs=1e-12)
    kp_off = torch.tensor([[10.0, 7.0 + sigma]], dtype=torch.float64)  # so pixel (10, 7) is sigma away
    w_off = gaussian_keypoint_weights(torch.cat([kp_off, torch.tensor([[3.0, 15.0]], dtype=torch.float64)]),
                                      torch.tensor([True, True]), 20, 24, sigma)
    assert w_off[7, 10].item() == pytest.approx(math.exp(-0.5), rel=1e-9)
    # eq. 13: a keypoint between pixels (peak < 1 before normalising) still gives max W_norm = 1
    w_half = gaussian_keypoint_weights(torch.tensor([[4.5, 4.5]]), torch.tensor([True]), 10, 10, 1.0)
    assert w_half.max().item() == pytest.approx(1.0) and w_half[4, 4].item() == pytest.approx(1.0)


def test_max_not_sum():
    kp = torch.tensor([[[5.0, 5.0], [6.0, 5.0]]])
    vis = torch.ones(1, 2, dtype=torch.bool)
    w = gaussian_keypoint_weights(kp, vis, 12, 12, 2.0)
    assert w.max().item() == pytest.approx(1.0, abs=1e-6)
    # on each keypoint the max is exactly 1; a sum would give (1 + e^{-1/8}) / (2 e^{-1/32}) ~ 0.97 there
    assert w[0, 5, 5].item() == pytest.approx(1.0, abs=1e-6) and w[0, 5, 6].item() == pytest.approx(1.0, abs=1e-6)
    single = keypoint_gaussians(kp, vis, 12, 12, 2.0)
    assert torch.allclose(w[0], single[0].amax(0) / single[0].amax(0).max())


def test_invisible_keypoints_contribute_nothing():
    kp = torch.tensor([[[5.0, 5.0], [14.0, 3.0]]])
    with_far = gaussian_keypoint_weights(kp, torch.tensor([[True, False]]), 16, 18, 2.0)
    alone = gaussian_keypoint_weights(kp[:, :1], torch.tensor([[True]]), 16, 18, 2.0)
    assert torch.equal(with_far, alone)
    none = gaussian_keypoint_weights(kp, torch.tensor([[False, False]]), 16, 18, 2.0)
    assert torch.equal(none, torch.ones(1, 16, 18))  # documented guard: nothing visible -> keep everything
    with pytest.raises(ValueError):
        gaussian_keypoint_weights(kp, torch.tensor([[1.0, 0.0]]), 16, 18, 2.0)


def test_vectorised_weights_equal_the_per_pixel_loop():
    g = torch.Generator().manual_seed(0)
    B, K, H, W = 3, 17, 9, 11
    kp = torch.rand(B, K, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 4, H + 4]) - 2
    vis = torch.rand(B, K, generator=g) > 0.4
    vis[2] = False  # one image with nothing visible
    fast = gaussian_keypoint_weights(kp, vis, H, W, sigma=1.7)
    slow = weights_reference(kp, vis, H, W, sigma=1.7)
    assert fast.shape == (B, H, W)
    assert torch.allclose(fast, slow, atol=1e-12)
    unbatched = gaussian_keypoint_weights(kp[0], vis[0], H, W, sigma=1.7)
    assert torch.allclose(unbatched, slow[0], atol=1e-12)


def test_weight_image():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    weights = torch.rand(2, 8, 8, generator=g)
    assert torch.equal(weight_image(image, weights, alpha=1.0), image)
    assert torch.allclose(weight_image(image, weights, alpha=0.0), image * weights[:, None])
    half = weight_image(image, weights, alpha=0.5)
    assert torch.allclose(half, image * (0.5 + 0.5 * weights[:, None]))
    with pytest.raises(ValueError):
        weight_image(image, weights, alpha=1.5)


def test_unit_coordinates_round_trip():
    kp = torch.tensor([[0.0, 0.0], [31.0, 15.0], [10.0, 4.0]])
    unit = keypoints_to_unit(kp, 16, 32)
    assert torch.allclose(unit[:2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert torch.allclose(keypoints_to_pixels(unit, 16, 32), kp)


def test_reparameterize_moments():
    torch.manual_seed(0)
    mu = torch.tensor([1.5, -2.0, 0.0])
    logvar = torch.tensor([math.log(0.25), math.log(4.0), 0.0])
    z = reparameterize(mu.expand(200_000, 3), logvar.expand(200_000, 3))
    assert torch.allclose(z.mean(0), mu, atol=0.02)
    assert torch.allclose(z.var(0), logvar.exp(), rtol=0.03)


def test_kl_closed_form():
    assert kl_divergence(torch.zeros(4, 6), torch.zeros(4, 6)).abs().max().item() == 0.0
    g = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(kl_divergence(mu, logvar), expected, atol=1e-5)
    assert torch.isfinite(kl_divergence(torch.zeros(1, 2), torch.full((1, 2), 500.0))).all()  # logvar clamp


def tiny_vae():
    torch.manual_seed(0)
    return BodyVAE(BodyVAEConfig(image_size=32, channels=(8, 16), feature_dim=32, latent_dim=8, keypoint_sigma=2.0))


def view_sets(num_identities, views, seed=0):
    data = BodiesDataset(num_identities, 1, size=32, seed=seed)
    rng = np.random.default_rng(seed)
    sets = [data.sample_views(i, views, rng) for i in range(num_identities)]
    return tuple(torch.stack([s[k] for s in sets]) for k in ("image", "keypoints", "visible", "pose_keypoints"))


def test_vae_any_number_of_views_and_order_invariant():
    vae = tiny_vae().eval()
    images, kp, vis, pose = view_sets(2, 5)
    mu5, logvar5 = vae.encode(images, kp, vis)
    assert mu5.shape == (2, 8) and logvar5.shape == (2, 8)
    mu1, _ = vae.encode(images[:, :1], kp[:, :1], vis[:, :1])
    assert mu1.shape == (2, 8) and not torch.allclose(mu1, mu5)
    same = torch.tensor([0, 0, 0])  # mean pooling: three copies of one view encode like the view alone
    mu3, _ = vae.encode(images[:, same], kp[:, same], vis[:, same])
    assert torch.allclose(mu3, mu1, atol=1e-5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    mu_p, logvar_p = vae.encode(images[:, perm], kp[:, perm], vis[:, perm])
    assert torch.allclose(mu_p, mu5, atol=1e-5) and torch.allclose(logvar_p, logvar5, atol=1e-5)
    # a masked view counts as absent
    mask = torch.tensor([[True, True, False, True, True]] * 2)
    keep = torch.tensor([0, 1, 3, 4])
    mu_m, _ = vae.encode(images, kp, vis, view_mask=mask)
    mu_k, _ = vae.encode(images[:, keep], kp[:, keep], vis[:, keep])
    assert torch.allclose(mu_m, mu_k, atol=1e-5)
    assert vae.decode(mu5, pose[:, 0]).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError):
        vae.encode(images, kp, vis, view_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_vae_training_lowers_the_loss():
    vae = tiny_vae()
    images, kp, vis, pose = view_sets(3, 2)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, logs = vae.loss(images, kp, vis, pose)
        assert set(logs) == {"loss", "recon", "kl"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_shape_vector_spans_minus_one_to_one():
    assert np.allclose(shape_vector(MEAN_SHAPE), 0, atol=1e-6)
    vectors = np.stack([shape_vector(identity(i)) for i in range(50)])
    assert vectors.shape == (50, len(SHAPE_RANGES)) and np.all(np.abs(vectors) <= 1)
    assert np.all(vectors.min(0) < -0.5) and np.all(vectors.max(0) > 0.5)  # each measurement uses its range


def test_vae_shape_head_is_a_loss_term_on_mu():
    cfg = BodyVAEConfig(image_size=32, channels=(8, 16), feature_dim=16, latent_dim=8, keypoint_sigma=2.0,
                        shape_weight=3.0)
    vae = BodyVAE(cfg)
    images, kp, vis, pose = view_sets(3, 2)
    shape = torch.randn(3, cfg.num_shape)
    torch.manual_seed(0)
    total, logs = vae.loss(images, kp, vis, pose, shape=shape)
    mu, _ = vae.encode(images, kp, vis)
    expected = ((vae.to_shape(mu) - shape) ** 2).sum(-1).mean()  # ||W mu + b - shape||^2, batch mean
    assert math.isclose(logs["shape"], expected.item(), rel_tol=1e-5)
    assert math.isclose(logs["loss"], logs["recon"] + cfg.beta_kl * logs["kl"] + 3.0 * logs["shape"], rel_tol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        vae.loss(images, kp, vis, pose)  # the head is on but no measurements given
    assert tiny_vae().to_shape is None  # shape_weight = 0 (the default): no head, the plain negative ELBO


def test_peak_soft_argmax_ignores_the_tails():
    H = W = 8
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    grid = torch.stack([xs, ys])                                        # pixel (x, y) of every pixel
    p = torch.zeros(1, 1, H, W)
    p[0, 0, 2, 5], p[0, 0, 2, 6] = 0.6, 0.2                             # the peak and its neighbour: x = 5.25
    p[0, 0, 7, 0] = 0.2                                                 # a far tail
    p.requires_grad_(True)
    out = peak_soft_argmax(p, grid)
    assert torch.allclose(out, torch.tensor([[[5.25, 2.0]]]))           # the tail is not pulled in
    whole = torch.einsum("bkhw,chw->bkc", p, grid)                      # the whole-image sum is pulled
    assert whole[0, 0, 0] < 5 and whole[0, 0, 1] > 2
    out.sum().backward()
    assert p.grad[0, 0, 2, 6] != 0 and p.grad[0, 0, 7, 0] == 0         # differentiable inside the window only


def test_keypoint_regressor_learns():
    views = render_identities(BodiesDataset(4, 8, size=32))
    model, log, finished = train_keypoint_regressor(views, steps=12, batch_size=16, lr=5e-3, show_progress=False)
    losses = [v for _, v in log.history["loss"]]
    assert isinstance(model, KeypointRegressor) and not model.training and finished
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    images = BodiesDataset(1, 2, size=32)[0]["image"][None]
    kp, vis = model.predict(images)
    assert kp.shape == (1, 17, 2) and vis.shape == (1, 17) and vis.dtype == torch.bool
