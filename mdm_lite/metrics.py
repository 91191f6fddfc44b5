"""Metrics for generated Shapes images: a judge, prompt accuracy, Fréchet distances.

Prompt accuracy, in the spirit of GenEval (Ghosh et al. 2023): generate an image for each
held-out prompt, let a classifier read every attribute back, and count the images whose
attributes all match their prompt. The classifier here is the Shapes *judge*, a small CNN with
one head per attribute (shape, colour, size, position, background) trained on rendered scenes
under random imperfections (jitter, blur, colour shift, noise), so that it reads slightly
imperfect generated images too. Its weights ship with the package (assets/judge.safetensors,
with the record of how they were trained in assets/judge.json); `train_judge` remakes them.

Fréchet distance (Heusel et al. 2017): fit a Gaussian to the features of each image set and
compute ``d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. `frechet_distance` uses the
judge's penultimate features, which know Shapes well and need no download; `inception_fid` is the
standard FID (Inception-v3 pool features, through torch-fidelity), comparable with papers but
blind to much of what matters on 64x64 flat shapes.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
import urllib.error
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, render_scene
from .samplers import DEFAULT_SAMPLER, DEFAULT_STEPS

# The judge's heads and their classes, in the order of its logits.
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
JUDGE_PATH = Path(__file__).parent / "assets" / "judge.safetensors"
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Shape of a Judge: conv layers (3x3, batch norm, ReLU) of `channels` with `strides`, pooled
    (see `Judge.body`) into a `feature_dim` layer that all heads read.
    """

    channels: tuple[int, ...] = (32, 64, 96, 96)
    strides: tuple[int, ...] = (2, 2, 2, 1)
    feature_dim: int = 128
    image_size: int = 64

    def __post_init__(self):
        if len(self.channels) != len(self.strides):
            raise ValueError(f"channels {self.channels} and strides {self.strides} differ in length")


class Judge(nn.Module):
    """Reads a Shapes scene back from its image: one classifier head per attribute.

    forward(images (B, 3, 64, 64) in [-1, 1]) -> {attribute: logits (B, num_classes)}.
    """

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config = config or JudgeConfig()
        layers, c_in = [], 3
        for c, stride in zip(config.channels, config.strides):
            layers += [nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Linear(10 * c_in, config.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(classes))
                                    for name, classes in ATTRIBUTES.items()})

    def body(self, images: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, 64, 64) in [-1, 1].

        The conv map is read two ways: a global max pool (what is there, wherever it is: shape,
        colour, size) and an average pool onto the 3x3 grid (where things are: position).
        """
        h = self.conv(images)
        pooled = torch.cat([h.amax((2, 3)), F.adaptive_avg_pool2d(h, 3).flatten(1)], 1)
        return self.project(pooled)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.body(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Penultimate features (N, feature_dim) of images (N, 3, 64, 64) in [-1, 1], for Fréchet
        distances. Puts the judge in eval mode (batch norm then uses its running statistics)."""
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([self.body(chunk.to(device, torch.float32)).cpu()
                          for chunk in images.split(batch_size)])

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 512) -> dict[str, list[str]]:
        """The attributes read from images (N, 3, 64, 64) in [-1, 1]: {attribute: N class names}."""
        h = self.features(images, batch_size).to(next(self.parameters()).device)
        return {name: [ATTRIBUTES[name][i] for i in head(h).argmax(1).tolist()]
                for name, head in self.heads.items()}


def save_judge(judge: Judge, path: str | Path = JUDGE_PATH, record: dict | None = None) -> None:
    """Write the judge's weights as safetensors (its config and classes in the metadata), and
    `record` (how it was trained) as JSON beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(dataclasses.asdict(judge.config)), "attributes": json.dumps(ATTRIBUTES)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    if record is not None:
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def load_judge(path: str | Path = JUDGE_PATH, device: str | torch.device = "cpu") -> Judge:
    """The judge saved at `path` (by default the one shipped with the package), in eval mode."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    attributes = {k: tuple(v) for k, v in json.loads(metadata["attributes"]).items()}
    if attributes != ATTRIBUTES:
        raise ValueError(f"the judge at {path} was trained for other Shapes classes; retrain it with "
                         "`python benchmarks/train_judge.py`")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(metadata["config"]).items()}
    judge = Judge(JudgeConfig(**config))
    judge.load_state_dict(state)
    return judge.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Training the judge


