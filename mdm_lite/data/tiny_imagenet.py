"""Tiny ImageNet: 64x64 photos of 200 ImageNet classes, captioned "a photo of a goldfish"
(chapters 1 and 8).

The Hub copy (default ``zh-plus/tiny-imagenet``; splits "train", 100,000 images, and "valid",
10,000) has columns image and label, a ClassLabel whose names are WordNet ids such as
n01443537. The caption uses the first WordNet lemma of the class, from the mapping timm
maintains for all ImageNet synsets.
"""

from __future__ import annotations

import datasets

from .captioned import CaptionedImageDataset, DatasetError, load_table, random_subset
from .phrasing import with_article

HUB_NAME = "zh-plus/tiny-imagenet"
CAPTION_TEMPLATE = "a photo of {}"


def class_captions(wordnet_ids: list[str]) -> list[str]:
    """Captions for WordNet ids: ["n01443537"] -> ["a photo of a goldfish"]."""
    # Imported here: importing timm loads its model zoo, seconds we only pay for Tiny ImageNet.
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-22k")  # lemmas cover every ImageNet synset, whatever the subset
    captions = []
    for wnid in wordnet_ids:
        try:
            lemmas = info.label_name_to_description(wnid)  # "goldfish, Carassius auratus"
        except KeyError:
            raise DatasetError(f"{wnid!r} is not an ImageNet WordNet id; is the label column a Tiny ImageNet "
                               "ClassLabel?") from None
        captions.append(CAPTION_TEMPLATE.format(with_article(lemmas.split(",")[0].strip())))
    return captions


def load_tiny_imagenet(split: str = "train", image_size: int = 64, max_samples: int | None = None,
                       hub_name: str = HUB_NAME, path: str | None = None, seed: int = 0) -> CaptionedImageDataset:
    """Tiny ImageNet image-caption pairs.

    Args:
        split: "train" or "valid" (the Hub copy's names).
        hub_name: the Hub dataset.
        path: a local copy, used instead of the Hub: a folder of parquet files in the Hub's layout.
        max_samples: keep a random subset of this many images (fixed by `seed`); random, not
            the first N, because the rows are sorted by class.
    """
    source = path or hub_name
    table = load_table(source, split, prefetch_name="tiny-imagenet")
    if not isinstance(table.features.get("label"), datasets.ClassLabel):
        raise DatasetError(f"{source} has no ClassLabel column 'label' (its columns: "
                           f"{', '.join(table.column_names)}); is it a Tiny ImageNet copy?")
    captions = class_captions(table.features["label"].names)
    table = random_subset(table, max_samples, seed)
    return CaptionedImageDataset(table, image_size, "image", "label", caption_from=captions.__getitem__,
                                 name=f"Tiny ImageNet ({source}), split {split!r}")
