"""The noise schedule, in log-SNR form (chapter 2 builds it).

A diffusion model corrupts a clean image x0 into z_t = alpha_t * x0 + sigma_t * eps, eps ~ N(0, I),
for a time t in [0, 1]. We write every schedule through its log signal-to-noise ratio
lambda(t) = log(alpha_t^2 / sigma_t^2): with a variance-preserving process (alpha^2 + sigma^2 = 1)
it fixes both alpha_t^2 = sigmoid(lambda) and sigma_t^2 = sigmoid(-lambda).

MDM (Gu et al. 2023, Sec. 3.1) uses the cosine schedule of improved DDPM (Nichol & Dhariwal 2021)
and shifts it per resolution as simple diffusion does (Hoogeboom et al. 2023, Sec. 3.1): average
pooling a 64x64 noisy image to 32x32 averages four independent noise values, which divides the
noise variance by 4, so the same t leaves a small image relatively cleaner. Shifting
lambda_r(t) = lambda(t) + 2 log(base / r) gives every resolution r the schedule it would see as a
pooled view of the base resolution.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOGSNR_MIN = -15.0
LOGSNR_MAX = 15.0


def cosine_logsnr(t: Tensor, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> Tensor:
    """Cosine schedule as a log-SNR: lambda(t) = -2 log tan(pi t / 2), clipped to [logsnr_min, logsnr_max].

    alpha_t = cos(pi t / 2) and sigma_t = sin(pi t / 2) give alpha/sigma = 1/tan(pi t / 2). Instead of
    clipping lambda we squeeze t into [t_min, t_max] so lambda stays smooth and strictly decreasing
    (simple diffusion, Algorithm 1).

    t: any shape, values in [0, 1]. Returns lambda(t) with the same shape, from logsnr_max at t=0
    down to logsnr_min at t=1.
    """
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2.0 * torch.log(torch.tan(t_min + t * (t_max - t_min)))


def shifted_cosine_logsnr(t: Tensor, resolution: int, base_resolution: int) -> Tensor:
    """The cosine log-SNR for an image of side `resolution`, shifted by 2 log(base / resolution).

    Below the base resolution the shift is positive (less noise at the same t); above it, negative.
    t: any shape in [0, 1]. Returns a tensor of the same shape.
    """
    return cosine_logsnr(t) + 2.0 * math.log(base_resolution / resolution)


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """alpha and sigma of a variance-preserving process from its log-SNR.

    alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1 exactly.
    """
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def expand_to(coef: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample coefficient (B,), or one for the whole batch (0-d), over an image
    batch x (B, C, H, W): returns (B, 1, 1, 1) or (1, 1, 1, 1)."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def add_noise(x0: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """The forward process q(z_t | x0): z_t = alpha_t x0 + sigma_t eps.

    x0: (B, C, H, W) in [-1, 1]; eps: (B, C, H, W) standard normal; logsnr: (B,).
    """
    alpha, sigma = alpha_sigma(logsnr)
    return expand_to(alpha, x0) * x0 + expand_to(sigma, x0) * eps


def velocity(x0: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """The v target of Salimans & Ho (2022): v = alpha eps - sigma x0.  Shapes as in `add_noise`."""
    alpha, sigma = alpha_sigma(logsnr)
    return expand_to(alpha, x0) * eps - expand_to(sigma, x0) * x0


def predict_x0_eps(z: Tensor, prediction: Tensor, logsnr: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Turn a network output into estimates of (x0, eps) of the noisy sample z.

    kind "v":   x0 = alpha z - sigma v,        eps = sigma z + alpha v   (rotation by the angle of (alpha, sigma))
    kind "eps": x0 = (z - sigma eps) / alpha,  eps = eps
    z, prediction: (B, C, H, W); logsnr: (B,).
    """
    alpha, sigma = (expand_to(c, z) for c in alpha_sigma(logsnr))
    if kind == "v":
        return alpha * z - sigma * prediction, sigma * z + alpha * prediction
    if kind == "eps":
        return (z - sigma * prediction) / alpha, prediction
    raise ValueError(f"unknown prediction kind {kind!r}: use 'v' or 'eps'")


def eps_from_x0(z: Tensor, x0: Tensor, logsnr: Tensor) -> Tensor:
    """eps = (z - alpha x0) / sigma: the noise implied by a (clipped) estimate of x0."""
    alpha, sigma = (expand_to(c, z) for c in alpha_sigma(logsnr))
    return (z - alpha * x0) / sigma


def discrete_timesteps(num_steps: int, device: torch.device | str | None = None) -> Tensor:
    """The T-step discrete view used by DDPM and DDIM: t_i = i / T for i = T, T-1, ..., 0.

    Returns a tensor of T + 1 times in [0, 1], decreasing from 1 to 0; step i goes from
    times[i] to times[i + 1]. Any T works, because the schedule is continuous in t.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, device=device)
