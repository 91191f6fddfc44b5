"""Training: a TrainConfig, its presets, and the loop that trains a NestedUNet on captioned images.

::

    from mdm_lite.train import TrainConfig, train
    result = train(TrainConfig(max_steps=300))          # the CPU preset on Shapes
    images = result.pipeline()(["a red circle in the center"]).images

The loop is the MDM recipe (Gu et al. 2023, Sec. 3.1-3.4): the multi-resolution loss on every
nesting level at once, AdamW, a linear warm-up, gradient clipping, an exponential moving average
of the weights for sampling, and text dropout for classifier-free guidance. Progressive training
(Sec. 3.4) starts a NestedUNet from a trained model with one level fewer (`init_from`).

Under `torchrun --nproc_per_node N` the same code runs DistributedDataParallel (gloo on CPU,
nccl on GPU) with a DistributedSampler; only rank 0 writes. A run is reproducible from its
checkpoint: the noise of step k is drawn from a generator seeded by (seed, rank, k), the data
order by (seed, epoch), so N steps then `resume` for N more gives the weights of 2N steps.

Run `python -m mdm_lite.train --help` (the same as `mdm-lite train`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, check_unlocked, check_writable, load_checkpoint, load_weights, lock_run,
                         resolve_checkpoint, save_checkpoint, unlock_run)
from .config_check import (ConfigError, Device, NonEmpty, NonNegative, OneOf, Positive, Range, Seed, build,
                           check_fields)
from .data import collate, load_dataset
from .memory import check_fits
from .diffusion import DiffusionConfig, drop_captions, multires_loss
from .nested import NestedUNet, NestedUNetConfig
from .text import TextEncoder
from .unet import UNetConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.json in every checkpoint.

    The defaults are the "cpu" preset: a 3-level NestedUNet (64, 32, 16) of 2.5M parameters
    that learns Shapes on a 2-core laptop CPU in minutes. batch_size is per process and per
    micro-batch: an optimizer step sees batch_size * num_gradient_accumulations * world_size
    images. Training stops after max_steps optimizer steps, or `epochs` passes over the data,
    whichever comes first (max_steps None: epochs only), or once max_time_s seconds of training
    (summed over resumes; sampling and saving excluded) have passed.

    Attributes:
        precision: "fp32", "bf16" (autocast) or "auto": bf16 where this machine runs it faster
            (see `choose_precision`), else fp32.
    """

    model: NestedUNetConfig = field(default_factory=lambda: NestedUNetConfig(
        image_size=64, num_levels=3, shell_channels=16, shell_num_res_blocks=1,
        inner=UNetConfig(channels=48, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                         position_embedding=True)))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dataset: Annotated[str, NonEmpty] = "shapes"
    dataset_options: dict = field(default_factory=dict)
    max_samples: Annotated[int, Positive] | None = None
    text_encoder: Annotated[str, NonEmpty] | None = None
    batch_size: Annotated[int, Positive] = 16
    epochs: Annotated[int, Positive] = 100
    max_steps: Annotated[int, Positive] | None = 300
    max_time_s: Annotated[float, Positive] | None = None
    lr: Annotated[float, Positive] = 2e-3
    weight_decay: Annotated[float, NonNegative] = 0.0
    warmup_steps: Annotated[int, NonNegative] = 50
    gradient_clip_norm: Annotated[float, Range(0, hint="0: no clipping")] = 1.0
    num_gradient_accumulations: Annotated[int, Positive] = 1
    ema_decay: Annotated[float, Range(0, 1, high_open=True)] = 0.999
    precision: Annotated[str, OneOf("auto", "fp32", "bf16")] = "auto"
    log_freq: Annotated[int, Positive] = 10
    save_freq: Annotated[int, Positive] = 500
    sample_prompts: list[str] | None = None
    num_sample_steps: Annotated[int, Positive] = 25
    guidance_scale: float = 3.0
    output_dir: Annotated[str, NonEmpty] = "output"
    device: Annotated[str, Device] = "auto"
    seed: Annotated[int, Seed] = 0
    num_workers: Annotated[int, NonNegative] = 0
    init_from: Annotated[str, NonEmpty] | None = None
    keep_checkpoints: Annotated[int, Range(0, hint="0 keeps every checkpoint")] = 3

    def __post_init__(self):
        check_fields(self)
        weights = self.diffusion.loss_weights
        if weights is not None and len(weights) != self.model.num_levels:
            raise ConfigError(f"has {len(weights)} entries for a {self.model.num_levels}-level model: give one weight "
                              "per level, outermost first, or null", "diffusion.loss_weights")
        reserved = sorted(set(self.dataset_options) & {"name", "split", "image_size", "max_samples"})
        if reserved:
            raise ConfigError(f"has {reserved[0]!r}, which the run sets itself (image_size from the model's, "
                              "max_samples from --max_samples): remove it", "dataset_options")
        for name in ("in_channels", "out_channels"):
            if getattr(self.model.inner, name) != 3:
                raise ConfigError(f"must be 3 (the datasets and the sampler make RGB images), got "
                                  f"{getattr(self.model.inner, name)}", f"model.inner.{name}")

    def validate(self) -> None:
        """Raise ConfigError, with the fix in its message, for what cannot work on this machine (the
        fields' types and ranges are checked when the config is built)."""
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no GPU is visible; use --device cpu (or auto)")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(f"--output_dir {self.output_dir} is a file; pass a directory path")
        check_writable(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The config of a JSON object; ConfigError naming the field for a value that cannot work."""
        return build(cls, data)


def cpu_preset() -> TrainConfig:
    """Shapes on a laptop CPU: 2.5M parameters, about 18 images/s on 2 cores, learning in minutes."""
    return TrainConfig()


def colab_preset() -> TrainConfig:
    """A Colab GPU (T4/L4/A100): 3 levels, a 37M-parameter inner UNet, bf16 where supported."""
    return TrainConfig(
        model=NestedUNetConfig(image_size=64, num_levels=3, shell_channels=64, shell_num_res_blocks=2,
                               inner=UNetConfig(channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                                                attention_resolutions=(16, 8), dropout=0.1)),
        batch_size=64, max_steps=20_000, lr=3e-4, warmup_steps=1000, ema_decay=0.9999,
        save_freq=2000, log_freq=50, num_sample_steps=50, num_workers=2)


def paper_preset() -> TrainConfig:
    """Close to the paper's 64x64 setting (Gu et al. 2023, Sec. 4.1 and App. A): a 3-level
    NestedUNet with light outer levels and a heavy 16x16 core, batch 256, lr 5e-5, EMA 0.9999."""
    return TrainConfig(
        model=NestedUNetConfig(image_size=64, num_levels=3, shell_channels=128, shell_num_res_blocks=2,
                               inner=UNetConfig(channels=256, channel_mult=(1, 2, 4), num_res_blocks=3,
                                                attention_resolutions=(16, 8, 4), head_dim=64, dropout=0.1,
                                                text_dim=384)),
        batch_size=64, num_gradient_accumulations=4, max_steps=300_000, lr=5e-5, warmup_steps=10_000,
        ema_decay=0.9999, save_freq=5000, log_freq=100, num_sample_steps=50, num_workers=4)


PRESETS = {"cpu": cpu_preset, "colab": colab_preset, "paper": paper_preset}


def flat_baseline(nested: NestedUNetConfig) -> NestedUNetConfig:
    """A single-level UNet at the same image size with about as many parameters as `nested`.

    It reaches the same innermost resolution with one channel multiplier per halving and keeps
    the inner UNet's blocks and attention resolutions; only its width is searched, in steps of 2
    (steps of 8 missed the cpu preset's count by 18%), for the parameter count closest to the
    NestedUNet's among widths whose attention channels split evenly into heads. The baseline of
    Gu et al. 2023, Sec. 5.
    """
    with torch.device("meta"):
        target = sum(p.numel() for p in NestedUNet(nested).parameters())
    inner = nested.inner
    halvings = nested.num_levels - 1 + len(inner.channel_mult) - 1
    mult = (1,) + tuple(min(2 ** k, 4) for k in range(1, halvings + 1))

    def config(channels: int, head_dim: int = inner.head_dim) -> NestedUNetConfig:
        return NestedUNetConfig(image_size=nested.image_size, num_levels=1, inner=dataclasses.replace(
            inner, channels=channels, channel_mult=mult, emb_dim=None, head_dim=head_dim))

    @functools.cache
    def size(channels: int) -> int:
        # Heads own no parameters: count with one head, which any width allows, and without allocating.
        with torch.device("meta"):
            return sum(p.numel() for p in NestedUNet(config(channels, channels * max(mult))).parameters())

    def splits_into_heads(channels: int) -> bool:
        """Whether each attention block's channels * mult features split into its features // head_dim heads."""
        features = [channels * m for i, m in enumerate(mult) if nested.image_size >> i in inner.attention_resolutions]
        return all(f % max(1, f // inner.head_dim) == 0 for f in features)

    low, high = 2, 2  # the parameter count grows with the width: bracket the target, then bisect
    while size(high) < target:
        low, high = high, high * 2
    while high - low > 2:
        mid = (low + high) // 4 * 2
        low, high = (mid, high) if size(mid) < target else (low, mid)
    below = next(c for c in range(low, 0, -2) if splits_into_heads(c))  # width 2 always has one head
    above = next(c for c in itertools.count(high, 2) if splits_into_heads(c))
    return config(min((below, above), key=lambda c: abs(size(c) - target)))


@dataclass
class TrainResult:
    """What `train` returns: the trained model and its EMA (on the training device), the config,
    the logged metrics (one dict per log_freq steps) and the last checkpoint directory."""

    model: NestedUNet
    ema: NestedUNet
    config: TrainConfig
    history: list[dict]
    checkpoint: Path | None

    def pipeline(self, use_ema: bool = True):
        """An MDMPipeline around the trained (EMA) model, to sample from prompts."""
        from .sample import MDMPipeline

        model = self.ema if use_ema else self.model
        device = next(model.parameters()).device
        return MDMPipeline(model, TextEncoder(self.config.text_encoder, device=device), self.config.diffusion, device)


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(config.device)


def choose_precision(config: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """(use bf16 autocast, why) for `config.precision` on `device`.

    "auto" picks bf16 where the hardware computes it natively: GPUs of compute capability 8
    (Ampere) or newer (`is_bf16_supported()` also says yes on a T4, where bf16 is emulated and
    slow), and CPUs with AMX tiles (Intel Sapphire Rapids and newer), whose bf16 matrix units make
    training faster. Elsewhere a CPU emulates bf16 and can run an order of magnitude slower, so fp32.
    """
    if config.precision != "auto":
        return config.precision == "bf16", f"--precision {config.precision}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        return native, f"GPU compute capability {major}.{minor} {'has' if native else 'lacks'} native bf16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return amx, f"this CPU {'has' if amx else 'lacks'} AMX bf16 matrix units"


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of step `step` on `rank`: a function of its arguments only, so a resumed
    run draws the same times, noise and caption dropout as the uninterrupted one."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr` over warmup_steps, then constant (a function of the step only)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d ema + (1 - d) model, with d ramped up as (1 + step) / (10 + step) early on so the
    average is not dominated by the random initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - d)


def _model_config(ckpt) -> NestedUNetConfig:
    """The model config a checkpoint was trained with; CheckpointError if its config.json holds none that works."""
    try:
        return build(NestedUNetConfig, ckpt.config.get("model"), "model")
    except ConfigError as error:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: {error}") from None


def grow_from(checkpoint_path: str, config: NestedUNetConfig) -> NestedUNet:
    """Progressive training (Gu et al. 2023, Sec. 3.4): a NestedUNet of `config` whose inner
    levels are the EMA weights of a trained checkpoint with one level fewer (or the same config,
    to fine-tune)."""
    ckpt = load_checkpoint(checkpoint_path)
    small = _model_config(ckpt)
    model = NestedUNet(small)
    load_weights(model, ckpt.ema, ckpt.path)
    if not model.gives_finite_outputs():
        raise CheckpointError(f"--init_from {ckpt.path}: its weights give non-finite outputs (the run had diverged); "
                              "grow from an earlier checkpoint")
    if small == config:
        return model
    if config.num_levels == small.num_levels + 1 and config.inner_levels() == small:
        return NestedUNet.wrap(model, config)
    raise CheckpointError(
        f"--init_from {ckpt.path} holds a {small.num_levels}-level model at {small.image_size}px; growing needs "
        f"exactly the inner levels of this {config.num_levels}-level model at {config.image_size}px: train the "
        "smaller model with --image_size half of this one, --num_levels one fewer and the same preset")


def _sample_prompts(config: TrainConfig, dataset) -> list[str]:
    if config.sample_prompts:
        return list(config.sample_prompts)
    return [dataset[i]["caption"] for i in range(min(8, len(dataset)))]


def _save_pictures(output_dir: Path, step: int, history: list[dict], ema: NestedUNet, encoder: TextEncoder,
                   config: TrainConfig, prompts: list[str], device: torch.device) -> Path:
    """Write loss.png (the loss curves so far), samples_{step}.png and its prompts beside it,
    samples_{step}.txt (one line per image, row by row); returns the grid's path."""
    from .sample import MDMPipeline, plot_losses, save_grid

    plot_losses(history, output_dir / "loss.png")
    pipe = MDMPipeline(ema, encoder, config.diffusion, device)
    out = pipe(prompts, num_inference_steps=config.num_sample_steps, guidance_scale=config.guidance_scale,
               seed=config.seed, output_type="pt")
    path = output_dir / f"samples_{step:06d}.png"
    columns = min(8, len(prompts))
    save_grid(out.images, path, nrow=columns)
    path.with_suffix(".txt").write_text("".join(f"row {i // columns + 1}, column {i % columns + 1}: {prompt}\n"
                                                for i, prompt in enumerate(prompts)))
    return path


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training, after the step it was in and a save: `step`, and `checkpoint`, the
    directory saved (None on a rank that does not write). A KeyboardInterrupt, so that whatever
    called train (a loop over runs, a recipe's stages) stops too."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint


class _Interrupt:
    """Ctrl-C during `train`: the first asks the run to stop after the current step, save a
    checkpoint and raise TrainingInterrupted (`requested`); a second raises KeyboardInterrupt at
    once. Only the main thread can catch signals: elsewhere Ctrl-C keeps its usual meaning."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    @contextlib.contextmanager
    def held_while_workers_start(self):
        """Block Ctrl-C while DataLoader workers start: they inherit the block and never see the
        Ctrl-C a terminal sends them too (they would die, or repeat the message), and the trainer
        gets a Ctrl-C pressed meanwhile once they have started. POSIX only."""
        if not hasattr(signal, "pthread_sigmask"):
            yield
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nmdm-lite train: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)


_INTERRUPT = _Interrupt()


def _one_run_per_output_dir(function):
    """`train` with Ctrl-C handled by _INTERRUPT, and the lock it takes on its output_dir released
    however it ends."""
    @functools.wraps(function)
    def run(config: TrainConfig, *args, **kwargs) -> TrainResult:
        with _INTERRUPT:
            try:
                return function(config, *args, **kwargs)
            finally:
                unlock_run(config.output_dir)
    return run


@_one_run_per_output_dir
def train(config: TrainConfig, progress: bool = True, resume: bool = False) -> TrainResult:
    """Train a NestedUNet as `config` says; write checkpoints, metrics.jsonl, loss.png and sample
    grids under config.output_dir (rank 0 only). resume: continue from output_dir's
    checkpoint_latest (its model config must match). Returns a TrainResult.
    """
    config.validate()
    rank, world, local_rank = _distributed()
    device = _device(config, local_rank)
    check_fits(config.model, device, batch_size=config.batch_size)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    output_dir = Path(config.output_dir)
    if rank == 0:
        check_unlocked(output_dir)
    latest = output_dir / "checkpoint_latest"
    has_checkpoint = latest.exists() or latest.is_symlink()
    if has_checkpoint and not resume:
        raise ConfigError(f"{output_dir} already holds a training run; pass --resume to continue it, or "
                          "choose a new --output_dir")
    if resume and not has_checkpoint:
        raise ConfigError(f"--resume: no checkpoint_latest in {output_dir}; drop --resume to start a new run")

    torch.manual_seed(config.seed)
    if config.init_from:
        model = grow_from(config.init_from, config.model)
    else:
        model = NestedUNet(config.model)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    step, epoch, batch_in_epoch, train_time = 0, 0, 0, 0.0
    if resume:
        ckpt = load_checkpoint(latest)
        if _model_config(ckpt) != config.model:
            raise CheckpointError(f"{ckpt.path} was trained with a different model config; resume with the same "
                                  "--preset/--num_levels/--image_size/--config, or choose a new --output_dir")
        if ckpt.model is None:
            raise CheckpointError(f"{ckpt.path} is an exported checkpoint (EMA weights only) and cannot be resumed; "
                                  "start a new run from it with --init_from")
        load_weights(model, ckpt.model, ckpt.path)
        load_weights(ema, ckpt.ema, ckpt.path)
        if not (model.gives_finite_outputs() and ema.gives_finite_outputs()):
            raise CheckpointError(f"{ckpt.path}: its weights give non-finite outputs (the run had diverged before "
                                  "this save); resume from an earlier checkpoint, or start a new run")
        optimizer.load_state_dict(ckpt.optimizer_state([p.shape for p in model.parameters()]))
        rng = ckpt.rng_state()
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        step, epoch, batch_in_epoch = ckpt.position()
        train_time = ckpt.state.get("train_time_s", 0.0)

    dataset = load_dataset(config.dataset, "train", image_size=config.model.image_size,
                           max_samples=config.max_samples, **config.dataset_options)
    encoder = TextEncoder(config.text_encoder, device=device)
    if encoder.dim != config.model.inner.text_dim:
        raise ConfigError(f"the text encoder gives {encoder.dim}-d tokens but the model expects "
                          f"{config.model.inner.text_dim}; set model.inner.text_dim to {encoder.dim}")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    accum = config.num_gradient_accumulations
    steps_per_epoch = len(sampler) // config.batch_size // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataset has {len(dataset)} samples, fewer than one step needs "
                          f"({config.batch_size * accum * world}); lower --batch_size or use more data")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    net = DistributedDataParallel(model) if world > 1 else model
    bf16, why = choose_precision(config, device)
    levels = config.model.num_levels
    prompts = _sample_prompts(config, dataset)
    writer = rank == 0
    if writer:
        lock_run(output_dir)
    history = _read_history(output_dir / "metrics.jsonl", step, rewrite=writer)
    if writer:
        output_dir.mkdir(parents=True, exist_ok=True)
        print(f"mdm-lite train: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"levels {config.model.resolutions}, {config.dataset} ({len(dataset)} samples), device {device}"
              f"{' x' + str(world) if world > 1 else ''}, {'bf16' if bf16 else 'fp32'} ({why}), steps {step}->{total_steps}",
              file=sys.stderr)
    if writer and step >= total_steps:
        print(f"mdm-lite train: {output_dir} is already at step {step} of {total_steps}, nothing to train; raise "
              "--max_steps (or --epochs) to train on", file=sys.stderr)
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and writer), dynamic_ncols=True)
    window = {"loss": [], "levels": [], "images": 0, "start": time.perf_counter()}
    checkpoint = resolve_checkpoint(latest) if step >= total_steps else None  # a resumed run already done
    stop = False
    while step < total_steps and not stop:
        sampler.set_epoch(epoch)
        batches = list(BatchSampler(sampler, config.batch_size, drop_last=True))[: steps_per_epoch * accum]
        # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise,
        # which would shift the dropout of a run resumed mid-epoch.
        with _INTERRUPT.held_while_workers_start():
            loader = iter(DataLoader(dataset, batch_sampler=batches[batch_in_epoch:], collate_fn=collate,
                                     num_workers=config.num_workers,
                                     generator=torch.Generator().manual_seed(config.seed + epoch)))
        while batch_in_epoch < len(batches) and step < total_steps and not stop:
            step_start = time.perf_counter()
            generator = step_generator(config.seed, rank, step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            total, per_level = 0.0, torch.zeros(levels)
            for micro in range(accum):
                batch = next(loader)
                x0 = batch["image"].to(device, non_blocking=True)
                text = encoder(drop_captions(batch["caption"], config.diffusion.cond_drop_prob, generator))
                sync = micro == accum - 1 or world == 1
                with net.no_sync() if not sync else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss, losses = multires_loss(net, x0, text.tokens, text.mask, config.diffusion, levels,
                                                     generator)
                    (loss / accum).backward()
                total += loss.detach().float() / accum
                per_level += torch.stack(losses).float().cpu() / accum
            batch_in_epoch += accum
            if world > 1:
                stats = torch.cat([total.reshape(1), per_level.to(device)])
                dist.all_reduce(stats)
                total, per_level = stats[0] / world, stats[1:].cpu() / world
            if not torch.isfinite(total):
                bar.close()
                raise _diverged(f"loss became {float(total)} at step {step + 1}", latest)
            if config.gradient_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, model, config.ema_decay, step)
            step += 1
            train_time += time.perf_counter() - step_start
            stop = _INTERRUPT.requested or config.max_time_s is not None and train_time >= config.max_time_s
            if world > 1:  # every rank stops at the same step: rank 0 decides
                flag = torch.tensor([float(stop)], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
            last = step == total_steps or stop
            window["loss"].append(float(total))
            window["levels"].append(per_level)
            window["images"] += x0.shape[0] * accum * world
            rate = window["images"] / (time.perf_counter() - window["start"])
            bar.update(1)
            bar.set_postfix(loss=f"{float(total):.4f}", img_s=f"{rate:.1f}")
            if step % config.log_freq == 0 or last:
                record = {"step": step, "epoch": epoch, "loss": float(np.mean(window["loss"])),
                          **{f"loss_{r}": float(v) for r, v in
                             zip(config.model.resolutions, torch.stack(window["levels"]).mean(0))},
                          "lr": learning_rate(config, step - 1), "images_per_s": rate, "train_time_s": train_time}
                history.append(record)
                if writer:
                    with open(output_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                window = {"loss": [], "levels": [], "images": 0, "start": time.perf_counter()}
            if step % config.save_freq == 0 or last:
                done_epoch = batch_in_epoch >= len(batches)
                state = {"epoch": epoch + done_epoch, "batch_in_epoch": 0 if done_epoch else batch_in_epoch,
                         "total_steps": total_steps, "train_time_s": train_time,
                         "loss": history[-1]["loss"] if history else None}
                if writer:
                    if not (model.gives_finite_outputs() and ema.gives_finite_outputs()):  # finite loss, huge weights
                        bar.close()
                        raise _diverged(f"the weights diverged at step {step} (their outputs overflow the loss; not "
                                        "saved)", latest)
                    checkpoint = save_checkpoint(output_dir, step, model.state_dict(), ema.state_dict(),
                                                 optimizer.state_dict(), config.to_dict(), state,
                                                 {"torch": torch.get_rng_state()}, keep=config.keep_checkpoints)
                    grid = _save_pictures(output_dir, step, history, ema, encoder, config, prompts, device)
                    bar.write(f"step {step}: saved {checkpoint} and {grid}")
                if world > 1:
                    dist.barrier()
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if _INTERRUPT.requested:
        raise TrainingInterrupted(step, checkpoint)
    return TrainResult(model, ema, config, history, checkpoint)


def _diverged(what: str, latest: Path) -> TrainingDiverged:
    if latest.exists():  # every checkpoint saved was checked first: the latest is good
        return TrainingDiverged(f"{what}; stopped, the last good checkpoint is {resolve_checkpoint(latest)}. Lower "
                                "--lr or --gradient_clip_norm and pass --resume")
    return TrainingDiverged(f"{what}; stopped, no checkpoint was saved yet. Lower --lr or --gradient_clip_norm and "
                            "run again")


def _record(line: str) -> dict | None:
    """A metrics.jsonl line as a record, or None if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _read_history(path: Path, step: int, rewrite: bool) -> list[dict]:
    """metrics.jsonl records up to `step` (0 for a new run): a killed run may have logged past its
    last checkpoint, or have saved none, and those records are dropped (from the file too, if
    `rewrite`, replaced atomically for the other ranks reading it) as this run logs them again.
    So is a line that is not a record: the half-written last line of a run killed as it logged."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = [r for r in map(_record, lines) if r is not None and r["step"] <= step]
    if rewrite and len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
