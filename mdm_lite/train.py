"""Training: a TrainConfig, its presets, and the loop that trains a NestedUNet on captioned images
(chapter 3 runs it first, chapter 5 looks inside, chapter 6 grows a model with it).

::

    from mdm_lite.train import TrainConfig, train
    result = train(TrainConfig(max_steps=300))          # the CPU preset on Shapes
    images = result.pipeline()(["a red circle in the center"]).images

`train` is four phases: `set_up` (devices, model, EMA, optimizer, data, and where a resumed run
stood), then for every step `train_step`, the MDM recipe (Gu et al. 2023, Sec. 3.1-3.4: caption
dropout for classifier-free guidance, the multi-resolution loss on every nesting level at once,
backward, gradient clipping, an AdamW step with a linear warm-up, an exponential moving average of
the weights for sampling), `log` and `save`. Progressive training (Sec. 3.4) starts a NestedUNet
from a trained model with one level fewer (`init_from`, `grow_from`).

Under `torchrun --nproc_per_node N -m mdm_lite train ...` the same code runs
DistributedDataParallel (gloo on CPU, nccl on GPU) with a DistributedSampler; only rank 0 writes.
A run is reproducible from its checkpoint: the noise of step k is drawn from a generator seeded by
(seed, rank, k), the data order by (seed, epoch), so N steps then `resume` for N more gives the
weights of 2N steps.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, check_unlocked, check_writable, load_checkpoint, load_weights, lock_run,
                         resolve_checkpoint, save_checkpoint, unlock_run)
from .config_check import (ConfigError, Device, NonEmpty, NonNegative, OneOf, Positive, Range, Seed, build,
                           check_fields)
from .data import collate, load_dataset
from .device import PRECISIONS, choose_precision, resolve_device
from .diffusion import DiffusionConfig, drop_captions, multires_loss
from .memory import check_fits
from .nested import NestedUNet, NestedUNetConfig
from .pipeline import MDMPipeline, checkpoint_configs
from .plotting import plot_losses, save_grid
from .text import DEFAULT_TEXT_ENCODER, TextEncoder
from .unet import UNetConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.json in every checkpoint.

    The defaults are the "cpu" preset: a 3-level NestedUNet (64, 32, 16) of 2.5M parameters
    that learns Shapes on a 2-core laptop CPU. Training stops at the first of: max_steps
    optimizer steps, `epochs` passes over the data, max_time_s seconds of training; at least one
    must be set.

    Attributes:
        model: the NestedUNet (`NestedUNetConfig`).
        diffusion: the schedule, prediction target, loss weights, caption dropout and training
            times (`DiffusionConfig`).
        dataset, dataset_options: the dataset's name and its loader's options (`load_dataset`).
        max_samples: use at most this many samples of the dataset (None: all).
        text_encoder: a Hub name or folder (None: the bundled all-MiniLM-L6-v2).
        batch_size: images per process and micro-batch; an optimizer step sees
            batch_size * num_gradient_accumulations * world_size images.
        epochs, max_steps: passes over the data, optimizer steps (None: no limit of that kind).
        max_time_s: seconds of training, summed over resumes, sampling and saving excluded
            (None: no time limit).
        lr, weight_decay: AdamW's (betas 0.9, 0.99); lr is reached linearly over warmup_steps.
        lr_decay_steps: the last steps before max_steps, over which lr falls linearly to 0 (a
            cool-down; 0: lr stays constant to the end). Needs max_steps.
        gradient_clip_norm: the largest global gradient norm (0: no clipping).
        num_gradient_accumulations: micro-batches per optimizer step.
        ema_decay: of the moving average of the weights that sampling uses (`update_ema`).
        precision: "fp32", "bf16" (the network under autocast) or "auto": bf16 where the hardware
            computes it natively (`device.choose_precision`).
        compile: run the network through `torch.compile` (a minute or more of compiling at the
            first step, then faster steps; see benchmarks/train_step.py --compile).
        log_freq, save_freq: steps between metrics.jsonl records; between checkpoints and sample grids.
        sample_prompts: prompts of the grids (None: the first 8 training captions);
            num_sample_steps, guidance_scale: how they are sampled.
        output_dir: where checkpoints, metrics.jsonl, loss.png and the grids go.
        device: "auto", "cpu", "cuda" or "cuda:N" (`device.resolve_device`); seed: of the model's
            initial weights, the data order, the noise and the caption dropout.
        num_workers: DataLoader worker processes (0: load in the training process).
        init_from: a checkpoint whose model, with one level fewer, becomes this model's inner
            levels (progressive training, Sec. 3.4; `grow_from`), or None.
        keep_checkpoints: how many of the latest checkpoints to keep (0: all).
    """

    model: NestedUNetConfig = field(default_factory=lambda: NestedUNetConfig(
        image_size=64, num_levels=3, shell_channels=16, shell_num_res_blocks=1,
        inner=UNetConfig(channels=48, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16, 8),
                         position_embedding=True)))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dataset: Annotated[str, NonEmpty] = "shapes"
    dataset_options: dict = field(default_factory=dict)
    max_samples: Annotated[int, Positive] | None = None
    text_encoder: Annotated[str, NonEmpty] | None = None
    batch_size: Annotated[int, Positive] = 16
    epochs: Annotated[int, Positive] | None = 100
    max_steps: Annotated[int, Positive] | None = 300
    max_time_s: Annotated[float, Positive] | None = None
    lr: Annotated[float, Positive] = 2e-3
    weight_decay: Annotated[float, NonNegative] = 0.0
    warmup_steps: Annotated[int, NonNegative] = 50
    lr_decay_steps: Annotated[int, NonNegative] = 0
    gradient_clip_norm: Annotated[float, Range(0, hint="0: no clipping")] = 1.0
    num_gradient_accumulations: Annotated[int, Positive] = 1
    ema_decay: Annotated[float, Range(0, 1, high_open=True)] = 0.999
    precision: Annotated[str, OneOf(*PRECISIONS)] = "auto"
    compile: bool = False
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
        if self.epochs is None and self.max_steps is None and self.max_time_s is None:
            raise ConfigError("is unset, as are max_steps and max_time_s: training would never stop; set one of them",
                              "epochs")
        if self.lr_decay_steps and self.max_steps is None:
            raise ConfigError("needs max_steps, since the lr falls to 0 at max_steps: set --max_steps or "
                              "--lr_decay_steps 0", "lr_decay_steps")
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
        resolve_device(self.device)  # a GPU that is not there
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
    """Shapes on a laptop CPU: the defaults of TrainConfig, a 3-level NestedUNet of 2.5M parameters."""
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


