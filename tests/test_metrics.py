"""Metrics maths against closed forms: matrix square root, Frechet distance, feature statistics, IS."""
import math

import numpy as np
import pytest
import torch

from minildm.metrics import feature_statistics, fid_from_features, frechet_distance, inception_score, sqrtm_psd

f64 = torch.float64


def random_psd(D: int, rank: int, seed: int) -> torch.Tensor:
    """X X^T with X [D, rank]: PSD, singular when rank < D."""
    X = torch.randn(D, rank, generator=torch.Generator().manual_seed(seed), dtype=f64)
    return X @ X.T


def random_orthogonal(D: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=f64))
    return Q


# ---------------------------------------------------------------- sqrtm_psd


def test_sqrtm_psd_known_values():
    assert torch.allclose(sqrtm_psd(torch.diag(torch.tensor([4.0, 9.0, 0.0]))), torch.diag(torch.tensor([2.0, 3.0, 0.0], dtype=f64)))
    # [[2, 1], [1, 2]] has eigenvalues 3 and 1 along (1, 1) and (1, -1)
    s3 = math.sqrt(3)
    expected = torch.tensor([[s3 + 1, s3 - 1], [s3 - 1, s3 + 1]], dtype=f64) / 2
    assert torch.allclose(sqrtm_psd(torch.tensor([[2.0, 1.0], [1.0, 2.0]])), expected, atol=1e-12)
    with pytest.raises(ValueError, match="square matrix"):
        sqrtm_psd(torch.ones(2, 3))


@pytest.mark.parametrize("rank", [40, 16, 3])  # full rank, exactly square X, rank-deficient
def test_sqrtm_psd_squares_back(rank):
    A = random_psd(16, rank, seed=rank)
    R = sqrtm_psd(A)
    scale = A.abs().max()
    assert R.dtype == f64 and torch.isfinite(R).all()
    assert torch.allclose(R, R.T, atol=1e-12 * scale)  # symmetric
    assert torch.linalg.eigvalsh(R).min() > -1e-7 * scale.sqrt()  # PSD
    assert torch.allclose(R @ R, A, atol=1e-10 * scale)  # R^2 = A
    assert torch.linalg.matrix_rank(R, rtol=1e-6) == min(rank, 16)  # same null space as A


def test_sqrtm_psd_near_singular():
    A = random_psd(12, 4, seed=5) + 1e-12 * torch.eye(12, dtype=f64)  # condition number ~1e13
    R = sqrtm_psd(A)
    assert torch.allclose(R @ R, A, atol=1e-10 * A.abs().max())


# ---------------------------------------------------------------- Frechet distance


def test_fd_diagonal_closed_form_including_zero_variances():
    # Diagonal covariances commute: Tr((S1 S2)^1/2) = sum sqrt(s1 s2), so FD = ||dmu||^2 + sum (sqrt s1 - sqrt s2)^2.
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, dtype=f64), torch.randn(6, generator=g, dtype=f64)
    s1 = torch.tensor([0.5, 1.0, 2.0, 0.0, 0.0, 3.0], dtype=f64)  # zero variances: singular covariances
    s2 = torch.tensor([2.0, 1.0, 0.1, 4.0, 0.0, 3.0], dtype=f64)
    expected = (mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum()
    fd = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert fd == pytest.approx(expected.item(), abs=1e-9)  # an eps*I offset would be off by ~2 sqrt(1e-6 * 4)


def test_fd_non_commuting_2x2_closed_form_catches_common_mistakes():
    # For a 2x2 matrix P with eigenvalues l1, l2 >= 0: Tr(P^1/2) = sqrt(l1) + sqrt(l2) = sqrt(Tr P + 2 sqrt(det P)).
    S1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=f64)
    S2 = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=f64)  # S1 S2 != S2 S1
    trace_sqrt = math.sqrt((S1 @ S2).trace() + 2 * math.sqrt(torch.det(S1) * torch.det(S2)))  # sqrt(8 + 2*3)
    mu1, mu2 = torch.tensor([1.0, 2.0]), torch.zeros(2)
    expected = 5.0 + S1.trace() + S2.trace() - 2 * trace_sqrt  # 5 + 8 - 2 sqrt(14)
    fd = frechet_distance(mu1, S1, mu2, S2)
    assert fd == pytest.approx(expected.item(), abs=1e-12)
    # The usual wrong versions give visibly different numbers on this case, so the assertion above catches them:
    elementwise = 5.0 + 8.0 - 2 * torch.sqrt(S1 * S2).trace()  # sqrt of the elementwise product
    no_factor_2 = 5.0 + 8.0 - trace_sqrt  # forgot the 2
    product_of_roots = 5.0 + 8.0 - 2 * (sqrtm_psd(S1) @ sqrtm_psd(S2)).trace()  # S1^1/2 S2^1/2 != (S1 S2)^1/2
    for wrong in (elementwise, no_factor_2, product_of_roots):
        assert abs(float(wrong) - fd) > 1e-2


