"""Recipes: named ways to train a NestedUNet, as a sequence of training runs (stages).

MDM trains its large models progressively (Gu et al. 2023, Sec. 3.4): the low-resolution UNet
first, then grown into a NestedUNet with more levels, each stage starting from the last one's
weights (`TrainConfig.init_from`, `NestedUNet.wrap`). The "progressive" recipe does that, with
one stage in front: the 16x16 UNet first learns the layout at a single high noise level. There
the image is almost pure noise and the caption is all the model has to go on, so it must learn
where "top left" is; over all noise levels at once, a small model learns the background, colour
and size long before it learns positions (chapter 6 and TRAINING.md show the evidence). In that
stage every Shapes caption names all five attributes: a caption without its background leaves the
model to guess the colour of the whole image, an error so large at t = 0.97 that it drowns the
few pixels of the object, and the layout is then not learnt in 2,000 steps; the later stages
train on captions that leave attributes out, as people's prompts do. Stages 2 and 3 draw more
high noise levels, where the layout is decided; the last stage draws every level alike, as the
paper does: skewed there too, the 64x64 level rarely trains at low noise and stays grainy (at its
step 500, twice the high-frequency energy inside the image and colour right 0.17 of the time
against 0.72; README, "Measured").

::

    mdm-lite train                                    # the progressive recipe, 12-18 min on 2 cores
    mdm-lite train --max_steps 33000 --lr_decay_steps 3000 --compile --output_dir runs/shapes   # like the shipped model

Each stage is an ordinary training run in its own folder under output_dir; `--resume` continues
the recipe where it stopped (finished stages are skipped, an unfinished one is resumed).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import load_checkpoint
from .diffusion import DiffusionConfig
from .text import TextEncoder
from .train import ConfigError, TrainConfig, TrainResult, train


@dataclass(frozen=True)
class Stage:
    """One training run of a recipe.

    name: its folder under output_dir; image_size, num_levels: the model it trains (its inner
    levels are the previous stage's model, or the same model); steps: optimizer steps (None: the
    stage stops at another limit of its TrainConfig, as in the time-bounded race of `compare`);
    time_range, time_power: the training times (see DiffusionConfig); all_attributes: Shapes captions
    name every attribute (`ShapesConfig.omit` False; other datasets are unchanged).
    """

    name: str
    image_size: int
    num_levels: int
    steps: int | None = None
    time_range: tuple[float, float] = (0.0, 1.0)
    time_power: float = 1.0
    all_attributes: bool = False


RECIPES: dict[str, tuple[Stage, ...]] = {
    # The last stage's steps are the ones `--max_steps` sets.
    "progressive": (
        # the layout: learnt between steps 1,500 and 2,000 on the wider phrasings (README, "Measured")
        Stage("1_layout16", 16, 1, 2500, time_range=(0.97, 0.97), all_attributes=True),
        Stage("2_all16", 16, 1, 500, time_power=3.0),  # every noise level, more of them high
        Stage("3_grow32", 32, 2, 500, time_power=3.0),  # 32/16 (Sec. 3.4)
        Stage("4_full64", 64, 3, 1000),  # 64/32/16: the full model, every noise level alike
    ),
}


def stage_config(base: TrainConfig, stage: Stage, init_from: str | None = None, last: bool = True) -> TrainConfig:
    """The TrainConfig of one stage: `base` with the stage's model size, training times, steps and
    folder (base.output_dir / stage.name), grown from init_from (a checkpoint, or None). Only the
    last stage keeps base.lr_decay_steps: the cool-down ends the recipe, not each stage."""
    model = base.model
    while model.num_levels > stage.num_levels:  # an earlier stage trains the full model's inner levels
        model = model.inner_levels()
    model = dataclasses.replace(model, image_size=stage.image_size, num_levels=stage.num_levels)
    diffusion = dataclasses.replace(base.diffusion, time_range=stage.time_range, time_power=stage.time_power)
    options = base.dataset_options
    if stage.all_attributes and base.dataset == "shapes":
        options = options | {"omit": False}
    return dataclasses.replace(base, model=model, diffusion=diffusion, max_steps=stage.steps,
                               output_dir=str(Path(base.output_dir) / stage.name), init_from=init_from,
                               dataset_options=options, lr_decay_steps=base.lr_decay_steps if last else 0)


def stage_configs(base: TrainConfig, recipe: str, last_steps: int | None = None) -> list[TrainConfig]:
    """The TrainConfig of every stage of `recipe` (`stage_config`), each stage growing from the
    last. last_steps: steps of the last stage (default: the recipe's)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    stages = list(RECIPES[recipe])
    if last_steps is not None:
        stages[-1] = dataclasses.replace(stages[-1], steps=last_steps)
    configs, previous = [], None
    for stage in stages:
        configs.append(stage_config(base, stage, previous, last=stage is stages[-1]))
        previous = str(Path(configs[-1].output_dir) / "checkpoint_latest")
    return configs


def _finished(config: TrainConfig) -> bool:
    latest = Path(config.output_dir) / "checkpoint_latest"
    return latest.exists() and load_checkpoint(latest).state["step"] >= config.max_steps


def run_recipe(base: TrainConfig, recipe: str = "progressive", last_steps: int | None = None,
               progress: bool = True, resume: bool = False) -> TrainResult | None:
    """Train every stage of `recipe` in turn (see `stage_configs`); returns the last stage's
    TrainResult, or None when every stage had finished before. resume: skip finished stages and
    resume an unfinished one."""
    configs = stage_configs(base, recipe, last_steps)
    if not resume and any((Path(c.output_dir) / "checkpoint_latest").exists() for c in configs):
        raise ConfigError(f"{base.output_dir} already holds this recipe's runs; pass --resume to continue it, "
                          "or choose a new --output_dir")
    result = encoder = None
    for number, config in enumerate(configs, 1):
        if _finished(config):
            continue
        # One encoder for every stage: its cache keeps the captions' embeddings, which the later
        # stages draw again (a caption costs about 6 ms on one CPU thread, 8,000 of them a stage).
        encoder = encoder or TextEncoder(base.text_encoder)
        started = (Path(config.output_dir) / "checkpoint_latest").exists()
        print(f"recipe {recipe}, stage {number}/{len(configs)}: {Path(config.output_dir).name}, "
              f"{config.model.resolutions}, {config.max_steps} steps, times {_times(config.diffusion)}",
              file=sys.stderr)
        result = train(config, progress=progress, resume=started, encoder=encoder)
    return result


def _times(diffusion: DiffusionConfig) -> str:
    low, high = diffusion.time_range
    if low == high:
        return f"t = {low}"
    return f"t in [{low}, {high}]" + (f" skewed by power {diffusion.time_power}" if diffusion.time_power != 1 else "")
