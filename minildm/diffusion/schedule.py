"""The noise schedule: betas, alphas, alpha_bar, and the closed forms of the forward process.

Lecture 13, "LDM: with DDPM" and "Properties of forward and exact reverse process". The forward process
adds a little Gaussian noise at every step,

    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I),        alpha_t = 1 - beta_t,

and the three properties on the slides follow from it:

    Property 1  q(x_t | x_0)        = N(sqrt(abar_t) x_0, (1 - abar_t) I),       abar_t = prod_{s<=t} alpha_s
    Property 2  q(x_{t-1} | x_t, x_0) = N(mu~(x_t, x_0), sigma_t^2 I)            (the posterior)
    Property 3  x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)               (so a net can predict eps)

Indexing: timesteps are 0-indexed, t = 0..T-1, and `betas[t]` is the paper's beta_{t+1}. So
`alphas_cumprod[0] = alpha_1 = 1 - beta_1` is already slightly noisy, and `alphas_cumprod_prev[0] = 1` is
clean data (abar_0 = 1 in the paper's notation).

Everything is computed once in float64 and kept as (non-persistent) buffers: the schedule is fully
determined by (num_timesteps, kind, beta_start, beta_end), so checkpoints store those, not the tables.
Values are gathered per sample and cast to the dtype of the tensor they multiply.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
DEFAULT_BETAS = {
    "linear": (1e-4, 0.02),  # DDPM (Ho et al. 2020)
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion v1 (CompVis configs call this "linear")
}
COSINE_S = 0.008  # offset s of the cosine schedule (Nichol & Dhariwal 2021), keeps beta_1 from being tiny
COSINE_MAX_BETA = 0.999  # cosine betas are clipped here, else beta_T = 1 (abar_T = 0) breaks 1 / sqrt(...)


def beta_schedule(
    kind: str, num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None
) -> torch.Tensor:
    """The betas of a named schedule as a float64 tensor [T].

    - "linear":        beta_t evenly spaced from beta_start to beta_end (default 1e-4..0.02, DDPM).
    - "scaled_linear": sqrt(beta_t) evenly spaced from sqrt(beta_start) to sqrt(beta_end), then squared
                       (default 0.00085..0.012, Stable Diffusion v1).
    - "cosine":        abar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008;
                       beta_t = 1 - abar(t) / abar(t - 1), clipped at 0.999. Takes no beta_start/beta_end.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"Unknown schedule kind {kind!r}; use one of {', '.join(SCHEDULE_KINDS)}.")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer of at least 2, got {num_timesteps!r}.")
    T = num_timesteps

    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("The cosine schedule is set by s = 0.008 alone; leave beta_start and beta_end as None.")
        steps = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((steps / T + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        abar = f / f[0]  # abar(0) = 1, ..., abar(T) = 0
        betas = 1 - abar[1:] / abar[:-1]  # beta_t = 1 - abar_t / abar_{t-1}
        return betas.clamp(max=COSINE_MAX_BETA)

    default_start, default_end = DEFAULT_BETAS[kind]
    beta_start = default_start if beta_start is None else float(beta_start)
    beta_end = default_end if beta_end is None else float(beta_end)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"Betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}.")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    # scaled_linear: linear in sqrt(beta), then squared
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def check_timesteps(t: torch.Tensor | int, num_timesteps: int, batch_size: int) -> torch.Tensor:
    """Validate timesteps and return them as a LongTensor [B].

    t: LongTensor [B] with values in 0..T-1, or a python int / 0-d tensor meaning that timestep for the whole batch.
    """
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"Timesteps must be integers (a LongTensor), got dtype {t.dtype}.")
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.ndim != 1 or t.shape[0] != batch_size:
        raise ValueError(f"Timesteps must have shape [B] = [{batch_size}] to match the batch, got {list(t.shape)}.")
    if t.numel() > 0 and (t.min() < 0 or t.max() >= num_timesteps):
        raise ValueError(
            f"Timesteps must lie in 0..{num_timesteps - 1} (0-indexed), got values from {int(t.min())} to {int(t.max())}."
        )
    return t.long()