@dataclass
class TrainResult:
    """What `train` returns: the trained model and its EMA (on the training device), the config,
    the logged metrics (one dict per log_freq steps) and the last checkpoint directory."""

    model: NestedUNet
    ema: NestedUNet
    config: TrainConfig
    history: list[dict]
    checkpoint: Path | None

    def pipeline(self, use_ema: bool = True) -> MDMPipeline:
        """An MDMPipeline around the trained (EMA) model, to sample from prompts."""
        model = self.ema if use_ema else self.model
        device = next(model.parameters()).device
        return MDMPipeline(model, TextEncoder(self.config.text_encoder, device=device), self.config.diffusion, device)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of step `step` on `rank`: a function of its arguments only, so a resumed
    run draws the same times, noise and caption dropout as the uninterrupted one."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr` over warmup_steps, then constant, then a linear fall to 0 over the
    last lr_decay_steps before max_steps (a function of the step only, so resuming is exact).

    The fall is the cool-down of a warm-up/stable/decay schedule (Hägele et al. 2024): most of the
    gain of a decaying schedule, without fixing the length of the run at its start."""
    factor = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_decay_steps:
        factor = min(factor, (config.max_steps - step) / config.lr_decay_steps)
    return config.lr * max(0.0, factor)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d ema + (1 - d) model, with d ramped up as (1 + step) / (10 + step) early on so the
    average is not dominated by the random initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - d)


def _model_config(ckpt) -> NestedUNetConfig:
    """The model config a checkpoint was trained with; CheckpointError if its config.json holds none that works."""
    return checkpoint_configs(ckpt)[0]


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
    if small.same_network(config):
        return model
    if config.num_levels == small.num_levels + 1 and config.inner_levels().same_network(small):
        return NestedUNet.wrap(model, config)
    raise CheckpointError(
        f"--init_from {ckpt.path} holds a {small.num_levels}-level model at {small.image_size}px; growing needs "
        f"exactly the inner levels of this {config.num_levels}-level model at {config.image_size}px: train the "
        "smaller model with --image_size half of this one, --num_levels one fewer and the same preset")


@dataclass
class Run:
    """A training run in progress: what `set_up` builds and every phase after it reads.

    step, epoch, batch_in_epoch: where the run stands (batch_in_epoch counts micro-batches);
    train_time: seconds of training so far, summed over resumes; total_steps: where it stops
    (None: only max_time_s stops it); writer: whether this process writes files (rank 0).
    """

    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    bf16: bool
    model: NestedUNet
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    ema: NestedUNet
    optimizer: torch.optim.Optimizer
    encoder: TextEncoder
    dataset: Dataset
    sampler: DistributedSampler
    steps_per_epoch: int
    total_steps: int | None
    prompts: list[str]
    history: list[dict]
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_time: float = 0.0

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def latest(self) -> Path:
        return self.output_dir / "checkpoint_latest"

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def finished(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps

    def out_of_time(self) -> bool:
        return self.config.max_time_s is not None and self.train_time >= self.config.max_time_s

    def epoch_batches(self) -> list[list[int]]:
        """This epoch's micro-batches of dataset indices, in the order of (seed, epoch), whole steps only."""
        self.sampler.set_epoch(self.epoch)
        accum = self.config.num_gradient_accumulations
        return list(BatchSampler(self.sampler, self.config.batch_size, drop_last=True))[: self.steps_per_epoch * accum]

    def loader(self, batches: list[list[int]]) -> Iterator[dict]:
        """The batches of this epoch from batch_in_epoch on (a resumed run continues mid-epoch)."""
        # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise,
        # which would shift the dropout of a run resumed mid-epoch.
        with _INTERRUPT.held_while_workers_start():
            return iter(DataLoader(self.dataset, batch_sampler=batches[self.batch_in_epoch:], collate_fn=collate,
                                   num_workers=self.config.num_workers,
                                   generator=torch.Generator().manual_seed(self.config.seed + self.epoch)))


