"""Seconds per image of sampling with guidance, per sampler, step count and precision, in one process.

Samples --num_images images with the CPU preset's NestedUNet (random weights: the speed does not
depend on them), guidance 3 (both halves of classifier-free guidance in one batch of 2N), with
each of DDIM 50, DDIM 20, DPM-Solver++(2M) 20 guided at every step, and DPM-Solver++(2M) 20 and 15
guided at t >= 0.4 only (the default guidance interval: the other steps run N images), in fp32 and
under bf16 autocast (as `MDMPipeline(precision="bf16")`). The runs go round by round, every run
once per round, so that other jobs on the machine slow all of them alike; each time is the median
over the rounds, and the speeds are given against DDIM 50 in fp32. --clock cpu times this
process's CPU time instead of the wall clock (with --threads 1 on a shared machine: only the time
it computed). Prints the peak memory (max RSS) after the first run alone (sampling num_images
images) and at the end.

    python benchmarks/sampling.py [--num_images 16] [--rounds 3] [--runs ddim:50 dpmpp:20 ...]
        [--precisions fp32 bf16] [--threads N] [--clock wall|cpu] [--flat]
"""
import argparse
import resource
import statistics

import torch

from timing import add_clock_options, round_robin, set_up_clock

from mdm_lite import DiffusionConfig, NestedUNet
from mdm_lite.compare import flat_baseline
from mdm_lite.samplers import sample
from mdm_lite.train import TrainConfig


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sampling_run(model, num_images: int, sampler: str, steps: int, low: float, precision: str):
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randn(num_images, 16, 384, generator=g), torch.ones(num_images, 16, dtype=torch.bool)
    null_tokens, null_mask = torch.randn(1, 2, 384, generator=g), torch.ones(1, 2, dtype=torch.bool)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            sample(model, model.config.resolutions, DiffusionConfig(), tokens, mask, null_tokens=null_tokens,
                   null_mask=null_mask, num_steps=steps, sampler=sampler, guidance_scale=3.0,
                   guidance_interval=(low, 1.0), generator=torch.Generator().manual_seed(0))

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; every run once per round")
    parser.add_argument("--runs", nargs="+", default=["ddim:50", "ddim:20", "dpmpp:20", "dpmpp:20:0.4", "dpmpp:15:0.4"],
                        help="SAMPLER:STEPS[:LOW], guidance at the steps with t in [LOW, 1] (default 0: every "
                        "step); the first, in the first precision, is the reference")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--flat", action="store_true", help="also the flat UNet of the same size, in the first run")
    add_clock_options(parser)
    args = parser.parse_args()
    clock = set_up_clock(args)
    nested_cfg = TrainConfig().model
    models = {"nested": NestedUNet(nested_cfg).eval()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.num_images} images, guidance 3, "
          f"{args.clock} clock, {args.rounds} rounds; {sum(p.numel() for p in models['nested'].parameters()) / 1e6:.2f}M "
          "parameters")
    specs = [(sampler, int(steps), float(low[0]) if low else 0.0)
             for sampler, steps, *low in (run.split(":") for run in args.runs)]
    runs = {("nested", *spec, precision): sampling_run(models["nested"], args.num_images, *spec, precision)
            for precision in args.precisions for spec in specs}
    first = next(iter(runs))
    runs[first]()  # warm-up, alone: the memory of sampling num_images images
    print(f"peak memory sampling {args.num_images} images (max RSS): {peak_rss_mib():.0f} MiB")
    if args.flat:
        models["flat"] = NestedUNet(flat_baseline(nested_cfg)).eval()
        runs[("flat",) + first[1:]] = sampling_run(models["flat"], args.num_images, *first[1:])
    seconds = {key: [s / args.num_images for s in times]  # per image
               for key, times in round_robin(runs, args.rounds, clock).items()}
    reference = statistics.median(seconds[first])
    def name_of(sampler, steps, low):
        return f"{sampler:5s} {steps:3d} steps, guidance {'every step' if low == 0 else f't >= {low:g}':>10}"

    for (name, sampler, steps, low, precision), times in seconds.items():
        per_image = statistics.median(times)
        print(f"{name:6s} {name_of(sampler, steps, low)} {precision}: {per_image:6.3f} s per image, "
              f"{reference / per_image:5.2f}x the speed of {name_of(*first[1:4]).replace('  ', ' ')} {first[4]}")
    print(f"peak memory of this process at the end (max RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
