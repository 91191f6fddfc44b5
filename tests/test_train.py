"""Training: exact resume, divergence stops cleanly, progressive growth, torchrun, the Python API."""

import copy
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdm_lite import MDMPipeline
from mdm_lite.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from mdm_lite.config_check import ConfigError
from mdm_lite.train import TrainingDiverged, grow_from, train
from tiny_run import INNER, snapshot, state_equal, tiny_config, trained_run, write_tiny_json

train_module = importlib.import_module("mdm_lite.train")  # `import mdm_lite.train` gives the function


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_dirs(output_dir) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint_[0-9]*"))


def test_resuming_n_steps_for_n_more_gives_bitwise_the_weights_of_2n_steps(run, tmp_path):
    # The resume starts mid-epoch (3 steps an epoch), crosses into the next one, and every step
    # draws dropout, caption dropout, times and noise: all of it must repeat exactly.
    output_dir = tmp_path / "run"
    train(tiny_config(output_dir, max_steps=2), progress=False)
    resumed = train(tiny_config(output_dir, max_steps=4), progress=False, resume=True)
    assert state_equal(resumed.model.state_dict(), run.model.state_dict())
    assert state_equal(resumed.ema.state_dict(), run.ema.state_dict())
    records = _metrics(output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # each step logged once
    assert [r["loss"] for r in records] == [r["loss"] for r in run.history]


def test_the_lr_warms_up_stays_then_cools_down_to_zero_at_max_steps_and_resumes_exactly(tmp_path):
    config = tiny_config(tmp_path / "whole", max_steps=8, lr_decay_steps=4)
    lrs = [train_module.learning_rate(config, step) for step in range(8)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    whole = train(config, progress=False)
    assert [r["lr"] for r in _metrics(tmp_path / "whole")] == pytest.approx(lrs)
    split = tmp_path / "split"  # stopped before the cool-down, resumed through it
    train(tiny_config(split, max_steps=4), progress=False)
    resumed = train(tiny_config(split, max_steps=8, lr_decay_steps=4), progress=False, resume=True)
    assert state_equal(resumed.model.state_dict(), whole.model.state_dict())
    with pytest.raises(ConfigError, match="lr_decay_steps.*needs max_steps"):
        tiny_config(tmp_path, max_steps=None, lr_decay_steps=4)


def test_a_compiled_run_trains_as_the_eager_one_and_saves_weights_an_eager_model_loads(run, tmp_path):
    compiled = train(tiny_config(tmp_path / "compiled", compile=True), progress=False)
    losses = [r["loss"] for r in _metrics(tmp_path / "compiled")]
    assert losses == pytest.approx([r["loss"] for r in run.history], rel=1e-3)
    reloaded = MDMPipeline.from_pretrained(str(tmp_path / "compiled")).model  # the checkpoint's own keys
    assert state_equal(reloaded.state_dict(), compiled.ema.state_dict())


def test_compile_without_a_working_compiler_is_a_config_error_naming_no_compile(tmp_path, monkeypatch):
    import torch._functorch.config
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # compile, do not reuse
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match="could not compile.*--no-compile"):
        train(tiny_config(tmp_path / "run", compile=True), progress=False)
    torch._dynamo.reset()
    assert not list((tmp_path / "run").glob("checkpoint_0*"))


def test_each_sample_grid_has_its_prompts_beside_it_one_line_per_image(run):
    grids = sorted(Path(run.config.output_dir).glob("samples_*.png"))
    assert [grid.name for grid in grids] == ["samples_000002.png", "samples_000004.png"]
    for grid in grids:
        assert grid.with_suffix(".txt").read_text() == "row 1, column 1: a red circle\n"


def test_a_new_run_after_one_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(output_dir, max_steps=2), progress=False)
    assert [r["step"] for r in _metrics(output_dir)] == [1, 2] and not _checkpoint_dirs(output_dir)
    train(tiny_config(output_dir, max_steps=2), progress=False)  # nothing to resume: a new run
    assert [r["step"] for r in _metrics(output_dir)] == [1, 2]


