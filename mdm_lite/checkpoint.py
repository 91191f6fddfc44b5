"""Checkpoints: one directory per save, safetensors for tensors and JSON for the rest (chapter 6
loads them; every training run writes them).

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
checkpoint complete and `checkpoint_latest` pointing at a complete one; a save that fails (a full
disk) removes its temporary directory and raises the OSError. One training run at a time writes
an output_dir: it holds `output_dir/.lock` (`lock_run`), which the system releases when the
process ends, however it ends.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config_check import ConfigError

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

    def optimizer_state(self, shapes: list[torch.Size] | None = None) -> dict:
        """The optimizer's state_dict, rebuilt from optimizer.safetensors and state.json.
        shapes: of the parameters it is for, in order; a moment of another shape is a CheckpointError."""
        path = self.path / "optimizer.safetensors"
        tensors = _load_tensors(path)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            if not index.isdigit() or not name or shapes is not None and (
                    int(index) >= len(shapes) or name.startswith("exp_avg") and value.shape != shapes[int(index)]):
                raise CheckpointError(f"{path} holds {key!r} {tuple(value.shape)}, which fits no parameter of the "
                                      f"model; {_instead(self.path)}")
            state.setdefault(int(index), {})[name] = value
        if "optimizer_param_groups" not in self.state:
            raise CheckpointError(f"{self.path / 'state.json'} has no optimizer_param_groups; {_instead(self.path)}")
        return {"state": state, "param_groups": self.state["optimizer_param_groups"]}

    def position(self) -> tuple[int, int, int]:
        """(step, epoch, batch_in_epoch): where the run stood at this save, for a resume."""
        values = [self.state.get(key) for key in ("step", "epoch", "batch_in_epoch")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise CheckpointError(f"{self.path / 'state.json'} does not say where the run stood (step, epoch, "
                                  f"batch_in_epoch: {values}); {_instead(self.path)}")
        return tuple(values)

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
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    except SafetensorError as error:  # an I/O error, "... (os error 28)": raise it as the OSError it is
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from error
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _step(path: Path) -> int | None:
    """The step of a checkpoint_NNNNNN directory; None for any other name."""
    digits = path.name[len("checkpoint_"):]
    return int(digits) if path.name.startswith("checkpoint_") and digits.isdigit() else None


def _saved(output_dir: Path) -> list[Path]:
    """The checkpoint_NNNNNN directories in output_dir, oldest first by step number, not by name:
    "checkpoint_1000000" < "checkpoint_999999" as text."""
    return sorted((p for p in output_dir.glob("checkpoint_[0-9]*") if _step(p) is not None), key=_step)


def _instead(checkpoint: Path) -> str:
    """What to use instead of a broken checkpoint directory: the newest complete one before it."""
    step = _step(checkpoint)
    earlier = [p for p in _saved(checkpoint.parent)
               if step is not None and _step(p) < step and all((p / f).exists() for f in FILES)]
    if not earlier:
        return "pass another checkpoint_NNNNNN directory, or start a new run"
    return (f"use the one before it, {earlier[-1]} (to --resume from it: ln -sfn {earlier[-1].name} "
            f"{checkpoint.parent / LATEST})")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or incomplete ({error}); {_instead(path.parent)}") from error


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """model.load_state_dict(tensors), with a CheckpointError naming `path` (the checkpoint they
    come from) if they do not fit the model or hold a NaN or an infinity."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        reason = str(error).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not fit the model in its config.json ({reason[:200]}); the "
                              f"checkpoint was edited or mixed with another run's files: {_instead(path)}") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]}{' and more' if len(bad) > 1 else ''}): "
                              f"the run had diverged when it saved them; {_instead(path)}")


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
    try:
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
    except OSError:  # a full disk or a folder gone read-only: give the space back, keep the previous checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a save at the same step (a rerun): move the old one aside, never half-delete it
        stale = output_dir / f".stale_{final.name}_{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)
    _point_latest(output_dir, final.name)
    _fsync_dir(output_dir)
    saved = _saved(output_dir)
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
        raise CheckpointError(f"{path} has a corrupt config.json or state.json ({error}); {_instead(path)}") from error
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: config.json and state.json must each hold a JSON object; {_instead(path)}")
    _upgrade(config)
    model = path / "model.safetensors"
    return Checkpoint(path, config, state, _load_tensors(model) if model.exists() else None,
                      _load_tensors(path / "ema.safetensors"))


def _upgrade(config: dict) -> None:
    """Fill in, in place, what a config.json written by an older mdm-lite leaves out, as that
    version behaved: UNets downsampled with a stride-2 conv before `UNetConfig.downsample` existed."""
    inner = config.get("model", {}).get("inner") if isinstance(config.get("model"), dict) else None
    if isinstance(inner, dict):
        inner.setdefault("downsample", "stride")


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


def check_writable(folder: str | Path, option: str = "--output_dir") -> None:
    """Raise ConfigError, naming `option`, unless files can be created in `folder`, or in its
    nearest existing parent if it does not exist yet. Creates nothing that stays."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option} {folder}: {existing} is a file; pass a directory path")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write_test_"):
            pass
    except OSError as error:
        raise ConfigError(f"{option} {folder} is not writable ({error.strerror}): choose a folder you can write "
                          "to, or fix its permissions") from None


LOCK = ".lock"
_held: dict[Path, object] = {}  # output_dir -> its open lock file, for the runs of this process


def _holder(lock: Path) -> str:
    """Who holds a lock file, as it says: "pid N: command"."""
    try:
        return lock.read_text().strip() or "a process that wrote nothing"
    except OSError:
        return "an unknown process"


def _try_flock(file) -> bool:
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _in_use(output_dir: Path) -> ConfigError:
    return ConfigError(f"{output_dir} is in use by another training run ({_holder(output_dir / LOCK)}); wait for it "
                       "to end or stop it, or choose another --output_dir")


def check_unlocked(output_dir: str | Path) -> None:
    """Raise ConfigError, naming the process, if another process holds output_dir's lock.
    Creates nothing: a run that fails before it writes leaves no trace."""
    output_dir = Path(output_dir).absolute()
    lock = output_dir / LOCK
    if os.name != "posix" or output_dir in _held or not lock.exists():
        return
    with open(lock) as file:
        if not _try_flock(file):  # closing the file releases the probe's lock
            raise _in_use(output_dir)


def lock_run(output_dir: str | Path) -> None:
    """Make this process the one training run that writes output_dir (created if needed), until
    `unlock_run` or the end of the process; ConfigError naming the holder if another live process
    holds it. A lock left by a process that has ended does not count: the system released it.
    POSIX only (flock); elsewhere nothing is locked."""
    output_dir = Path(output_dir).absolute()
    if os.name != "posix" or output_dir in _held:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    file = open(output_dir / LOCK, "a+")
    if not _try_flock(file):
        file.close()
        raise _in_use(output_dir)
    file.truncate(0)
    file.write(f"pid {os.getpid()}: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")
    file.flush()
    _held[output_dir] = file


def unlock_run(output_dir: str | Path) -> None:
    """Release the lock `lock_run` took on output_dir, if this process holds it."""
    file = _held.pop(Path(output_dir).absolute(), None)
    if file is not None:
        file.close()
