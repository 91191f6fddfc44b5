"""Hostile input and faults, one test per kind: every expected failure is one line with exit status 2
(bad input) or 1 (a failed run), nothing saved is lost, and nothing goes through silently wrong.
benchmarks/hostile_inputs.py runs a larger battery of the same kinds through real processes."""

import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import mdm_lite.checkpoint as checkpoint
from mdm_lite import NestedUNetConfig, TrainConfig, UNetConfig
from mdm_lite.checkpoint import load_checkpoint, resolve_checkpoint
from mdm_lite.cli import main
from mdm_lite.config_check import ConfigError
from tiny_run import TINY, snapshot, state_equal, trained_run, write_tiny_json

train_module = importlib.import_module("mdm_lite.train")  # `import mdm_lite.train` gives the function


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _call(capsys, *argv) -> tuple[int, str]:
    """Run `mdm-lite argv` in this process: (exit status, the last line on stderr); the lines before
    it may only be the run's header and progress lines of train."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err)
    assert all(line.startswith(("mdm-lite train:", "step ")) or not line for line in err[:-1]), err
    return status, err[-1] if err else ""


def _train(tmp, *options) -> list:
    return ["train", "--config", write_tiny_json(tmp / "tiny.json"), "--no_progress", *options]


def _sample(checkpoint_path, out, *options) -> list:
    return ["sample", "--checkpoint", checkpoint_path, "--prompts", "a red circle", "--output_dir", out,
            "--num_inference_steps", 2, *options]


def _config_file(tmp, change) -> Path:
    """TINY as a --config file, changed by `change` (a function of the dict, or a JSON value for the whole file)."""
    config = json.loads(json.dumps(TINY))
    data = change(config) if callable(change) else change
    (tmp / "bad.json").write_text(json.dumps(config if data is None and callable(change) else data))
    return tmp / "bad.json"


def _set(path: str, value):
    def change(config):
        *parents, name = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
    return change


# --config values: (the change, words the one-line message must hold: the field, and the rule or fix).
BAD_CONFIGS = {
    "batch_size a string": (_set("batch_size", "2"), ["batch_size", "integer", "'2'"]),
    "lr a word": (_set("lr", "fast"), ["lr", "number", "'fast'"]),
    "lr NaN": (_set("lr", math.nan), ["lr", "finite"]),
    "model a list": (_set("model", [1, 2, 3]), ["model", "NestedUNetConfig"]),
    "a file holding null": (None, ["TrainConfig", "None"]),
    "image_size a string": (_set("model.image_size", "32"), ["model.image_size", "integer"]),
    "inner.channels 0": (_set("model.inner.channels", 0), ["model.inner.channels", "positive integer"]),
    "inner.channels -8": (_set("model.inner.channels", -8), ["model.inner.channels", "positive integer"]),
    "inner.channels odd": (_set("model.inner.channels", 15), ["model.inner.channels", "even"]),
    "inner.head_dim 0": (_set("model.inner.head_dim", 0), ["model.inner.head_dim", "positive integer"]),
    "inner.channel_mult empty": (_set("model.inner.channel_mult", []), ["model.inner.channel_mult", "non-empty"]),
    "dataset_options a list": (_set("dataset_options", [1]), ["dataset_options", "object"]),
    "a misspelt field": (_set("model.image_sise", 16), ["model", "image_sise", "did you mean image_size"]),
    "loss_weights for another level count": (_set("diffusion.loss_weights", [1.0]), ["diffusion.loss_weights",
                                                                                     "one weight per level"]),
    "ema_decay 1": (_set("ema_decay", 1), ["ema_decay", "[0, 1)"]),
    "precision fp16": (_set("precision", "fp16"), ["precision", "auto, fp32, bf16"]),
    "seed -1": (_set("seed", -1), ["seed", "[0,"]),
    "heads that do not split": (_set("model.inner.head_dim", 3), ["model.inner.head_dim", "divides 32"]),
    "inner.channels 1000000 (36 TB)": (_set("model.inner.channels", 1_000_000), ["training this model",
                                                                                 "smaller model"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_config_value_of_the_wrong_type_or_range_is_one_line_naming_the_field(case, tmp_path, capsys):
    change, words = BAD_CONFIGS[case]
    status, line = _call(capsys, "train", "--config", _config_file(tmp_path, change), "--output_dir",
                         tmp_path / "out", "--no_progress")
    assert status == 2 and line.startswith("mdm-lite: error: ") and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [
    lambda: UNetConfig(channels="64"), lambda: NestedUNetConfig(num_levels=0),
    lambda: TrainConfig(batch_size=True), lambda: TrainConfig.from_dict({"model": {"inner": {"dropout": 1.0}}}),
])
def test_configs_built_in_python_are_checked_as_json_ones_are(config):
    with pytest.raises(ConfigError):
        config()


@pytest.mark.parametrize("option, words", [
    ("bogus=1", ["--dataset_option", "bogus", "rename or remove"]),
    ("length=abc", ["--dataset_option length", "integer"]),
    ("length=0", ["length", "at least 1"]),
    ("length", ["not key=value"]),
    ("image_size=8", ["dataset_options", "'image_size'", "remove it"]),
])
def test_a_bad_dataset_option_is_one_line_naming_it(option, words, tmp_path, capsys):
    status, line = _call(capsys, *_train(tmp_path, "--output_dir", tmp_path / "out", "--dataset_option", option))
    assert status == 2 and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image_size", [48, 256])
def test_attention_resolutions_that_select_no_level_are_refused(image_size, tmp_path, capsys):
    # The CPU preset's inner UNet attends at 16 and 8px: 48 or 256 with 3 levels put its two levels
    # at 12 and 6 or at 64 and 32px.
    status, line = _call(capsys, "train", "--image_size", image_size, "--num_levels", 3, "--recipe", "none",
                         "--output_dir", tmp_path / "out")
    assert status == 2 and "attention_resolutions [16, 8] select no level" in line, line
    assert TrainConfig().model.inner.attention_resolutions == (16, 8)  # what a preset says keeps its meaning


def _blow_up_weights_at(step_number):
    """An optimizer step that leaves finite weights of 1e30 at step `step_number` (1-based)."""
    original, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == step_number:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(1e30)
        return result
    return step


@pytest.mark.parametrize("step_number, last_good", [(2, None), (4, "checkpoint_000002")])  # saves at 2 and 4
def test_weights_that_diverged_are_never_saved_nor_called_good(step_number, last_good, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(torch.optim.AdamW, "step", _blow_up_weights_at(step_number))
    output_dir = tmp_path / "run"
    status, line = _call(capsys, *_train(tmp_path, "--output_dir", output_dir))
    assert status == 1 and "the weights diverged" in line, line
    if last_good is None:
        assert "no checkpoint was saved yet" in line and not (output_dir / "checkpoint_latest").exists()
        return
    assert str((output_dir / last_good).resolve()) in line and resolve_checkpoint(output_dir).name == last_good
    monkeypatch.undo()  # resuming from the checkpoint called good goes on
    assert _call(capsys, *_train(tmp_path, "--output_dir", output_dir, "--resume"))[0] == 0


def test_lr_1e30_saves_nothing_and_says_no_checkpoint_was_saved(tmp_path, capsys):
    output_dir = tmp_path / "run"
    status, line = _call(capsys, *_train(tmp_path, "--output_dir", output_dir, "--lr", "1e30", "--warmup_steps", 0,
                                         "--save_freq", 1))
    assert status == 1 and "diverged at step 1" in line and "no checkpoint was saved yet" in line, line
    assert not list(output_dir.glob("checkpoint_*"))


def _full_disk_at_the_second_save(monkeypatch):
    save, calls = checkpoint.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 5:  # a save writes model, ema, optimizer and rng: the second save's model
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save(tensors, path)
    monkeypatch.setattr(checkpoint, "save_file", save_file)


class _ReadOnly:
    """tempfile as seen by checkpoint.check_writable, with every folder under `root` read-only (a
    real read-only folder cannot be made here: the tests may run as root)."""

    def __init__(self, root):
        self.root = Path(root)

    def TemporaryFile(self, dir, **kwargs):
        if Path(dir).is_relative_to(self.root):
            raise OSError(30, "Read-only file system", str(dir))
        return __import__("tempfile").TemporaryFile(dir=dir, **kwargs)


def test_a_full_disk_at_a_save_is_one_line_and_the_last_checkpoint_stays_resumable(run, tmp_path, monkeypatch,
                                                                                   capsys):
    _full_disk_at_the_second_save(monkeypatch)
    output_dir = tmp_path / "run"
    status, line = _call(capsys, *_train(tmp_path, "--output_dir", output_dir))
    assert status == 1 and "No space left on device" in line and "checkpoint_000002, is intact" in line, line
    assert "--resume" in line and not list(output_dir.glob(".tmp_*"))  # the failed save gave its space back
    monkeypatch.undo()
    resumed = train_module.train(train_module.TrainConfig.from_dict({**TINY, "output_dir": str(output_dir)}),
                                 progress=False, resume=True)
    assert state_equal(resumed.model.state_dict(), run.model.state_dict())  # nothing was lost


@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_read_only_output_dir_is_refused_before_any_work(command, run, tmp_path, monkeypatch, capsys):
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(checkpoint, "tempfile", _ReadOnly(tmp_path / "ro"))
    worked = []
    monkeypatch.setattr(train_module, "load_dataset", lambda *a, **k: worked.append(1))
    monkeypatch.setattr("mdm_lite.pipeline.MDMPipeline.from_pretrained", lambda *a, **k: worked.append(1))
    argv = (_train(tmp_path, "--output_dir", tmp_path / "ro" / "out") if command == "train" else
            _sample(run.config.output_dir, tmp_path / "ro" / "out"))
    status, line = _call(capsys, *argv)
    assert status == 2 and "is not writable (Read-only file system)" in line and "--output_dir" in line, line
    assert not worked and not list((tmp_path / "ro").iterdir())


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds folder's lock, as a training run there does."""
    code = ("import sys, time; from mdm_lite.checkpoint import lock_run; lock_run(sys.argv[1]); print('locked', "
            "flush=True); time.sleep(600)")
    other = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "locked"
    return other


