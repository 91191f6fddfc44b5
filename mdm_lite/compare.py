"""Nested against flat at equal compute: the paper's headline claim, tested at small scale.

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
from pathlib import Path

from .metrics import evaluate_pipeline, load_judge
from .train import TrainConfig, flat_baseline, train


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
        config = dataclasses.replace(base, model=configs[name], output_dir=str(Path(output_dir) / name),
                                     max_steps=None, epochs=10**6, save_freq=10**9, keep_checkpoints=1,
                                     num_sample_steps=num_inference_steps)
        for point in range(1, num_points + 1):
            config.max_time_s = budget_s * point / num_points
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
    from matplotlib.figure import Figure

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
