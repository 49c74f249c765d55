"""Lesson 16 exercise: the Frechet distance between two Gaussians, the heart of FID.

Fill in the region between `# TODO begin` and `# TODO end`, then grade it:

    python lessons/16_beyond/grade.py

lesson.py uses your function for its FID-shapes numbers as soon as it no longer raises NotImplementedError.
"""
import torch


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    Input:
        mu1, mu2         [D] float tensors: the means (of the features of two image sets)
        sigma1, sigma2   [D, D] float tensors: the covariances, symmetric positive SEMI-definite
                         (they may be singular: fewer images than feature dimensions)
    Output:
        a Python float >= 0:
            FD = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2})
        where (sigma1 sigma2)^{1/2} is the MATRIX square root of the matrix product (the matrix R with
        R R = sigma1 sigma2), not an elementwise square root.
    Hints:
        - compute in float64 (tensor.double()); features have large, nearly singular covariances.
        - Tr(M^{1/2}) = sum_i sqrt(lambda_i(M)): you need the eigenvalues of sigma1 sigma2 only. That
          product is not symmetric, but it has the same eigenvalues as the symmetric PSD matrix
          S1^{1/2} sigma2 S1^{1/2} (S1^{1/2} from torch.linalg.eigh of sigma1), and torch.linalg.eigvalsh
          of a symmetric matrix is stable and real. Eigenvalues come out as tiny negatives (-1e-15) where
          the true value is 0: clamp them at 0 before the square root.
    """
    # TODO begin
    raise NotImplementedError
    # TODO end
