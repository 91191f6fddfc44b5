"""Pictures of images and training: the book's figures and the files a training run writes.

`show_images` draws a grid of images with titles in a notebook (every chapter uses it);
`save_grid`, `side_by_side` and `plot_losses` make the PNG files of `mdm-lite train` and
`mdm-lite sample`. Images are tensors in [-1, 1] (`mdm_lite.images`). Chapter 1 introduces
`show_images`, chapter 6 the others.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from .images import to_pil, to_uint8

FONT_SIZE = 10  # points: the smallest text of a figure that stays readable in the HTML book


def as_array(image: Tensor | Image.Image | np.ndarray) -> np.ndarray:
    """An image as imshow takes it: a (3, H, W) tensor in [-1, 1] becomes (H, W, 3) uint8
    (values outside [-1, 1], as in a noisy image, are clipped); PIL images and arrays pass through."""
    if isinstance(image, Tensor):
        return to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()
    return np.asarray(image)


def show_images(images: Sequence | Tensor, titles: Sequence[str] | None = None, ncols: int | None = None, *,
                row_labels: Sequence[str] | None = None, column_titles: Sequence[str] | None = None,
                suptitle: str | None = None, size: float = 1.6, wrap: int = 24, fontsize: float = FONT_SIZE):
    """Draw images in a grid, row by row, and return its axes, an array (rows, ncols).

    images: a (N, 3, H, W) tensor in [-1, 1], or a sequence of (3, H, W) tensors, PIL images or
    arrays (all of one size). titles: one per image, wrapped at `wrap` characters; column_titles:
    over the first row instead; row_labels: left of each row. ncols: images per row (default:
    all in one row). size: the height of an image in inches. Pixels stay sharp (no smoothing).
    Call `plt.show()` after, or change the axes first.
    """
    arrays = [as_array(image) for image in images]
    ncols = ncols or len(arrays)
    nrows = math.ceil(len(arrays) / ncols)
    height, width = arrays[0].shape[:2]
    titles = [_wrapped(t, wrap) for t in titles] if titles is not None else None
    column_titles = [_wrapped(t, wrap) for t in column_titles] if column_titles is not None else None
    shown = [line for t in (titles or []) + (column_titles or []) for line in t.splitlines()]
    em = fontsize / 72  # inches
    title_height = max((t.count("\n") + 1 for t in (titles or []) + (column_titles or [])), default=0) * 1.6 * em
    label_width = 0.0 if row_labels is None else (1 + max(l.count("\n") for l in row_labels)) * 1.3 * em
    cell_width = max(size * width / height, 0.55 * em * max(map(len, shown), default=0)) + 0.1
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, dpi=80,
                             figsize=(ncols * cell_width + label_width,
                                      nrows * (size + title_height + 0.2) + (2 * em if suptitle else 0)))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for i, (ax, array) in enumerate(zip(axes.flat, arrays)):
        ax.imshow(array, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=fontsize)
    for ax in axes.flat[len(arrays):]:
        ax.axis("off")
    if column_titles is not None:
        for ax, title in zip(axes[0], column_titles):
            ax.set_title(title, fontsize=fontsize)
    if row_labels is not None:
        for ax, label in zip(axes[:, 0], row_labels):
            ax.set_ylabel(label, fontsize=fontsize)
    top = 1.0
    if suptitle:
        fig.suptitle(suptitle, fontsize=fontsize + 1)
        top = 1 - 2 * em / fig.get_figheight()  # room for it above the titles
    fig.tight_layout(rect=(0, 0, 1, top))
    return axes


def _wrapped(text: str, width: int) -> str:
    """`text` with each of its lines wrapped at `width` characters (its own line breaks kept)."""
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def side_by_side(levels: list[Tensor]) -> Tensor:
    """Every nesting level of the same samples next to each other, each upsampled (nearest) to the
    largest size: list of (N, 3, R_k, R_k) -> (N, 3, R, R * num_levels)."""
    size = levels[0].shape[-1]
    return torch.cat([F.interpolate(x, size=size, mode="nearest") for x in levels], dim=-1)


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid, white between images; returns the path."""
    grid = make_grid(images.float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, value_range=(-1, 1),
                     normalize=True, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(grid[None] * 2 - 1)[0].save(path)
    return path


def plot_losses(history: list[dict], path: str | Path) -> Path:
    """Plot the total and per-level losses of a metrics history (log scale) into a PNG. Draws on a
    Figure of its own, not through pyplot, so it leaves a notebook's figures alone."""
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    if history:
        steps = [r["step"] for r in history]
        for key in [k for k in history[-1] if k.startswith("loss")]:
            ax.plot(steps, [r.get(key, float("nan")) for r in history], label=key.replace("loss_", "level "))
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