@pytest.mark.parametrize("other", ["alive", "ended"])
def test_a_folder_in_use_by_another_run_is_refused_and_a_stale_lock_is_not(other, run, tmp_path, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(run.config.output_dir, output_dir, symlinks=True)
    holder = _holder(output_dir)
    try:
        if other == "ended":
            holder.kill()
            holder.wait()
        before = snapshot(output_dir)
        status, line = _call(capsys, *_train(tmp_path, "--output_dir", output_dir, "--resume", "--max_steps", 5))
    finally:
        holder.kill()
        holder.wait()
    if other == "alive":
        assert status == 2 and f"in use by another training run (pid {holder.pid}" in line, line
        assert snapshot(output_dir) == before
    else:
        assert status == 0 and load_checkpoint(output_dir).state["step"] == 5


def _with_weights(tmp, run_dir, fill) -> Path:
    """A copy of run_dir's latest checkpoint whose EMA weights are all `fill`."""
    copy = tmp / "weights"
    shutil.copytree(resolve_checkpoint(run_dir), copy)
    ema = load_file(str(copy / "ema.safetensors"))
    save_file({k: torch.full_like(v, fill) for k, v in ema.items()}, str(copy / "ema.safetensors"))
    return copy


@pytest.mark.parametrize("case, words", [
    (("--guidance_scale", "nan"), ["--guidance_scale", "finite"]),
    (("--guidance_scale", "inf"), ["--guidance_scale", "finite"]),
    (("--eta", "nan"), ["--eta", "finite"]),
    (("--eta", "-1"), ["--eta", ">= 0"]),
    (("--guidance_interval", "0.6", "0.4"), ["--guidance_interval", "0 <= low <= high <= 1", "0 1"]),
    (("--guidance_interval", "nan", "1"), ["--guidance_interval", "0 <= low <= high <= 1"]),
    ("NaN weights", ["non-finite weights"]),
    ("weights of 1e30", ["non-finite outputs"]),
])
def test_non_finite_sampling_options_and_weights_are_refused(case, words, run, tmp_path, capsys):
    source, options = run.config.output_dir, case
    if isinstance(case, str):
        source, options = _with_weights(tmp_path, source, math.nan if case == "NaN weights" else 1e30), ()
    status, line = _call(capsys, *_sample(source, tmp_path / "out", *options))
    assert status == 2 and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_samples_that_come_out_non_finite_are_a_failed_run_not_black_images(run, tmp_path, monkeypatch, capsys):
    def overflowing(model, resolutions, *args, **kwargs):  # what weights that overflow on these prompts give
        return [torch.full((1, 3, r, r), math.nan) for r in resolutions]

    monkeypatch.setattr("mdm_lite.pipeline.sample", overflowing)
    status, line = _call(capsys, *_sample(run.config.output_dir, tmp_path / "out"))
    assert status == 1 and "non-finite images" in line and not (tmp_path / "out").exists(), line


def _optimizer_tensors(tmp, run_dir, change) -> Path:
    """A copy of the run whose latest optimizer.safetensors is changed by `change(path)`."""
    copy = tmp / "copy"
    shutil.copytree(run_dir, copy, symlinks=True)
    change(resolve_checkpoint(copy) / "optimizer.safetensors")
    return copy


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rename_a_tensor(path):
    tensors = load_file(str(path))
    tensors["exp_avg"] = tensors.pop(next(iter(tensors)))
    save_file(tensors, str(path))


def _drop_a_key(tmp, run_dir):
    copy = tmp / "partial"
    shutil.copytree(resolve_checkpoint(run_dir), copy)
    ema = load_file(str(copy / "ema.safetensors"))
    ema.pop(next(iter(ema)))
    save_file(ema, str(copy / "ema.safetensors"))
    return copy


def _pickle_only_encoder(tmp):
    """A text encoder folder with its config and tokenizer, and weights only as a pickle."""
    from mdm_lite.text import resolve_text_encoder

    folder = tmp / "encoder"
    shutil.copytree(resolve_text_encoder(None), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    return folder


def _lock_that_is_a_folder(tmp, run_dir):
    copy = tmp / "copy"
    shutil.copytree(run_dir, copy, symlinks=True)
    (copy / ".lock").unlink(missing_ok=True)
    (copy / ".lock").mkdir()
    return copy


MISC = {
    "sample --device tpu": (lambda tmp, run: _sample(run, tmp / "out", "--device", "tpu"),
                            ["--device", "auto, cpu, cuda"]),
    "sample --num_per_prompt 100000": (lambda tmp, run: _sample("shapes", tmp / "out", "--num_per_prompt", 100000),
                                       ["sampling 100000 images", "--num_per_prompt"]),
    "sample --seed -1": (lambda tmp, run: _sample(run, tmp / "out", "--seed", -1), ["--seed", "[0,"]),
    "train --seed -1": (lambda tmp, run: _train(tmp, "--output_dir", tmp / "out", "--seed", -1), ["seed", "[0,"]),
    "truncated optimizer tensor": (lambda tmp, run: _train(tmp, "--output_dir", _optimizer_tensors(tmp, run, _truncate),
                                                           "--resume"), ["corrupt", "checkpoint_000002", "ln -sfn"]),
    "renamed optimizer tensor": (lambda tmp, run: _train(tmp, "--output_dir", _optimizer_tensors(
        tmp, run, _rename_a_tensor), "--resume"), ["'exp_avg'", "fits no parameter", "checkpoint_000002"]),
    "--init_from a checkpoint missing a key": (lambda tmp, run: _train(
        tmp, "--output_dir", tmp / "out", "--init_from", _drop_a_key(tmp, run)), ["do not fit", "Missing key"]),
    "a .lock that is a folder": (lambda tmp, run: _train(tmp, "--output_dir", _lock_that_is_a_folder(tmp, run),
                                                         "--resume"), ["cannot use", ".lock", "Is a directory"]),
    "a text encoder with only a pickle": (lambda tmp, run: _train(
        tmp, "--output_dir", tmp / "out", "--text_encoder", _pickle_only_encoder(tmp)), ["safetensors", "pickle"]),
}


@pytest.mark.parametrize("case", list(MISC))
def test_misc_bad_input_is_one_line_that_names_the_option_or_the_fix(case, run, tmp_path, capsys):
    argv, words = MISC[case]
    before = snapshot(Path(run.config.output_dir))
    status, line = _call(capsys, *argv(tmp_path, run.config.output_dir))
    assert status == 2 and line.startswith("mdm-lite: error: ") and all(w in line for w in words), line
    assert not (tmp_path / "out").exists() and snapshot(Path(run.config.output_dir)) == before


def test_a_half_written_metrics_line_from_a_killed_run_does_not_stop_a_resume(run, tmp_path, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(run.config.output_dir, output_dir, symlinks=True)
    with open(output_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 0.3')  # the write the kill cut short
    status, _ = _call(capsys, *_train(tmp_path, "--output_dir", output_dir, "--resume", "--max_steps", 5))
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert status == 0 and steps == [1, 2, 3, 4, 5]


def _press_ctrl_c(monkeypatch, at_step: int, times: int):
    """Ctrl-C `times` times during the forward pass of step `at_step` (1-based)."""
    loss, calls = train_module.multires_loss, []

    def pressed(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return loss(*args, **kwargs)
    monkeypatch.setattr(train_module, "multires_loss", pressed)


@pytest.mark.parametrize("times", [1, 2])
def test_the_first_ctrl_c_saves_after_its_step_and_a_second_stops_at_once(times, run, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # pytest-xdist workers ignore SIGINT; a terminal has the default
    _press_ctrl_c(monkeypatch, at_step=3, times=times)
    status, line = _call(capsys, *_train(tmp_path, "--output_dir", output_dir, "--save_freq", 100))
    assert status == 130 and signal.getsignal(signal.SIGINT) is before  # the handler of before is back
    if times == 2:  # at once: nothing saved, and the message says so
        assert "interrupted; no checkpoint was saved yet" in line and not (output_dir / "checkpoint_latest").exists()
        return
    assert "interrupted at step 3, saved" in line and "--resume" in line, line
    assert load_checkpoint(output_dir).state["step"] == 3
    monkeypatch.undo()
    resumed = train_module.train(train_module.TrainConfig.from_dict({**TINY, "output_dir": str(output_dir)}),
                                 progress=False, resume=True)
    assert state_equal(resumed.model.state_dict(), run.model.state_dict())  # the stop lost no step


def test_ctrl_c_in_a_terminal_stops_a_real_process_and_its_dataloader_workers_cleanly(tmp_path):
    command = [str(Path(sys.executable).parent / "mdm-lite"), *map(str, _train(
        tmp_path, "--output_dir", tmp_path / "run", "--max_steps", 1000, "--save_freq", 1000, "--num_workers", 2))]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    err = ""
    while not err.endswith("\n") or not err.splitlines()[-1].startswith("mdm-lite train:"):  # the loop starts
        err += process.stderr.readline()
    time.sleep(1)
    os.killpg(process.pid, signal.SIGINT)  # a terminal sends Ctrl-C to the whole group: workers too
    err += process.stderr.read()
    assert process.wait(timeout=120) == 130 and "Traceback" not in err, err
    assert err.count("stopping after this step") == 1, err  # said once, by the trainer
    assert "interrupted at step" in err.splitlines()[-1] and load_checkpoint(tmp_path / "run").state["step"] >= 1
