"""Whether a model fits in memory, estimated before anything is allocated (chapter 8 sizes the
presets; training and sampling call `check_fits` first).

The model is built on the meta device (shapes only, no storage) and run once on a meta batch of
one image, with forward hooks on every layer. From that, per image:

- training: the output of every layer and every attention's score matrices, all kept for the
  backward pass, plus the weights five times over (weights, gradients, AdamW's two moments, EMA);
- sampling (twice the images, with guidance): the skip connections of every level, all alive at
  the innermost level, plus one layer's input and output at the largest.

All in fp32, 4 bytes a float. Both are lower bounds: functional ops (SiLU, concatenation, norms)
hold temporaries too. On the CPU preset, measured peaks were 1.7x the training figure and 1.4x
the sampling one. `check_fits` refuses what even the lower bound says cannot fit in the memory the
device has free; a run close to the limit can still run out, which `mdm-lite` reports as such.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config_check import ConfigError
from .nested import NestedUNet, NestedUNetConfig
from .unet import AttentionBlock, UNet

TEXT_LENGTH = 32  # tokens per caption, TextEncoder's default max_length


@dataclass(frozen=True)
class Footprint:
    """parameters: the model's count. Floats per image: kept, every layer's output and attention
    scores; skips, the outputs the UNets keep for their skip connections; largest, the largest
    single layer output."""

    parameters: int
    kept: int
    skips: int
    largest: int

    def training_bytes(self, batch_size: int) -> int:
        return 4 * (5 * self.parameters + batch_size * self.kept)

    def sampling_bytes(self, images: int) -> int:
        return 4 * (self.parameters + 2 * images * (self.skips + 2 * self.largest))


_footprints: dict[str, Footprint] = {}  # by repr(config): a pipeline checks before every call


def footprint(config: NestedUNetConfig) -> Footprint:
    """The Footprint of a NestedUNet of `config`, from a forward pass on the meta device."""
    if repr(config) not in _footprints:
        _footprints[repr(config)] = _measure(config)
    return _footprints[repr(config)]


def _measure(config: NestedUNetConfig) -> Footprint:
    with torch.device("meta"):
        model = NestedUNet(config)
    outputs: list[int] = []
    skips: list[int] = []

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(module, AttentionBlock):  # scores: heads x pixels x (pixels + text tokens)
            pixels = inputs[0].shape[-2] * inputs[0].shape[-1]
            outputs.append(module.heads * pixels * (pixels + TEXT_LENGTH))
        elif not list(module.children()):
            outputs.append(output.numel())

    def skip(module: nn.Module, inputs, output) -> None:
        skips.append(output.numel())

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    for unet in (m for m in model.modules() if isinstance(m, UNet)):  # UNet.encode's skips: conv_in, then each down layer
        hooks += [layer.register_forward_hook(skip) for layer in (unet.conv_in, *unet.down)]
    text_dim = config.inner.text_dim
    with torch.device("meta"), torch.no_grad():
        model([torch.empty(1, 3, r, r) for r in config.resolutions], torch.empty(1),
              torch.empty(1, TEXT_LENGTH, text_dim) if text_dim else None,
              torch.ones(1, TEXT_LENGTH, dtype=torch.bool) if text_dim else None)
    for hook in hooks:
        hook.remove()
    return Footprint(sum(p.numel() for p in model.parameters()), sum(outputs), sum(skips), max(outputs))


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: the GPU's free memory, or the CPU's available
    memory (Linux's MemAvailable); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _size(n: float, unit: str = "B") -> str:
    """n with a decimal prefix: 37.2 PB, 2.5 M (parameters)."""
    for prefix in ("", "K", "M", "G", "T", "P"):
        if n < 1000 or prefix == "P":
            return f"{n:.0f} {prefix}{unit}" if not prefix else f"{n:.1f} {prefix}{unit}"
        n /= 1000


def check_fits(config: NestedUNetConfig, device: torch.device, *, batch_size: int | None = None,
               images: int | None = None) -> None:
    """Raise ConfigError if training at `batch_size`, or sampling `images` at once, cannot fit in
    the memory `device` has free (see the module docstring for what is counted)."""
    free = available_bytes(device)
    if free is None:
        return
    try:
        fp = footprint(config)
    except RuntimeError as error:  # shapes whose sizes overflow 64 bits, even on the meta device
        if "overflow" not in str(error):
            raise
        raise ConfigError(f"this model's tensors at image_size {config.image_size} are too large to count "
                          f"({str(error).splitlines()[0][:80]}): use a smaller image_size") from None
    if batch_size is not None:
        need = fp.training_bytes(batch_size)
        if need > free:
            largest = (free - fp.training_bytes(0)) // (4 * fp.kept)
            fix = (f"a --batch_size of at most {largest}" if largest >= 1 else
                   "a smaller model (model.inner.channels, channel_mult, num_res_blocks, shell_channels)")
            raise ConfigError(f"training this model ({_size(fp.parameters, '')} parameters) at batch_size "
                              f"{batch_size} needs at least {_size(need)} but {device} has {_size(free)} free: use {fix}")
    if images is not None:
        need = fp.sampling_bytes(images)
        if need > free:
            largest = max(0, (free - fp.sampling_bytes(0)) // (fp.sampling_bytes(1) - fp.sampling_bytes(0)))
            fix = (f"ask for at most {largest} (fewer prompts or --num_per_prompt), and run again with another "
                   "--seed for more" if largest else f"this model ({_size(fp.parameters, '')} parameters) is too "
                   "large for it: use a smaller one")
            raise ConfigError(f"sampling {images} image{'s' if images > 1 else ''} at once needs at least "
                              f"{_size(need)} but {device} has {_size(free)} free: {fix}")
