"""Metrics for generated Shapes images: prompt accuracy, Fréchet distances, evaluation (chapter 7).

Prompt accuracy, in the spirit of GenEval (Ghosh et al. 2023): generate an image for each
held-out prompt, let a classifier read every attribute back, and count the images whose
attributes all match their prompt. The classifier is the Shapes judge (`mdm_lite.judge`).

Fréchet distance (Heusel et al. 2017): fit a Gaussian to the features of each image set and
compute ``d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. `frechet_distance` uses the
judge's penultimate features, which know Shapes well and need no download; `inception_fid` is the
standard FID (Inception-v3 pool features, through torch-fidelity), comparable with papers but
blind to much of what matters on 64x64 flat shapes.
"""
from __future__ import annotations

import math
import time
import urllib.error
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint
from .config_check import ConfigError
from .data import ShapesDataset
from .images import to_uint8
from .judge import ATTRIBUTES, Judge, attribute_labels, load_judge
from .pipeline import MDMPipeline
from .samplers import DEFAULT_GUIDANCE_INTERVAL, DEFAULT_SAMPLER, DEFAULT_STEPS

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when n = 0.

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half-width = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    Unlike the normal interval it stays inside [0, 1] and is not empty at p = 0 or 1.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def prompt_accuracy(images: Tensor, attributes: Sequence[dict], judge: Judge | None = None) -> dict:
    """How often the judge reads back the prompt an image was made from.

    images: (N, 3, 64, 64) in [-1, 1]; attributes: the N one-object scenes they were prompted with.
    Only the attributes a prompt states are scored (a scene's "stated" list; all five without one):
    "a red star" is right with any size, position and background.
    Returns {"n", "accuracy": fraction of images with every stated attribute right, "ci95": its
    Wilson interval, "layout", "layout_ci95": the same for background, colour and position alone
    (what the default `mdm-lite train` run is measured by), "per_attribute": {attribute: fraction right among the prompts that state it},
    "per_attribute_n", "per_attribute_ci95", "predicted": the judge's reading, {attribute: N class names}}.
    """
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
    judge = judge or load_judge()
    labels = attribute_labels(attributes)
    predicted = judge.predict(images)
    right = torch.stack([torch.tensor([ATTRIBUTES[name].index(p) for p in predicted[name]]) == labels[:, i]
                         for i, name in enumerate(ATTRIBUTES)], 1)
    stated = torch.tensor([[name in a.get("stated", ATTRIBUTES) for name in ATTRIBUTES] for a in attributes],
                          dtype=torch.bool).reshape(len(attributes), len(ATTRIBUTES))
    n = len(images)
    all_right = int((right | ~stated).all(1).sum())
    layout = [list(ATTRIBUTES).index(name) for name in ("background", "colour", "position")]
    layout_right = int((right | ~stated)[:, layout].all(1).sum())
    per = {name: int((right[:, i] & stated[:, i]).sum()) for i, name in enumerate(ATTRIBUTES)}
    per_n = {name: int(stated[:, i].sum()) for i, name in enumerate(ATTRIBUTES)}
    return {"n": n, "accuracy": all_right / n if n else float("nan"), "ci95": wilson_interval(all_right, n),
            "layout": layout_right / n if n else float("nan"), "layout_ci95": wilson_interval(layout_right, n),
            "per_attribute": {name: k / per_n[name] if per_n[name] else float("nan") for name, k in per.items()},
            "per_attribute_n": per_n,
            "per_attribute_ci95": {name: wilson_interval(k, per_n[name]) for name, k in per.items()},
            "predicted": predicted}


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), in float64, of features (N, D)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition
    (eigenvalues that rounding made slightly negative are taken as 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def gaussian_frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)::

        |mu_a - mu_b|^2 + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^(1/2)).

    sigma_a sigma_b is not symmetric, but it has the eigenvalues of the symmetric PSD matrix
    M = sigma_a^(1/2) sigma_b sigma_a^(1/2), so tr((sigma_a sigma_b)^(1/2)) = sum sqrt(eig(M)):
    two symmetric eigendecompositions, no complex parts to discard as with a general sqrtm.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    root_a = _psd_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt
    return max(float(distance), 0.0)  # >= 0 exactly; rounding can leave -1e-12


def frechet_distance(images_a: Tensor, images_b: Tensor, judge: Judge | None = None) -> float:
    """Fréchet distance between two image sets (N, 3, 64, 64) in [-1, 1] in the judge's feature space.

    Use a few hundred images per set or more: the covariance has feature_dim^2 entries, and the
    distance is biased upwards for small sets (two independent sets of real renders give > 0).
    """
    judge = judge or load_judge()
    return gaussian_frechet_distance(*feature_statistics(judge.features(images_a)),
                                     *feature_statistics(judge.features(images_b)))


