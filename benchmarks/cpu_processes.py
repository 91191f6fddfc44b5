"""Training images/s on an N-core CPU: one process of N threads against N processes of one thread.

The CPU preset's small convolutions (16 to 96 channels) do not split well over threads: on 2 cores
a second thread adds little. N processes of one thread each, every one a data-parallel replica
(DistributedDataParallel over gloo) with batch_size / N images, keep every core busy on its own
convolutions and average the gradients once per step. Both ways see the same global batch, so
they are the same training: this is what `torchrun --nproc_per_node N -m mdm_lite train ...`
does on a CPU.

Rounds alternate the two ways (fresh processes each time, so that other jobs on the machine slow
both alike); each speed is the median over rounds, the wall clock of `steps` steps after 2 warm-up
steps, in images per second of the global batch.

    python benchmarks/cpu_processes.py [--processes 2] [--batch_size 16] [--steps 10] [--rounds 3]
        [--dtype fp32|bf16]
"""
import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from mdm_lite import NestedUNet, multires_loss
from mdm_lite.train import cpu_preset

TEXT_LENGTH = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica(rank: int, world: int, threads: int, batch_size: int, steps: int, dtype: str, port: int, out):
    """One process: `threads` threads, batch_size / world images a step; rank 0 puts images/s in out."""
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = cpu_preset()
    torch.manual_seed(0)  # the same initial weights in every replica, as train() makes them
    model = NestedUNet(config.model)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as mdm_lite.train
    g = torch.Generator().manual_seed(rank)
    local = batch_size // world
    x = torch.rand(local, 3, 64, 64, generator=g) * 2 - 1
    tokens = torch.randn(local, TEXT_LENGTH, config.model.inner.text_dim, generator=g)
    mask = torch.ones(local, TEXT_LENGTH, dtype=torch.bool)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = multires_loss(net, x, tokens, mask, config.diffusion, config.model.num_levels, generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the replicas here
        optimizer.step()

    for _ in range(2):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    if rank == 0:
        out.put(steps * local * world / (time.perf_counter() - start))
    dist.destroy_process_group()


def images_per_s(world: int, threads: int, args) -> float:
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    mp.start_processes(replica, args=(world, threads, args.batch_size, args.steps, args.dtype, free_port(), out),
                       nprocs=world, start_method="spawn")
    return out.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="N: cores to use")
    parser.add_argument("--batch_size", type=int, default=16, help="the global batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    n = args.processes
    if args.batch_size % n:
        parser.error(f"--batch_size {args.batch_size} must be a multiple of --processes {n}")
    ways = {f"1 process x {n} threads": (1, n), f"{n} processes x 1 thread": (n, 1)}
    speeds = {name: [] for name in ways}
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, global batch {args.batch_size}, {args.dtype}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for _ in range(args.rounds):
        for name, (world, threads) in ways.items():
            speeds[name].append(images_per_s(world, threads, args))
    median = {name: statistics.median(s) for name, s in speeds.items()}
    for name, ips in median.items():
        print(f"{name:24s} {ips:6.1f} images/s  (rounds: {', '.join(f'{s:.1f}' for s in speeds[name])})")
    one, many = median.values()
    print(f"ratio {n} processes vs 1 process: {many / one:.2f}x")


if __name__ == "__main__":
    main()
