"""Images per second of one training step (forward, backward, AdamW) at 64x64, against references.

Models, each in fp32 and under bf16 autocast, all in one process:

- the preset's NestedUNet (the reference of every ratio);
- diffusers' UNet2DConditionModel of about as many parameters (2.49M for the cpu preset's 2.50M:
  4 levels 64/32/16/8 of 36/72/72/72 channels, one ResNet block per level, cross-attention at
  8x8), trained on the same v target with the same optimizer, when diffusers is installed; and
  the same UNet channels-last ("diffusers NHWC": `.to(memory_format=torch.channels_last)` and
  NHWC images, the layout diffusers' docs suggest for speed), which runs faster on some CPUs;
- with --flat, the single-level UNet of the same size (`flat_baseline`);
- with --shells C:N[:P] ..., the preset's NestedUNet with lighter (or heavier) shells: C channels
  and N down-path blocks per shell (`shell_channels`, `shell_num_res_blocks`), the outermost shell
  on PxP blocks of pixels (`outer_patch`), the core unchanged, each timed against the preset in the
  same dtype;
- with --channels_last, the preset's NestedUNet run channels-last, as sampling runs (NHWC images,
  its GroupNorms' channels-last maps normalised channels-first through a copy each way, and their
  gradients copied back the same way: torch's channels-last GroupNorm backward is slow), timed
  against the preset in the same dtype;
- with --profile N, after the timing, the N operators that take the most time, in milliseconds
  of the main thread a step (torch.profiler's self CPU time), a column per run: where two runs
  differ;
- with --compile, the preset's NestedUNet under torch.compile (`mdm-lite train --compile`; on a
  CPU the compiler runs its convolutions channels-last itself) and diffusers' NHWC UNet compiled
  too, the fair reference for it, each with the time its first step (compiling) took.

The timed steps run round by round, every model and dtype once per round, so that other jobs on
the machine slow all of them alike; each speed is the median over the rounds. --clock cpu times
the process's CPU time instead of the wall clock: with one thread (--threads 1) on a shared
machine it counts only the time this process computed. Also printed: the GFLOP of a step per
image (convolutions and matrix products, forward and backward, counted by
torch.utils.flop_counter), the fraction of the matmul peak measured in the same process (a
2048^3 product in fp32 and in bf16, by torch.mm or as a 1x1 convolution, whichever is faster)
that it reaches, and the peak memory (max RSS): after the NestedUNet's first steps alone (that is
the memory of training it), and at the end.

    python benchmarks/train_step.py [--batch_size 16] [--rounds 3] [--steps 2] [--preset cpu]
        [--dtypes fp32 bf16] [--flat] [--shells 8:0 16:1:2] [--channels_last] [--no_diffusers] [--compile]
        [--profile N] [--threads N] [--clock wall|cpu]
"""
import argparse
import dataclasses
import resource
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timing import add_clock_options, add_dtype_option, round_robin, set_up_clock

from mdm_lite import DiffusionConfig, NestedUNet, add_noise, multires_loss, velocity
from mdm_lite.compare import flat_baseline
from mdm_lite.train import PRESETS
from mdm_lite.unet import GroupNorm

