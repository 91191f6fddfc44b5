"""Sampling from a trained model: a diffusers-style pipeline and the pictures it makes.

::

    from mdm_lite import MDMPipeline
    pipe = MDMPipeline.from_pretrained("output/checkpoint_latest")
    images = pipe(["a red circle in the center", "a small blue star top left"]).images  # PIL images

A pipeline holds a NestedUNet, its frozen text encoder and its DiffusionConfig; calling it encodes
the prompts and the empty prompt, and runs `mdm_lite.samplers.sample` on every nesting level at
once (Gu et al. 2023, Sec. 3.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .config_check import ConfigError, Device, NonNegative, OneOf, Positive, Seed, check_value
from .memory import check_fits
from .diffusion import DiffusionConfig
from .samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, sample
from .nested import NestedUNet, NestedUNetConfig
from .text import TextEncoder


@dataclass
class PipelineOutput:
    """images: the largest level, as PIL images or a (N, 3, R, R) tensor in [-1, 1];
    levels: every level, largest first, tensors in [-1, 1]; trajectory: see `samplers.sample`."""

    images: list[Image.Image] | Tensor
    levels: list[Tensor] = field(default_factory=list)
    trajectory: list[dict] | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda if visible, else cpu; "cuda" with no GPU, or a device that is none of auto,
    cpu, cuda and cuda:N, is an error that says what to do."""
    check_value("device", str(device), Annotated[str, Device])
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no GPU is visible; use --device cpu (or auto)")
    return device


# The types and ranges of MDMPipeline's options, checked as config fields are (`config_check`).
SAMPLING_OPTIONS = {
    "prompt": list[str], "num_inference_steps": Annotated[int, Positive], "guidance_scale": float,
    "eta": Annotated[float, NonNegative], "num_images_per_prompt": Annotated[int, Positive],
    "seed": Annotated[int, Seed] | None, "sampler": Annotated[str, OneOf(*SAMPLERS)],
    "precision": Annotated[str, OneOf("auto", "fp32", "bf16")],
}


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether sampling at `precision` runs the network under bf16 autocast: "bf16", or "auto" where
    training's "auto" picks bf16, on hardware that computes it natively (`mdm_lite.train.choose_precision`:
    a GPU of compute capability 8 or newer, a CPU with AMX); "fp32" never."""
    from .train import TrainConfig, choose_precision

    return choose_precision(TrainConfig(precision=precision), device)[0]


class SamplingFailed(RuntimeError):
    """Sampling produced NaN or infinite images; the message says what to change."""


class MDMPipeline:
    """Prompts in, images out. model: a NestedUNet; text_encoder: the TextEncoder it was trained
    with; diffusion: its DiffusionConfig."""

    def __init__(self, model: NestedUNet, text_encoder: TextEncoder, diffusion: DiffusionConfig,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device)
        self.diffusion = diffusion

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, device: str | torch.device = "auto",
                        use_ema: bool = True) -> "MDMPipeline":
        """Load a checkpoint directory, an output_dir (its checkpoint_latest) or the pointer itself.
        use_ema: the moving-average weights (better samples) rather than the raw ones."""
        from .train import TrainConfig

        device = resolve_device(device)
        ckpt = load_checkpoint(checkpoint)
        try:
            config = TrainConfig.from_dict(ckpt.config)
        except ConfigError as error:
            raise CheckpointError(f"{ckpt.path / 'config.json'}: {error}") from None
        check_fits(config.model, device, images=1)
        model = NestedUNet(config.model)
        if not use_ema and ckpt.model is None:
            raise CheckpointError(f"{ckpt.path} is an exported checkpoint with EMA weights only; drop --no_ema")
        load_weights(model, ckpt.ema if use_ema else ckpt.model, ckpt.path)
        if not model.gives_finite_outputs():
            raise CheckpointError(f"{ckpt.path}: its weights give non-finite outputs (the run had diverged before this "
                                  "save); sample from an earlier checkpoint")
        return cls(model, TextEncoder(config.text_encoder, device=device), config.diffusion, device)

    @property
    def resolutions(self) -> list[int]:
        return self.model.config.resolutions

    def __call__(self, prompt: str | list[str], num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = 3.0,
                 sampler: str = DEFAULT_SAMPLER, eta: float = 0.0, num_images_per_prompt: int = 1,
                 seed: int | None = 0, generator: torch.Generator | None = None, output_type: str = "pil",
                 return_trajectory: bool = False, progress: bool = False, precision: str = "auto") -> PipelineOutput:
        """Generate num_images_per_prompt images for each prompt (same order, repeats adjacent).

        guidance_scale: classifier-free guidance weight (1 = none); sampler: "dpmpp" (DPM-Solver++(2M)),
        "ddim" or "ddpm" (`mdm_lite.samplers`); seed: fixes the noise (ignored when a generator is
        given); output_type "pil" or "pt"; progress: a progress bar over the steps; precision:
        "fp32", "bf16" (the network under autocast; the sampler's arithmetic stays fp32) or "auto"
        (`uses_bf16`). On this machine's CPU (AMX) bf16 samples 1.8x faster than fp32, with the same
        prompt accuracy and judge FD for the shipped checkpoint (README).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("no prompts given; pass at least one prompt")
        options = {"prompt": prompts, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                   "eta": eta, "num_images_per_prompt": num_images_per_prompt, "seed": seed, "sampler": sampler,
                   "precision": precision}
        for name, value in options.items():
            check_value(name, value, SAMPLING_OPTIONS[name])
        check_fits(self.model.config, self.device, images=len(prompts) * num_images_per_prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        text = self.text_encoder(prompts)
        null = self.text_encoder([""])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, self.device)):
            out = sample(self.model, self.resolutions, self.diffusion, text.tokens, text.mask,
                         null_tokens=null.tokens, null_mask=null.mask, num_steps=num_inference_steps,
                         sampler=sampler, eta=eta, guidance_scale=guidance_scale, generator=generator,
                         device=self.device, return_trajectory=return_trajectory, progress=progress)
        levels, trajectory = out if return_trajectory else (out, None)
        levels = [x.float().cpu() for x in levels]
        if not all(torch.isfinite(x).all() for x in levels):
            raise SamplingFailed(f"sampling gave non-finite images (guidance_scale {guidance_scale}, eta {eta}): use a "
                                 "guidance_scale between 1 and 10, or sample from an earlier checkpoint")
        images = to_pil(levels[0]) if output_type == "pil" else levels[0]
        return PipelineOutput(images, levels, trajectory)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> N RGB PIL images."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def side_by_side(levels: list[Tensor]) -> Tensor:
    """Every nesting level of the same samples next to each other, each upsampled (nearest) to the
    largest size: list of (N, 3, R_k, R_k) -> (N, 3, R, R * num_levels)."""
    size = levels[0].shape[-1]
    return torch.cat([F.interpolate(x, size=size, mode="nearest") for x in levels], dim=-1)


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid; returns the path."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, value_range=(-1, 1),
                     normalize=True, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid[None] * 2 - 1)[0].save(path)
    return path


def plot_losses(history: list[dict], path: str | Path) -> Path:
    """Plot the total and per-level losses of a metrics history (log scale) into a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    if history:
        steps = [r["step"] for r in history]
        for key in [k for k in history[-1] if k.startswith("loss")]:
            ax.plot(steps, [r.get(key, float("nan")) for r in history], label=key.replace("loss_", "level "))
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
