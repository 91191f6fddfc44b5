"""The layers' fast forms against their plain forms, and the training step with each, in one process.

Four places of the CPU preset's training step and sampling compute the same function in a cheaper way; this
times each against the plain form it replaced (the reference of each ratio):

- `Upsample`: one stride-2 4x4 transposed conv, against a nearest x2 copy then the 3x3 conv;
- `AttentionBlock`: the pixels as a (B, H*W, C) sequence, which torch's fused attention kernel
  takes, with attention in fp32 on the CPU, against the (B, C, H*W) layout, which made
  `scaled_dot_product_attention` fall back to its unfused kernel;
- AdamW: `fused=True`, against the default loop over the parameters;
- `GroupNorm`: under bf16, channels-last maps under 32x32 (sampling's 16x16 and 8x8 levels)
  normalised channels-first, against torch's channels-last kernel (no layer row: training is
  channels-first, so only the sampling row shows it).

Each layer fwd + bwd at the preset's shapes, then the whole step (forward, backward, AdamW:
train_step.py's) and sampling (16 images, DPM-Solver++ 20 steps, guidance 3 at every step) with
all plain forms against all fast ones, fp32 and bf16 autocast, round by round; medians. It also
prints the largest difference between the two forms' outputs (fp32: rounding only).

    python benchmarks/layers.py [--batch_size 16] [--rounds 5] [--threads N] [--clock wall|cpu]
"""
import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from timing import add_clock_options, round_robin, set_up_clock
from train_step import TEXT_LENGTH, training_step

from mdm_lite import DiffusionConfig, NestedUNet
from mdm_lite.samplers import sample
from mdm_lite.train import PRESETS
from mdm_lite.unet import AttentionBlock, GroupNorm, Upsample


