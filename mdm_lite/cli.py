"""The `mdm-lite` command line: a thin layer over TrainConfig, train, MDMPipeline and the metrics
(the book's appendix runs every command).

::

    mdm-lite train                                   # the CPU preset on Shapes, 12-18 minutes
    mdm-lite train --preset colab --dataset flickr30k --output_dir runs/flickr
    mdm-lite sample --checkpoint output/checkpoint_latest --prompts "a red circle" "a blue star"
    mdm-lite prefetch --dataset flickr30k
    mdm-lite eval --checkpoint output --num_samples 256

Every expected failure ends with one line on stderr that says what happened and what to do: bad
input (an option, a config file, a checkpoint, a dataset, a folder that cannot be written) with
exit status 2, a run that failed (diverged, a full disk, out of memory) with 1, Ctrl-C with 130;
nothing already saved is touched. Anything else is a bug and prints its traceback (`main`).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import torch

from .checkpoint import CheckpointError, check_writable, resolve_checkpoint
from .config_check import ConfigError, Device, Positive, check_value
from .data import DatasetError, prefetch
from .device import PRECISIONS
from .images import to_pil
from .metrics import PROMPT_SETS, evaluate_checkpoint
from .pipeline import SAMPLING_OPTIONS, MDMPipeline, SamplingFailed
from .plotting import save_grid, side_by_side
from .recipe import run_recipe
from .samplers import DEFAULT_GUIDANCE_INTERVAL, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, check_guidance_interval
from .text import TextEncoderError
from .train import PRESETS, TrainConfig, TrainingDiverged, TrainingInterrupted, cpu_preset, train

# Options of TrainConfig that the command line sets directly, with their types.
TRAIN_OPTIONS = {
    "batch_size": int, "epochs": int, "max_steps": int, "lr": float, "weight_decay": float, "warmup_steps": int,
    "lr_decay_steps": int, "gradient_clip_norm": float, "num_gradient_accumulations": int, "ema_decay": float,
    "precision": str, "log_freq": int, "save_freq": int, "num_sample_steps": int, "guidance_scale": float,
    "output_dir": str, "device": str, "seed": int, "max_time_s": float, "num_workers": int, "init_from": str,
    "dataset": str, "max_samples": int, "text_encoder": str, "keep_checkpoints": int,
}


def _option_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options(items: list[str] | None) -> dict:
    """--dataset_option KEY=VALUE items as a dict, numbers read as numbers."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--dataset_option {item!r} is not key=value, e.g. caption_column=text")
        options[key] = _option_value(value)
    return options


def build_train_config(args: argparse.Namespace):
    """The TrainConfig that `mdm-lite train` runs: a preset (or --config file), then the flags
    given; built once, so that every value is checked as the config is (`config_check`)."""
    if args.config:
        try:
            config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read --config {args.config} ({error}); pass a JSON file such as a "
                              "checkpoint's config.json") from error
        except ConfigError as error:
            raise ConfigError(f"--config {args.config}: {error}") from None
    elif args.preset in PRESETS:
        config = PRESETS[args.preset]()
    else:
        raise ConfigError(f"unknown preset {args.preset!r}: use one of {', '.join(PRESETS)}")
    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    if "epochs" in given and "max_steps" not in given:
        given["max_steps"] = None  # --epochs alone: train for that many epochs, as the original CLI did
    model = {k: getattr(args, k) for k in ("image_size", "num_levels") if getattr(args, k) is not None}
    if model:
        given["model"] = dataclasses.replace(config.model, **model)
    diffusion = {k: getattr(args, k) for k in ("time_power", "time_range") if getattr(args, k) is not None}
    if diffusion:
        given["diffusion"] = dataclasses.replace(config.diffusion, **diffusion)
    if args.dataset_option:
        given["dataset_options"] = {**config.dataset_options, **_options(args.dataset_option)}
    if args.sample_prompts:
        given["sample_prompts"] = args.sample_prompts
    if args.compile is not None:
        given["compile"] = args.compile
    return dataclasses.replace(config, **given)


