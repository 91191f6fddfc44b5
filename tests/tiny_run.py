"""A tiny training run shared by test_train, test_checkpoint and test_cli: trained once per session.

TINY is a 2-level NestedUNet (16, 8) of 0.36M parameters on 12 Shapes images, batch 4: 3 steps an
epoch, so a 4-step run crosses an epoch and a resume at step 2 starts mid-epoch. Dropout 0.1 and
the default caption dropout make every step draw random numbers, as a real run does.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from mdm_lite.train import TrainConfig, TrainResult, train

INNER = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4], "dropout": 0.1}
TINY = {
    "model": {"image_size": 16, "num_levels": 2, "shell_channels": 8, "inner": INNER},
    "dataset_options": {"length": 12}, "batch_size": 4, "max_steps": 4, "save_freq": 2, "log_freq": 1,
    "num_sample_steps": 2, "warmup_steps": 2, "lr": 1e-3, "sample_prompts": ["a red circle"], "device": "cpu",
}

_RUNS: dict[str, TrainResult] = {}


def tiny_config(output_dir, **changes) -> TrainConfig:
    """TINY writing to output_dir, with `changes` applied on top (e.g. max_steps=2)."""
    return TrainConfig.from_dict({**copy.deepcopy(TINY), "output_dir": str(output_dir), **changes})


def write_tiny_json(path: Path) -> Path:
    """TINY as a --config file for the command line (no output_dir: pass --output_dir)."""
    path.write_text(json.dumps(TINY))
    return path


def trained_run(tmp_path_factory) -> TrainResult:
    """TINY trained for 4 steps (checkpoints at 2 and 4), once per test session. Read-only: copy it
    before changing anything in its output_dir."""
    if "tiny" not in _RUNS:
        torch.set_num_threads(1)
        _RUNS["tiny"] = train(tiny_config(tmp_path_factory.mktemp("tiny") / "run"), progress=False)
    return _RUNS["tiny"]


def state_equal(a: dict, b: dict) -> bool:
    """Bitwise equality of two state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes) and every link (-> its target)."""
    return {str(p.relative_to(folder)): (str(p.readlink()).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}
