"""Sampling from a trained model: a diffusers-style pipeline (chapter 7 builds it).

::

    from mdm_lite import MDMPipeline
    pipe = MDMPipeline.from_pretrained("output/checkpoint_latest")
    images = pipe(["a red circle in the center", "a small blue star top left"]).images  # PIL images

A pipeline holds a NestedUNet, its frozen text encoder and its DiffusionConfig; calling it encodes
the prompts and the empty prompt, and runs `mdm_lite.samplers.sample` on every nesting level at
once (Gu et al. 2023, Sec. 3.3). `from_pretrained` builds all three from a checkpoint's config.json
(its "model", "diffusion" and "text_encoder" entries) and its EMA weights: sampling needs none of
the training code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from PIL import Image
from torch import Tensor

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_weights
from .config_check import ConfigError, NonEmpty, NonNegative, OneOf, Positive, Seed, check_value
from .device import PRECISIONS, choose_precision, resolve_device
from .diffusion import DiffusionConfig
from .images import to_pil
from .memory import check_fits
from .nested import NestedUNet, NestedUNetConfig
from .samplers import (DEFAULT_GUIDANCE_INTERVAL, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, check_guidance_interval,
                       sample)
from .text import TextEncoder


@dataclass
class PipelineOutput:
    """images: the largest level, as PIL images or a (N, 3, R, R) tensor in [-1, 1];
    levels: every level, largest first, tensors in [-1, 1]; trajectory: see `samplers.sample`."""

    images: list[Image.Image] | Tensor
    levels: list[Tensor] = field(default_factory=list)
    trajectory: list[dict] | None = None


def checkpoint_configs(ckpt: Checkpoint) -> tuple[NestedUNetConfig, DiffusionConfig, str | None]:
    """What sampling needs of a checkpoint's config.json: the model's config, the diffusion config
    and the text encoder (None: the bundled one). A value that cannot work is a CheckpointError
    naming the file and the field."""
    config = ckpt.config
    try:
        model = check_value("model", config.get("model"), NestedUNetConfig)
        diffusion = check_value("diffusion", config.get("diffusion", {}), DiffusionConfig)
        text_encoder = check_value("text_encoder", config.get("text_encoder"), Annotated[str, NonEmpty] | None)
    except ConfigError as error:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: {error}") from None
    return model, diffusion, text_encoder


# The types and ranges of MDMPipeline's options, checked as config fields are (`config_check`).
SAMPLING_OPTIONS = {
    "prompt": list[str], "num_inference_steps": Annotated[int, Positive], "guidance_scale": float,
    "eta": Annotated[float, NonNegative], "num_images_per_prompt": Annotated[int, Positive],
    "seed": Annotated[int, Seed] | None, "sampler": Annotated[str, OneOf(*SAMPLERS)],
    "precision": Annotated[str, OneOf(*PRECISIONS)],
}


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
        """Load a checkpoint directory, an output_dir (its checkpoint_latest), the pointer itself, or
        "shapes" (the checkpoint shipped in the package). use_ema: the moving-average weights
        (better samples) rather than the raw ones."""
        device = resolve_device(device)
        ckpt = load_checkpoint(checkpoint)
        model_config, diffusion, text_encoder = checkpoint_configs(ckpt)
        check_fits(model_config, device, images=1)
        model = NestedUNet(model_config)
        if not use_ema and ckpt.model is None:
            raise CheckpointError(f"{ckpt.path} is an exported checkpoint with EMA weights only; drop --no_ema")
        load_weights(model, ckpt.ema if use_ema else ckpt.model, ckpt.path)
        if not model.gives_finite_outputs():
            raise CheckpointError(f"{ckpt.path}: its weights give non-finite outputs (the run had diverged before this "
                                  "save); sample from an earlier checkpoint")
        return cls(model, TextEncoder(text_encoder, device=device), diffusion, device)

    @property
    def resolutions(self) -> list[int]:
        """Image side of every level, largest first."""
        return self.model.config.resolutions

    def uses_bf16(self, precision: str = "auto") -> bool:
        """Whether sampling at `precision` runs the network under bf16 autocast on this pipeline's
        device: "bf16", or "auto" where training's "auto" picks it (`device.choose_precision`)."""
        return choose_precision(precision, self.device)[0]

    def __call__(self, prompt: str | list[str], num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = 3.0,
                 guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL, sampler: str = DEFAULT_SAMPLER,
                 eta: float = 0.0, num_images_per_prompt: int = 1,
                 seed: int | None = 0, generator: torch.Generator | None = None, output_type: str = "pil",
                 return_trajectory: bool = False, progress: bool = False, precision: str = "auto") -> PipelineOutput:
        """Generate num_images_per_prompt images for each prompt (same order, repeats adjacent).

        guidance_scale: classifier-free guidance weight (1 = none); guidance_interval (low, high): the
        times t in [0, 1] (1: pure noise) of the guided steps, the others conditional only
        (`mdm_lite.samplers`; (0, 1): every step); sampler: "dpmpp" (DPM-Solver++(2M)),
        "ddim" or "ddpm" (`mdm_lite.samplers`); seed: fixes the noise (ignored when a generator is
        given); output_type "pil" or "pt"; progress: a progress bar over the steps; precision:
        "fp32", "bf16" (the network under autocast; the sampler's arithmetic stays fp32) or "auto"
        (`uses_bf16`).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("no prompts given; pass at least one prompt")
        options = {"prompt": prompts, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                   "eta": eta, "num_images_per_prompt": num_images_per_prompt, "seed": seed, "sampler": sampler,
                   "precision": precision}
        for name, value in options.items():
            check_value(name, value, SAMPLING_OPTIONS[name])
        check_guidance_interval(guidance_interval)
        check_fits(self.model.config, self.device, images=len(prompts) * num_images_per_prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        text = self.text_encoder(prompts)
        null = self.text_encoder([""])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.uses_bf16(precision)):
            out = sample(self.model, self.resolutions, self.diffusion, text.tokens, text.mask,
                         null_tokens=null.tokens, null_mask=null.mask, num_steps=num_inference_steps,
                         sampler=sampler, eta=eta, guidance_scale=guidance_scale,
                         guidance_interval=guidance_interval, generator=generator,
                         device=self.device, return_trajectory=return_trajectory, progress=progress)
        levels, trajectory = out if return_trajectory else (out, None)
        levels = [x.float().cpu() for x in levels]
        if not all(torch.isfinite(x).all() for x in levels):
            raise SamplingFailed(f"sampling gave non-finite images (guidance_scale {guidance_scale}, eta {eta}): use a "
                                 "guidance_scale between 1 and 10, or sample from an earlier checkpoint")
        images = to_pil(levels[0]) if output_type == "pil" else levels[0]
        return PipelineOutput(images, levels, trajectory)