def all_scenes() -> list[dict]:
    """Every one-object scene: 6 shapes x 8 colours x 2 sizes x 9 positions x 3 backgrounds = 2592.

    Rendering is deterministic, so these are all the distinct clean images of difficulty
    "single", held-out (shape, colour) pairs included: the judge must read those too.
    """
    return [dict(zip(ATTRIBUTES, values)) for values in itertools.product(*ATTRIBUTES.values())]


def attribute_labels(attributes: Sequence[dict]) -> Tensor:
    """Class indices (N, 5), columns in the order of ATTRIBUTES, of one-object scenes."""
    for a in attributes:
        if "objects" in a:
            raise ValueError("the judge reads one-object scenes (difficulty 'single'); got a two-object scene")
    return torch.tensor([[ATTRIBUTES[name].index(a[name]) for name in ATTRIBUTES] for a in attributes])


def _gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image (B, C, H, W) with its own Gaussian of std `sigma` (B,) pixels (5x5 kernel)."""
    b, c, h, w = images.shape
    x = torch.arange(-2, 3, dtype=images.dtype)
    k = torch.exp(-x ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    kernel = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]  # (B*C, 1, 5, 5)
    blurred = F.conv2d(F.pad(images.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate"), kernel, groups=b * c)
    return blurred.reshape(b, c, h, w)


def perturb(images: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Random imperfections of the kind a generator leaves, each drawn per image.

    images: (B, 3, H, W) in [-1, 1]. At strength 1: shift up to 2 px, scale by 0.92-1.08, rotate
    up to 6 degrees (objects stay well inside their grid cell and their size class), blur with a
    Gaussian of std up to 1 px, offset each channel by up to 0.06, add Gaussian noise of std up
    to 0.1. Returns the same shape, clamped to [-1, 1].
    """
    b, _, h, _ = images.shape

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    s = strength
    angle = uniform(-6, 6) * s * math.pi / 180
    scale = 1 + uniform(-0.08, 0.08) * s
    shift = uniform(-2, 2, 2) * s * 2 / h  # in the [-1, 1] units of affine_grid
    theta = torch.stack([torch.stack([torch.cos(angle), -torch.sin(angle)], 1),
                         torch.stack([torch.sin(angle), torch.cos(angle)], 1)], 1) / scale[:, None, None]
    grid = F.affine_grid(torch.cat([theta, shift[:, :, None]], 2), list(images.shape), align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = _gaussian_blur(x, uniform(0, 1) * s)
    x = x + uniform(-0.06, 0.06, 3, 1, 1) * s
    x = x + uniform(0, 0.1, 1, 1, 1) * s * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def train_judge(steps: int = 3000, batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 1e-4,
                seed: int = 0, config: JudgeConfig | None = None,
                log: Callable[[str], None] | None = print) -> tuple[Judge, dict]:
    """Train a judge on perturbed renders of `all_scenes()`. Returns (judge in eval mode, record).

    Each step draws `batch_size` scenes and fresh perturbations (`perturb`), and minimises the
    sum of the heads' cross-entropies with AdamW under a cosine learning rate with a 5% warm-up.
    fp32 on CPU; the record holds the settings, the time taken and the last losses.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    images = torch.stack([render_scene(a, (config or JudgeConfig()).image_size) for a in scenes])
    labels = attribute_labels(scenes)
    judge = Judge(config).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0)))))
    recent = []
    for step in range(steps):
        index = torch.randint(len(scenes), (batch_size,), generator=generator)
        logits = judge(perturb(images[index], generator))
        loss = sum(F.cross_entropy(logits[name], labels[index, i]) for i, name in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        recent = (recent + [loss.item()])[-100:]
        if log is not None and (step + 1) % max(1, steps // 20) == 0:
            log(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  {time.perf_counter() - start:.0f}s")
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
              "config": dataclasses.asdict(judge.config), "train_seconds": round(time.perf_counter() - start, 1),
              "final_loss": sum(recent) / len(recent), "threads": torch.get_num_threads()}
    return judge.eval(), record


# ---------------------------------------------------------------------------------------------
# Prompt accuracy


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
    Wilson interval, "per_attribute": {attribute: fraction right among the prompts that state it},
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
    per = {name: int((right[:, i] & stated[:, i]).sum()) for i, name in enumerate(ATTRIBUTES)}
    per_n = {name: int(stated[:, i].sum()) for i, name in enumerate(ATTRIBUTES)}
    return {"n": n, "accuracy": all_right / n if n else float("nan"), "ci95": wilson_interval(all_right, n),
            "per_attribute": {name: k / per_n[name] if per_n[name] else float("nan") for name, k in per.items()},
            "per_attribute_n": per_n,
            "per_attribute_ci95": {name: wilson_interval(k, per_n[name]) for name, k in per.items()},
            "predicted": predicted}


# ---------------------------------------------------------------------------------------------
# Fréchet distances


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
    {"n", "prompt_accuracy", "prompt_accuracy_ci95", "<attribute>_accuracy" for each attribute, and
    "judge_fd" (Fréchet distance to `real_images` in the judge's features) when real images are given}.
    """
    judge = judge or load_judge()
    scores = prompt_accuracy(images, attributes, judge)
    row = {"n": scores["n"], "prompt_accuracy": scores["accuracy"], "prompt_accuracy_ci95": scores["ci95"]}
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
                      guidance_scale: float = 3.0, sampler: str = DEFAULT_SAMPLER, seed: int = 0, split: str = "train",
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
    from .data import ShapesDataset
    from .sample import uses_bf16

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
                                guidance_scale=guidance_scale, sampler=sampler, generator=generator,
                                output_type="pt", progress=progress, precision=precision).images)
            bar.update(len(batches[-1]))
            bar.set_postfix(s_per_image=f"{(time.perf_counter() - start) / (i + len(batches[-1])):.2f}")
    images = torch.cat(batches)
    elapsed = time.perf_counter() - start
    real_images = torch.stack([real[i]["image"] for i in range(num_samples)])
    row = evaluate_samples(images, [a for _, a in scenes], real_images, judge)
    return {**row, "split": split, "phrasing": phrasing, "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "sampler": sampler,
            "precision": "bf16" if uses_bf16(precision, pipe.device) else "fp32", "sample_s_per_image": elapsed / num_samples}


