"""Checkpoints: one directory per save, safetensors for tensors and JSON for the rest.

::

    output_dir/
      checkpoint_000400/
        model.safetensors      the trained weights
        ema.safetensors        their exponential moving average (what sampling uses)
        optimizer.safetensors  AdamW moments, one tensor per parameter and key
        config.json            the TrainConfig, enough to rebuild the model
        state.json             step, epoch, batch position, optimizer hyper-parameters, metrics
        rng.safetensors        torch RNG states (for dropout), so a resumed run repeats itself
      checkpoint_latest -> checkpoint_000400

Nothing here unpickles: loading a checkpoint from someone else cannot run their code.
A save writes a hidden temporary directory and renames it into place, then swaps the
`checkpoint_latest` link the same way, so a process killed at any moment leaves the previous
checkpoint complete and `checkpoint_latest` pointing at a complete one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LATEST = "checkpoint_latest"
# Checkpoints shipped inside the package, by name: `MDMPipeline.from_pretrained("shapes")`.
PRETRAINED = {"shapes": Path(__file__).parent / "assets" / "shapes_cpu"}
FILES = ("ema.safetensors", "config.json", "state.json")  # model.safetensors is optional: see `export`


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model asked for."""


@dataclass
class Checkpoint:
    path: Path
    config: dict
    state: dict
    model: dict[str, torch.Tensor] | None  # None in an exported checkpoint
    ema: dict[str, torch.Tensor]

    def optimizer_state(self) -> dict:
        """The optimizer's state_dict, rebuilt from optimizer.safetensors and state.json."""
        tensors = _load_tensors(self.path / "optimizer.safetensors")
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        return {"state": state, "param_groups": self.state["optimizer_param_groups"]}

    def rng_state(self) -> dict[str, torch.Tensor]:
        path = self.path / "rng.safetensors"
        return _load_tensors(path) if path.exists() else {}


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or incomplete ({error}); resume from an earlier "
                              "checkpoint_NNNNNN directory in the same output_dir") from error


def save_checkpoint(output_dir: str | Path, step: int, model: dict, ema: dict, optimizer: dict, config: dict,
                    state: dict, rng: dict[str, torch.Tensor] | None = None, keep: int = 3) -> Path:
    """Write checkpoint_{step:06d} atomically and point checkpoint_latest at it.

    model, ema: state dicts; optimizer: an optimizer state_dict (tensors go to safetensors, its
    param_groups to state.json); config: the JSON-ready TrainConfig; state: JSON-ready counters.
    keep: how many checkpoint directories to keep (the oldest go once the new one is in place).
    Returns the directory written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint_{step:06d}"
    tmp = output_dir / f".tmp_checkpoint_{step:06d}_{os.getpid()}"
    for leftover in output_dir.glob(".tmp_checkpoint_*"):  # from saves that were killed; one writer per run
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(model, tmp / "model.safetensors")
    _save_tensors(ema, tmp / "ema.safetensors")
    _save_tensors({f"{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()},
                  tmp / "optimizer.safetensors")
    if rng:
        _save_tensors(rng, tmp / "rng.safetensors")
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "state.json", {**state, "step": step, "optimizer_param_groups": optimizer["param_groups"]})
    _fsync_dir(tmp)
    if final.exists():  # a save at the same step (a rerun): move the old one aside, never half-delete it
        stale = output_dir / f".stale_{final.name}_{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)
    _point_latest(output_dir, final.name)
    _fsync_dir(output_dir)
    # Oldest first by step number, not by name: "checkpoint_1000000" < "checkpoint_999999" as text.
    saved = sorted((p for p in output_dir.glob("checkpoint_[0-9]*") if p.name[len("checkpoint_"):].isdigit()),
                   key=lambda p: int(p.name[len("checkpoint_"):]))
    for old in saved[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _point_latest(output_dir: Path, name: str) -> None:
    """Atomically make output_dir/checkpoint_latest name `name`: a symlink, or a one-line text
    file where symlinks are not allowed (Windows without developer mode)."""
    link = output_dir / LATEST
    tmp = output_dir / f".tmp_{LATEST}_{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(name, tmp, target_is_directory=True)
    except OSError:
        tmp.write_text(name + "\n")
    if link.is_dir() and not link.is_symlink():
        raise CheckpointError(f"{link} is a directory, not a pointer; move it away and save again")
    os.replace(tmp, link)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` means: a checkpoint directory itself, an output_dir
    (its latest checkpoint), a checkpoint_latest pointer, or the name of a shipped checkpoint
    (see PRETRAINED; the name wins over a local folder of the same name: write ./shapes for that)."""
    if isinstance(path, str) and path in PRETRAINED:
        path = PRETRAINED[path]
    path = Path(path)
    if path.is_dir() and (path / LATEST).exists() or (path / LATEST).is_symlink():
        path = path / LATEST
    if path.is_file() and path.name == LATEST:  # the text-file form of the pointer
        path = path.parent / path.read_text().strip()
    if path.is_symlink():
        path = path.resolve()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: pass a checkpoint directory or an output_dir "
                              "with a checkpoint_latest (train one with `mdm-lite train`)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory; pass the directory that holds "
                              "model.safetensors and config.json")
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {', '.join(missing)}); pass "
                              "another checkpoint_NNNNNN directory")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory (see `resolve_checkpoint` for what `path` may be)."""
    path = resolve_checkpoint(path)
    try:
        config = json.loads((path / "config.json").read_text())
        state = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} has a corrupt config.json or state.json ({error}); pass another "
                              "checkpoint_NNNNNN directory") from error
    model = path / "model.safetensors"
    return Checkpoint(path, config, state, _load_tensors(model) if model.exists() else None,
                      _load_tensors(path / "ema.safetensors"))


def export(checkpoint: str | Path, destination: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """A small checkpoint for sampling only: the EMA weights cast to `dtype`, config.json and
    state.json; no raw weights, optimizer or RNG state, so it cannot be resumed. The shipped
    Shapes checkpoint is one (half the size of the fp32 EMA, a quarter of a full checkpoint)."""
    ckpt = load_checkpoint(checkpoint)
    destination = Path(destination)
    tmp = destination.with_name(f".tmp_{destination.name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.ema.items()},
                  tmp / "ema.safetensors")
    _write_json(tmp / "config.json", ckpt.config)
    _write_json(tmp / "state.json", {k: v for k, v in ckpt.state.items() if k != "optimizer_param_groups"})
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(tmp, destination)
    return destination
