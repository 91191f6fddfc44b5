"""Captioned image datasets read through Hugging Face `datasets`, and their one preprocessing path
(chapter 1 writes `preprocess` inline).

Every real dataset (Flickr30k, Tiny ImageNet, or any table with an image column and a text
column) ends up as a `datasets.Dataset` wrapped in `CaptionedImageDataset`, which decodes,
resizes, crops and scales each image the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import numpy as np
import torch
from PIL import Image

from ..images import from_pil


class DatasetError(ValueError):
    """A dataset that cannot be used as asked. The message is one line and names the fix."""


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size`, center-crop a square, scale to [-1, 1].

    Returns a float tensor (3, image_size, image_size). Grayscale, palette and RGBA images
    are converted to RGB first.
    """
    image = image.convert("RGB")
    width, height = image.size
    scale = image_size / min(width, height)
    # PIL filters over the whole footprint of the output pixel when shrinking: no aliasing.
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return from_pil(image)


def _is_text(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _is_text_list(feature) -> bool:
    return isinstance(feature, (datasets.List, datasets.LargeList)) and _is_text(feature.feature)


class _BadRow(Exception):
    """A row whose image cannot be decoded or that has no caption."""


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a `datasets.Dataset`.

    Item: {"image": (3, image_size, image_size) float in [-1, 1], "caption": str}.

    Args:
        table: the rows; `image_column` holds images (or image file paths), `caption_column`
            holds a caption, a list of captions (one is drawn at random, with torch's generator,
            each time the row is used), or any value that `caption_from` turns into a caption.
        name: how error messages refer to the dataset.

    Rows whose image cannot be decoded, or that have no caption, are skipped with a warning
    and counted in `skipped`: indexing one returns the next good row instead. Only when
    every row is bad does indexing raise. With DataLoader workers each worker keeps its own
    count.
    """

    def __init__(self, table: datasets.Dataset, image_size: int = 64, image_column: str = "image",
                 caption_column: str = "caption", caption_from: Callable[[Any], str] | None = None,
                 name: str = "the dataset"):
        for option, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in table.column_names:
                raise DatasetError(f"{name} has no column {column!r} (its columns: "
                                   f"{', '.join(table.column_names)}); pass {option}=<one of them>")
        image_feature, caption_feature = table.features[image_column], table.features[caption_column]
        if not (isinstance(image_feature, datasets.Image) or _is_text(image_feature)):
            raise DatasetError(f"column {image_column!r} of {name} holds {image_feature}, not images or "
                               "image paths; pass image_column=<the image column>")
        if caption_from is None and not (_is_text(caption_feature) or _is_text_list(caption_feature)):
            raise DatasetError(f"column {caption_column!r} of {name} holds {caption_feature}, not text; "
                               "pass caption_column=<the text column>")
        if len(table) == 0:
            raise DatasetError(f"{name} has no rows; check its path, split and filters")
        # Decode images ourselves, so that one unreadable file is skipped instead of fatal.
        self.table = table.select_columns([image_column, caption_column]).cast_column(
            image_column, datasets.Image(decode=False))
        self.image_size = image_size
        self.image_column, self.caption_column = image_column, caption_column
        self.caption_from = caption_from
        self.name = name
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.table)

    @property
    def skipped(self) -> int:
        """Number of rows found unreadable so far."""
        return len(self._bad)

    def _caption(self, value) -> str:
        if self.caption_from is not None:
            return self.caption_from(value)
        captions = [c for c in ([value] if isinstance(value, str) else value) if c]
        if not captions:
            raise _BadRow("no caption")
        return captions[torch.randint(len(captions), ()).item()]

    def _item(self, index: int) -> dict:
        row = self.table[index]
        image = row[self.image_column]  # {"bytes": ... or None, "path": ... or None}, or None
        if image is None:
            raise _BadRow("no image")
        try:
            if image["bytes"] is not None:
                pil = Image.open(io.BytesIO(image["bytes"]))
            else:
                pil = Image.open(image["path"])
            pil.load()
        # What PIL raises for missing, truncated, corrupt or oversized files.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise _BadRow(f"{image['path'] or 'embedded image'}: {error}") from error
        return {"image": preprocess(pil, self.image_size), "caption": self._caption(row[self.caption_column])}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} of length {len(self)}")
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._bad:
                continue
            try:
                return self._item(candidate)
            except _BadRow as reason:
                self._bad.add(candidate)
                warnings.warn(f"skipped row {candidate} of {self.name} ({reason}); "
                              f"{self.skipped} skipped so far", stacklevel=2)
        raise DatasetError(f"all {len(self)} rows of {self.name} are unreadable; check the image files")


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """Whether `name` looks like a Hugging Face Hub dataset id ("owner/name") rather than a local path."""
    return bool(_HUB_ID.match(name)) and not name.startswith(".") and not os.path.exists(name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the Hub (HF_ENDPOINT), or to the proxy configured for it, opens
    within `timeout` seconds."""
    address = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(address.scheme)
    if proxy and not urllib.request.proxy_bypass(address.hostname):
        address = urllib.parse.urlsplit(proxy)
    try:
        socket.create_connection((address.hostname, address.port or (443 if address.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def in_cache(hub_id: str) -> bool:
    """Whether the `datasets` cache holds a prepared copy of the Hub dataset `hub_id` ("owner/name")."""
    owner, name = hub_id.split("/")
    folder = Path(datasets.config.HF_DATASETS_CACHE) / f"{owner}___{datasets.naming.camelcase_to_snakecase(name)}"
    return any(path.is_dir() for path in folder.glob("*/*/*"))  # config/version/hash, as `datasets` writes it


@contextlib.contextmanager
def _offline():
    """`datasets` and `huggingface_hub` as with HF_HUB_OFFLINE=1: the cache only, no request."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_table(source: str, split: str, prefetch_name: str | None = None) -> datasets.Dataset:
    """`datasets.load_dataset` for a Hub id, a local folder (parquet files, an `imagefolder`
    with a metadata file, CSV, ...) or parquet file(s) (a path or glob ending in .parquet),
    with its failures turned into one-line `DatasetError`s.

    A Hub dataset already in the cache is read from there with no request to the Hub; one that
    is not is downloaded, or, when the Hub cannot be reached, is an error at once (instead of
    after the Hub client's retries).

    prefetch_name: the name `mdm-lite prefetch --dataset` takes for this source, for the hint.
    """
    if source.endswith(".parquet"):
        args, kwargs = ("parquet",), {"data_files": source}
    elif os.path.isdir(source) or is_hub_id(source):
        args, kwargs = (source,), {}
    else:
        raise DatasetError(f"no dataset at {source!r}: pass an existing folder, .parquet file(s), "
                           "or a Hub name like owner/name")
    unreachable = DatasetError(f"{source!r} is not in the local cache and the Hub cannot be reached; run "
                               f"`mdm-lite prefetch --dataset {prefetch_name or source}` with network access, "
                               "or pass a local copy")
    hub = is_hub_id(source) and not datasets.config.HF_HUB_OFFLINE
    cached = hub and in_cache(source)
    if hub and not cached and not hub_reachable():
        raise unreachable
    try:
        with _offline() if cached else contextlib.nullcontext():
            return datasets.load_dataset(*args, split=split, **kwargs)
    except ConnectionError as error:
        raise unreachable from error
    except FileNotFoundError as error:  # includes datasets' DatasetNotFoundError
        raise DatasetError(f"no dataset {source!r} on the Hub or on disk ({error}); check the name") from error
    except ValueError as error:  # datasets says "unknown split" and "no rows" only in its messages
        if str(error).startswith("Unknown split"):
            raise DatasetError(f"{source!r}: {error} Pass split=<one of them>") from error
        if "corresponds to no data" in str(error):
            raise DatasetError(f"{source!r} has no rows in split {split!r}; check its files and split") from error
        raise


def random_subset(table: datasets.Dataset, max_samples: int | None, seed: int = 0) -> datasets.Dataset:
    """`max_samples` rows drawn at random (fixed by `seed`), in their stored order; all rows if None.

    Random rather than the first N, because many tables are sorted by class.
    """
    if max_samples is None or max_samples >= len(table):
        return table
    if max_samples < 1:
        raise DatasetError(f"max_samples must be at least 1, got {max_samples}")
    rows = np.random.default_rng(seed).choice(len(table), size=max_samples, replace=False)
    return table.select(np.sort(rows))


def load_captioned(source: str, split: str = "train", image_size: int = 64, max_samples: int | None = None,
                   image_column: str = "image", caption_column: str = "caption",
                   seed: int = 0) -> CaptionedImageDataset:
    """Any dataset with an image column and a text column.

    Args:
        source: a Hub name ("owner/name"), a local folder (an `imagefolder` whose metadata.jsonl
            or metadata.csv holds the captions, or parquet files), or .parquet file(s)/glob.
            Local parquet files and folders without split names form the split "train".
        caption_column: a column of strings, or of lists of strings (one drawn per use).
        max_samples: keep a random subset of this many rows (fixed by `seed`).
    """
    table = random_subset(load_table(source, split), max_samples, seed)
    return CaptionedImageDataset(table, image_size, image_column, caption_column, name=repr(source))
