"""Flickr30k: 31,783 photos, five human captions each, from the Hub or from a local download
(chapters 1 and 8).

Sources, all read into the same table (image, caption: list of 5 str):

- The Hub (default ``lmms-lab/flickr30k``), a parquet copy with columns image, caption,
  sentids, split, img_id, filename. All rows sit in one Hub split named "test"; the `split`
  column holds the usual Karpathy split (train 29,000 / val 1,014 / test 1,000), which is what
  our `split` selects. Not ``nlphuji/flickr30k``, the copy the original project used: it is
  built by a loading script, and `datasets` >= 4 no longer runs loading scripts.
- A local folder in one of the layouts people download themselves:
  the widely shared zip, ``Images/`` + ``captions.txt`` (CSV ``image,caption``, one row per
  caption); or the Kaggle copy, ``flickr30k_images/`` + ``results.csv`` (``|``-separated,
  header ``image_name| comment_number| comment``, and one broken row, which is skipped).
  These layouts carry no split: "train" and "all" both give every image.
- A local folder of parquet files in the Hub's layout.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import datasets

from .captioned import CaptionedImageDataset, DatasetError, load_table, random_subset

HUB_NAME = "lmms-lab/flickr30k"
HUB_SPLIT = "test"  # the only split of lmms-lab/flickr30k; it holds every image
SPLITS = ("train", "val", "test", "all")
_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "caption": datasets.List(datasets.Value("string")),
    "filename": datasets.Value("string"),
})


def _read_zip_captions(path: Path) -> tuple[dict[str, list[str]], int]:
    """captions.txt (``image,caption``) -> ({filename: captions}, number of rows skipped)."""
    captions: dict[str, list[str]] = {}
    skipped = 0
    with open(path, newline="", encoding="utf-8") as file:
        rows = csv.reader(file)
        header = [h.strip() for h in next(rows, [])]
        if header != ["image", "caption"]:
            raise DatasetError(f"{path} starts with {header}, not the header image,caption; "
                               "is this the Flickr30k captions.txt?")
        for row in rows:
            # An unquoted comma inside a caption splits it into more fields: glue them back.
            filename, caption = (row[0].strip(), ",".join(row[1:]).strip()) if row else ("", "")
            if filename and caption:
                captions.setdefault(filename, []).append(caption)
            else:
                skipped += 1
    return captions, skipped


def _read_kaggle_results(path: Path) -> tuple[dict[str, list[str]], int]:
    """results.csv (``image_name| comment_number| comment``) -> ({filename: captions}, rows skipped)."""
    captions: dict[str, list[str]] = {}
    skipped = 0
    with open(path, newline="", encoding="utf-8") as file:
        # Quotes inside captions are text, not CSV quoting.
        rows = csv.reader(file, delimiter="|", quoting=csv.QUOTE_NONE)
        header = [h.strip() for h in next(rows, [])]
        if header != ["image_name", "comment_number", "comment"]:
            raise DatasetError(f"{path} starts with {header}, not the header image_name| comment_number| "
                               "comment; is this the Kaggle Flickr30k results.csv?")
        for row in rows:
            fields = [f.strip() for f in row]
            if len(fields) == 3 and fields[0] and fields[2]:
                captions.setdefault(fields[0], []).append(fields[2])
            else:  # e.g. the known row whose comment_number and comment run together
                skipped += 1
    return captions, skipped


_LAYOUTS = (  # (captions file, image folder, reader) of each downloadable layout
    ("captions.txt", "Images", _read_zip_captions),
    ("results.csv", "flickr30k_images", _read_kaggle_results),
)


def is_local_layout(path: str | Path) -> bool:
    """Whether `path` is a download in the zip or Kaggle layout."""
    return any((Path(path) / captions).is_file() for captions, _, _ in _LAYOUTS)


def read_local_layout(path: str | Path) -> datasets.Dataset:
    """A downloaded Flickr30k folder (zip or Kaggle layout) as a table with columns
    image (file paths, read lazily), caption (list of str) and filename.
    """
    captions_name, images_name, read = next(layout for layout in _LAYOUTS if (Path(path) / layout[0]).is_file())
    captions_file, images = Path(path) / captions_name, Path(path) / images_name
    if not images.is_dir():
        raise DatasetError(f"{captions_file} found but no image folder {images}; unpack the images there")
    captions, skipped = read(captions_file)
    if skipped:
        warnings.warn(f"skipped {skipped} malformed row(s) of {captions_file}", stacklevel=2)
    filenames = sorted(captions)
    return datasets.Dataset.from_dict(
        {"image": [str(images / f) for f in filenames], "caption": [captions[f] for f in filenames],
         "filename": filenames},
        features=_FEATURES)


def load_flickr30k(split: str = "train", image_size: int = 64, max_samples: int | None = None,
                   hub_name: str = HUB_NAME, path: str | None = None, seed: int = 0) -> CaptionedImageDataset:
    """Flickr30k image-caption pairs; each use of an image draws one of its five captions.

    Args:
        split: "train", "val", "test" (Karpathy split) or "all".
        hub_name: the Hub dataset, in the lmms-lab layout.
        path: a local copy, used instead of the Hub: a download in the zip or Kaggle layout, or
            a folder of parquet files in the Hub's layout.
        max_samples: keep a random subset of this many images (fixed by `seed`).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown Flickr30k split {split!r}: use one of {', '.join(SPLITS)}")
    if path is not None and is_local_layout(path):
        if split not in ("train", "all"):
            raise DatasetError(f"the Flickr30k download at {path} has no splits; use split='train' (every image)")
        table, name = read_local_layout(path), f"Flickr30k at {path}"
    else:
        source = path or hub_name
        table, name = load_table(source, HUB_SPLIT, prefetch_name="flickr30k"), f"Flickr30k ({source})"
        if "split" in table.column_names and split != "all":
            # Read the small split column straight from Arrow: no image is decoded.
            rows = [i for i, s in enumerate(table.data.column("split").to_pylist()) if s == split]
            table = table.select(rows)
        elif split not in ("train", "all"):
            raise DatasetError(f"{source} has no 'split' column to select {split!r} from; "
                               "use split='train' (every image)")
    table = random_subset(table, max_samples, seed)
    return CaptionedImageDataset(table, image_size, "image", "caption", name=f"{name}, split {split!r}")
