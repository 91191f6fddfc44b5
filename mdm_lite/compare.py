"""Nested against flat at equal compute: the paper's headline claim, tested at small scale
(chapter 9 runs it; chapter 4 builds the flat baseline).

Gu et al. 2023 (Sec. 5, Fig. 5) report that a NestedUNet trained with the multi-resolution loss
reaches a given 64x64 quality sooner than a single-resolution UNet of the same size. Here three
models train on Shapes for the same training time, each with the project's recipe where it
applies (`RACE`): the NestedUNet end to end, its flat baseline of equal parameters
(`flat_baseline`), and the NestedUNet grown progressively (`recipe.RECIPES["progressive"]`). At
chosen points each 64x64 model is evaluated by prompt accuracy and the Fréchet distance in the
judge's features (`mdm_lite.metrics`), on training-style prompts and on held-out phrasings.

    rows = nested_vs_flat("runs/race", budget_s=1800, points_s=(150, 300, 600, 900, 1200, 1500, 1800))
    plot_comparison(rows)

`benchmarks/nested_vs_flat.py` is the command line for it; chapter 9 of the book runs it.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import torch

from .data import ShapesDataset
from .judge import load_judge
from .metrics import PROMPT_SETS, evaluate_pipeline
from .nested import NestedUNet, NestedUNetConfig
from .recipe import RECIPES, Stage, stage_config
from .samplers import DEFAULT_GUIDANCE_INTERVAL
from .train import TrainConfig, train


def flat_baseline(nested: NestedUNetConfig) -> NestedUNetConfig:
    """A single-level UNet at the same image size with about as many parameters as `nested`.

    It reaches the same innermost resolution with one channel multiplier per halving and keeps
    the inner UNet's blocks and attention resolutions. Its width is searched, in steps of 2, for the
    widest whose attention channels split evenly into heads and whose count stays at or under the
    NestedUNet's; then the width of its time embedding (`emb_dim`, one linear map per block reads
    it) closes the rest of the gap, a few thousand parameters per unit. The baseline of Gu et al.
    2023, Sec. 5.
    """
    with torch.device("meta"):
        target = sum(p.numel() for p in NestedUNet(nested).parameters())
    inner = nested.inner
    halvings = nested.num_levels - 1 + len(inner.channel_mult) - 1
    mult = (1,) + tuple(min(2 ** k, 4) for k in range(1, halvings + 1))

    def config(channels: int, head_dim: int = inner.head_dim, emb_dim: int | None = None) -> NestedUNetConfig:
        return NestedUNetConfig(image_size=nested.image_size, num_levels=1, inner=dataclasses.replace(
            inner, channels=channels, channel_mult=mult, emb_dim=emb_dim, head_dim=head_dim))

    @functools.cache
    def size(channels: int, emb_dim: int | None = None) -> int:
        # Heads own no parameters: count with one head, which any width allows, and without allocating.
        with torch.device("meta"):
            return sum(p.numel() for p in NestedUNet(config(channels, channels * max(mult), emb_dim)).parameters())

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
    width = next(c for c in range(high if size(high) <= target else low, 0, -2) if splits_into_heads(c))
    low, high = 4 * width, 8 * width  # emb_dim: 4 * width by default; bisect up to the target
    while size(width, high) < target:
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if size(width, mid) < target else (low, mid)
    return config(width, emb_dim=min((low, high), key=lambda e: abs(size(width, e) - target)))


# Each model of the race: its stages, each with its share of the training budget. The
# progressive recipe's stages get about their shares of the wall-clock of `mdm-lite train` when
# the committed race ran (397 / 148 / 196 / 713 s, its first stage then 1,500 steps). The models
# trained end to end at 64x64 get the recipe where it applies: the same share of layout training
# at t = 0.97 on captions that name every attribute, then every noise level alike. "flat" is
# `flat_baseline` of the NestedUNet (one level).
RACE: dict[str, tuple[tuple[Stage, float], ...]] = {
    "nested": ((Stage("1_layout64", 64, 3, time_range=(0.97, 0.97), all_attributes=True), 0.25),
               (Stage("2_all64", 64, 3), 0.75)),
    "flat": ((Stage("1_layout64", 64, 1, time_range=(0.97, 0.97), all_attributes=True), 0.25),
             (Stage("2_all64", 64, 1), 0.75)),
    "progressive": tuple((dataclasses.replace(stage, steps=None), share)
                         for stage, share in zip(RECIPES["progressive"], (0.25, 0.10, 0.15, 0.50))),
}


def nested_vs_flat(output_dir: str | Path, budget_s: float = 1800.0, points_s: Sequence[float] | None = None,
                   num_samples: int = 64, num_inference_steps: int = 20, guidance_scale: float = 3.0,
                   guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
                   base: TrainConfig | None = None, models: tuple[str, ...] = tuple(RACE),
                   prompt_sets: tuple[str, ...] = ("train", "phrasing"),
                   on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Train each of `models` (keys of RACE) stage by stage, each stage for its share of budget_s
    seconds of training time (sampling and saving excluded), and evaluate its 64x64 model at
    points_s, seconds of training (default: every budget_s / 6); a point that a step or a smaller
    model's stage overshoots is scored at the next stop of a 64x64 model. Training stops at the
    last point, so points_s=(150,) runs the first 150 s of the budget_s schedule.

    base: the TrainConfig of the nested model (the CPU preset by default); every stage is a run
    in output_dir / model / stage. An evaluation generates num_samples images from the EMA weights
    for each of `prompt_sets` (keys of `metrics.PROMPT_SETS`), sampled as num_inference_steps,
    guidance_scale and guidance_interval say (`MDMPipeline`). Returns one row per (model, point)
    whose model is 64x64 (a progressive model is smaller before its last stage): model, stage,
    params, step and images_seen (over all its stages), train_time_s, wall_s (training, saving and
    evaluating so far), loss_64 and "sets": {prompt set: `metrics.evaluate_pipeline`'s row}.
    on_row: called with each row as it is made.
    """
    base = base or TrainConfig()
    judge = load_judge()
    points = sorted(points_s or [budget_s * k / 6 for k in range(1, 7)])
    rows = []
    for name in models:
        model = flat_baseline(base.model) if name == "flat" else base.model
        run_base = dataclasses.replace(base, model=model, output_dir=str(Path(output_dir) / name), max_steps=None,
                                       epochs=None, max_time_s=budget_s, keep_checkpoints=1,
                                       num_sample_steps=num_inference_steps)
        spent_s, steps, images, previous, started = 0.0, 0, 0, None, time.perf_counter()
        pending = list(points)  # a step can overshoot a point: it is then scored at the next 64x64 stop
        for number, (stage, share) in enumerate(RACE[name], 1):
            if not pending:
                break
            config = stage_config(run_base, stage, previous)
            images_per_step = config.batch_size * config.num_gradient_accumulations
            end_s = budget_s if number == len(RACE[name]) else spent_s + share * budget_s
            stops = sorted({p for p in pending if spent_s < p < end_s} | {min(end_s, pending[-1])})
            for resume, stop in enumerate(stops):
                result = train(dataclasses.replace(config, max_time_s=max(stop - spent_s, 1e-3)), progress=False,
                               resume=resume > 0)
                last = result.history[-1]
                reached_s = spent_s + last["train_time_s"]
                if any(p <= reached_s for p in pending) and stage.image_size == base.model.image_size:
                    pending = [p for p in pending if p > reached_s]
                    pipe = result.pipeline()
                    row = {"model": name, "stage": stage.name, "params": sum(p.numel() for p in result.model.parameters()),
                           "step": steps + last["step"], "images_seen": images + last["step"] * images_per_step,
                           "train_time_s": reached_s, "loss_64": last[f"loss_{stage.image_size}"],
                           "sets": {s: evaluate_pipeline(pipe, num_samples=num_samples,
                                                         num_inference_steps=num_inference_steps,
                                                         guidance_scale=guidance_scale,
                                                         guidance_interval=guidance_interval, judge=judge,
                                                         **PROMPT_SETS[s])
                                    for s in prompt_sets}}
                    row["wall_s"] = time.perf_counter() - started
                    rows.append(row)
                    print(_summary(row), file=sys.stderr)
                    if on_row:
                        on_row(row)
            steps += last["step"]
            images += last["step"] * images_per_step
            spent_s += last["train_time_s"]
            previous = str(Path(config.output_dir) / "checkpoint_latest")
    return rows


