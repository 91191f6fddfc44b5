"""The speed work in one number: today's code against the code the speed issue measured, in one process.

`git archive` puts the package of an earlier commit (--before; default 332aebf, the last commit
before the speed work began) beside today's as `mdm_lite_before`, and both train and sample the
same network, round by round, so that other jobs on the machine slow both alike:

- training: the CPU preset of that commit (2.50M parameters: attention at 8x8 only, no position
  embedding), one step (forward, backward, AdamW as each code's `train` builds it) at batch 16,
  64x64, fp32 and bf16 autocast; then today's preset (2.65M: attention at 16 and 8, a position
  embedding) on today's code, which the README's other figures are of; with --compile also both
  networks under torch.compile on today's code (`mdm-lite train --compile`), with the time each
  first step (compiling) took;
- sampling: --sample_batch prompts with guidance 3, the earlier code's default (DDIM 50 guided at
  every step, fp32, no_grad) against today's default (`samplers.sample`'s: DPM-Solver++(2M), its
  DEFAULT_STEPS, guided at the times of DEFAULT_GUIDANCE_INTERVAL only) and DPM-Solver++(2M) 20
  guided at every step, in fp32 and under bf16 autocast.

Each speed is the median over the rounds; the ratios are today's over the earlier code's.

--dtypes fp32 leaves bf16 out: on a CPU without native bf16 (neither AMX nor AVX512-BF16), where
`--precision auto` trains and samples in fp32, autocast ran the step 15x and 17x slower on the two
such CPUs measured.

    python benchmarks/before_after.py [--before REV] [--rounds 5] [--sample_batch 4] [--compile]
        [--dtypes fp32 bf16] [--threads N] [--clock wall|cpu]
"""
import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from timing import add_clock_options, add_dtype_option, round_robin, set_up_clock
from train_step import TEXT_LENGTH, training_step

import mdm_lite
from mdm_lite import DiffusionConfig, NestedUNet, NestedUNetConfig, UNetConfig
from mdm_lite.samplers import DEFAULT_GUIDANCE_INTERVAL, DEFAULT_STEPS, sample
from mdm_lite.train import PRESETS

REPO = Path(__file__).resolve().parent.parent
# Today's samplers: the default, and DPM-Solver++ 20 guided at every step as the earlier code guided.
SAMPLING_AFTER = {
    f"dpmpp {DEFAULT_STEPS}, guided t >= {DEFAULT_GUIDANCE_INTERVAL[0]:g} (default)": {},
    "dpmpp 20, guided every step": dict(num_steps=20, sampler="dpmpp", guidance_interval=(0.0, 1.0)),
}


def import_before(rev: str, folder: Path):
    """The package of commit `rev` as the module `mdm_lite_before` (its imports are relative)."""
    archive = folder / "before.tar"
    with archive.open("wb") as out:
        done = subprocess.run(["git", "-C", str(REPO), "archive", rev, "mdm_lite"], stdout=out, stderr=subprocess.PIPE)
    if done.returncode:
        sys.exit(f"before_after.py: git cannot archive {rev} ({done.stderr.decode().strip()}); run it in a full "
                 "clone of the repository (git fetch --unshallow), or pass --before <a commit it has>")
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (folder / "src" / "mdm_lite").rename(folder / "src" / "mdm_lite_before")
    sys.path.insert(0, str(folder / "src"))
    return importlib.import_module("mdm_lite_before")


def todays_config(config) -> NestedUNetConfig:
    """The earlier code's NestedUNetConfig as today's (the same network)."""
    inner = {name: getattr(config.inner, name) for name in UNetConfig.__dataclass_fields__ if hasattr(config.inner, name)}
    return NestedUNetConfig(image_size=config.image_size, num_levels=config.num_levels, inner=UNetConfig(**inner),
                            shell_channels=config.shell_channels, shell_num_res_blocks=config.shell_num_res_blocks)


