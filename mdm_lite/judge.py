"""The Shapes judge: a small CNN that reads a scene's attributes back from its image (chapter 7).

One classifier head per attribute (shape, colour, size, position, background), trained on
rendered scenes under random imperfections (jitter, blur, colour shift, noise; `perturb`), so
that it reads slightly imperfect generated images too. `mdm_lite.metrics` scores samples with it:
prompt accuracy, and Fréchet distances in its features. Its weights ship with the package
(assets/judge.safetensors, with the record of how they were trained in assets/judge.json);
`train_judge` remakes them (`python benchmarks/train_judge.py`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, render_scene

# The judge's heads and their classes, in the order of its logits.
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
JUDGE_PATH = Path(__file__).parent / "assets" / "judge.safetensors"


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
