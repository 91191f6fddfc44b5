"""Checkpoints: safetensors and JSON only, read back exactly, pruned, and never half-written."""

import json
import os
import pickle
import re

import pytest
import torch

import mdm_lite.checkpoint as checkpoint
from mdm_lite.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from mdm_lite.train import train
from tiny_run import state_equal, tiny_config, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _save(output_dir, step, keep=3):
    """A save with a one-tensor model, enough to exercise the directory handling."""
    weights = {"w": torch.full((2,), float(step))}
    optimizer = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    return save_checkpoint(output_dir, step, weights, weights, optimizer, {"model": {}}, {"epoch": 0}, keep=keep)


def _checkpoint_dirs(output_dir):
    """The visible checkpoint directories, oldest first."""
    return sorted((p.name for p in output_dir.iterdir() if re.fullmatch(r"checkpoint_\d+", p.name)),
                  key=lambda name: int(name.split("_")[1]))


def test_a_checkpoint_is_safetensors_and_json_files_only(run):
    path = resolve_checkpoint(run.config.output_dir)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
        "state.json"]
    for file in path.iterdir():
        data = file.read_bytes()
        if file.suffix == ".json":
            json.loads(data)
        else:  # safetensors: an 8-byte little-endian header length, a JSON header, then raw tensor bytes
            header = int.from_bytes(data[:8], "little")
            assert json.loads(data[8:8 + header])


def test_load_checkpoint_reads_back_the_trained_weights_without_unpickling(run, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    ckpt = load_checkpoint(run.config.output_dir)
    assert ckpt.path.name == "checkpoint_000004" and ckpt.state["step"] == 4
    assert state_equal(ckpt.model, run.model.state_dict())
    assert state_equal(ckpt.ema, run.ema.state_dict())
    assert ckpt.config == json.loads(json.dumps(run.config.to_dict()))
    optimizer = torch.optim.AdamW(run.model.parameters())
    optimizer.load_state_dict(ckpt.optimizer_state())  # the optimizer state round-trips through safetensors + JSON
    assert optimizer.state_dict()["state"][0]["step"] == 4
    assert set(ckpt.rng_state()) == {"torch"}


def test_keep_checkpoints_prunes_the_oldest_and_latest_points_at_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert _checkpoint_dirs(tmp_path) == ["checkpoint_000003", "checkpoint_000004"]
    assert resolve_checkpoint(tmp_path).name == "checkpoint_000004"
    assert load_checkpoint(tmp_path).model["w"].tolist() == [4.0, 4.0]


def test_pruning_keeps_the_newest_past_a_million_steps(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        _save(tmp_path, step, keep=2)
    assert _checkpoint_dirs(tmp_path) == ["checkpoint_999999", "checkpoint_1000000"]
    assert load_checkpoint(tmp_path).state["step"] == 1_000_000


def test_latest_is_a_text_file_where_symlinks_are_not_allowed(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symbolic links are not allowed here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    latest = tmp_path / "checkpoint_latest"
    assert latest.is_file() and not latest.is_symlink() and latest.read_text() == "checkpoint_000002\n"
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint_000002"
    assert load_checkpoint(latest).state["step"] == 2


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the save may catch it and carry on."""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_complete_and_resumable(run, tmp_path, monkeypatch):
    write = checkpoint._save_tensors
    written = []

    def killed_in_the_second_save(tensors, path):
        written.append(path.name)
        write(tensors, path)
        if len(written) == 6:  # a save writes model, ema, optimizer, rng: this is the second save's ema
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise Killed

    monkeypatch.setattr(checkpoint, "_save_tensors", killed_in_the_second_save)
    config = tiny_config(tmp_path / "run")
    with pytest.raises(Killed):
        train(config, progress=False)
    assert written[4:] == ["model.safetensors", "ema.safetensors"]
    output_dir = tmp_path / "run"
    assert _checkpoint_dirs(output_dir) == ["checkpoint_000002"]  # no half-written checkpoint_000004
    assert resolve_checkpoint(output_dir).name == "checkpoint_000002"
    ckpt = load_checkpoint(output_dir)
    assert ckpt.state["step"] == 2
    assert len(ckpt.optimizer_state()["state"]) == len(ckpt.model)

    # The killed run logged steps 3 and 4 after its last checkpoint; resuming logs them once, and
    # repeats the uninterrupted run bit for bit.
    monkeypatch.setattr(checkpoint, "_save_tensors", write)
    resumed = train(tiny_config(output_dir), progress=False, resume=True)
    assert state_equal(resumed.model.state_dict(), run.model.state_dict())
    assert state_equal(resumed.ema.state_dict(), run.ema.state_dict())
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_missing_or_incomplete_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    _save(tmp_path, 1)
    (tmp_path / "checkpoint_000001" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing ema.safetensors"):
        load_checkpoint(tmp_path)