def set_up(config: TrainConfig, resume: bool, encoder: TextEncoder | None = None) -> Run:
    """Everything before the first step: the process group, the device, the model (new, grown
    from `init_from`, or resumed with its optimizer and position), its EMA, the data, the text
    encoder (`encoder`, moved to the device, or a new one) and the lock on output_dir. Raises
    ConfigError or CheckpointError, before anything is written, for what cannot work."""
    config.validate()
    rank, world, local_rank = _distributed()
    device = resolve_device(config.device, local_rank)
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
    # A resumed run loads its own weights below: it does not need init_from's checkpoint any more.
    model = grow_from(config.init_from, config.model) if config.init_from and not resume else NestedUNet(config.model)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused: one kernel for all parameters; on the CPU preset's 374 tensors 2.7 ms a step against 15.6
    # for the default loop, one thread (the same update, in another order of operations)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay, fused=True)
    position = _resume(latest, config, model, ema, optimizer) if resume else (0, 0, 0, 0.0)

    dataset = load_dataset(config.dataset, "train", image_size=config.model.image_size,
                           max_samples=config.max_samples, **config.dataset_options)
    if encoder is None:
        encoder = TextEncoder(config.text_encoder, device=device)
    elif encoder.name_or_path != (config.text_encoder or DEFAULT_TEXT_ENCODER):
        raise ConfigError(f"the text encoder passed to train is {encoder.name_or_path!r} but the config names "
                          f"{config.text_encoder or DEFAULT_TEXT_ENCODER!r}; pass a TextEncoder of the config's")
    else:
        encoder.to(device)
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
    limits = [n for n in (config.max_steps, config.epochs and config.epochs * steps_per_epoch) if n is not None]
    net = DistributedDataParallel(model) if world > 1 else model
    if config.compile:
        net = torch.compile(net)  # compiled at the first step; model and ema stay the eager modules
    bf16, why = choose_precision(config.precision, device)
    if rank == 0:
        lock_run(output_dir)
    history = _read_history(output_dir / "metrics.jsonl", position[0], rewrite=rank == 0)
    run = Run(config, rank, world, device, bf16, model, net, ema, optimizer, encoder, dataset, sampler,
              steps_per_epoch, min(limits) if limits else None, _sample_prompts(config, dataset), history, *position)
    if run.writer:
        output_dir.mkdir(parents=True, exist_ok=True)
        print(f"mdm-lite train: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"levels {config.model.resolutions}, {config.dataset} ({len(dataset)} samples), device {device}"
              f"{' x' + str(world) if world > 1 else ''}, {'bf16' if bf16 else 'fp32'} ({why}), "
              f"{'torch.compile (the first step compiles), ' if config.compile else ''}{_budget(run)}",
              file=sys.stderr)
        if run.finished:
            print(f"mdm-lite train: {output_dir} is already at step {run.step} of {run.total_steps}, nothing to "
                  "train; raise --max_steps (or --epochs) to train on", file=sys.stderr)
    return run


def _resume(latest: Path, config: TrainConfig, model: NestedUNet, ema: NestedUNet,
            optimizer: torch.optim.Optimizer) -> tuple[int, int, int, float]:
    """Load a run's latest checkpoint into model, ema, optimizer and the RNG; returns where it
    stood: (step, epoch, batch_in_epoch, train_time)."""
    ckpt = load_checkpoint(latest)
    if not _model_config(ckpt).same_network(config.model):
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
    return (*ckpt.position(), ckpt.state.get("train_time_s", 0.0))