def edge_ratio(images: Tensor) -> dict[str, float]:
    """High-frequency energy of each border row and column over that of the interior.

    images: (N, C, H, W). The energy of a pixel is ``abs(x - box3x3(x))`` (replicate padding), averaged
    over channels and images; the interior leaves out two pixels on each side. Returns {"top",
    "bottom", "left", "right", "max"}. Real Shapes renders, flat at their borders, score below 1; a
    model that leaves noise along an edge scores above.
    """
    x = images.float()
    energy = (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)).abs().mean((0, 1))
    interior = energy[2:-2, 2:-2].mean()
    sides = {"top": energy[0].mean(), "bottom": energy[-1].mean(), "left": energy[:, 0].mean(),
             "right": energy[:, -1].mean()}
    ratios = {name: float(value / interior) for name, value in sides.items()}
    return ratios | {"max": max(ratios.values())}


def evaluate_samples(images: Tensor, attributes: Sequence[dict], real_images: Tensor | None = None,
                     judge: Judge | None = None) -> dict:
    """One row of numbers for generated images (N, 3, 64, 64) in [-1, 1] and their prompts' attributes:
    {"n", "prompt_accuracy", "prompt_accuracy_ci95", "layout_accuracy" (background, colour and position
    all right), "layout_accuracy_ci95", "<attribute>_accuracy" for each attribute, and
    "judge_fd" (Fréchet distance to `real_images` in the judge's features) when real images are given}.
    """
    judge = judge or load_judge()
    scores = prompt_accuracy(images, attributes, judge)
    row = {"n": scores["n"], "prompt_accuracy": scores["accuracy"], "prompt_accuracy_ci95": scores["ci95"],
           "layout_accuracy": scores["layout"], "layout_accuracy_ci95": scores["layout_ci95"]}
    row |= {f"{name}_accuracy": value for name, value in scores["per_attribute"].items()}
    row |= {f"{name}_n": value for name, value in scores["per_attribute_n"].items()}
    row["edge_ratio"] = edge_ratio(images)["max"]
    if real_images is not None:
        row["judge_fd"] = frechet_distance(images, real_images, judge)
    return row


EVAL_SEED = 1_000_003  # Shapes seed of the evaluation prompts: scenes apart from training's seed 0
# The prompt sets of `mdm-lite eval`: training-style prompts, the same kind of scenes in phrasings
# that training never sees, and shape-colour pairs that training never sees.
PROMPT_SETS = {
    "train": {"split": "train", "phrasing": "train"},
    "phrasing": {"split": "train", "phrasing": "heldout"},
    "pairs": {"split": "heldout", "phrasing": "train"},
}


def evaluate_pipeline(pipe, num_samples: int = 256, num_inference_steps: int = DEFAULT_STEPS,
                      guidance_scale: float = 3.0, guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
                      sampler: str = DEFAULT_SAMPLER, seed: int = 0, split: str = "train",
                      phrasing: str = "train", batch_size: int = 64, judge: Judge | None = None,
                      progress: bool = False, precision: str = "auto") -> dict:
    """Generate num_samples images from fresh Shapes prompts with an MDMPipeline and score them.

    The prompts are the captions of a ShapesDataset(seed=EVAL_SEED + seed, split, phrasing)
    ("heldout" split: shape-colour pairs never trained on; "heldout" phrasing: captions in words
    training never uses); the real images for the Fréchet distance are as many other renders of
    the same split. Returns `evaluate_samples`'s row plus the sampling settings and "sample_s_per_image".
    progress: a progress bar over the images, and one over the steps of each batch; precision: the
    pipeline's ("auto", "fp32" or "bf16").
    """
    judge = judge or load_judge()
    size = pipe.resolutions[0]
    prompts = ShapesDataset(length=num_samples, image_size=size, seed=EVAL_SEED + seed, split=split,
                            phrasing=phrasing)
    real = ShapesDataset(length=num_samples, image_size=size, seed=EVAL_SEED + seed + 1, split=split)
    scenes = [prompts.scene(i) for i in range(num_samples)]
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    batches = []
    with tqdm(total=num_samples, desc=f"sampling ({split} split, {phrasing} phrasing)", unit="image",
              disable=not progress) as bar:
        for i in range(0, num_samples, batch_size):
            batches.append(pipe([c for c, _ in scenes[i:i + batch_size]], num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                sampler=sampler, generator=generator,
                                output_type="pt", progress=progress, precision=precision).images)
            bar.update(len(batches[-1]))
            bar.set_postfix(s_per_image=f"{(time.perf_counter() - start) / (i + len(batches[-1])):.2f}")
    images = torch.cat(batches)
    elapsed = time.perf_counter() - start
    real_images = torch.stack([real[i]["image"] for i in range(num_samples)])
    row = evaluate_samples(images, [a for _, a in scenes], real_images, judge)
    return {**row, "split": split, "phrasing": phrasing, "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "guidance_interval": list(guidance_interval), "sampler": sampler,
            "precision": "bf16" if pipe.uses_bf16(precision) else "fp32", "sample_s_per_image": elapsed / num_samples}


