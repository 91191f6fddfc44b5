"""Seconds to sample 16 images at 50 DDIM steps with guidance (two forward passes per step), for the
CPU preset's NestedUNet and the flat UNet of the same size, in one process; prints the ratio and
the peak memory.

    python benchmarks/sampling.py [--num_images 16] [--steps 50]
"""
import argparse
import resource
import time

import torch

from mdm_lite import DiffusionConfig, NestedUNet
from mdm_lite.samplers import sample
from mdm_lite.train import TrainConfig, flat_baseline


def seconds(model, num_images, steps):
    tokens, mask = torch.randn(num_images, 16, 384), torch.ones(num_images, 16, dtype=torch.bool)
    null_tokens, null_mask = torch.randn(1, 2, 384), torch.ones(1, 2, dtype=torch.bool)
    start = time.perf_counter()
    sample(model.eval(), model.config.resolutions, DiffusionConfig(), tokens, mask, null_tokens=null_tokens,
           null_mask=null_mask, num_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    nested_cfg = TrainConfig().model
    results = {}
    for name, cfg in (("nested", nested_cfg), ("flat", flat_baseline(nested_cfg))):
        model = NestedUNet(cfg)
        results[name] = s = seconds(model, args.num_images, args.steps)
        print(f"{name:6s} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params: {args.num_images} images "
              f"x {args.steps} steps in {s:.1f} s ({s / args.num_images:.2f} s per image), {torch.get_num_threads()} threads")
    print(f"ratio flat / nested time: {results['flat'] / results['nested']:.2f}x")
    print(f"peak memory of this process (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
