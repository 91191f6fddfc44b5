"""What the timing benchmarks share: options (--threads, --clock, --dtypes) and timing runs round by round."""
import argparse
import time
from typing import Callable, Hashable

import torch


def add_clock_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall clock or this process's CPU time")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="fp32 and/or bf16 autocast (fp32 alone on a CPU without native bf16, where it is slow)")


def set_up_clock(args: argparse.Namespace) -> Callable[[], float]:
    """Apply --threads, seed torch with 0, and return the clock --clock names."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return time.perf_counter if args.clock == "wall" else time.process_time


def round_robin(runs: dict[Hashable, Callable[[], None]], rounds: int, clock: Callable[[], float],
                calls: int = 1) -> dict[Hashable, list[float]]:
    """Seconds per call of each run, one figure per round: every run goes once (`calls` times in a
    row) per round, so that other jobs on the machine slow all of them alike."""
    seconds = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = clock()
            for _ in range(calls):
                run()
            seconds[key].append((clock() - start) / calls)
    return seconds