def _budget(run: Run) -> str:
    """Where the run goes, for its first line: "steps 0->2000", "steps 0->2000 or until 600 s of
    training", "from step 0 until 600 s of training" (max_time_s counts the resumed runs too)."""
    until = f"until {run.config.max_time_s:g} s of training" if run.config.max_time_s else ""
    if run.total_steps is None:
        return f"from step {run.step} {until}"
    return f"steps {run.step}->{run.total_steps}" + (f" or {until}" if until else "")


def train_step(run: Run, batches: Iterator[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of the MDM recipe (Gu et al. 2023, Sec. 3) on the next micro-batches.

    Returns (loss, per-level losses (num_levels,)), averaged over micro-batches and processes.
    Raises TrainingDiverged for a loss that is not finite, before it touches the weights.
    """
    config, accum, levels = run.config, run.config.num_gradient_accumulations, run.config.model.num_levels
    generator = step_generator(config.seed, run.rank, run.step)  # times, noise, dropout: same on a resume
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, run.step)
    total, per_level = 0.0, torch.zeros(levels)
    for micro in range(accum):
        batch = next(batches)
        x0 = batch["image"].to(run.device, non_blocking=True)
        # Caption dropout: train some captions as the empty prompt, for classifier-free guidance.
        text = run.encoder(drop_captions(batch["caption"], config.diffusion.cond_drop_prob, generator),
                           pad_to=run.encoder.max_length if config.compile else None)
        sync = micro == accum - 1 or run.world == 1  # DDP averages gradients on the last micro-batch only
        with run.net.no_sync() if not sync else contextlib.nullcontext():
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                # The multi-resolution loss (Eq. 4): one time t, every level noised, one forward pass.
                try:
                    loss, losses = multires_loss(run.net, x0, text.tokens, text.mask, config.diffusion, levels,
                                                 generator)
                except torch._dynamo.exc.BackendCompilerFailed as error:  # no C++ compiler, an unsupported op
                    raise ConfigError(f"torch.compile could not compile the network ({str(error).splitlines()[0]}); "
                                      "train without --compile (pass --no-compile)") from error
            (loss / accum).backward()
        total += loss.detach().float() / accum
        per_level += torch.stack(losses).float().cpu() / accum
    if run.world > 1:
        stats = torch.cat([total.reshape(1), per_level.to(run.device)])
        dist.all_reduce(stats)
        total, per_level = stats[0] / run.world, stats[1:].cpu() / run.world
    if not torch.isfinite(total):
        raise _diverged(f"loss became {float(total)} at step {run.step + 1}", run.latest)
    if config.gradient_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.gradient_clip_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(run.ema, run.model, config.ema_decay, run.step)  # the weights sampling uses
    return total, per_level


class _Log:
    """The progress bar and metrics.jsonl: every step's loss, averaged over log_freq steps."""

    def __init__(self, run: Run, progress: bool):
        self.run = run
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not (progress and run.writer),
                        dynamic_ncols=True)
        self._reset()

    def _reset(self):
        self.losses, self.levels, self.images, self.start = [], [], 0, time.perf_counter()

    def step(self, loss: torch.Tensor, per_level: torch.Tensor, last: bool) -> None:
        """Record the step just taken (run.step is its number); write a record every log_freq steps and at the last."""
        run, config = self.run, self.run.config
        self.losses.append(float(loss))
        self.levels.append(per_level)
        self.images += config.batch_size * config.num_gradient_accumulations * run.world
        rate = self.images / (time.perf_counter() - self.start)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(loss):.4f}", img_s=f"{rate:.1f}")
        if run.step % config.log_freq == 0 or last:
            record = {"step": run.step, "epoch": run.epoch, "loss": float(np.mean(self.losses)),
                      **{f"loss_{r}": float(v) for r, v in
                         zip(config.model.resolutions, torch.stack(self.levels).mean(0))},
                      "lr": learning_rate(config, run.step - 1), "images_per_s": rate, "train_time_s": run.train_time}
            run.history.append(record)
            if run.writer:
                with open(run.output_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            self._reset()

    def close(self) -> None:
        self.bar.close()


def save(run: Run, epoch_done: bool, log: _Log) -> Path | None:
    """A checkpoint of the run as it stands (model, EMA, optimizer, config, position, RNG), then
    loss.png and a sample grid with its prompts; rank 0 writes, every rank waits for it. Returns
    the checkpoint's directory (None on other ranks). Raises TrainingDiverged, saving nothing, for
    weights whose outputs are no longer finite."""
    checkpoint = None
    if run.writer:
        if not (run.model.gives_finite_outputs() and run.ema.gives_finite_outputs()):  # finite loss, huge weights
            raise _diverged(f"the weights diverged at step {run.step} (their outputs overflow the loss; not saved)",
                            run.latest)
        state = {"epoch": run.epoch + epoch_done, "batch_in_epoch": 0 if epoch_done else run.batch_in_epoch,
                 "total_steps": run.total_steps, "train_time_s": run.train_time,
                 "loss": run.history[-1]["loss"] if run.history else None}
        checkpoint = save_checkpoint(run.output_dir, run.step, run.model.state_dict(), run.ema.state_dict(),
                                     run.optimizer.state_dict(), run.config.to_dict(), state,
                                     {"torch": torch.get_rng_state()}, keep=run.config.keep_checkpoints)
        grid = _save_pictures(run)
        log.bar.write(f"step {run.step}: saved {checkpoint} and {grid}")
    if run.world > 1:
        dist.barrier()
    return checkpoint


def train(config: TrainConfig, progress: bool = True, resume: bool = False,
          encoder: TextEncoder | None = None) -> TrainResult:
    """Train a NestedUNet as `config` says; write checkpoints, metrics.jsonl, loss.png and sample
    grids under config.output_dir (rank 0 only). resume: continue from output_dir's
    checkpoint_latest (its model config must match). encoder: a TextEncoder of
    config.text_encoder to reuse, with the caption embeddings it has cached (the stages of a
    recipe share one: a frozen encoder embeds a caption the same way in every stage); None loads
    one. Returns a TrainResult.
    """
    with _INTERRUPT, _lock_released_at_exit(config.output_dir):
        run = set_up(config, resume, encoder)
        log = _Log(run, progress)
        checkpoint = resolve_checkpoint(run.latest) if run.finished else None  # a resumed run already done
        stop = False
        try:
            while not (run.finished or stop):
                batches = run.epoch_batches()
                loader = run.loader(batches)
                while run.batch_in_epoch < len(batches) and not (run.finished or stop):
                    step_start = time.perf_counter()
                    loss, per_level = train_step(run, loader)
                    run.step, run.batch_in_epoch = run.step + 1, run.batch_in_epoch + config.num_gradient_accumulations
                    run.train_time += time.perf_counter() - step_start
                    stop = _stop_requested(run)
                    log.step(loss, per_level, last=run.finished or stop)
                    if run.step % config.save_freq == 0 or run.finished or stop:
                        checkpoint = save(run, run.batch_in_epoch >= len(batches), log)
                if run.batch_in_epoch >= len(batches):
                    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
        finally:
            log.close()
        if _INTERRUPT.requested:
            raise TrainingInterrupted(run.step, checkpoint)
        return TrainResult(run.model, run.ema, config, run.history, checkpoint)


@contextlib.contextmanager
def _lock_released_at_exit(output_dir: str):
    """Release the lock `set_up` takes on output_dir however the run ends."""
    try:
        yield
    finally:
        unlock_run(output_dir)


def _stop_requested(run: Run) -> bool:
    """Whether to stop after this step: Ctrl-C, or max_time_s spent. Every rank stops at the same
    step: rank 0 decides."""
    stop = _INTERRUPT.requested or run.out_of_time()
    if run.world > 1:
        flag = torch.tensor([float(stop)], device=run.device)
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _sample_prompts(config: TrainConfig, dataset) -> list[str]:
    if config.sample_prompts:
        return list(config.sample_prompts)
    return [dataset[i]["caption"] for i in range(min(8, len(dataset)))]


def _save_pictures(run: Run) -> Path:
    """Write loss.png (the loss curves so far), samples_{step}.png and its prompts beside it,
    samples_{step}.txt (one line per image, row by row); returns the grid's path."""
    config, prompts = run.config, run.prompts
    plot_losses(run.history, run.output_dir / "loss.png")
    pipe = MDMPipeline(run.ema, run.encoder, config.diffusion, run.device)
    out = pipe(prompts, num_inference_steps=config.num_sample_steps, guidance_scale=config.guidance_scale,
               seed=config.seed, output_type="pt")
    path = run.output_dir / f"samples_{run.step:06d}.png"
    columns = min(8, len(prompts))
    save_grid(out.images, path, nrow=columns)
    path.with_suffix(".txt").write_text("".join(f"row {i // columns + 1}, column {i % columns + 1}: {prompt}\n"
                                                for i, prompt in enumerate(prompts)))
    return path


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
