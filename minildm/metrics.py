"""Evaluation maths for generative models: Frechet distance (FID) and Inception Score, from features.

Both scores look at generated images through a fixed feature network (Inception-v3 in the papers; in
minildm a small network of our own, added elsewhere). This file holds only the maths on top of the
features, so it needs no download and can be checked against closed forms.

FID (Heusel et al. 2017) fits a Gaussian to each feature set and measures the Frechet (2-Wasserstein)
distance between the two Gaussians:

    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

Lower is better; 0 means equal means and covariances. IS (Salimans et al. 2016) uses class
probabilities p(y|x): confident per image (low entropy) and diverse over the set (high entropy of p(y)):

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = E_x p(y|x),   1 <= IS <= K classes

Everything is computed in float64: covariances of many features lose digits quickly in float32.
"""
from __future__ import annotations

import math

import torch
from einops import einsum


def _float64(x) -> torch.Tensor:
    """Tensor or array -> float64 tensor on the CPU."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _zero_noise(lam: torch.Tensor) -> torch.Tensor:
    """Eigenvalues lam [D] of a symmetric PSD matrix, with the rounding noise of its zero eigenvalues removed.

    The zero eigenvalues of a singular PSD matrix come out of eigh as noise, +-1e-16 * max(lam). Noise is
    harmless for lam itself but not for sqrt(lam): sqrt(1e-16) = 1e-8. So every eigenvalue below the noise
    level D * machine_eps * max(lam) (numpy.linalg.matrix_rank's tolerance) is set to exactly 0, which it
    is mathematically; this also removes the tiny negative ones, whose sqrt would be NaN.
    """
    noise = lam.shape[0] * torch.finfo(lam.dtype).eps * lam.abs().max()
    return torch.where(lam > noise, lam, 0.0)


def sqrtm_psd(A) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix: A [D, D] -> R [D, D] (float64), R R = A.

    With A = V diag(lam) V^T (eigh: V orthogonal, lam >= 0), R = V diag(sqrt(lam)) V^T is the unique
    symmetric PSD matrix with R R = V diag(lam) V^T = A. Works for singular (rank-deficient) A too.
    """
    A = _float64(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"sqrtm_psd needs a square matrix [D, D], got shape {tuple(A.shape)}.")
    lam, V = torch.linalg.eigh((A + A.T) / 2)  # (A + A^T) / 2 removes rounding asymmetry
    lam = _zero_noise(lam)
    return einsum(V, lam.sqrt(), V, "i k, k, j k -> i j")  # R = V diag(sqrt(lam)) V^T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).  mu [D], sigma [D, D] -> float >= 0.

        FD = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

    The hard part is Tr((S1 S2)^{1/2}). S1 S2 is NOT symmetric (unless S1 and S2 commute), so a general
    matrix square root of it (scipy.linalg.sqrtm, as pytorch-fid does) goes through complex numbers and is
    numerically fragile when the covariances are singular (fewer samples than feature dimensions). But
    with R = S1^{1/2}:  S1 S2 = R (R S2)  and  (R S2) R = R S2 R,  and XY and YX always have the same
    eigenvalues. So S1 S2 has the eigenvalues of M = R S2 R, which is symmetric PSD, and

        Tr((S1 S2)^{1/2}) = sum_i sqrt(lam_i(S1 S2)) = sum_i sqrt(lam_i(R S2 R)) = Tr((R S2 R)^{1/2})

    needs only symmetric eigen-decompositions (eigh), which are stable and real. Singular covariances
    need no eps * I here: their zero eigenvalues are set to exactly 0 (an eps * I offset, pytorch-fid's
    fallback, would instead bias FD by about 2 sqrt(eps) sqrt(s) for every direction with variance s
    in one set and none in the other).
    """
    mu1, mu2, sigma1, sigma2 = (_float64(t) for t in (mu1, mu2, sigma1, sigma2))
    D = mu1.shape[0]
    for name, t, shape in (("mu2", mu2, (D,)), ("sigma1", sigma1, (D, D)), ("sigma2", sigma2, (D, D))):
        if tuple(t.shape) != shape:
            raise ValueError(f"frechet_distance: {name} has shape {tuple(t.shape)} but mu1 [{D}] needs {list(shape)}.")
    mean_term = (mu1 - mu2).square().sum()  # ||mu1 - mu2||^2
    R = sqrtm_psd(sigma1)  # S1^{1/2}
    M = R @ sigma2 @ R  # R S2 R: symmetric PSD, same eigenvalues as S1 S2
    lam = _zero_noise(torch.linalg.eigvalsh((M + M.T) / 2))  # eigenvalues only: cheaper than eigh
    trace_sqrt = lam.sqrt().sum()  # Tr((S1 S2)^{1/2}) = sum sqrt(lam(R S2 R))
    fd = mean_term + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt  # FD = |dmu|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})
    return max(fd.item(), 0.0)  # >= 0 mathematically; rounding can leave -1e-13 for identical inputs


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian fit of a feature set: features [N, D] -> (mu [D], sigma [D, D]), float64.

    mu = (1/N) sum_n f_n,   sigma = 1/(N-1) sum_n (f_n - mu)(f_n - mu)^T   (unbiased, like numpy.cov)
    """
    f = _float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features [N, D] with N >= 2, got shape {tuple(f.shape)}.")
    mu = f.mean(dim=0)
    centered = f - mu
    sigma = einsum(centered, centered, "n i, n j -> i j") / (f.shape[0] - 1)
    return mu, sigma


def fid_from_features(features1, features2) -> float:
    """FD between Gaussians fitted to two feature sets [N1, D] and [N2, D] (FID with Inception features)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(probs, splits: int = 1) -> tuple[float, float]:
    """Inception Score of class probabilities probs [N, K] (rows are softmax outputs, not logits).

        IS = exp( (1/N) sum_n KL(p(y|x_n) || p(y)) ),   p(y) = (1/N) sum_n p(y|x_n)

    As in Salimans et al., the N images are cut into `splits` equal parts and IS is computed on each;
    returns (mean, std) over the splits (std = 0.0 for splits=1). IS = 1 when every image gets the same
    prediction, and IS = K when each image is one confident class and the K classes are equally used.
    """
    p = _float64(probs)
    if p.ndim != 2:
        raise ValueError(f"inception_score needs probabilities [N, K], got shape {tuple(p.shape)}.")
    if (p < 0).any() or not torch.allclose(p.sum(dim=1), torch.ones(p.shape[0], dtype=torch.float64), atol=1e-4):
        raise ValueError("inception_score needs rows of class probabilities that sum to 1: apply softmax to logits first.")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"inception_score: splits must be between 1 and N = {p.shape[0]}, got {splits}.")
    scores = []
    for part in p.tensor_split(splits, dim=0):  # `splits` parts of (nearly) equal size
        p_y = part.mean(dim=0, keepdim=True)  # p(y) = E_x p(y|x)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, p_y)).sum(dim=1)  # KL = sum_y p log p - p log p(y); 0 log 0 = 0
        scores.append(math.exp(kl.mean().item()))  # exp(E_x KL)
    scores = torch.tensor(scores, dtype=torch.float64)
    return scores.mean().item(), scores.std(correction=0).item()
