"""Real and user datasets, each read from a small local copy in exactly its published layout.

The Hub copies are written as parquet with the Hub's columns and features and loaded
through the same `datasets.load_dataset` call as the Hub name; nothing is downloaded.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mdm_lite.data import DatasetError, ShapesDataset, collate, load_dataset, prefetch, preprocess
from mdm_lite.cli import main as mdm_lite_main

FLICKR_FEATURES = datasets.Features({  # lmms-lab/flickr30k
    "image": datasets.Image(),
    "caption": datasets.List(datasets.Value("string")),
    "sentids": datasets.List(datasets.Value("string")),
    "split": datasets.Value("string"),
    "img_id": datasets.Value("string"),
    "filename": datasets.Value("string"),
})
TINY_WNIDS = ["n01443537", "n01629819", "n02124075", "n07873807"]  # real Tiny ImageNet classes


def _photo(seed: int, size=(48, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _captions(index: int) -> list[str]:
    return [f"photo {index} caption {k}" for k in range(5)]


@pytest.fixture
def flickr_hub(tmp_path):
    """lmms-lab/flickr30k's layout: data/test-*.parquet, one Hub split holding every image."""
    splits = ["train", "train", "train", "train", "val", "test"]
    table = datasets.Dataset.from_dict({
        "image": [_photo(i) for i in range(6)],
        "caption": [_captions(i) for i in range(6)],
        "sentids": [[str(5 * i + k) for k in range(5)] for i in range(6)],
        "split": splits,
        "img_id": [str(i) for i in range(6)],
        "filename": [f"{1000 + i}.jpg" for i in range(6)],
    }, features=FLICKR_FEATURES)
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    return tmp_path


def _write_images(folder, count: int) -> list[str]:
    folder.mkdir()
    names = [f"{1000 + i}.jpg" for i in range(count)]
    for i, name in enumerate(names):
        _photo(i).save(folder / name)
    return names