def gather_at(values: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    """Pick `values[t]` for every sample and shape it to broadcast against x.

    values: [T] per-timestep table (float64 buffer).
    t:      LongTensor [B] of timesteps in 0..T-1, or a python int / 0-d tensor used for the whole batch.
    x:      [B, ...] the tensor the result will multiply.
    returns [B, 1, ..., 1] (one 1 per non-batch dim of x), in x's dtype and on x's device.
    """
    t = check_timesteps(t, values.shape[0], x.shape[0]).to(values.device)
    picked = values[t].to(device=x.device, dtype=x.dtype)  # [B]
    return picked.view(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


class NoiseSchedule(nn.Module):
    """Fixed variance schedule of a diffusion model, with Properties 1-3 and v-prediction.

    NoiseSchedule(num_timesteps=1000, kind="linear" | "scaled_linear" | "cosine", beta_start=None, beta_end=None)

    Buffers (float64, [T]): betas, alphas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod,
    sqrt_one_minus_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
    posterior_mean_coef_x0, posterior_mean_coef_xt.
    Methods take t: LongTensor [B] (0-indexed) or an int for the whole batch, and x tensors [B, ...].
    Move it with .to(device) only: .to(dtype) or .half() would also round the float64 tables.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        kind: str = "linear",
        beta_start: float | None = None,
        beta_end: float | None = None,
    ):
        super().__init__()
        betas = beta_schedule(kind, num_timesteps, beta_start, beta_end)
        self.num_timesteps = num_timesteps
        self.kind = kind
        self.beta_start = beta_start  # as given (None = the kind's default), so the schedule can be rebuilt
        self.beta_end = beta_end

        alphas = 1 - betas  # alpha_t = 1 - beta_t
        alphas_cumprod = torch.cumprod(alphas, dim=0)  # abar_t = prod_{s<=t} alpha_s
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])  # abar_{t-1}, abar = 1 before step 1

        # Property 2 (the slide's mean has two subscripts wrong: sqrt(abar_t) for sqrt(abar_{t-1}) on x_0, and
        # (1 - abar_t) for (1 - abar_{t-1}) on x_t, which would make the x_t coefficient just sqrt(alpha_t)):
        # sigma_t^2 = (1 - abar_{t-1}) beta_t / (1 - abar_t)
        posterior_variance = (1 - alphas_cumprod_prev) * betas / (1 - alphas_cumprod)
        # mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        posterior_mean_coef_x0 = alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod)  # slide's alpha_t^(0)
        posterior_mean_coef_xt = alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # slide's alpha_t^(t)
        # sigma_0^2 = 0 (the last step is deterministic), so log(0) is replaced by log(sigma_1^2) as in DDPM
        posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))

        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef_x0": posterior_mean_coef_x0,
            "posterior_mean_coef_xt": posterior_mean_coef_xt,
        }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, kind={self.kind!r}, beta_start={self.beta_start}, beta_end={self.beta_end}"

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Property 1: a sample of q(x_t | x_0) in one shot. x0, eps [B, ...] -> x_t [B, ...]."""
        # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        # Slide erratum: the slide writes (1 - abar_t) eps, dropping the sqrt; the variance of q(x_t | x_0) is
        # (1 - abar_t), so the noise is scaled by its square root (Algorithm 1 on the later slide has it right).
        return gather_at(self.sqrt_alphas_cumprod, t, x0) * x0 + gather_at(self.sqrt_one_minus_alphas_cumprod, t, x0) * eps

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Property 2: q(x_{t-1} | x_t, x_0) = N(mean, variance I).

        x0, x_t: [B, ...]. Returns mean [B, ...], variance [B, 1, ..., 1] and log_variance [B, 1, ..., 1]
        (log_variance is clipped at t = 0, where the variance is exactly 0).
        """
        # mu~ = alpha_t^(0) x_0 + alpha_t^(t) x_t  (coefficients written out in __init__)
        mean = gather_at(self.posterior_mean_coef_x0, t, x_t) * x0 + gather_at(self.posterior_mean_coef_xt, t, x_t) * x_t
        variance = gather_at(self.posterior_variance, t, x_t)
        log_variance = gather_at(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Property 3: the clean sample implied by x_t and the noise in it. [B, ...] -> [B, ...]."""
        # x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        # (the slide's "x_0 = (x_0 + (1 - abar_t) eps) / sqrt(abar_t)" is garbled: x_t, minus, and sqrt.)
        return (x_t - gather_at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / gather_at(self.sqrt_alphas_cumprod, t, x_t)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """Property 1 solved for the noise: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t). [B, ...]."""
        return (x_t - gather_at(self.sqrt_alphas_cumprod, t, x_t) * x0) / gather_at(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def predict_v(self, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0. [B, ...]."""
        return gather_at(self.sqrt_alphas_cumprod, t, x0) * eps - gather_at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def v_to_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
        """The noise implied by a v-prediction: eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v. [B, ...]."""
        return gather_at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + gather_at(self.sqrt_alphas_cumprod, t, x_t) * v

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t): LongTensor [B] -> float32 [B] (computed in float64)."""
        t = check_timesteps(t, self.num_timesteps, torch.as_tensor(t).numel()).to(self.alphas_cumprod.device)
        abar = self.alphas_cumprod[t]
        return (abar / (1 - abar)).float()