def test_a_nan_loss_raises_training_diverged_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    last_good = output_dir / "checkpoint_000002"
    multires_loss, calls, saved = train_module.multires_loss, [], {}

    def nan_on_the_third_step(*args, **kwargs):
        total, losses = multires_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # after the save at step 2
            saved.update(snapshot(last_good))
            return total * float("nan"), losses
        return total, losses

    monkeypatch.setattr(train_module, "multires_loss", nan_on_the_third_step)
    with pytest.raises(TrainingDiverged) as error:
        train(tiny_config(output_dir), progress=False)
    message = str(error.value)
    assert "nan" in message and str(last_good.resolve()) in message and "--resume" in message
    assert saved and snapshot(last_good) == saved  # the last good checkpoint is untouched
    assert _checkpoint_dirs(output_dir) == ["checkpoint_000002"]
    assert resolve_checkpoint(output_dir) == last_good.resolve()
    assert load_checkpoint(output_dir).state["step"] == 2


SMALL = {"image_size": 8, "num_levels": 1, "shell_channels": 8, "inner": INNER}  # TINY's inner level


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 1-level 8px model trained for 2 steps: what progressive training grows TINY from."""
    return train(tiny_config(tmp_path_factory.mktemp("small") / "run", model=SMALL, max_steps=2), progress=False)


def test_progressive_training_starts_the_inner_level_where_the_smaller_model_stopped(small, tmp_path, monkeypatch):
    grown = {}

    def remember_the_grown_model(path, config):
        model = grow_from(path, config)
        grown["model"] = copy.deepcopy(model)  # before train() updates it in place
        return model

    monkeypatch.setattr(train_module, "grow_from", remember_the_grown_model)
    big = train(tiny_config(tmp_path / "big", init_from=small.config.output_dir, max_steps=1), progress=False)
    assert big.model.config.resolutions == [16, 8]
    model, ema = grown["model"].eval(), small.ema.eval()
    generator = torch.Generator().manual_seed(0)
    x16, x8 = torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    tokens, mask = torch.randn(2, 5, 384, generator=generator), torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        inner = model([x16, x8], t, tokens, mask)[1]
        assert torch.equal(inner, ema([x8], t, tokens, mask)[0])
        assert not torch.equal(inner, small.model.eval()([x8], t, tokens, mask)[0])  # EMA, not raw weights


@pytest.mark.parametrize("model", [
    {"image_size": 32, "num_levels": 3, "shell_channels": 8, "inner": INNER},  # two levels bigger
    {"image_size": 16, "num_levels": 2, "shell_channels": 8, "inner": {**INNER, "channels": 24}},  # wider core
])
def test_init_from_a_model_that_is_not_the_inner_levels_is_a_checkpoint_error(small, tmp_path, model):
    with pytest.raises(CheckpointError, match="init_from"):
        train(tiny_config(tmp_path / "big", model=model, init_from=small.config.output_dir), progress=False)
    assert not (tmp_path / "big").exists()


def test_torchrun_with_two_processes_writes_one_checkpoint_and_logs_each_step_once(tmp_path):
    config, output_dir = write_tiny_json(tmp_path / "tiny.json"), tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mdm_lite", "train", "--config", str(config), "--output_dir", str(output_dir),
               "--max_steps", "2", "--no_progress"]
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    print(f"torchrun, 2 processes, 2 steps: {time.perf_counter() - start:.1f} s")
    assert done.returncode == 0, done.stderr
    assert "device cpu x2" in done.stderr  # both processes trained, in one process group
    assert _checkpoint_dirs(output_dir) == ["checkpoint_000002"]
    assert load_checkpoint(output_dir).state["step"] == 2
    assert [r["step"] for r in _metrics(output_dir)] == [1, 2]


def test_the_python_api_samples_in_two_lines(run):
    pipe = MDMPipeline.from_pretrained(run.config.output_dir)
    out = pipe(["a red circle"], num_inference_steps=3)
    assert len(out.images) == 1 and out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    tensors = pipe(["a red circle", "a blue star"], num_inference_steps=3, output_type="pt")
    assert tensors.images.shape == (2, 3, 16, 16)
    assert tensors.images.min() >= -1 and tensors.images.max() <= 1
    assert [x.shape[-1] for x in tensors.levels] == [16, 8]