# Options that shape a single run's model or training times; a recipe sets them per stage.
SINGLE_RUN_OPTIONS = ("image_size", "num_levels", "time_power", "time_range", "init_from")


def chosen_recipe(args: argparse.Namespace) -> str | None:
    """The recipe `mdm-lite train` runs: --recipe, else "progressive" for the cpu preset (None: one run)."""
    recipe = args.recipe or ("progressive" if args.preset == "cpu" and not args.config else "none")
    if recipe == "none":
        return None
    given = [f"--{name}" for name in SINGLE_RUN_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} set one run's model or times, and the {recipe} recipe sets each "
                          "stage's: add --recipe none to train a single run")
    return recipe


def _train(args: argparse.Namespace) -> int:
    config = build_train_config(args)
    args.run_folder = Path(config.output_dir)  # what `main` reports on, should the run fail
    recipe = chosen_recipe(args)
    start = time.perf_counter()
    if recipe:
        result = run_recipe(config, recipe, args.max_steps, progress=not args.no_progress, resume=args.resume)
    else:
        result = train(config, progress=not args.no_progress, resume=args.resume)
    if result is not None and result.checkpoint is not None:
        run_dir = Path(result.config.output_dir)
        grids = sorted(run_dir.glob("samples_*.png"))
        last = result.history[-1]["loss"] if result.history else float("nan")
        print(f"trained {'the ' + recipe + ' recipe' if recipe else str(result.history[-1]['step']) + ' steps'} in "
              f"{time.perf_counter() - start:.0f} s, final loss {last:.4f}\n"
              f"checkpoint: {result.checkpoint}\nsamples:    {grids[-1] if grids else '-'}\n"
              f"loss curve: {run_dir / 'loss.png'}\n"
              f"next: mdm-lite sample --checkpoint {run_dir / 'checkpoint_latest'} "
              f"--prompts \"a small blue star top left\"\n"
              f"      mdm-lite eval --checkpoint {run_dir / 'checkpoint_latest'} --num_samples 64")
        if recipe:
            print("      a model like the shipped one: mdm-lite train --max_steps 33000 --lr_decay_steps 3000 "
                  "--compile --output_dir runs/shapes (hours on a CPU; see mdm_lite/assets/shapes_cpu/TRAINING.md)")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts or [])
    if args.prompts_file:
        try:
            prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise ConfigError(f"cannot read --prompts_file {args.prompts_file} ({error.strerror})") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"--prompts_file {args.prompts_file} is not UTF-8 text ({error.reason}); pass a text "
                              "file with one prompt per line") from error
    if not prompts:
        raise ConfigError("no prompts: pass --prompts \"a red circle\" ... or --prompts_file with one per line")
    return prompts


# The sample command's names for MDMPipeline's options (`pipeline.SAMPLING_OPTIONS`).
SAMPLE_FLAGS = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale", "eta": "eta",
                "num_per_prompt": "num_images_per_prompt", "seed": "seed"}