def plain_upsample(self: Upsample, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def plain_attention(self: AttentionBlock, x, tokens=None, mask=None):
    """The block on (B, C, N) maps: 1x1 Conv1d projections, heads split from the channel axis."""
    b, c, h, w = x.shape

    def heads(t):  # (B, C, N) -> (B, heads, N, C / heads), not contiguous
        return t.reshape(b, self.heads, c // self.heads, t.shape[-1]).transpose(2, 3)

    flat = x.reshape(b, c, h * w)
    pos = 0.0 if self.pos is None else self.pos.T.to(x.dtype)
    q, k, v = self.qkv(self.norm(x).reshape(b, c, h * w) + pos).chunk(3, dim=1)
    a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    flat = flat + self.out(a.transpose(2, 3).reshape(b, c, h * w))
    if tokens is not None and self.cross_attention:
        q = heads(self.cross_q(self.cross_norm(flat.reshape(b, c, h, w)).reshape(b, c, h * w) + pos))
        k, v = self.cross_kv(tokens).transpose(1, 2).chunk(2, dim=1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, heads(k), heads(v), attn_mask=attn_mask)
        flat = flat + self.cross_out(a.transpose(2, 3).reshape(b, c, h * w))
    return flat.reshape(b, c, h, w)


FAST = {Upsample: Upsample.forward, AttentionBlock: AttentionBlock.forward, GroupNorm: GroupNorm.forward}
PLAIN = {Upsample: plain_upsample, AttentionBlock: plain_attention, GroupNorm: nn.GroupNorm.forward}


@contextlib.contextmanager
def forms(plain: bool):
    """Run the layers in their plain forms (plain=True) or their fast ones, the code's own."""
    for cls, forward in (PLAIN if plain else FAST).items():
        cls.forward = forward
    try:
        yield
    finally:
        for cls, forward in FAST.items():
            cls.forward = forward


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def layer_run(layer, inputs, dtype: str, plain: bool):
    """fwd + bwd of one layer on fixed inputs (the first one gets a gradient)."""
    x = inputs[0].detach().requires_grad_()

    def run():
        with forms(plain), autocast(dtype):
            out = layer(x, *inputs[1:])
        out.float().sum().backward()
    return run


def step_run(model: NestedUNet, batch_size: int, dtype: str, plain: bool):
    """train_step.py's training step, with the plain forms and AdamW's loop (plain=True) or the fast ones."""
    step = training_step(model, batch_size, dtype, model.config.inner.text_dim, fused=not plain)

    def run():
        with forms(plain):
            step()
    return run


def sampling_run(model: NestedUNet, num_images: int, dtype: str, plain: bool):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(num_images, TEXT_LENGTH, model.config.inner.text_dim, generator=g)
    mask = torch.ones(num_images, TEXT_LENGTH, dtype=torch.bool)
    null_tokens, null_mask = torch.randn(1, 2, tokens.shape[-1], generator=g), torch.ones(1, 2, dtype=torch.bool)

    def run():
        with forms(plain), autocast(dtype):
            sample(model, model.config.resolutions, DiffusionConfig(), tokens, mask, null_tokens=null_tokens,
                   null_mask=null_mask, num_steps=20, sampler="dpmpp", guidance_scale=3.0,
                   guidance_interval=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    add_clock_options(parser)
    args = parser.parse_args()
    clock = set_up_clock(args)
    config = PRESETS["cpu"]().model
    b, text_dim = args.batch_size, config.inner.text_dim
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}, {args.clock} clock, "
          f"{args.rounds} rounds")

    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randn(b, TEXT_LENGTH, text_dim, generator=g), torch.ones(b, TEXT_LENGTH, dtype=torch.bool)
    mask[: b // 2, TEXT_LENGTH // 2:] = False
    layers = {  # the preset's shapes: the 64x64 shell's upsample, the core's attention at 16 and 8
        "Upsample 32 ch, 32->64": (Upsample(32), (torch.randn(b, 32, 32, 32, generator=g),)),
        "AttentionBlock 48 ch, 16x16": (AttentionBlock(48, 32, text_dim, 16),
                                        (torch.randn(b, 48, 16, 16, generator=g), tokens, mask)),
        "AttentionBlock 96 ch, 8x8": (AttentionBlock(96, 32, text_dim, 8),
                                      (torch.randn(b, 96, 8, 8, generator=g), tokens, mask)),
    }
    runs, differences = {}, {}
    for name, (layer, inputs) in layers.items():
        with torch.no_grad():
            for p in layer.parameters():  # no zero-initialised output layer hiding the rest
                p.normal_(0, 0.1, generator=g)
            with forms(True):
                reference = layer(*inputs)
            differences[name] = (layer(*inputs) - reference).abs().max().item()
        for dtype in ("fp32", "bf16"):
            for plain in (True, False):
                runs[name, dtype, plain] = layer_run(layer, inputs, dtype, plain)
    torch.manual_seed(0)
    for dtype in ("fp32", "bf16"):
        for plain in (True, False):  # one model per run: each has its own optimizer state
            runs["training step", dtype, plain] = step_run(NestedUNet(config), b, dtype, plain)
    sampler_model = NestedUNet(config).eval()
    for dtype in ("fp32", "bf16"):
        for plain in (True, False):
            runs[f"sampling {b} images", dtype, plain] = sampling_run(sampler_model, b, dtype, plain)
    for run in runs.values():  # warm-up
        run()

    seconds = round_robin(runs, args.rounds, clock)
    for name in [*layers, "training step", f"sampling {b} images"]:
        for dtype in ("fp32", "bf16"):
            plain, fast = (statistics.median(seconds[name, dtype, p]) for p in (True, False))
            if name == "training step":
                rate = f"{b / plain:5.1f} -> {b / fast:5.1f} images/s"
            elif name.startswith("sampling"):
                rate = f"{plain / b:5.3f} -> {fast / b:5.3f} s per image"
            else:
                rate = f"{plain * 1e3:6.1f} -> {fast * 1e3:6.1f} ms fwd + bwd"
            print(f"{name:28s} {dtype}: {rate}, {plain / fast:.2f}x")
        if name in differences:
            print(f"{name:28s} largest |fast - plain| of the fp32 outputs: {differences[name]:.1e}")


if __name__ == "__main__":
    main()