@pytest.fixture
def flickr_kaggle(tmp_path):
    """The Kaggle copy: flickr30k_images/ + results.csv ('|'-separated, spaces after '|')."""
    names = _write_images(tmp_path / "flickr30k_images", 3)
    lines = ["image_name| comment_number| comment"]
    for i, name in enumerate(names):
        lines += [f"{name}| {k}| {caption}" for k, caption in enumerate(_captions(i))]
    lines[-1] = f"{names[-1]}| 4 A dog runs across the grass ."  # the known broken row
    lines[1] = f'{names[0]}| 0| A man says "hello" .'  # quotes are text, not CSV quoting
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def flickr_zip(tmp_path):
    """The widely shared zip: Images/ + captions.txt (CSV image,caption)."""
    names = _write_images(tmp_path / "Images", 2)
    lines = ["image,caption"]
    for i, name in enumerate(names):
        lines += [f"{name},{caption}" for caption in _captions(i)]
    lines[1] = f'{names[0]},"A dog , brown , runs ."'
    lines[2] = f"{names[0]},A cat , black , sits ."  # unquoted commas, as in some copies
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def tiny_imagenet(tmp_path):
    """zh-plus/tiny-imagenet's layout: data/{train,valid}-*.parquet, label a ClassLabel of WordNet ids."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TINY_WNIDS)})
    (tmp_path / "data").mkdir()
    for split, count in (("train", 8), ("valid", 4)):
        table = datasets.Dataset.from_dict(
            {"image": [_photo(i, (64, 64)) for i in range(count)], "label": [i % 4 for i in range(count)]},
            features=features)
        table.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001-0123456789abcdef.parquet"))
    return tmp_path


@pytest.fixture
def imagefolder(tmp_path):
    """An `imagefolder` with its captions in metadata.jsonl."""
    folder = tmp_path / "mine"
    names = _write_images(folder, 3)
    rows = [{"file_name": name, "text": f"my picture number {i}"} for i, name in enumerate(names)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _check_items(dataset, image_size: int):
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, image_size, image_size)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert isinstance(item["caption"], str) and item["caption"]


def test_flickr30k_from_the_hub_layout_selects_the_karpathy_split(flickr_hub):
    train = load_dataset("flickr30k", image_size=32, path=str(flickr_hub))
    assert len(train) == 4
    _check_items(train, 32)
    assert len(load_dataset("flickr30k", split="val", path=str(flickr_hub))) == 1
    assert len(load_dataset("flickr30k", split="all", path=str(flickr_hub))) == 6


def test_flickr30k_draws_one_of_the_five_captions_each_time_an_image_is_used(flickr_hub):
    data = load_dataset("flickr30k", split="test", path=str(flickr_hub))  # one image: photo 5
    torch.manual_seed(0)
    drawn = {data[0]["caption"] for _ in range(40)}
    assert drawn == set(_captions(5))


def test_flickr30k_kaggle_layout_skips_its_broken_row_with_a_warning(flickr_kaggle):
    with pytest.warns(UserWarning, match="skipped 1 malformed row"):
        data = load_dataset("flickr30k", path=str(flickr_kaggle))
    assert len(data) == 3
    _check_items(data, 64)
    captions = data.table["caption"]
    assert [len(c) for c in captions] == [5, 5, 4]
    assert captions[0][0] == 'A man says "hello" .'


def test_flickr30k_zip_layout_keeps_commas_inside_captions(flickr_zip):
    data = load_dataset("flickr30k", path=str(flickr_zip), image_size=16)
    assert len(data) == 2
    _check_items(data, 16)
    assert data.table["caption"][0][:2] == ["A dog , brown , runs .", "A cat , black , sits ."]


def test_flickr30k_download_has_no_val_split(flickr_zip):
    with pytest.raises(DatasetError, match="has no splits"):
        load_dataset("flickr30k", split="val", path=str(flickr_zip))


def test_tiny_imagenet_captions_come_from_wordnet_class_names(tiny_imagenet):
    data = load_dataset("tiny-imagenet", path=str(tiny_imagenet))
    assert len(data) == 8
    _check_items(data, 64)
    assert [data[i]["caption"] for i in range(4)] == [
        "a photo of a goldfish", "a photo of a European fire salamander", "a photo of an Egyptian cat",
        "a photo of a pizza"]
    assert len(load_dataset("tiny-imagenet", split="valid", path=str(tiny_imagenet))) == 4


def test_an_imagefolder_with_captions_in_its_metadata_file(imagefolder):
    data = load_dataset(str(imagefolder), caption_column="text", image_size=24)
    assert sorted(data[i]["caption"] for i in range(len(data))) == [f"my picture number {i}" for i in range(3)]
    _check_items(data, 24)


def test_a_parquet_file_with_its_own_column_names(tmp_path):
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict({"picture": [_photo(i) for i in range(3)], "description": ["x", "y", "z"]},
                               features=datasets.Features({"picture": datasets.Image(),
                                                           "description": datasets.Value("string")})
                               ).to_parquet(str(path))
    data = load_dataset(str(path), image_column="picture", caption_column="description")
    assert [data[i]["caption"] for i in range(3)] == ["x", "y", "z"]


def test_max_samples_keeps_a_fixed_random_subset(tiny_imagenet):
    a = load_dataset("tiny-imagenet", max_samples=3, path=str(tiny_imagenet))
    b = load_dataset("tiny-imagenet", max_samples=3, path=str(tiny_imagenet))
    assert len(a) == 3
    assert [a[i]["caption"] for i in range(3)] == [b[i]["caption"] for i in range(3)]
    assert len(load_dataset("shapes", max_samples=5)) == 5


def test_preprocessing_resizes_the_shorter_side_and_crops_the_centre():
    stripes = np.zeros((40, 80, 3), dtype=np.uint8)  # red | green (the middle half) | blue
    stripes[:, :20] = (255, 0, 0)
    stripes[:, 20:60] = (0, 255, 0)
    stripes[:, 60:] = (0, 0, 255)
    image = preprocess(Image.fromarray(stripes), 16)
    assert image.shape == (3, 16, 16)
    inner = image[:, :, 1:15]  # the crop's outer columns touch the stripes' edges
    torch.testing.assert_close(inner, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand_as(inner),
                               atol=0.05, rtol=0)


def test_an_unreadable_image_is_skipped_counted_and_warned(flickr_kaggle):
    (flickr_kaggle / "flickr30k_images" / "1001.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="malformed row"):
        data = load_dataset("flickr30k", path=str(flickr_kaggle))
    with pytest.warns(UserWarning, match="skipped row 1"):
        items = [data[i] for i in range(len(data))]
    assert data.skipped == 1
    assert all(item["image"].shape == (3, 64, 64) for item in items)


def test_all_images_unreadable_is_an_error(flickr_zip):
    for path in (flickr_zip / "Images").iterdir():
        path.unlink()
    data = load_dataset("flickr30k", path=str(flickr_zip))
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="all 2 rows .* unreadable"):
        data[0]


def test_an_unknown_dataset_name_is_a_one_line_error_listing_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'flicker30k': use shapes, flickr30k, tiny-imagenet") as e:
        load_dataset("flicker30k")
    assert "\n" not in str(e.value)


def test_an_unknown_split_is_an_error_listing_the_splits_that_exist(tiny_imagenet):
    with pytest.raises(DatasetError, match=r"Unknown split \"test\". Should be one of \['train', 'valid'\]"):
        load_dataset("tiny-imagenet", split="test", path=str(tiny_imagenet))


def test_a_missing_column_is_an_error_naming_the_columns_that_exist(imagefolder):
    with pytest.raises(DatasetError, match=r"no column 'caption' \(its columns: image, text\); pass caption_column"):
        load_dataset(str(imagefolder))


def test_an_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"image": [], "caption": []}, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")})).to_parquet(str(path))
    with pytest.raises(DatasetError, match="has no rows"):
        load_dataset(str(path))


def test_a_hub_dataset_missing_from_the_cache_offline_names_the_prefetch_command():
    with pytest.raises(DatasetError, match="mdm-lite prefetch --dataset flickr30k") as e:
        load_dataset("flickr30k")  # lmms-lab/flickr30k, never downloaded here
    assert "\n" not in str(e.value)


def _unreachable_hub(tmp_path) -> dict:
    """The environment of a process that is not told to work offline and whose Hub is a closed
    port of this machine: it can reach no Hub, here or anywhere."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"),
            "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _prefetch_flickr30k(env: dict, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "mdm-lite"), "prefetch", "--dataset", "flickr30k",
                           *options], env=env, capture_output=True, text=True, timeout=120)