def _sample(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    for flag, option in SAMPLE_FLAGS.items():  # before the minutes of loading and sampling
        check_value(f"--{flag}", getattr(args, flag), SAMPLING_OPTIONS[option])
    check_guidance_interval(args.guidance_interval, "--guidance_interval")
    check_value("--device", args.device, Annotated[str, Device])
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    pipe = MDMPipeline.from_pretrained(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    start = time.perf_counter()
    out = pipe(prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
               guidance_interval=tuple(args.guidance_interval), sampler=args.sampler, eta=args.eta,
               num_images_per_prompt=args.num_per_prompt, seed=args.seed,
               output_type="pt", progress=not args.no_progress, precision=args.precision)
    seconds = time.perf_counter() - start
    output_dir.mkdir(parents=True, exist_ok=True)
    images = side_by_side(out.levels) if args.save_levels else out.images
    for i, image in enumerate(to_pil(images)):
        image.save(output_dir / f"sample_{i:04d}.png")
    grid = save_grid(images, output_dir / "grid.png", nrow=args.num_per_prompt if args.num_per_prompt > 1 else 8)
    expanded = [p for p in prompts for _ in range(args.num_per_prompt)]
    (output_dir / "prompts.json").write_text(json.dumps(
        [{"file": f"sample_{i:04d}.png", "prompt": p} for i, p in enumerate(expanded)], indent=2))
    precision = "bf16" if pipe.uses_bf16(args.precision) else "fp32"
    print(f"wrote {len(expanded)} samples and {grid}: {args.num_inference_steps} {args.sampler} steps in {precision}, "
          f"{seconds:.1f} s ({seconds / len(expanded):.2f} s/image)")
    return 0


def _prefetch(args: argparse.Namespace) -> int:
    n = prefetch(args.dataset, args.split, **_options(args.dataset_option))
    print(f"{args.dataset} ({args.split}): {n} samples ready in the cache")
    return 0


def _eval(args: argparse.Namespace) -> int:
    check_value("--num_samples", args.num_samples, Annotated[int, Positive])
    for flag in ("num_inference_steps", "guidance_scale", "seed"):  # before the minutes of sampling
        check_value(f"--{flag}", getattr(args, flag), SAMPLING_OPTIONS[flag])
    check_guidance_interval(args.guidance_interval, "--guidance_interval")
    check_value("--device", args.device, Annotated[str, Device])
    check_writable(Path(args.output).parent, "--output")
    table = evaluate_checkpoint(args.checkpoint, num_samples=args.num_samples,
                                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                guidance_interval=tuple(args.guidance_interval),
                                sampler=args.sampler, seed=args.seed, prompt_sets=args.prompts, device=args.device,
                                use_ema=not args.no_ema, progress=not args.no_progress, precision=args.precision)
    print(f"checkpoint {table['checkpoint']} (step {table['step']})")
    sets = table["sets"]
    keys = [k for k in next(iter(sets.values())) if k not in ("split", "phrasing")]
    width = max(len(k) for k in keys)
    print(f"{'prompts':<{width}}" + "".join(f"  {name:>10}" for name in sets))
    for key in keys:
        cells = [sets[name][key] for name in sets]
        print(f"{key:<{width}}" + "".join(f"  {v:>10.4f}" if isinstance(v, float) else f"  {v!s:>10}" for v in cells))
    output = Path(args.output)
    output.write_text(json.dumps(table, indent=2))
    print(f"wrote {output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from .demo import Demo
    except ModuleNotFoundError as error:  # the optional extra `demo` is not installed
        raise ConfigError(str(error)) from error

    demo = Demo(args.checkpoint, args.device)
    try:
        demo.launch(args.host, args.port)
    except OSError as error:
        raise ConfigError(f"cannot serve on {args.host}:{args.port} ({error.strerror or 'the port is taken'}); "
                         f"pass another --port, e.g. --port {args.port + 1}") from error
    return 0


PRECISION_HELP = ("the network in bf16 (autocast) or fp32; auto: bf16 where the hardware computes it natively "
                  "(a GPU of compute capability 8+, a CPU with AMX or AVX512-BF16), as training does")


def _add_sampler_options(command: argparse.ArgumentParser) -> None:
    """The sampler's options, which `sample` and `eval` share: steps, guidance, interval, sampler."""
    command.add_argument("--num_inference_steps", type=int, default=DEFAULT_STEPS,
                         help="denoising steps per image (network calls)")
    command.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance (1: none)")
    command.add_argument("--guidance_interval", type=float, nargs=2, default=list(DEFAULT_GUIDANCE_INTERVAL),
                         metavar=("LOW", "HIGH"), help="guide the steps at times t in [LOW, HIGH] (1: pure noise), "
                         "the others conditional only (0 1: every step)")
    command.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                         help="reverse process: dpmpp (DPM-Solver++(2M)), ddim or ddpm")


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with "(default: X)", except for flags, required options and help that names its default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm-lite", description="Matryoshka Diffusion Models, small enough to read.")
    sub = p.add_subparsers(dest="command", required=True)
    defaults = cpu_preset()  # what `mdm-lite train` uses for an option not given

    t = sub.add_parser("train", help="train a NestedUNet (defaults: the CPU preset on Shapes)")
    t.add_argument("--preset", default="cpu", help="cpu (default), colab or paper")
    t.add_argument("--recipe", choices=("progressive", "none"),
                   help="progressive: the 16x16 UNet learns the layout at one noise level, then every noise "
                   "level, then grows to 32/16 and 64/32/16, each stage in its own folder under --output_dir, "
                   "--max_steps setting the last one's steps (default for the cpu preset); none: one run")
    t.add_argument("--config", help="a TrainConfig as JSON (e.g. a checkpoint's config.json) instead of a preset")
    t.add_argument("--resume", action="store_true", help="continue the run in --output_dir from checkpoint_latest")
    t.add_argument("--image_size", type=int, help=f"side of the largest level (cpu preset: {defaults.model.image_size})")
    t.add_argument("--num_levels", type=int, help="nesting levels: 1 plain UNet, 2 (64, 32), 3 (64, 32, 16) "
                                                  f"(cpu preset: {defaults.model.num_levels})")
    t.add_argument("--time_power", type=float, help="training times t = 1 - (1 - u)^p, u uniform: above 1, more "
                   f"training at high noise (cpu preset: {defaults.diffusion.time_power})")
    t.add_argument("--time_range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="map the training times onto [LOW, HIGH]; 0.97 0.97 trains at one noise level "
                   f"(cpu preset: {' '.join(str(v) for v in defaults.diffusion.time_range)})")
    t.add_argument("--dataset_option", action="append", metavar="KEY=VALUE",
                   help="passed to the dataset loader: path=..., image_column=..., caption_column=..., hub_name=...")
    t.add_argument("--sample_prompts", nargs="+", help="prompts of the sample grid written at each save")
    t.add_argument("--no_progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the network: a minute or more of compiling, then faster steps "
                   "(--no-compile: eager, e.g. for a --config that compiles on a machine without a C++ compiler)")
    for name, kind in TRAIN_OPTIONS.items():
        t.add_argument(f"--{name}", type=kind, help=f"TrainConfig.{name} (cpu preset: {getattr(defaults, name)})")
    t.set_defaults(run=_train)

    s = sub.add_parser("sample", help="generate images from prompts with a trained checkpoint",
                         formatter_class=_ShowDefaults)
    s.add_argument("--checkpoint", required=True, help="checkpoint directory, output_dir, checkpoint_latest, or "
                   "shapes (the one shipped in the package)")
    s.add_argument("--prompts", nargs="+", help="one or more prompts, each in quotes")
    s.add_argument("--prompts_file", help="a text file with one prompt per line")
    s.add_argument("--output_dir", default="generated", help="where sample_0000.png, ... and grid.png go")
    _add_sampler_options(s)
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 deterministic, 1 DDPM-like)")
    s.add_argument("--num_per_prompt", type=int, default=1, help="images per prompt")
    s.add_argument("--seed", type=int, default=0, help="same seed, same images")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto")
    s.add_argument("--no_ema", action="store_true", help="use the raw weights instead of their moving average")
    s.add_argument("--save_levels", action="store_true", help="save every nesting level side by side")
    s.add_argument("--no_progress", action="store_true", help="no progress bar over the steps")
    s.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    s.set_defaults(run=_sample)

    f = sub.add_parser("prefetch", help="download a dataset into the cache before training",
                         formatter_class=_ShowDefaults)
    f.add_argument("--dataset", required=True, help="flickr30k, tiny-imagenet, or a Hub name")
    f.add_argument("--split", default="train", help="the dataset split to cache")
    f.add_argument("--dataset_option", action="append", metavar="KEY=VALUE",
                   help="passed to the dataset loader: path=..., hub_name=...")
    f.set_defaults(run=_prefetch)

    e = sub.add_parser("eval", help="prompt accuracy and Frechet distance of a Shapes checkpoint",
                         formatter_class=_ShowDefaults)
    e.add_argument("--checkpoint", required=True, help="checkpoint directory, output_dir, or shapes (the shipped one)")
    e.add_argument("--num_samples", type=int, default=256, help="images to generate and judge")
    _add_sampler_options(e)
    e.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--prompts", nargs="+", default=list(PROMPT_SETS), choices=tuple(PROMPT_SETS),
                   help="prompt sets: training-style captions, phrasings training never saw, shape-colour "
                   "pairs training never saw")
    e.add_argument("--no_ema", action="store_true", help="judge the raw weights instead of their moving average")
    e.add_argument("--no_progress", action="store_true", help="no progress bar over the images and steps")
    e.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    e.add_argument("--output", default="eval.json", help="where to write the table as JSON")
    e.set_defaults(run=_eval)

    d = sub.add_parser("demo", help="a web page to try a checkpoint: a prompt, its every level and the trajectory "
                       "(needs pip install \"mdm-lite[demo]\")", formatter_class=_ShowDefaults)
    d.add_argument("--checkpoint", default="shapes",
                   help="checkpoint directory, output_dir, or shapes (the one shipped in the package)")
    d.add_argument("--port", type=int, default=7860, help="the page is at http://HOST:PORT")
    d.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: the whole network")
    d.add_argument("--device", default="auto", help="cpu, cuda or auto")
    d.set_defaults(run=_demo)
    return p