def evaluate_checkpoint(checkpoint: str | Path, num_samples: int = 256, device: str = "auto", use_ema: bool = True,
                        prompt_sets: Sequence[str] = tuple(PROMPT_SETS), **options) -> dict:
    """`evaluate_pipeline` on a checkpoint (a directory, an output_dir or "shapes") for each of
    `prompt_sets` (keys of PROMPT_SETS), for `mdm-lite eval`. Returns {"checkpoint", "step",
    "sets": {name: evaluate_pipeline's row, with its interval as ci95_low / ci95_high}}."""
    unknown = [name for name in prompt_sets if name not in PROMPT_SETS]
    if unknown:
        raise ConfigError(f"unknown prompt sets {unknown}: use {', '.join(PROMPT_SETS)}")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.config.get("dataset") != "shapes":
        raise ConfigError(f"{ckpt.path} was trained on {ckpt.config.get('dataset')!r}; the judge reads Shapes "
                          "images only: evaluate a Shapes checkpoint, or use inception_fid in Python")
    pipe = MDMPipeline.from_pretrained(ckpt.path, device=device, use_ema=use_ema)
    judge = load_judge()
    sets = {}
    for name in prompt_sets:
        row = evaluate_pipeline(pipe, num_samples=num_samples, judge=judge, **PROMPT_SETS[name], **options)
        for key in ("prompt_accuracy", "layout_accuracy"):
            row[f"{key}_ci95_low"], row[f"{key}_ci95_high"] = row.pop(f"{key}_ci95")
        sets[name] = row
    return {"checkpoint": str(ckpt.path), "step": ckpt.state.get("step"), "sets": sets}


# Standard Inception FID, through torch-fidelity.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


class FIDUnavailable(RuntimeError):
    """Inception FID cannot run here: torch-fidelity or the Inception weights are missing."""


def inception_weights(download: bool = False) -> Path:
    """Path of the FID Inception-v3 weights (the TensorFlow 2015-12-05 graph, as converted by
    torch-fidelity) in the torch hub cache; fetched from GitHub only when `download` is True."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    if path.exists():
        return path
    if not download:
        raise FIDUnavailable(f"the Inception FID weights are not in {path.parent}: fetch them once with network "
                             "access: python -c 'from mdm_lite.metrics import inception_weights; "
                             "inception_weights(download=True)'")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(path))
    except (urllib.error.URLError, OSError) as err:
        raise FIDUnavailable(f"could not download the Inception FID weights from {INCEPTION_URL} ({err}); "
                             f"download the file by hand into {path.parent}") from err
    return path


@torch.no_grad()
def inception_fid(images_a: Tensor, images_b: Tensor, download: bool = False, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> float:
    """Standard FID between two image sets (N, 3, H, W) in [-1, 1]: Inception-v3 2048-d pool
    features of images quantised to 8 bits and resized to 299x299 as in the TensorFlow original
    (torch-fidelity's feature extractor), then `gaussian_frechet_distance`.

    Needs `pip install 'mdm-lite[fid]'` and the weights (`inception_weights(download=True)`);
    raises FIDUnavailable, naming the fix, when either is missing. FID is biased upwards for small
    N: compare values only at equal N (papers use 10k-50k images).
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise FIDUnavailable("Inception FID needs torch-fidelity: pip install 'mdm-lite[fid]'") from err
    weights = inception_weights(download)
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    model = model.to(device)

    def features(images: Tensor) -> Tensor:
        return torch.cat([model(to_uint8(chunk).to(device))[0].cpu() for chunk in images.split(batch_size)])

    return gaussian_frechet_distance(*feature_statistics(features(images_a)), *feature_statistics(features(images_b)))
