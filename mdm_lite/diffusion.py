"""The multi-resolution diffusion loss (MDM, Gu et al. 2023, Sec. 3.1; chapter 5 builds it).

Training (Eq. 4 of the paper): take a clean 64x64 image x0, average-pool it into a pyramid
(64, 32, 16, ...), draw one time t for the whole pyramid, noise every level with its own
independent noise and its own resolution-shifted schedule, and ask the NestedUNet to denoise all
levels in one forward pass. The loss is a weighted sum of the per-level mean squared errors.

Sampling, the reverse process on every level at once, is in `mdm_lite.samplers`.

Prediction target. The network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022), as the
MDM reference code does, and the loss is the MSE on v. With eps-prediction the clean image is
recovered as x0 = (z - sigma eps) / alpha, which divides by alpha -> 0 at the noisy end of the
schedule, and the shift makes the 64x64 level reach very low SNR; v stays well scaled at both
ends, since x0 = alpha z - sigma v never divides. `prediction="eps"` is kept for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config_check import ConfigError, NonNegative, OneOf, Positive, Range, check_fields
from .schedule import add_noise, shifted_cosine_logsnr, velocity


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
        time_power, time_range: the two parameters of the one distribution of training times,
            `training_times` (the paper draws t uniformly in [0, 1]: power 1, range (0, 1), the
            defaults). Sampling is unchanged.
    """

    prediction: Annotated[str, OneOf("v", "eps")] = "v"
    base_resolution: Annotated[int, Positive] = 32
    loss_weights: tuple[Annotated[float, NonNegative], ...] | None = None
    cond_drop_prob: Annotated[float, Range(0, 1)] = 0.1
    time_power: Annotated[float, Range(0, low_open=True, hint="1: uniform times")] = 1.0
    time_range: tuple[Annotated[float, Range(0, 1)], Annotated[float, Range(0, 1)]] = (0.0, 1.0)

    def __post_init__(self):
        check_fields(self)
        if self.time_range[0] > self.time_range[1]:
            raise ConfigError(f"must be two times 0 <= low <= high <= 1 (e.g. 0.97 0.97 for one noise level), got "
                              f"{list(self.time_range)}", "time_range")

    def training_times(self, u: Tensor) -> Tensor:
        """Training times t from u uniform in [0, 1) (any shape)::

            t = low + (high - low) (1 - (1 - u)^time_power),  (low, high) = time_range.

        A power p above 1 spends more of training near t = 1, where the image is noise and only
        the caption says where the object goes: P(t > 0.9) = 0.1^(1/p) for the full range, 0.46
        for p = 3. low = high trains at that one noise level. The defaults return u itself, bit for bit.
        """
        t = u if self.time_power == 1.0 else 1 - (1 - u) ** self.time_power
        if self.time_range != (0.0, 1.0):
            low, high = self.time_range
            t = low + (high - low) * t
        return t

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
    t = config.training_times(torch.rand(b, generator=generator, device="cpu")).to(x0.device)
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
