"""Grade lesson 16:  python lessons/16_beyond/grade.py  (add -v for details).

Each check feeds your frechet_distance Gaussians where a common mistake shows, and compares with a closed
form or with minildm.metrics.frechet_distance.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `lessons` and `minildm`

import torch  # noqa: E402

from lessons.grading import Check, main  # noqa: E402
from minildm.metrics import feature_statistics, frechet_distance as reference  # noqa: E402

REFERENCE = {"frechet_distance": reference}  # the library's solution (tests/test_lessons_graders.py checks it passes)

f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_psd(D: int, rank: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """X X^T with X [D, rank]: symmetric PSD, singular when rank < D."""
    X = torch.randn(D, rank, generator=_gen(seed), dtype=f64) * scale
    return X @ X.T


def rotation(angle: float) -> torch.Tensor:
    return torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=f64)


def close(got, expected: float, rel: float = 1e-6, abs_: float = 1e-8) -> None:
    got = float(got)
    assert math.isfinite(got), f"got {got}"
    assert abs(got - expected) <= abs_ + rel * abs(expected), f"got {got:.10g}, expected {expected:.10g}"


def check_identical(fn):
    """Two equal Gaussians are at distance 0, singular covariances included."""
    for D, rank, seed in ((1, 1, 0), (3, 3, 1), (8, 8, 2), (8, 3, 3)):
        mu, sigma = torch.randn(D, generator=_gen(seed), dtype=f64), random_psd(D, rank, seed)
        close(fn(mu, sigma, mu.clone(), sigma.clone()), 0.0, abs_=1e-6 * sigma.trace().item())


def check_mean_term(fn):
    """Same covariance, means apart by a vector of length 3: FD = ||mu1 - mu2||^2 = 9 (a squared distance)."""
    sigma = random_psd(4, 4, 4)
    mu1 = torch.randn(4, generator=_gen(5), dtype=f64)
    shift = torch.tensor([1.0, 2.0, 2.0, 0.0], dtype=f64)  # length 3
    close(fn(mu1, sigma, mu1 + shift, sigma.clone()), 9.0)
    close(fn(mu1, sigma, mu1 - shift / 3, sigma.clone()), 1.0)


def check_one_dimension(fn):
    """D = 1: FD = (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s (variances s^2 on the diagonal)."""
    for m1, s1, m2, s2 in ((0.0, 1.0, 0.0, 2.0), (1.0, 3.0, -1.0, 0.5), (2.0, 0.0, 2.0, 4.0)):
        got = fn(torch.tensor([m1], dtype=f64), torch.tensor([[s1**2]], dtype=f64),
                 torch.tensor([m2], dtype=f64), torch.tensor([[s2**2]], dtype=f64))
        close(got, (m1 - m2) ** 2 + (s1 - s2) ** 2)


def check_non_commuting(fn):
    """Covariances with different principal axes (S1 S2 != S2 S1): the MATRIX square root of S1 S2 matters.

    For 2x2 matrices, Tr(M^{1/2}) = sqrt(Tr M + 2 sqrt(det M)) (from (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2)).
    """
    for angle, a, b in ((math.pi / 4, 4.0, 1.0), (math.pi / 6, 9.0, 0.25), (1.0, 2.0, 0.0)):
        s1 = torch.diag(torch.tensor([a, b], dtype=f64))
        R = rotation(angle)
        s2 = R @ torch.diag(torch.tensor([1.0, 3.0], dtype=f64)) @ R.T
        M = s1 @ s2
        trace_sqrt = math.sqrt(M.trace().item() + 2 * math.sqrt(max(torch.linalg.det(M).item(), 0.0)))
        expected = s1.trace().item() + s2.trace().item() - 2 * trace_sqrt
        zero = torch.zeros(2, dtype=f64)
        close(fn(zero, s1, zero.clone(), s2), expected)


def check_rotation_invariance(fn):
    """A distance between distributions does not depend on the coordinate axes: rotating both Gaussians
    (mu -> Q mu, S -> Q S Q^T) leaves FD unchanged, and FD(1, 2) = FD(2, 1)."""
    D = 5
    mu1, mu2 = torch.randn(D, generator=_gen(6), dtype=f64), torch.randn(D, generator=_gen(7), dtype=f64)
    s1, s2 = random_psd(D, D, 8), random_psd(D, D, 9)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=_gen(10), dtype=f64))
    expected = reference(mu1, s1, mu2, s2)
    close(fn(mu1, s1, mu2, s2), expected)
    close(fn(Q @ mu1, Q @ s1 @ Q.T, Q @ mu2, Q @ s2 @ Q.T), expected)
    close(fn(mu2, s2, mu1, s1), expected)


def check_features(fn):
    """Like FID: statistics of 40 'feature vectors' of dimension 64 (singular covariances, N < D), and two
    sets from the same distribution whose FD is small next to the traces (float32 input: compute in float64)."""
    g = _gen(11)
    a, b = torch.randn(40, 64, generator=g) * 3 + 10, torch.randn(40, 64, generator=g) * 2 + 9
    close(fn(*feature_statistics(a), *feature_statistics(b)), reference(*feature_statistics(a), *feature_statistics(b)), rel=1e-5)
    mix = torch.randn(64, 64, generator=g) * 20
    real, fake = (torch.randn(3000, 64, generator=g) @ mix + 100, torch.randn(3000, 64, generator=g) @ mix + 100)
    stats = [t.float() for t in (*feature_statistics(real), *feature_statistics(fake))]  # what a float32 pipeline passes
    close(fn(*stats), reference(*stats), rel=1e-4)


CHECKS = [
    Check("frechet_distance", check_identical,
          "a Gaussian is at distance 0 from itself: Tr(S) + Tr(S) - 2 Tr((S S)^{1/2}) = 0 needs the factor 2 "
          "and the exact covariances (no eps * I added anywhere)"),
    Check("frechet_distance", check_mean_term,
          "the mean term is the SQUARED Euclidean distance ||mu1 - mu2||^2 (sum of squares, no square root)"),
    Check("frechet_distance", check_one_dimension,
          "in one dimension FD = (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s: check the trace terms "
          "and the factor 2 in front of Tr((S1 S2)^{1/2})"),
    Check("frechet_distance", check_non_commuting,
          "(S1 S2)^{1/2} is the matrix square root of the matrix product: not an elementwise sqrt, and not "
          "S1^{1/2} S2^{1/2} (equal only when S1 and S2 commute)"),
    Check("frechet_distance", check_rotation_invariance,
          "a distance between Gaussians cannot depend on the axes: rotating both must not change it "
          "(elementwise operations on covariance matrices break this)"),
    Check("frechet_distance", check_features,
          "feature covariances are singular (N < D) and FD is a small difference of large traces: compute in "
          "float64 and clamp the tiny negative eigenvalues at 0 instead of adding eps * I"),
]

if __name__ == "__main__":
    sys.exit(main(CHECKS, __file__))
