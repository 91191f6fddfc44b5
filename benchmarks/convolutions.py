"""Where the training step's time goes: its convolutions alone against the whole step, in one process.

Records every convolution the CPU preset's training step runs (forward, batch 16, 64x64, and
backward: torch's `convolution` and `convolution_backward` calls, with their shapes, strides,
dtype and which gradients they compute), then times each recorded call on its own, replayed
with random tensors of the same layout, round by round with the whole step (forward, backward,
AdamW: train_step.py's) in fp32 and under bf16 autocast. Prints the calls that take the most
time, each with its speed against the matmul peak measured in the same process, and the sum of
all of them against the step:

- the convolutions' share of the step, and their speed together (GFLOP counted by
  torch.utils.flop_counter);
- the step's speed-up if everything else were free (step / convolutions): the most that work
  on the normalisations, activations, attention, copies and optimizer can give, whatever it is.

    python benchmarks/convolutions.py [--batch_size 16] [--rounds 5] [--top 12] [--dtypes fp32 bf16]
        [--threads N] [--clock wall|cpu]
"""
import argparse
import collections
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from timing import add_clock_options, add_dtype_option, round_robin, set_up_clock
from train_step import matmul_peak, training_step

from mdm_lite import NestedUNet
from mdm_lite.train import PRESETS

aten = torch.ops.aten
CONVOLUTIONS = (aten.convolution.default, aten.convolution_backward.default)


class Recorder(TorchDispatchMode):
    """Counts the convolution calls run under it, by `signature`."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONVOLUTIONS:
            self.calls[func, signature(args)] += 1
        return func(*args, **(kwargs or {}))


def signature(args) -> tuple:
    """A call's arguments, hashable: each tensor as (shape, stride, dtype), lists as tuples."""
    def one(arg):
        if isinstance(arg, torch.Tensor):
            return "tensor", tuple(arg.shape), arg.stride(), arg.dtype
        return tuple(arg) if isinstance(arg, (list, tuple)) else arg
    return tuple(one(arg) for arg in args)


def replay(func, sig: tuple):
    """A closure that runs `func` on random tensors laid out as in the recorded call `sig`."""
    g = torch.Generator().manual_seed(0)

    def argument(arg):
        if isinstance(arg, tuple) and arg[:1] == ("tensor",):
            _, shape, stride, dtype = arg
            return torch.empty_strided(shape, stride, dtype=torch.float32).normal_(generator=g).to(dtype)
        return list(arg) if isinstance(arg, tuple) else arg
    args = [argument(arg) for arg in sig]

    def run():
        func(*args)

    with FlopCounterMode(display=False) as counter:
        run()
    run.flops = counter.get_total_flops()
    return run


def describe(func, sig: tuple) -> str:
    """'forward  (16, 48, 64, 64) -> 16 ch, 3x3, NCHW, float32' and the like, for a recorded call.

    The positions are those of torch's schemas: convolution(input, weight, bias, stride, padding,
    dilation, transposed, output_padding, groups) and convolution_backward(grad_output, input,
    weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask).
    """
    if func is aten.convolution.default:
        x, w, transposed = sig[0], sig[1], sig[6]
        kind = "forward, transposed" if transposed else "forward"
    else:
        x, w, transposed, mask = sig[1], sig[2], sig[7], sig[10]
        wanted = [name for name, on in zip(("input", "weight", "bias"), mask) if on]
        kind = f"backward{', transposed' if transposed else ''} ({', '.join(wanted)})"
    out = w[1][1] if transposed else w[1][0]
    layout = "NHWC" if x[2][1] == 1 and x[1][1] > 1 else "NCHW"
    dtype = str(x[3]).removeprefix("torch.")
    return f"{kind:44s} {str(x[1]):18s} -> {out:3d} ch, {w[1][2]}x{w[1][3]}, {layout}, {dtype}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; every call and the step once per round")
    parser.add_argument("--top", type=int, default=12, help="how many of the slowest calls to print per dtype")
    add_dtype_option(parser)
    add_clock_options(parser)
    args = parser.parse_args()
    clock = set_up_clock(args)
    config = PRESETS["cpu"]().model
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.clock} clock, {args.rounds} rounds")

    model = NestedUNet(config)
    runs, counts = {}, {}
    for dtype in args.dtypes:
        step = training_step(model, args.batch_size, dtype, config.inner.text_dim)
        step()  # warm-up: allocator, oneDNN kernels
        with Recorder() as recorder:
            step()
        runs[dtype, "step"] = step
        for (func, sig), count in recorder.calls.items():
            runs[dtype, func, sig] = replay(func, sig)
            runs[dtype, func, sig]()
            counts[dtype, func, sig] = count
    seconds = {key: statistics.median(times) for key, times in round_robin(runs, args.rounds, clock).items()}

    for dtype in args.dtypes:
        peak = matmul_peak(torch.float32 if dtype == "fp32" else torch.bfloat16, clock)
        calls = [key for key in counts if key[0] == dtype]
        total = {key: seconds[key] * counts[key] for key in calls}
        print(f"\n{dtype}: the {args.top} convolution calls that take the most time in a step "
              f"(matmul peak {peak / 1e9:.0f} GFLOP/s)")
        for key in sorted(calls, key=total.get, reverse=True)[:args.top]:
            rate = runs[key].flops / seconds[key]
            print(f"  {describe(*key[1:])} x{counts[key]:2d}: {1e3 * seconds[key]:6.2f} ms each, "
                  f"{1e3 * total[key]:6.1f} ms, {rate / 1e9:5.0f} GFLOP/s ({rate / peak:4.0%} of the peak)")
        conv_s, step_s = sum(total.values()), seconds[dtype, "step"]
        flops = sum(runs[key].flops * counts[key] for key in calls)
        print(f"{dtype}: the step {1e3 * step_s:.0f} ms ({args.batch_size / step_s:.1f} images/s); its "
              f"{sum(counts[key] for key in calls)} convolution calls alone {1e3 * conv_s:.0f} ms "
              f"({conv_s / step_s:.0%} of the step) at {flops / conv_s / 1e9:.0f} GFLOP/s "
              f"({flops / conv_s / peak:.0%} of the matmul peak); everything else {1e3 * (step_s - conv_s):.0f} ms")
        print(f"{dtype}: with everything but the convolutions free, the step would be at most "
              f"{step_s / conv_s:.2f}x faster")


if __name__ == "__main__":
    main()