# Errors of bad input (exit 2) and of a run that failed (exit 1); their messages say what to do.
BAD_INPUT = (ConfigError, CheckpointError, DatasetError, TextEncoderError)
# What a full disk, a folder made read-only or lost permissions raise: a failed run, not a bug.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
# A path in the way (a folder where a file goes, or the reverse) or one too long: bad input.
PATH_ERRORS = {errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP}


def _saved(args: argparse.Namespace) -> str:
    """What a failed or interrupted command leaves: for train, the last checkpoint of its folder
    (or of the recipe stage it was in) and how to go on from it."""
    folder = getattr(args, "run_folder", None)
    if folder is None:
        return "nothing that was there before was changed"
    try:
        pointers = [p for p in (folder / "checkpoint_latest", *folder.glob("*/checkpoint_latest")) if p.exists()]
    except OSError:  # a folder that cannot be looked at (a name too long) holds nothing saved
        pointers = []
    if not pointers:
        return "no checkpoint was saved yet: run the same command again"
    newest = resolve_checkpoint(max(pointers, key=lambda p: p.stat().st_mtime))
    return f"the last checkpoint, {newest}, is intact: continue with the same command and --resume"


def _out_of_memory(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def main(argv: list[str] | None = None) -> int:
    """Run a command; the one place where expected errors become one line and an exit status."""
    args = parser().parse_args(argv)

    def fail(message: str, status: int) -> int:
        print(f"mdm-lite: {message}", file=sys.stderr)
        return status

    try:
        return args.run(args)
    except BAD_INPUT as error:
        return fail(f"error: {error}", 2)
    except (TrainingDiverged, SamplingFailed) as error:
        return fail(str(error), 1)
    except OSError as error:
        where = error.filename or getattr(args, "run_folder", None) or getattr(args, "output_dir", "a file")
        if error.errno in PATH_ERRORS:
            return fail(f"error: cannot use {str(where)[:200]} ({error.strerror}): move what is in the way, or "
                        f"choose another path; {_saved(args)}", 2)
        if error.errno not in DISK_ERRORS:
            raise
        return fail(f"cannot write {where} ({error.strerror}): free some space or choose a writable --output_dir; "
                    f"{_saved(args)}", 1)
    except RuntimeError as error:
        if not _out_of_memory(error):
            raise
        return fail(f"out of memory ({str(error).splitlines()[0][:120]}): lower --batch_size, or sample fewer "
                    f"images at once; {_saved(args)}", 1)
    except TrainingInterrupted as stop:
        where = f"saved {stop.checkpoint}" if stop.checkpoint else "saved"
        return fail(f"interrupted at step {stop.step}, {where}: continue with the same command and --resume", 130)
    except KeyboardInterrupt:
        return fail(f"interrupted; {_saved(args)}", 130)


if __name__ == "__main__":
    sys.exit(main())
