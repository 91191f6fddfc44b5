"""Images per second of one training step (forward, backward, AdamW) at 64x64 on this machine.

Runs the default NestedUNet and a single-level 64x64 UNet of about the same parameter count, in
fp32 and under bf16 autocast, in one process, and prints each speed and the ratios against the
fp32 NestedUNet (the reference run).

    python benchmarks/train_step.py [--batch_size 16] [--steps 5] [--preset cpu]
"""
import argparse
import resource
import time

import torch

from mdm_lite import DiffusionConfig, NestedUNet, multires_loss
from mdm_lite.train import PRESETS, flat_baseline


def images_per_second(model, batch_size, steps, dtype, text_dim):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, 3, 64, 64) * 2 - 1
    tokens = torch.randn(batch_size, 12, text_dim)
    mask = torch.ones(batch_size, 12, dtype=torch.bool)
    cfg = DiffusionConfig()
    levels = model.config.num_levels

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = multires_loss(model, x, tokens, mask, cfg, levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator and kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    nested_cfg = PRESETS[args.preset]().model
    models = {"nested": NestedUNet(nested_cfg), "flat": NestedUNet(flat_baseline(nested_cfg))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, preset {args.preset}")
    results = {}
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        for dtype in args.dtypes:
            results[name, dtype] = ips = images_per_second(model, args.batch_size, args.steps, dtype, nested_cfg.inner.text_dim)
            print(f"{name:7s} {n / 1e6:6.2f}M params  {dtype}: {ips:7.1f} images/s")
    ref = results["nested", args.dtypes[0]]
    for key, ips in results.items():
        print(f"ratio {key[0]}/{key[1]} vs nested/{args.dtypes[0]}: {ips / ref:.2f}x")
    for dtype in args.dtypes:
        print(f"ratio nested vs flat, {dtype}: {results['nested', dtype] / results['flat', dtype]:.2f}x")
    print(f"peak memory of this process (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