def before_step(before, model, batch_size: int, dtype: str, text_dim: int):
    """One training step of the earlier code: its loss, and AdamW as its `train` built it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, 64, 64, generator=g) * 2 - 1
    tokens = torch.randn(batch_size, TEXT_LENGTH, text_dim, generator=g)
    mask = torch.ones(batch_size, TEXT_LENGTH, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    config = before.DiffusionConfig()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = before.multires_loss(model, x, tokens, mask, config, model.config.num_levels, generator=g)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sampling_run(sample_fn, model, resolutions, n: int, text_dim: int, dtype: str, context, **options):
    """A closure that samples n images with guidance 3 from fixed random prompts."""
    g = torch.Generator().manual_seed(1)
    tokens, mask = torch.randn(n, TEXT_LENGTH, text_dim, generator=g), torch.ones(n, TEXT_LENGTH, dtype=torch.bool)
    null_tokens, null_mask = torch.randn(1, 2, text_dim, generator=g), torch.ones(1, 2, dtype=torch.bool)
    config = DiffusionConfig()

    def run():
        with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            sample_fn(model, resolutions, config, tokens, mask, null_tokens=null_tokens, null_mask=null_mask,
                      guidance_scale=3.0, generator=torch.Generator().manual_seed(2), **options)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="332aebf", help="the earlier commit (default: before the speed work)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sample_batch", type=int, default=4, help="images per sampling run (0: no sampling)")
    parser.add_argument("--compile", action="store_true",
                        help="also today's training step under torch.compile (minutes of compiling each)")
    add_dtype_option(parser)
    add_clock_options(parser)
    args = parser.parse_args()
    clock = set_up_clock(args)
    with tempfile.TemporaryDirectory() as folder:
        before = import_before(args.before, Path(folder))
        issue_config = before.TrainConfig().model
        text_dim = issue_config.inner.text_dim
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, {args.rounds} rounds; "
              f"before: {args.before} ({before.__name__}), after: {Path(mdm_lite.__file__).parent.name} of today")

        torch.manual_seed(0)
        old_model = before.NestedUNet(issue_config)
        new_model = NestedUNet(todays_config(issue_config))
        new_model.load_state_dict(old_model.state_dict())  # the same weights, so the same function
        preset_model = NestedUNet(PRESETS["cpu"]().model)
        count = {name: sum(p.numel() for p in m.parameters()) / 1e6
                 for name, m in [("issue", new_model), ("preset", preset_model)]}
        runs = {}
        for dtype in args.dtypes:
            runs["train", "issue's preset", "before", dtype] = before_step(before, old_model, args.batch_size, dtype,
                                                                        text_dim)
            runs["train", "issue's preset", "after", dtype] = training_step(new_model, args.batch_size, dtype, text_dim)
            runs["train", "today's preset", "after", dtype] = training_step(preset_model, args.batch_size, dtype,
                                                                         text_dim)
            for what, model in [("issue's preset", new_model), ("today's preset", preset_model)] * args.compile:
                twin = NestedUNet(model.config)  # a module of its own for each compiled run, with the same weights
                twin.load_state_dict(model.state_dict())
                runs["train", what, "after+compile", dtype] = training_step(twin, args.batch_size, dtype, text_dim,
                                                                          compiled=True)
        if args.sample_batch:
            res = todays_config(issue_config).resolutions
            runs["sample", "ddim 50", "before", "fp32"] = sampling_run(before.diffusion.sample, old_model.eval(), res,
                                                                       args.sample_batch, text_dim, "fp32",
                                                                       torch.no_grad, num_steps=50, sampler="ddim")
            for dtype in args.dtypes:
                for what, options in SAMPLING_AFTER.items():
                    runs["sample", what, "after", dtype] = sampling_run(sample, new_model.eval(), res, args.sample_batch,
                                                                        text_dim, dtype, torch.inference_mode, **options)
        for key, run in runs.items():  # warm-up: allocator, oneDNN kernels, compiling
            start = time.perf_counter()
            run()
            if "compile" in key[2]:
                print(f"torch.compile, {key[1]}, {key[3]}: the first step (compiling) took "
                      f"{time.perf_counter() - start:.0f} s")
        seconds = round_robin(runs, args.rounds, clock)
    per = {key: statistics.median(s) for key, s in seconds.items()}
    for (kind, what, code, dtype), s in per.items():
        if kind == "train":
            params = count["issue" if what == "issue's preset" else "preset"]
            print(f"train  {what} ({params:.2f}M), {code:13s} {dtype}: {args.batch_size / s:6.1f} images/s")
        else:
            print(f"sample {what}, {code:6s} {dtype}: {s / args.sample_batch:6.2f} s/image")
    issue, preset = ("train", "issue's preset"), ("train", "today's preset")
    for dtype in args.dtypes:
        base = per[*issue, "before", dtype]
        print(f"ratio train, issue's preset, after/before, {dtype}: {base / per[*issue, 'after', dtype]:.2f}x")
        print(f"ratio train, today's preset after / issue's preset before, {dtype}: "
              f"{base / per[*preset, 'after', dtype]:.2f}x")
        if args.compile:
            print(f"ratio train, issue's preset, after+compile/before, {dtype}: "
                  f"{base / per[*issue, 'after+compile', dtype]:.2f}x")
            print(f"ratio train, today's preset after+compile / issue's preset before, {dtype}: "
                  f"{base / per[*preset, 'after+compile', dtype]:.2f}x")
    if {"fp32", "bf16"} <= set(args.dtypes):
        for code in ("after", "after+compile")[:1 + args.compile]:
            print(f"ratio train, issue's preset, {code} bf16 / before fp32: "
                  f"{per[*issue, 'before', 'fp32'] / per[*issue, code, 'bf16']:.2f}x")
    if args.sample_batch:
        base = per["sample", "ddim 50", "before", "fp32"]
        for what in SAMPLING_AFTER:
            for dtype in args.dtypes:
                print(f"ratio sample, {what} {dtype} after / ddim 50 fp32 before: "
                      f"{base / per['sample', what, 'after', dtype]:.2f}x")


if __name__ == "__main__":
    main()
