"""The multi-resolution diffusion loss and the samplers (MDM, Gu et al. 2023, Sec. 3.1 and 3.3).

Training (Eq. 4 of the paper): take a clean 64x64 image x0, average-pool it into a pyramid
(64, 32, 16, ...), draw one time t for the whole pyramid, noise every level with its own
independent noise and its own resolution-shifted schedule, and ask the NestedUNet to denoise all
levels in one forward pass. The loss is a weighted sum of the per-level mean squared errors.

Sampling runs the reverse process on every level at once: one forward pass per step updates the
whole pyramid, each level with its own shifted schedule.

Prediction target. The network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022), as the
MDM reference code does, and the loss is the MSE on v. With eps-prediction the clean image is
recovered as x0 = (z - sigma eps) / alpha, which divides by alpha -> 0 at the noisy end of the
schedule, and the shift makes the 64x64 level reach very low SNR; v stays well scaled at both
ends, since x0 = alpha z - sigma v never divides. `prediction="eps"` is kept for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import add_noise, alpha_sigma, discrete_timesteps, eps_from_x0, predict_x0_eps, shifted_cosine_logsnr, velocity


@dataclass
class DiffusionConfig:
    """How a model is trained and sampled, saved beside its weights.

    Attributes:
        prediction: "v" or "eps", what the network outputs (see the module docstring).
        base_resolution: the resolution that sees the plain cosine schedule; level r is shifted by
            2 log(base / r). 32 follows the paper: the low-resolution net keeps the schedule made for
            small images and the 64x64 level is made noisier. A single-level 64x64 baseline uses the
            same value so that both models see the same 64x64 schedule.
        loss_weights: per level, outermost first; None weighs every level 1 (the paper's default).
        cond_drop_prob: probability of training a caption as the empty prompt, for classifier-free
            guidance (Ho & Salimans 2022). The MDM reference code has none; we add it.
        time_power: training times are drawn as t = 1 - (1 - u)^time_power, u uniform in [0, 1).
            1 is uniform, as in the paper. Larger values spend more of training near t = 1, where
            the image is noise and only the caption says where the object goes: with 3, 46% of
            the samples have t > 0.9 instead of 10%. Sampling is unchanged.
        time_range: (low, high): the training time above is mapped linearly onto [low, high].
            (0, 1), the default, leaves it alone; (0.97, 0.97) trains at one noise level only,
            where the image is noise and the caption is all the model has: a small Shapes model
            learns where objects go far sooner there than among all noise levels (README).
    """

    prediction: str = "v"
    base_resolution: int = 32
    loss_weights: tuple[float, ...] | None = None
    cond_drop_prob: float = 0.1
    time_power: float = 1.0
    time_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {self.prediction!r}")
        if not self.time_power > 0:
            raise ValueError(f"time_power must be positive (1: uniform times), got {self.time_power}")
        self.time_range = tuple(float(v) for v in self.time_range)
        if len(self.time_range) != 2 or not 0.0 <= self.time_range[0] <= self.time_range[1] <= 1.0:
            raise ValueError(f"time_range must be two times 0 <= low <= high <= 1 (e.g. 0.97 0.97 for one "
                             f"noise level), got {self.time_range}")
        if self.loss_weights is not None:
            self.loss_weights = tuple(float(w) for w in self.loss_weights)

    def logsnr(self, t: Tensor, resolution: int) -> Tensor:
        """The shifted cosine log-SNR of a level of side `resolution` at time t (any shape)."""
        return shifted_cosine_logsnr(t, resolution, self.base_resolution)


def image_pyramid(x0: Tensor, num_levels: int) -> list[Tensor]:
    """[x0, x0 pooled 2x, pooled 4x, ...]: (B, C, R, R) -> num_levels tensors, largest first.

    Average pooling, as in MDM: each low-resolution pixel is the mean of the pixels it covers.
    """
    levels = [x0]
    for _ in range(num_levels - 1):
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def drop_captions(captions: Sequence[str], prob: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt with probability `prob` (classifier-free guidance)."""
    keep = torch.rand(len(captions), generator=generator) >= prob
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def multires_loss(model: Callable, x0: Tensor, tokens: Tensor | None, mask: Tensor | None,
                  config: DiffusionConfig, num_levels: int,
                  generator: torch.Generator | None = None) -> tuple[Tensor, list[Tensor]]:
    """The MDM training loss (Eq. 4): sum_k w_k || f_k(z_t) - target_k ||^2.

    model: NestedUNet-like, called as model(zs, t, tokens, mask) -> list of predictions.
    x0: (B, 3, R, R) clean images in [-1, 1]; tokens: (B, L, D); mask: (B, L) bool.
    Returns (weighted total, per-level mean squared errors detached, outermost first).
    """
    b = x0.shape[0]
    xs = image_pyramid(x0, num_levels)
    t = torch.rand(b, generator=generator, device="cpu").to(x0.device)
    if config.time_power != 1.0:  # skew towards high noise; 1 leaves t untouched, bit for bit
        t = 1 - (1 - t) ** config.time_power
    if config.time_range != (0.0, 1.0):
        low, high = config.time_range
        t = low + (high - low) * t
    zs, targets = [], []
    for x in xs:
        logsnr = config.logsnr(t, x.shape[-1])
        eps = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
        zs.append(add_noise(x, eps, logsnr))
        targets.append(velocity(x, eps, logsnr) if config.prediction == "v" else eps)
    preds = model(zs, t, tokens, mask)
    weights = config.loss_weights or (1.0,) * num_levels
    if len(weights) != num_levels:
        raise ValueError(f"loss_weights has {len(weights)} entries for a {num_levels}-level model")
    losses = [F.mse_loss(p.float(), y) for p, y in zip(preds, targets)]
    total = sum(w * l for w, l in zip(weights, losses))
    return total, [l.detach() for l in losses]


def _pad_to(tokens: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad (B, L, D) tokens with zeros and their (B, L) mask with False up to `length`."""
    extra = length - tokens.shape[1]
    if extra == 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def _guided(model, zs, t, tokens, mask, null_tokens, null_mask, scale: float) -> list[Tensor]:
    """Classifier-free guidance: f_uncond + scale * (f_cond - f_uncond), both in one batch."""
    if scale == 1.0 or tokens is None:
        return model(zs, t, tokens, mask)
    b = zs[0].shape[0]
    length = max(tokens.shape[1], null_tokens.shape[1])
    tokens, mask = _pad_to(tokens, mask, length)
    null_tokens, null_mask = _pad_to(null_tokens.expand(b, -1, -1), null_mask.expand(b, -1), length)
    outs = model([torch.cat([z, z]) for z in zs], torch.cat([t, t]),
                 torch.cat([tokens, null_tokens]), torch.cat([mask, null_mask]))
    return [u + scale * (c - u) for c, u in (o.chunk(2) for o in outs)]


@torch.no_grad()
def sample(model: Callable, resolutions: Sequence[int], config: DiffusionConfig,
           tokens: Tensor | None = None, mask: Tensor | None = None, *,
           null_tokens: Tensor | None = None, null_mask: Tensor | None = None,
           batch_size: int | None = None, num_steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
           guidance_scale: float = 1.0, clip_sample: bool = True, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu", return_trajectory: bool = False):
    """Sample every level of the pyramid jointly.

    tokens: (B, L, D) and mask (B, L) of the prompts, or None for an unconditional model (then give
    batch_size). null_tokens (1, L0, D) / null_mask (1, L0): the empty prompt, needed when
    guidance_scale != 1. sampler: "ddim" (Song et al. 2021; eta = 0 deterministic, eta = 1 the
    DDPM posterior variance) or "ddpm" (ancestral sampling from q(z_s | z_t, x0), Ho et al. 2020).
    clip_sample clips the predicted x0 to [-1, 1] at every step, as the MDM reference does.

    Returns a list of images (B, 3, R_k, R_k) in [-1, 1] (unclipped if clip_sample is False),
    largest first; with return_trajectory, also a list over steps of dicts
    {"t": float, "z": [levels], "x0": [levels]}.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}: use 'ddim' or 'ddpm'")
    if guidance_scale != 1.0 and tokens is not None and null_tokens is None:
        raise ValueError("guidance_scale != 1 needs null_tokens/null_mask, the encoding of the empty prompt")
    b = tokens.shape[0] if tokens is not None else batch_size
    zs = [torch.randn((b, 3, r, r), generator=generator, device="cpu").to(device) for r in resolutions]
    times = discrete_timesteps(num_steps, device=device)
    trajectory = []
    for i in range(num_steps):
        t, s = times[i].expand(b), times[i + 1].expand(b)
        preds = _guided(model, zs, t, tokens, mask, null_tokens, null_mask, guidance_scale)
        x0s = []
        for k, (z, pred) in enumerate(zip(zs, preds)):
            logsnr_t = config.logsnr(t, resolutions[k])
            logsnr_s = config.logsnr(s, resolutions[k])
            x0, eps = predict_x0_eps(z, pred.float(), logsnr_t, config.prediction)
            if clip_sample:
                x0 = x0.clamp(-1.0, 1.0)
                eps = eps_from_x0(z, x0, logsnr_t)
            noise = torch.randn(z.shape, generator=generator, device="cpu").to(device)
            if sampler == "ddpm":
                zs[k] = ddpm_step(z, x0, logsnr_t, logsnr_s, noise)
            else:
                zs[k] = ddim_step(z, x0, eps, logsnr_t, logsnr_s, noise, eta)
            x0s.append(x0)
        if return_trajectory:
            trajectory.append({"t": float(times[i]), "z": [z.cpu() for z in zs], "x0": [x.cpu() for x in x0s]})
    # The last step lands on s = 0 (logsnr_max), where z equals x0 up to sigma ~ 5e-4: return the
    # last x0 estimate itself, which is exactly in [-1, 1] when clipped.
    return (x0s, trajectory) if return_trajectory else x0s


def _coef(c: Tensor, x: Tensor) -> Tensor:
    return c.reshape(-1, *([1] * (x.ndim - 1)))


def ddim_step(z: Tensor, x0: Tensor, eps: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, noise: Tensor,
              eta: float = 0.0) -> Tensor:
    """One DDIM step from t to s < t (Song et al. 2021, Eq. 12).

    z_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c noise, with c = eta * sigma of the DDPM
    posterior q(z_s | z_t, x0); eta = 0 is deterministic, eta = 1 matches DDPM.
    z, x0, eps, noise: (B, C, H, W); logsnr_t, logsnr_s: (B,).
    """
    alpha_s, sigma_s = (_coef(c, z) for c in alpha_sigma(logsnr_s))
    c = eta * _coef(_posterior_std(logsnr_t, logsnr_s), z)
    return alpha_s * x0 + (sigma_s ** 2 - c ** 2).clamp(min=0).sqrt() * eps + c * noise


def _posterior_std(logsnr_t: Tensor, logsnr_s: Tensor) -> Tensor:
    """Std of q(z_s | z_t, x0): sigma_s * sqrt(1 - SNR_t / SNR_s) (Kingma et al. 2021, VDM Eq. 33)."""
    _, sigma_s = alpha_sigma(logsnr_s)
    return sigma_s * (-torch.expm1(logsnr_t - logsnr_s)).clamp(min=0).sqrt()


def ddpm_step(z: Tensor, x0: Tensor, logsnr_t: Tensor, logsnr_s: Tensor, noise: Tensor) -> Tensor:
    """One ancestral step: a draw from the posterior q(z_s | z_t, x = x0) (DDPM, Eq. 6-7).

    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0,
    with alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
    """
    alpha_t, sigma_t = (_coef(c, z) for c in alpha_sigma(logsnr_t))
    alpha_s, sigma_s = (_coef(c, z) for c in alpha_sigma(logsnr_s))
    alpha_ts = alpha_t / alpha_s
    sigma_ts2 = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2
    mean = alpha_ts * sigma_s ** 2 / sigma_t ** 2 * z + alpha_s * sigma_ts2 / sigma_t ** 2 * x0
    return mean + _coef(_posterior_std(logsnr_t, logsnr_s), z) * noise


def ddim_sample(model, resolutions, config, tokens=None, mask=None, **kwargs):
    """`sample` with the DDIM sampler (eta defaults to 0)."""
    return sample(model, resolutions, config, tokens, mask, sampler="ddim", **kwargs)


def ddpm_sample(model, resolutions, config, tokens=None, mask=None, **kwargs):
    """`sample` with DDPM ancestral steps."""
    return sample(model, resolutions, config, tokens, mask, sampler="ddpm", **kwargs)
