"""Image-caption datasets: the embedded Shapes scenes, Flickr30k, Tiny ImageNet, or your own
(chapter 1; chapter 8 trains on the real ones).

Every item is {"image": (3, H, W) float in [-1, 1], "caption": str}; Shapes items also carry
"attributes" (see `mdm_lite.data.shapes`). `load_dataset` picks a dataset by name,
`collate` batches items, `prefetch` fills the cache before training.
"""

from __future__ import annotations

import os
import typing

import torch

from ..config_check import check_options
from .captioned import CaptionedImageDataset, DatasetError, load_captioned, preprocess
from .flickr30k import load_flickr30k
from .shapes import (
    HELDOUT_PAIRS,
    ShapesConfig,
    ShapesDataset,
    caption_for,
    heldout_prompts,
    make_scene,
    render_scene,
    sample_attributes,
)
from .tiny_imagenet import load_tiny_imagenet

NAMED_DATASETS = ("shapes", "flickr30k", "tiny-imagenet")


def load_dataset(name: str, split: str = "train", image_size: int = 64, max_samples: int | None = None,
                 **options) -> torch.utils.data.Dataset:
    """A dataset of {"image": (3, image_size, image_size) in [-1, 1], "caption": str} items.

    Args:
        name: "shapes", "flickr30k", "tiny-imagenet", or any captioned dataset: a Hub name
            ("owner/name"), a local folder (`imagefolder` with a metadata file, or parquet
            files) or .parquet file(s).
        split: "train", or the dataset's other splits ("heldout" for Shapes; "val", "test",
            "all" for Flickr30k; "valid" for Tiny ImageNet).
        max_samples: use at most this many samples (for Shapes, the dataset's length).
        options: passed to the loader: for Shapes the fields of `ShapesConfig` (seed,
            difficulty, length); for Flickr30k and Tiny ImageNet hub_name, path, seed; for
            other datasets image_column, caption_column, seed.
    """
    if name == "shapes":
        options = _checked(options, ShapesConfig)
        if max_samples is not None:
            options["length"] = min(max_samples, options.get("length", max_samples))
        try:
            return ShapesDataset(image_size=image_size, split=split, **options)
        except ValueError as error:  # ShapesConfig's own range checks
            raise DatasetError(str(error)) from None
    if name == "flickr30k":
        return load_flickr30k(split, image_size, max_samples, **_checked(options, load_flickr30k))
    if name == "tiny-imagenet":
        return load_tiny_imagenet(split, image_size, max_samples, **_checked(options, load_tiny_imagenet))
    if "/" in name or os.sep in name or name.endswith(".parquet") or os.path.exists(name):
        return load_captioned(name, split, image_size, max_samples, **_checked(options, load_captioned))
    raise DatasetError(f"unknown dataset {name!r}: use {', '.join(NAMED_DATASETS)}, a Hub name like "
                       "owner/name, a local folder, or a .parquet file")


def _checked(options: dict, loader) -> dict:
    """`options` checked against the typed keyword arguments of `loader` (a function or a config
    dataclass) that load_dataset does not set itself: unknown names and wrong types are ConfigErrors."""
    hints = {k: v for k, v in typing.get_type_hints(loader, include_extras=True).items()
             if k not in ("source", "split", "image_size", "max_samples", "return")}
    return check_options(options, hints, "--dataset_option")


def collate(batch: list[dict]) -> dict:
    """Batch dataset items: {"image": (B, 3, H, W), "caption": list of B str} plus
    "attributes" (list of B dicts) when the items have them.
    """
    out = {"image": torch.stack([item["image"] for item in batch]),
           "caption": [item["caption"] for item in batch]}
    if all("attributes" in item for item in batch):
        out["attributes"] = [item["attributes"] for item in batch]
    return out


def prefetch(name: str, split: str = "train", **options) -> int:
    """Download `name` into the `datasets` cache now, so training later needs no network.

    Takes the arguments of `load_dataset`. Returns the number of samples now available
    (Shapes needs no download and returns its length).
    """
    return len(load_dataset(name, split, **options))


__all__ = [
    "HELDOUT_PAIRS",
    "CaptionedImageDataset",
    "DatasetError",
    "ShapesConfig",
    "ShapesDataset",
    "caption_for",
    "collate",
    "heldout_prompts",
    "load_captioned",
    "load_dataset",
    "load_flickr30k",
    "load_tiny_imagenet",
    "make_scene",
    "prefetch",
    "preprocess",
    "render_scene",
    "sample_attributes",
]