def evaluate_checkpoint(checkpoint: str | Path, num_samples: int = 256, device: str = "auto", use_ema: bool = True,
                        prompt_sets: Sequence[str] = tuple(PROMPT_SETS), **options) -> dict:
    """`evaluate_pipeline` on a checkpoint (a directory, an output_dir or "shapes") for each of
    `prompt_sets` (keys of PROMPT_SETS), for `mdm-lite eval`. Returns {"checkpoint", "step",
    "sets": {name: evaluate_pipeline's row, with its interval as ci95_low / ci95_high}}."""
    from .checkpoint import load_checkpoint
    from .config_check import ConfigError
    from .sample import MDMPipeline

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
        low, high = row.pop("prompt_accuracy_ci95")
        sets[name] = {**row, "prompt_accuracy_ci95_low": low, "prompt_accuracy_ci95_high": high}
    return {"checkpoint": str(ckpt.path), "step": ckpt.state.get("step"), "sets": sets}


# ---------------------------------------------------------------------------------------------
# Standard Inception FID, through torch-fidelity

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


def _to_uint8(images: Tensor) -> Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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
        return torch.cat([model(_to_uint8(chunk).to(device))[0].cpu() for chunk in images.split(batch_size)])

    return gaussian_frechet_distance(*feature_statistics(features(images_a)), *feature_statistics(features(images_b)))