TEXT_LENGTH = 12


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def diffusers_unet(text_dim: int):
    """diffusers' UNet2DConditionModel with about the cpu preset's parameters, or None without diffusers."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    return UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(36, 72, 72, 72),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=3, norm_num_groups=4)  # 3 heads of 24 channels


def diffusers_nhwc_unet(text_dim: int):
    """diffusers_unet channels-last, fed NHWC images ("diffusers NHWC")."""
    return nhwc_inputs(diffusers_unet(text_dim).to(memory_format=torch.channels_last))


def training_step(model, batch_size: int, dtype: str, text_dim: int, compiled: bool = False, fused: bool = True):
    """A closure that runs one step of `model` (a NestedUNet or a diffusers UNet) on fixed random data;
    fused: AdamW's fused kernel, as mdm_lite.train (False: its loop over the parameters)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, 64, 64, generator=g) * 2 - 1
    tokens = torch.randn(batch_size, TEXT_LENGTH, text_dim, generator=g)
    mask = torch.ones(batch_size, TEXT_LENGTH, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    net = torch.compile(model) if compiled else model
    config = DiffusionConfig()

    def loss_of_step() -> torch.Tensor:
        if isinstance(model, NestedUNet):
            return multires_loss(net, x, tokens, mask, config, model.config.num_levels, generator=g)[0]
        t = torch.rand(batch_size, generator=g)  # the 64x64 level's schedule, the same v target
        logsnr, eps = config.logsnr(t, 64), torch.randn(x.shape, generator=g)
        pred = net(add_noise(x, eps, logsnr), (1000 * t).long(), tokens, encoder_attention_mask=mask).sample
        return F.mse_loss(pred.float(), velocity(x, eps, logsnr))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_of_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def flops_per_image() -> float:
        with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss_of_step().backward()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / batch_size

    step.flops_per_image = flops_per_image
    return step


def nhwc_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, its images (a tensor, or a NestedUNet's list of them) made channels-last (NHWC) as
    they enter its forward."""
    def nhwc(z: torch.Tensor) -> torch.Tensor:
        return z.contiguous(memory_format=torch.channels_last)

    def to_nhwc(module, args):
        images = args[0]
        return ([nhwc(z) for z in images] if isinstance(images, list) else nhwc(images), *args[1:])

    model.register_forward_pre_hook(to_nhwc)
    return model


def channels_last_nested(config) -> NestedUNet:
    """The NestedUNet on NHWC images, each GroupNorm's channels-last map normalised channels-first
    and handed back channels-last: the same function, in the other layout."""
    model = NestedUNet(config)
    for module in model.modules():
        if isinstance(module, GroupNorm):
            module.forward = types.MethodType(_norm_channels_first, module)
    return nhwc_inputs(model)


class _Relayout(torch.autograd.Function):
    """x copied to `layout` (channels-first or channels-last), its gradient copied to the other one,
    the layout x came in. (A plain .contiguous() hands its gradient back as it came, channels-first,
    and autograd then sums it with the residual path's channels-last gradient of the same map: a
    strided add, 34 ms a step in bf16.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        ctx.back = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
        return x.contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous(memory_format=ctx.back), None


def _norm_channels_first(norm: GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        y = GroupNorm.forward(norm, _Relayout.apply(x, torch.contiguous_format))
        return _Relayout.apply(y, torch.channels_last)
    return GroupNorm.forward(norm, x)


@torch.no_grad()
def channels_last_gap(config) -> float:
    """Largest difference between the NestedUNet's predictions channels-first and channels-last, in
    fp32, with every weight perturbed (no zero-initialised output conv hiding the rest)."""
    g = torch.Generator().manual_seed(1)
    model = NestedUNet(config)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    other = channels_last_nested(config)
    other.load_state_dict(model.state_dict())
    zs = [torch.randn(2, 3, r, r, generator=g) for r in config.resolutions]
    tokens, t = torch.randn(2, TEXT_LENGTH, config.inner.text_dim, generator=g), torch.rand(2, generator=g)
    return max((a - b).abs().max().item() for a, b in zip(model(zs, t, tokens), other(zs, t, tokens)))


def operator_times(run, steps: int) -> dict[str, float]:
    """Milliseconds a step that each operator of `run` takes itself, on the main thread (torch.profiler's
    self CPU time, over `steps` steps)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            run()
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in profile.key_averages()}


def print_operator_table(times: dict[tuple[str, str], dict[str, float]], rows: int) -> None:
    """The `rows` operators that take the most time in any run, a column per run, and each run's sum."""
    operators = sorted({op for table in times.values() for op in table},
                       key=lambda op: -max(table.get(op, 0.0) for table in times.values()))
    names = [f"{name} {dtype}" for name, dtype in times]
    width = max(map(len, names)) + 2
    print(f"{'ms a step, self CPU time':48s}" + "".join(f"{name:>{width}s}" for name in names))
    for op in operators[:rows]:
        print(f"{op[:48]:48s}" + "".join(f"{table.get(op, 0.0):{width}.1f}" for table in times.values()))
    print(f"{'all operators':48s}" + "".join(f"{sum(table.values()):{width}.1f}" for table in times.values()))


def shell(text: str) -> tuple[int, int, int]:
    """--shells' C:N or C:N:P as (shell_channels, shell_num_res_blocks, outer_patch)."""
    try:
        parts = [int(part) for part in text.split(":")]
        channels, blocks, patch = parts if len(parts) == 3 else (*parts, 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not CHANNELS:BLOCKS or CHANNELS:BLOCKS:PATCH, e.g. 8:0 "
                                         "or 16:1:2") from None
    return channels, blocks, patch


def matmul_peak(dtype: torch.dtype, clock, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` size^3 matrix products, each done two ways: by torch.mm and as
    a 1x1 convolution (oneDNN, the library of the step's convolutions), whichever is faster. On an
    AMD CPU torch.mm's fp32 (MKL) ran its AVX2 code, 215 GFLOP/s against 380 for the same product
    as a convolution, so the share of a peak from torch.mm alone came out 1.8x too high there."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    image = a.T.contiguous().reshape(1, size, size, 1)  # (1, K, M, 1): a's columns as channels
    kernel = b.T.contiguous().reshape(size, size, 1, 1)  # (N, K, 1, 1): b's columns as filters
    best = float("inf")
    for product in (lambda: a @ b, lambda: F.conv2d(image, kernel)):
        product()
        for _ in range(repeats):
            start = clock()
            product()
            best = min(best, clock() - start)
    return 2 * size ** 3 / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; every run once per round")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run and round")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    add_dtype_option(parser)
    parser.add_argument("--flat", action="store_true", help="also the single-level UNet of the same size")
    parser.add_argument("--shells", nargs="+", type=shell, default=[], metavar="C:N[:P]",
                        help="also the NestedUNet with shells of C channels and N down-path blocks, "
                             "the outermost on PxP blocks of pixels (outer_patch P, default 1)")
    parser.add_argument("--channels_last", action="store_true",
                        help="also the NestedUNet run channels-last (GroupNorm through channels-first copies)")
    parser.add_argument("--no_diffusers", action="store_true", help="leave out diffusers' UNet")
    parser.add_argument("--compile", action="store_true",
                        help="also the NestedUNet and diffusers' NHWC UNet under torch.compile (minutes of compiling)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also the N operators that take the most time, ms a step per run (torch.profiler)")
    add_clock_options(parser)
    args = parser.parse_args()
    clock = set_up_clock(args)
    nested_cfg = PRESETS[args.preset]().model
    text_dim = nested_cfg.inner.text_dim
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, preset {args.preset}, "
          f"{args.clock} clock, {args.rounds} rounds of {args.steps} steps")

    models = {"nested": NestedUNet(nested_cfg)}
    runs = {("nested", dtype): training_step(models["nested"], args.batch_size, dtype, text_dim) for dtype in args.dtypes}
    for run in runs.values():  # warm-up: allocator, oneDNN kernels
        run()
    print(f"peak memory training the NestedUNet at batch {args.batch_size} (max RSS): {peak_rss_mib():.0f} MiB")
    if not args.no_diffusers and args.preset == "cpu" and (unet := diffusers_unet(text_dim)) is not None:
        models["diffusers"] = unet
        models["diffusers NHWC"] = diffusers_nhwc_unet(text_dim)
    if args.flat:
        models["flat"] = NestedUNet(flat_baseline(nested_cfg))
    variants = [f"shells {':'.join(map(str, shell))}" for shell in args.shells]  # ours, other shells
    for name, (channels, blocks, patch) in zip(variants, args.shells):
        models[name] = NestedUNet(dataclasses.replace(nested_cfg, shell_channels=channels, shell_num_res_blocks=blocks,
                                                      outer_patch=patch))
    if args.channels_last:
        variants.append("channels-last")
        models["channels-last"] = channels_last_nested(nested_cfg)
        print(f"channels-last: largest |difference| of the predictions from channels-first ones: "
              f"{channels_last_gap(nested_cfg):.1e} (fp32 rounding)")
    for name, model in models.items():
        if name != "nested":
            for dtype in args.dtypes:
                runs[name, dtype] = training_step(model, args.batch_size, dtype, text_dim)
                runs[name, dtype]()
    compiled = {"nested+compile": lambda: NestedUNet(nested_cfg)}
    if "diffusers NHWC" in models:
        compiled["diffusers NHWC+compile"] = lambda: diffusers_nhwc_unet(text_dim)
    for name, build in compiled.items() if args.compile else ():
        for dtype in args.dtypes:
            start = time.perf_counter()
            models[name] = build()  # a fresh model for each dtype
            runs[name, dtype] = training_step(models[name], args.batch_size, dtype, text_dim, compiled=True)
            runs[name, dtype]()
            print(f"{name}, {dtype}: the first step (compiling) took {time.perf_counter() - start:.0f} s")

    seconds = round_robin(runs, args.rounds, clock, calls=args.steps)
    peaks = {"fp32": matmul_peak(torch.float32, clock), "bf16": matmul_peak(torch.bfloat16, clock)}
    print(f"matmul peak (2048^3, best of 5): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")

    speed = {}
    for key, run in runs.items():
        name, dtype = key
        speed[key] = args.batch_size / statistics.median(seconds[key])
        flops = runs[name.split("+")[0], dtype].flops_per_image()  # a compiled run's, counted on the eager one
        print(f"{name:22s} {sum(p.numel() for p in models[name].parameters()) / 1e6:5.2f}M params  {dtype}: "
              f"{speed[key]:6.1f} images/s, {flops / 1e9:.2f} GFLOP/image, "
              f"{speed[key] * flops / peaks[dtype]:5.1%} of the {dtype} matmul peak")
    reference = ("nested", args.dtypes[0])
    for key, ips in speed.items():
        if key != reference and key[0] not in variants:  # variants: against the preset below
            print(f"ratio {key[0]}/{key[1]} vs {reference[0]}/{reference[1]}: {ips / speed[reference]:.2f}x")
    ours = ["nested"] + ["nested+compile"] * args.compile
    for name in models:
        if name in variants:  # its speed against the preset's, dtype by dtype
            for dtype in args.dtypes:
                print(f"ratio {name} vs nested, {dtype}: {speed[name, dtype] / speed['nested', dtype]:.2f}x")
        elif name not in ours:
            for dtype in args.dtypes:
                for mine in ours:
                    print(f"ratio {mine} vs {name}, {dtype}: {speed[mine, dtype] / speed[name, dtype]:.2f}x")
    if args.profile:
        print_operator_table({key: operator_times(run, args.steps) for key, run in runs.items()}, args.profile)
    print(f"peak memory of this process at the end (max RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
