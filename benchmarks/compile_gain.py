"""What `mdm-lite train --compile` buys: the training step compiled against eager, in fresh processes.

Timed in one process beside other compiled models (`train_step.py --compile`), a compiled step's
speed varied from run to run far more than the eager step's on a busy machine. Here each run is a
process of its own holding one model: the CPU preset's NestedUNet, one training step (forward,
backward, AdamW) at batch 16, 64x64, as `train_step.py` runs it. Rounds alternate eager and
compiled processes (so that other jobs on the machine slow both alike); each process times
`steps` steps after 2 warm-up steps (the first of them compiles: seconds when torch's cache holds
the graph, minutes when it does not; printed). The ratio is compiled over eager, per round and the
median over rounds. With --options KEY=VALUE ..., a third process per round compiles with those of
inductor's settings (`torch._inductor.config`, e.g. conv_1x1_as_mm=True) and is timed against the
plain compiled step as well.

    python benchmarks/compile_gain.py [--rounds 3] [--steps 12] [--dtypes fp32 bf16] [--threads 2]
        [--options conv_1x1_as_mm=True]
"""
import argparse
import ast
import statistics
import subprocess
import sys
import time

import torch
import torch._inductor.config as inductor_config

from timing import add_dtype_option
from train_step import training_step

from mdm_lite import NestedUNet
from mdm_lite.train import cpu_preset


def inductor_options(pairs: list[str]) -> dict:
    """{"conv_1x1_as_mm": True} from ["conv_1x1_as_mm=True"]: values as Python literals, else strings."""
    options, known = {}, inductor_config.get_config_copy()
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in known:
            sys.exit(f"compile_gain.py: torch._inductor.config has no setting {key!r}; see its config.py")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def child(mode: str, dtype: str, steps: int, threads: int, options: dict) -> None:
    """Print 'compile_s images_per_s' of one model in this process (mode eager, compile, or options:
    compiled with `options` set)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = cpu_preset().model
    with inductor_config.patch(options if mode == "options" else {}):
        step = training_step(NestedUNet(config), 16, dtype, config.inner.text_dim, compiled=mode != "eager")
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        step()
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
    print(f"{first:.1f} {16 / statistics.median(seconds):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    add_dtype_option(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="inductor settings for a third, compiled process per round")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = inductor_options(args.options)
    if args.child:
        return child(*args.child, args.steps, args.threads, options)
    print(f"torch {torch.__version__}, {args.threads} threads, batch 16, preset cpu, {args.rounds} rounds of a fresh "
          f"process per run, {args.steps} timed steps each{f', options {options}' if options else ''}")
    modes = ("eager", "compile", "options") if options else ("eager", "compile")
    passed_on = ["--options", *args.options] if options else []
    speeds = {(mode, dtype): [] for dtype in args.dtypes for mode in modes}
    for round_ in range(args.rounds):
        for mode, dtype in speeds:
            done = subprocess.run([sys.executable, __file__, "--child", mode, dtype, "--steps", str(args.steps),
                                   "--threads", str(args.threads), *passed_on],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"compile_gain.py: the {mode} {dtype} process failed: {done.stderr.strip().splitlines()[-1]}")
            first, ips = map(float, done.stdout.split())
            speeds[mode, dtype].append(ips)
            print(f"round {round_ + 1}, {mode:7s} {dtype}: {ips:5.1f} images/s (first step {first:.0f} s)", flush=True)
    for dtype in args.dtypes:
        ratios = [c / e for c, e in zip(speeds["compile", dtype], speeds["eager", dtype])]
        print(f"{dtype}: eager {statistics.median(speeds['eager', dtype]):.1f}, compiled "
              f"{statistics.median(speeds['compile', dtype]):.1f} images/s; compiled / eager per round "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}, median {statistics.median(ratios):.2f}x")
        if options:
            ratios = [o / c for o, c in zip(speeds["options", dtype], speeds["compile", dtype])]
            print(f"{dtype}: compiled with the options {statistics.median(speeds['options', dtype]):.1f} images/s; "
                  f"over compiled without them per round {', '.join(f'{r:.2f}x' for r in ratios)}, "
                  f"median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
