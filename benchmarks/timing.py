"""What the timing benchmarks (sampling.py, train_step.py) share: their --threads and --clock options."""
import argparse
import time
from typing import Callable

import torch


def add_clock_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall clock or this process's CPU time")


def set_up_clock(args: argparse.Namespace) -> Callable[[], float]:
    """Apply --threads, seed torch with 0, and return the clock --clock names."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return time.perf_counter if args.clock == "wall" else time.process_time
