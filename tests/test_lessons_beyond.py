"""Grader of lesson 16 (frechet_distance): two learner solutions pass, the untouched stub says it is not
implemented, and every realistic wrong version fails on the check that names the mistake."""
import pytest
import torch

from lesson_helpers import failed as failed_checks, grader, stubs
from lessons.grading import grade
from minildm.metrics import sqrtm_psd


def failed(fn) -> set:
    return failed_checks("16_beyond", frechet_distance=fn)


def _f64(*tensors):
    return [torch.as_tensor(t).double() for t in tensors]


def learner_eigvals(mu1, sigma1, mu2, sigma2):
    """Tr((S1 S2)^{1/2}) from the (complex) eigenvalues of the non-symmetric product, as numpy users write it."""
    mu1, sigma1, mu2, sigma2 = _f64(mu1, sigma1, mu2, sigma2)
    trace_sqrt = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return ((mu1 - mu2) @ (mu1 - mu2) + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt).item()


def learner_eigh(mu1, sigma1, mu2, sigma2):
    """The docstring's hint: eigenvalues of the symmetric S1^{1/2} S2 S1^{1/2}."""
    mu1, sigma1, mu2, sigma2 = _f64(mu1, sigma1, mu2, sigma2)
    lam, V = torch.linalg.eigh(sigma1)
    root = V @ torch.diag(lam.clamp(min=0).sqrt()) @ V.T
    trace_sqrt = torch.linalg.eigvalsh(root @ sigma2 @ root).clamp(min=0).sqrt().sum()
    return max(((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt).item(), 0.0)


def _with_trace_sqrt(trace_sqrt_fn, mean_term=lambda d: d.pow(2).sum(), factor=2.0, dtype=torch.float64):
    def fd(mu1, sigma1, mu2, sigma2):
        mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t).to(dtype) for t in (mu1, sigma1, mu2, sigma2))
        return (mean_term(mu1 - mu2) + sigma1.trace() + sigma2.trace() - factor * trace_sqrt_fn(sigma1, sigma2)).item()
    return fd


def _true_trace_sqrt(s1, s2):
    root = sqrtm_psd(s1).to(s1.dtype)
    return torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()


sqrt_of_elementwise_product = _with_trace_sqrt(lambda s1, s2: (s1 * s2).sqrt().trace())
missing_factor_2 = _with_trace_sqrt(_true_trace_sqrt, factor=1.0)
square_roots_separately = _with_trace_sqrt(lambda s1, s2: (sqrtm_psd(s1) @ sqrtm_psd(s2)).trace())
mean_not_squared = _with_trace_sqrt(_true_trace_sqrt, mean_term=lambda d: d.pow(2).sum().sqrt())
in_float32 = _with_trace_sqrt(lambda s1, s2: torch.linalg.eigvalsh(
    sqrtm_psd(s1).float() @ s2 @ sqrtm_psd(s1).float()).clamp(min=0).sqrt().sum(), dtype=torch.float32)
eps_identity_offset = _with_trace_sqrt(lambda s1, s2: _true_trace_sqrt(s1 + 1e-6 * torch.eye(len(s1), dtype=s1.dtype),
                                                                       s2 + 1e-6 * torch.eye(len(s2), dtype=s2.dtype)))


def test_learner_solutions_pass_the_stub_says_not_implemented():
    assert not failed(learner_eigvals)
    assert not failed(learner_eigh)
    results = grade(grader("16_beyond").CHECKS, stubs("16_beyond"))
    assert all(not ok and "not implemented" in message for ok, message in results.values())


@pytest.mark.parametrize("wrong", [sqrt_of_elementwise_product, missing_factor_2, square_roots_separately,
                                   mean_not_squared, in_float32, eps_identity_offset])
def test_wrong_versions_fail(wrong):
    assert failed(wrong)


def test_each_mistake_fails_the_check_that_names_it():
    assert "frechet_distance #1" in failed(missing_factor_2)  # FD(N, N) = 0 needs the 2
    assert "frechet_distance #2" in failed(mean_not_squared)
    assert "frechet_distance #4" in failed(sqrt_of_elementwise_product)  # matrix, not elementwise
    assert "frechet_distance #4" in failed(square_roots_separately)
    assert "frechet_distance #5" in failed(sqrt_of_elementwise_product)  # depends on the axes
    assert "frechet_distance #6" in failed(in_float32)
    assert "frechet_distance #1" in failed(eps_identity_offset)  # biases FD(N, N) away from 0
    # S1^{1/2} S2^{1/2} is right whenever S1 and S2 commute, so only the non-commuting checks catch it
    assert not failed(square_roots_separately) & {"frechet_distance #1", "frechet_distance #2", "frechet_distance #3"}