def race_prompts(n: int = 8) -> list[str]:
    """The prompts of the race's sample grids, the same for every model: n // 2 training-style
    captions, then n - n // 2 in held-out phrasings (Shapes scenes of seed 123)."""
    half = n // 2
    return ([ShapesDataset(length=half, seed=123).scene(i)[0] for i in range(half)]
            + [ShapesDataset(length=n - half, seed=123, phrasing="heldout").scene(i)[0] for i in range(n - half)])


def _summary(row: dict) -> str:
    sets = "  ".join(f"{s}: prompt {r['prompt_accuracy']:.3f} layout {r['layout_accuracy']:.3f} FD {r['judge_fd']:.0f}"
                     for s, r in row["sets"].items())
    return f"{row['model']:11s} {row['train_time_s']:6.0f} s  {row['images_seen']:6d} images  {sets}"


def plot_comparison(rows: list[dict], prompt_set: str = "train"):
    """Prompt accuracy and layout accuracy (each with its 95% interval) and judge Fréchet distance
    on `prompt_set`, against training time (left) and images seen (right), one line per model.
    Returns the Figure; it is a pyplot figure, so a notebook shows it (`plt.show()`)."""
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), dpi=100)
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        scores = [r["sets"][prompt_set] for r in mine]
        label = f"{name} ({mine[0]['params'] / 1e6:.2f}M)"
        for col, x in enumerate(([r["train_time_s"] / 60 for r in mine], [r["images_seen"] / 1000 for r in mine])):
            for row, key in enumerate(("prompt_accuracy", "layout_accuracy")):
                value = [s[key] for s in scores]
                error = [[v - s[f"{key}_ci95"][0] for v, s in zip(value, scores)],
                         [s[f"{key}_ci95"][1] - v for v, s in zip(value, scores)]]
                axes[row, col].errorbar(x, value, yerr=error, marker="o", capsize=3, label=label)
            axes[2, col].plot(x, [s["judge_fd"] for s in scores], marker="o", label=label)
    for col, xlabel in enumerate(("training time (min)", "images seen (thousands)")):
        axes[0, col].set(ylabel="prompt accuracy", ylim=(0, 1))
        axes[1, col].set(ylabel="layout accuracy\n(background, colour, position)", ylim=(0, 1))
        axes[2, col].set(ylabel="Fréchet distance\n(judge features)", yscale="log", xlabel=xlabel)
    axes[0, 0].legend()
    described = {"train": "training-style prompts", "phrasing": "prompts in held-out phrasings",
                 "pairs": "held-out shape-colour pairs"}.get(prompt_set, prompt_set)
    fig.suptitle(f"{described}, {scores[0]['n']} per model and point, 95% intervals")
    fig.tight_layout()
    return fig
