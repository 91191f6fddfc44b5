"""Nested against flat at equal compute: the paper's headline claim, tested at small scale
(chapter 9 runs it; chapter 4 builds the flat baseline).

Gu et al. 2023 (Sec. 5, Fig. 5) report that a NestedUNet trained with the multi-resolution loss
reaches a given 64x64 quality sooner than a single-resolution UNet of the same size. Here both
models train on Shapes for the same wall-clock budget with about the same number of parameters
(`flat_baseline`), and are evaluated at several points during training by prompt accuracy and the
Fréchet distance in the judge's features (`mdm_lite.metrics`).

    rows = nested_vs_flat(budget_s=600, num_points=3, output_dir="runs/compare")
    plot_comparison(rows)

`benchmarks/nested_vs_flat.py` is the command line for it; chapter 9 of the book runs it.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .judge import load_judge
from .metrics import evaluate_pipeline
from .nested import NestedUNet, NestedUNetConfig
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


def nested_vs_flat(output_dir: str | Path, budget_s: float = 600.0, num_points: int = 3, num_samples: int = 64,
                   num_inference_steps: int = 20, guidance_scale: float = 3.0, base: TrainConfig | None = None,
                   models: tuple[str, ...] = ("nested", "flat")) -> list[dict]:
    """Train each model for budget_s seconds of training time (sampling and saving excluded),
    evaluating after every budget_s / num_points. base: the TrainConfig of the nested model (the
    CPU preset by default); the flat one replaces its model with `flat_baseline(base.model)`.
    Returns one row per (model, point): model, params, step, images_seen, train_time_s and the
    numbers of `metrics.evaluate_pipeline` (prompt accuracy with its 95% interval, per attribute,
    judge_fd).
    """
    base = base or TrainConfig()
    judge = load_judge()
    configs = {"nested": base.model, "flat": flat_baseline(base.model)}
    rows = []
    for name in models:
        for point in range(1, num_points + 1):  # the same run, resumed with a larger time budget
            config = dataclasses.replace(base, model=configs[name], output_dir=str(Path(output_dir) / name),
                                         max_steps=None, epochs=None, max_time_s=budget_s * point / num_points,
                                         save_freq=10**9, keep_checkpoints=1, num_sample_steps=num_inference_steps)
            result = train(config, progress=False, resume=point > 1)
            last = result.history[-1]
            row = evaluate_pipeline(result.pipeline(), num_samples=num_samples, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, judge=judge)
            rows.append({"model": name, "params": sum(p.numel() for p in result.model.parameters()),
                         "step": last["step"], "images_seen": last["step"] * config.batch_size
                         * config.num_gradient_accumulations, "train_time_s": last["train_time_s"],
                         "loss_64": last[f"loss_{config.model.image_size}"], **row})
    return rows


def plot_comparison(rows: list[dict], axes=None):
    """Prompt accuracy (with its 95% interval) and judge Fréchet distance against training time,
    one line per model. Returns the matplotlib Figure (new unless `axes`, a pair, is given)."""
    if axes is None:
        fig = Figure(figsize=(10, 3.6), dpi=100)
        axes = fig.subplots(1, 2)
    fig = axes[0].figure
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        t = [r["train_time_s"] / 60 for r in mine]
        acc = [r["prompt_accuracy"] for r in mine]
        low = [a - r["prompt_accuracy_ci95"][0] for a, r in zip(acc, mine)]
        high = [r["prompt_accuracy_ci95"][1] - a for a, r in zip(acc, mine)]
        label = f"{name} ({mine[0]['params'] / 1e6:.2f}M)"
        axes[0].errorbar(t, acc, yerr=[low, high], marker="o", capsize=3, label=label)
        axes[1].plot(t, [r["judge_fd"] for r in mine], marker="o", label=label)
    axes[0].set(xlabel="training time (min)", ylabel="prompt accuracy (all attributes)", ylim=(0, 1))
    axes[1].set(xlabel="training time (min)", ylabel="Fréchet distance (judge features)", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    return fig
