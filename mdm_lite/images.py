"""Images as tensors: the one place where 8-bit pixels become values in [-1, 1] and back.

Every image in mdm_lite is a float tensor (3, H, W), or a batch (B, 3, H, W), in [-1, 1]: pixel
value 0 is -1 and 255 is 1, so v = p / 127.5 - 1. Chapter 1 writes this conversion inline.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def from_pil(image: Image.Image) -> Tensor:
    """An RGB PIL image (W x H) -> a float32 tensor (3, H, W) in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_uint8(images: Tensor) -> Tensor:
    """Images (..., 3, H, W) in [-1, 1] -> uint8 pixels of the same shape, the inverse of
    `from_pil`: values outside [-1, 1] are clipped, then rounded to the nearest of 256 levels."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> N RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()]