def test_fd_trace_term_equals_eigenvalues_of_the_product():
    # Independent route: Tr((S1 S2)^1/2) = sum_i sqrt(lambda_i(S1 S2)) with a general (complex) eigen-solver.
    S1, S2 = random_psd(10, 14, seed=1), random_psd(10, 12, seed=2)
    mu = torch.zeros(10, dtype=f64)
    trace_sqrt = torch.linalg.eigvals(S1 @ S2).real.clamp_min(0).sqrt().sum()
    expected = S1.trace() + S2.trace() - 2 * trace_sqrt
    assert frechet_distance(mu, S1, mu, S2) == pytest.approx(expected.item(), rel=1e-9)


def test_fd_is_symmetric_and_rotation_invariant():
    g = torch.Generator().manual_seed(3)
    mu1, mu2 = torch.randn(8, generator=g, dtype=f64), torch.randn(8, generator=g, dtype=f64)
    S1, S2 = random_psd(8, 10, seed=3), random_psd(8, 5, seed=4)  # S2 singular
    fd = frechet_distance(mu1, S1, mu2, S2)
    assert fd > 1.0
    assert frechet_distance(mu2, S2, mu1, S1) == pytest.approx(fd, rel=1e-10)
    Q = random_orthogonal(8, seed=5)  # rotating all features changes no distance between the Gaussians
    assert frechet_distance(Q @ mu1, Q @ S1 @ Q.T, Q @ mu2, Q @ S2 @ Q.T) == pytest.approx(fd, rel=1e-9)


def test_fd_from_sampled_features():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(16, 16, generator=g, dtype=f64)
    features = torch.randn(500, 16, generator=g, dtype=f64) @ mixing + 3.0  # correlated, non-zero mean
    _, sigma = feature_statistics(features)
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-9 * sigma.trace().item())
    shift = torch.randn(16, generator=g, dtype=f64)
    assert fid_from_features(features, features + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)
    # f2 = 2 f: mu2 = 2 mu, S2 = 4 S  =>  FD = ||mu||^2 + Tr(S + 4S - 2 * 2S) = ||mu||^2 + Tr(S)
    mu, _ = feature_statistics(features)
    assert fid_from_features(features, 2 * features) == pytest.approx((mu.square().sum() + sigma.trace()).item(), rel=1e-9)
    # two independent samples of the same Gaussian: small, much smaller than a real shift
    other = torch.randn(500, 16, generator=g, dtype=f64) @ mixing + 3.0
    assert fid_from_features(features, other) < 0.2 * fid_from_features(features, other + 1.0)
    # fewer samples than dimensions (singular covariance): still finite and 0 against itself
    few = features[:6]
    assert fid_from_features(few, few) == pytest.approx(0.0, abs=1e-7 * feature_statistics(few)[1].trace().item())


def test_feature_statistics_match_numpy_unbiased():
    f = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(f)
    assert mu.dtype == f64 and sigma.shape == (7, 7)
    assert np.allclose(mu.numpy(), f.double().numpy().mean(axis=0))
    assert np.allclose(sigma.numpy(), np.cov(f.double().numpy(), rowvar=False))  # divides by N - 1
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 7))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_reference_values():
    K, N = 5, 50
    uniform = torch.full((N, K), 1.0 / K)
    assert inception_score(uniform) == pytest.approx((1.0, 0.0), abs=1e-12)  # no confidence: IS = 1
    balanced = torch.eye(K)[torch.arange(N) % K]  # one confident class per image, classes used equally
    assert inception_score(balanced) == pytest.approx((K, 0.0), abs=1e-9)  # IS = K
    assert inception_score(balanced, splits=5) == pytest.approx((K, 0.0), abs=1e-9)
    collapsed = torch.eye(K)[torch.zeros(N, dtype=torch.long)]  # confident but always the same class
    assert inception_score(collapsed)[0] == pytest.approx(1.0, abs=1e-12)
    # by hand: p(y) = (0.5, 0.5), KL = 0.9 ln(0.9 / 0.5) + 0.1 ln(0.1 / 0.5) for both rows
    two = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=f64)
    assert inception_score(two)[0] == pytest.approx(math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2)), rel=1e-12)


def test_inception_score_splits_and_bad_input():
    probs = torch.cat([torch.eye(4)[torch.arange(8) % 4], torch.eye(4)[torch.arange(8) % 2]])  # 4 classes, then 2
    mean, std = inception_score(probs, splits=2)
    assert (mean, std) == pytest.approx((3.0, 1.0), abs=1e-9)  # IS 4 and IS 2
    with pytest.raises(ValueError, match="softmax"):
        inception_score(torch.randn(10, 4))  # logits, not probabilities
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.full((3, 2), 0.5), splits=4)