def test_a_hub_dataset_not_in_the_cache_with_the_hub_unreachable_fails_at_once_in_one_line(tmp_path):
    done = _prefetch_flickr30k(_unreachable_hub(tmp_path))
    assert done.returncode == 2
    # One line: the Hub client's retries (30 s of them, each logged) never started.
    assert done.stderr.splitlines() == [
        "mdm-lite: error: 'lmms-lab/flickr30k' is not in the local cache and the Hub cannot be reached; run "
        "`mdm-lite prefetch --dataset flickr30k` with network access, or pass a local copy"]


def test_a_hub_dataset_in_the_cache_loads_from_it_with_the_hub_unreachable(flickr_hub, tmp_path):
    env = _unreachable_hub(tmp_path)
    # A prepared copy where `datasets` keeps one of lmms-lab/flickr30k: owner___name/config/version/hash.
    table = datasets.load_dataset("parquet", data_files={"test": str(flickr_hub / "data" / "*.parquet")},
                                  split="test", cache_dir=str(tmp_path / "build"))
    prepared = Path(table.cache_files[0]["filename"]).parent
    copy = Path(env["HF_DATASETS_CACHE"]) / "lmms-lab___flickr30k" / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, copy)
    (copy / "parquet-test.arrow").rename(copy / "flickr30k-test.arrow")
    info = json.loads((copy / "dataset_info.json").read_text())
    (copy / "dataset_info.json").write_text(json.dumps({**info, "dataset_name": "flickr30k", "config_name": "default"}))
    done = _prefetch_flickr30k(env, "--split", "all")
    assert done.returncode == 0, done.stderr
    assert "flickr30k (all): 6 samples ready in the cache" in done.stdout
    assert "Retry" not in done.stderr, "the Hub was asked first"


def test_collate_stacks_images_and_lists_captions_and_attributes():
    loader = torch.utils.data.DataLoader(ShapesDataset(length=6, image_size=16), batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    assert len(batch["attributes"]) == 4


def test_prefetch_loads_the_dataset_once_and_reports_its_size(tiny_imagenet, capsys):
    assert prefetch("tiny-imagenet", path=str(tiny_imagenet)) == 8
    assert mdm_lite_main(["prefetch", "--dataset", "shapes"]) == 0
    assert "shapes (train): 10000 samples" in capsys.readouterr().out
