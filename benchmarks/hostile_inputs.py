"""A battery of hostile inputs and faults, each run as a real `mdm-lite` process on a tiny model.

::

    python benchmarks/hostile_inputs.py                  # every case, about 15 minutes on 2 cores
    python benchmarks/hostile_inputs.py --only sample    # the cases whose name holds "sample"

Each case is a command line (bad options, config files, checkpoints, folders; a full or read-only
disk; a second trainer; Ctrl-C) and what it should end in: a clean error (exit 2 for bad input, 1
for a failed run, 130 for Ctrl-C; no traceback; the last line on stderr starts with "mdm-lite" and
holds the words that name the option or the fix) or a success whose result is checked (files
written, images not blank, checkpoints that load). Outcomes:

    clean      the error expected, one line naming the option or the fix
    ok         a success expected, and its result checked
    traceback  a Python traceback
    silent     exit 0 where an error was due, or a success whose result is wrong
    vague      a clean error whose line lacks the words expected, or the wrong exit status
    lost       something saved before the command is gone or changed
    skipped    needs what this machine lacks (root and mount namespaces, for a full disk)

A full disk and a read-only folder are real: a small tmpfs in a private mount namespace
(`unshare -m`, as root). Prints one line per case, then the counts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MDM = str(Path(sys.executable).parent / "mdm-lite")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TINY = {
    "model": {"image_size": 16, "num_levels": 2, "shell_channels": 8,
              "inner": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}},
    "dataset_options": {"length": 12}, "batch_size": 4, "max_steps": 2, "save_freq": 2, "log_freq": 1,
    "num_sample_steps": 2, "warmup_steps": 2, "lr": 1e-3, "sample_prompts": ["a red circle"], "device": "cpu",
}


@dataclass
class Case:
    """name; argv: the command, a function of the case's folder (and the shared Setup); expect:
    "2", "1" or "130" (a clean error with that status), "ok" (exit 0) or "any" (either, checked);
    words: what the error line must hold; check: a function of (folder, stderr) returning a problem
    or None, run whatever the outcome; mount: ("ro" | "full", size, prefill) for a tmpfs at
    folder/"m"; run: a function doing the whole case itself, returning (status, stderr)."""

    name: str
    argv: Callable | None = None
    expect: str = "2"
    words: tuple = ()
    check: Callable | None = None
    mount: tuple | None = None
    run: Callable | None = None
    outcome: str = ""
    detail: str = ""


@dataclass
class Setup:
    root: Path
    run: Path = field(init=False)  # a tiny run: 4 steps, checkpoints at 2 and 4
    config: Path = field(init=False)

    def __post_init__(self):
        self.config = self.write(self.root / "tiny.json", TINY)
        self.run = self.root / "run"
        done = subprocess.run([MDM, "train", "--config", str(self.config), "--output_dir", str(self.run),
                               "--max_steps", "4", "--no_progress"], env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    @staticmethod
    def write(path: Path, data) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        return path


# --- helpers to build the cases ------------------------------------------------------------

def changed(**paths) -> dict:
    """TINY with dotted paths set: changed(**{"model.inner.channels": 0})."""
    config = json.loads(json.dumps(TINY))
    for path, value in paths.items():
        *parents, name = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
    return config


def train(*options, config=None, out="out"):
    """`mdm-lite train` on TINY (or `config`: a dict, or the file's bytes) into folder/out; an
    option may be a function of (folder, setup)."""
    def argv(folder, setup):
        path = setup.config
        if config is not None:
            path = folder / "config.json"
            path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
        return ["train", "--config", path, "--output_dir", folder / out, "--no_progress",
                *[o(folder, setup) if callable(o) else o for o in options]]
    return argv


def sample(*options, checkpoint=None, out="out"):
    """`mdm-lite sample` of the tiny run (or `checkpoint`, a path or a function) into folder/out."""
    def argv(folder, setup):
        source = checkpoint(folder, setup) if callable(checkpoint) else checkpoint or setup.run
        return ["sample", "--checkpoint", source, "--prompts", "a red circle", "--output_dir", folder / out,
                "--num_inference_steps", 2, *[o(folder, setup) if callable(o) else o for o in options]]
    return argv


def copy_run(change=None):
    """A copy of the tiny run at folder/copy, its latest checkpoint changed by change(checkpoint_dir)."""
    def make(folder, setup):
        copy = folder / "copy"
        if not copy.exists():
            shutil.copytree(setup.run, copy, symlinks=True)
            if change:
                change(copy / os.readlink(copy / "checkpoint_latest"))
        return copy
    return make


def tensors(file: str, change):
    def edit(checkpoint: Path):
        from safetensors.torch import load_file, save_file

        path = checkpoint / file
        save_file(change(load_file(str(path))), str(path))
    return edit


def json_file(file: str, change):
    def edit(checkpoint: Path):
        path = checkpoint / file
        data = json.loads(path.read_text())
        path.write_text(change(data) if callable(change) else change)
    return edit


def truncate(file: str):
    def edit(checkpoint: Path):
        path = checkpoint / file
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return edit


def remove(file: str):
    return lambda checkpoint: (checkpoint / file).unlink()


def fill(value):
    import torch
    return lambda ts: {k: torch.full_like(v, value) for k, v in ts.items()}


def drop_first(ts):
    ts.pop(next(iter(ts)))
    return ts


def rename_first(ts):
    ts["bogus"] = ts.pop(next(iter(ts)))
    return ts


def reshape_first_moment(ts):
    import torch
    key = next(k for k in ts if k.endswith("exp_avg"))
    ts[key] = torch.zeros(3)
    return ts


def unchanged_run(folder, err) -> str | None:
    """The copy of the run still holds what it held: the checkpoints load, bit for bit as before."""
    copy = folder / "copy"
    if not copy.exists():
        return None
    before = folder / "copy.before.json"
    if not before.exists():
        return None
    return "the run folder changed" if json.loads(before.read_text()) != _listing(copy) else None


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def images_written(count: int):
    def check(folder, err):
        from PIL import Image

        pngs = sorted((folder / "out").glob("sample_*.png"))
        if len(pngs) != count:
            return f"{len(pngs)} samples written, not {count}"
        for png in pngs:
            low, high = Image.open(png).convert("L").getextrema()
            if high - low < 2:
                return f"{png.name} is blank"
        return None
    return check


def checkpoint_at(step: int, folder_name="out"):
    def check(folder, err):
        sys.path.insert(0, str(Path(__file__).parent.parent))
        from mdm_lite.checkpoint import load_checkpoint

        try:
            return None if load_checkpoint(folder / folder_name).state["step"] == step else f"not at step {step}"
        except Exception as error:  # noqa: BLE001 (whatever it is, the check failed)
            return f"no checkpoint at step {step} ({error})"
    return check


def no_checkpoint(folder, err):
    return "a checkpoint was saved" if list((folder / "out").glob("checkpoint_0*")) else None


def nothing_at(name):
    return lambda folder, err: f"{name} was written" if (folder / name).exists() else None


def pickle_only_encoder(folder, setup):
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from mdm_lite.text import resolve_text_encoder

    encoder = folder / "encoder"
    shutil.copytree(resolve_text_encoder(None), encoder, ignore=shutil.ignore_patterns("*.safetensors"))
    (encoder / "pytorch_model.bin").write_bytes(b"a pickle that must never be loaded")
    return encoder


def a_file(folder, setup):
    (folder / "file").write_text("not a folder\n")
    return folder / "file"


def text_file(text: str | bytes, name="prompts.txt"):
    def make(folder, setup):
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path
    return make


# --- cases that run themselves -------------------------------------------------------------

def _start(argv, folder) -> subprocess.Popen:
    return subprocess.Popen([MDM, *map(str, argv)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=folder, start_new_session=True)


def _wait_for_header(process) -> str:
    err = ""
    while True:
        line = process.stderr.readline()
        err += line
        if not line or line.startswith("mdm-lite train:"):
            return err


def ctrl_c(presses: int, delay: float = 1.0, workers: int = 0):
    """Ctrl-C as a terminal sends it, to the whole process group (the DataLoader workers too)."""
    def run(folder, setup):
        process = _start(train("--max_steps", 1000, "--save_freq", 1000, "--num_workers", workers)(folder, setup),
                         folder)
        err = _wait_for_header(process)
        time.sleep(delay)
        for _ in range(presses):
            os.killpg(process.pid, signal.SIGINT)
            time.sleep(0.05)
        err += process.stderr.read()
        return process.wait(timeout=300), err
    return run


def second_trainer(resume: bool):
    def run(folder, setup):
        first = _start(train("--max_steps", 1000, "--save_freq", 1000)(folder, setup), folder)
        err = _wait_for_header(first)
        try:
            argv = train("--max_steps", 4, *(["--resume"] if resume else []))(folder, setup)
            second = subprocess.run([MDM, *map(str, argv)], env=ENV, capture_output=True, text=True, cwd=folder)
        finally:
            first.send_signal(signal.SIGINT)
            first_err = err + first.stderr.read()
            first.wait(timeout=300)
        steps = [json.loads(line)["step"] for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
        if steps != list(range(1, len(steps) + 1)) or "interrupted at step" not in first_err:
            return 0, f"the first run was disturbed: steps {steps[:8]}..., {first_err.splitlines()[-1:]}"
        if str(first.pid) not in second.stderr:
            return second.returncode, second.stderr + " (the other process is not named)"
        return second.returncode, second.stderr
    return run


def stale_lock(folder, setup):
    out = folder / "out"
    out.mkdir()
    (out / ".lock").write_text("pid 999999: mdm-lite train (a run that died)\n")
    argv = train()(folder, setup)
    done = subprocess.run([MDM, *map(str, argv)], env=ENV, capture_output=True, text=True)
    return done.returncode, done.stderr


def interrupted_then_resumed(folder, setup):
    status, err = ctrl_c(1)(folder, setup)
    if status != 130:
        return status, err
    argv = train("--resume", "--max_steps", _step_of(folder) + 1)(folder, setup)
    done = subprocess.run([MDM, *map(str, argv)], env=ENV, capture_output=True, text=True)
    return done.returncode, err + done.stderr


def _step_of(folder) -> int:
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from mdm_lite.checkpoint import load_checkpoint

    return load_checkpoint(folder / "out").state["step"]


# --- the battery ---------------------------------------------------------------------------

def cases() -> list[Case]:
    c = []
    # Config files (--config): types, ranges, structure.
    bad_configs = {
        "batch_size '2'": ({"batch_size": "2"}, ["batch_size", "integer"]),
        "batch_size 2.5": ({"batch_size": 2.5}, ["batch_size", "integer"]),
        "batch_size true": ({"batch_size": True}, ["batch_size", "integer"]),
        "batch_size -1": ({"batch_size": -1}, ["batch_size", "positive"]),
        "lr 'fast'": ({"lr": "fast"}, ["lr", "number"]),
        "lr -1": ({"lr": -1}, ["lr", "positive"]),
        "lr 0": ({"lr": 0}, ["lr", "positive"]),
        "lr Infinity": ({"lr": math.inf}, ["lr", "finite"]),
        "lr NaN": ({"lr": math.nan}, ["lr", "finite"]),
        "model [1,2,3]": ({"model": [1, 2, 3]}, ["model", "NestedUNetConfig"]),
        "model null": ({"model": None}, ["model", "NestedUNetConfig"]),
        "image_size '32'": ({"model.image_size": "32"}, ["model.image_size", "integer"]),
        "image_size 0": ({"model.image_size": 0}, ["model.image_size", "positive"]),
        "image_size 17": ({"model.image_size": 17}, ["image_size", "divisible"]),
        "num_levels 0": ({"model.num_levels": 0}, ["model.num_levels", "positive"]),
        "inner.channels 0": ({"model.inner.channels": 0}, ["model.inner.channels", "positive"]),
        "inner.channels -8": ({"model.inner.channels": -8}, ["model.inner.channels", "positive"]),
        "inner.channels 15": ({"model.inner.channels": 15}, ["model.inner.channels", "even"]),
        "inner.channels 1000000": ({"model.inner.channels": 1_000_000}, ["needs at least", "smaller model"]),
        "inner.head_dim 0": ({"model.inner.head_dim": 0}, ["model.inner.head_dim", "positive"]),
        "inner.head_dim 3": ({"model.inner.head_dim": 3}, ["model.inner.head_dim", "divides"]),
        "inner.channel_mult []": ({"model.inner.channel_mult": []}, ["model.inner.channel_mult", "non-empty"]),
        "inner.channel_mult [1, 0]": ({"model.inner.channel_mult": [1, 0]}, ["channel_mult[1]", "positive"]),
        "inner.channel_mult [1,2,2,2,2]": ({"model.inner.channel_mult": [1, 2, 2, 2, 2]}, ["channel_mult", "fewer"]),
        "inner.attention_resolutions [3]": ({"model.inner.attention_resolutions": [3]},
                                            ["attention_resolutions", "select no level"]),
        "inner.dropout 1.5": ({"model.inner.dropout": 1.5}, ["model.inner.dropout", "[0, 1)"]),
        "inner.text_dim 100": ({"model.inner.text_dim": 100}, ["text_dim", "384"]),
        "inner.in_channels 1": ({"model.inner.in_channels": 1}, ["model.inner.in_channels", "3"]),
        "inner.num_res_blocks -1": ({"model.inner.num_res_blocks": -1}, ["num_res_blocks", ">= 0"]),
        "inner.emb_dim 0": ({"model.inner.emb_dim": 0}, ["emb_dim", "positive"]),
        "shell_channels 0": ({"model.shell_channels": 0}, ["shell_channels", "positive"]),
        "unknown model field": ({"model.image_sise": 16}, ["image_sise", "did you mean"]),
        "unknown top-level field": ({"learning_rate": 0.1}, ["learning_rate", "rename or remove"]),
        "dataset_options [1]": ({"dataset_options": [1]}, ["dataset_options", "object"]),
        "dataset_options bogus": ({"dataset_options": {"bogus": 1}}, ["bogus", "rename or remove"]),
        "diffusion.prediction x0": ({"diffusion.prediction": "x0"}, ["diffusion.prediction", "v, eps"]),
        "diffusion.loss_weights [1]": ({"diffusion.loss_weights": [1.0]}, ["loss_weights", "per level"]),
        "diffusion.cond_drop_prob 2": ({"diffusion.cond_drop_prob": 2}, ["cond_drop_prob", "[0, 1]"]),
        "diffusion.time_range [0.5]": ({"diffusion.time_range": [0.5]}, ["time_range", "2"]),
        "ema_decay 1": ({"ema_decay": 1}, ["ema_decay", "[0, 1)"]),
        "precision fp16": ({"precision": "fp16"}, ["precision", "auto, fp32, bf16"]),
        "device tpu": ({"device": "tpu"}, ["device", "cuda"]),
        "seed -1": ({"seed": -1}, ["seed", "[0,"]),
        "keep_checkpoints -1": ({"keep_checkpoints": -1}, ["keep_checkpoints", "0 keeps every"]),
        "num_workers -1": ({"num_workers": -1}, ["num_workers", ">= 0"]),
        "output_dir ''": ({"output_dir": ""}, ["output_dir", "non-empty"]),
        "sample_prompts 'abc'": ({"sample_prompts": "abc"}, ["sample_prompts", "list"]),
        "max_steps 0": ({"max_steps": 0}, ["max_steps", "positive"]),
        "epochs 0": ({"epochs": 0}, ["epochs", "positive"]),
        "lr 10**400, an integer": ({"lr": 10 ** 400}, ["lr", "finite"]),
        "batch_size 10**30": ({"batch_size": 10 ** 30}, ["needs at least", "--batch_size of at most"]),
        "image_size 2**20": ({"model.image_size": 2 ** 20, "model.inner.attention_resolutions": [2 ** 18]},
                             ["image_size", "too large"]),
    }
    for name, (paths, words) in bad_configs.items():
        c.append(Case(f"config: {name}", train(config=changed(**paths)), "2", tuple(words), nothing_at("out")))
    for name, data, words in (("a file holding null", b"null", ["TrainConfig", "None"]),
                              ("a file holding a list", b"[1, 2]", ["TrainConfig", "object"]),
                              ("a file holding a string", b'"cpu"', ["TrainConfig", "object"]),
                              ("an empty file", b"", ["--config", "JSON"]),
                              ("a file that is not JSON", b"{batch_size: 2", ["--config", "JSON"]),
                              ("a binary file", b"\xff\xfe\x00binary", ["--config", "JSON"])):
        c.append(Case(f"config: {name}", train(config=data), "2", tuple(words), nothing_at("out")))
    c.append(Case("config: a missing file", lambda f, s: ["train", "--config", f / "nope.json"], "2",
                  ("--config", "No such file")))

    # Command-line options of train.
    flags = {
        "--batch_size 0": (["--batch_size", 0], ["batch_size", "positive"]),
        "--lr -1": (["--lr", -1], ["lr", "positive"]),
        "--lr nan": (["--lr", "nan"], ["lr", "finite"]),
        "--lr inf": (["--lr", "inf"], ["lr", "finite"]),
        "--seed -1": (["--seed", -1], ["seed", "[0,"]),
        "--device tpu": (["--device", "tpu"], ["device", "cuda"]),
        "--device cuda:x": (["--device", "cuda:x"], ["device", "cuda:N"]),
        "--precision fp16": (["--precision", "fp16"], ["precision", "fp32"]),
        "--ema_decay 1.5": (["--ema_decay", 1.5], ["ema_decay", "[0, 1)"]),
        "--time_power 0": (["--time_power", 0], ["time_power", "1: uniform"]),
        "--time_range 0.9 0.5": (["--time_range", 0.9, 0.5], ["time_range", "0.97 0.97"]),
        "--time_range -1 2": (["--time_range", -1, 2], ["time_range", "[0, 1]"]),
        "--image_size 17": (["--image_size", 17], ["image_size", "divisible"]),
        "--num_levels 0": (["--num_levels", 0], ["num_levels", "positive"]),
        "--image_size 32 (attention on no level)": (["--image_size", 32], ["attention_resolutions", "no level"]),
        "--max_samples 0": (["--max_samples", 0], ["max_samples", "positive"]),
        "--max_samples 1 (less than a step)": (["--max_samples", 1], ["fewer than one step", "--batch_size"]),
        "--save_freq 0": (["--save_freq", 0], ["save_freq", "positive"]),
        "--log_freq 0": (["--log_freq", 0], ["log_freq", "positive"]),
        "--max_time_s -5": (["--max_time_s", -5], ["max_time_s", "positive"]),
        "--gradient_clip_norm -1": (["--gradient_clip_norm", -1], ["gradient_clip_norm", "no clipping"]),
        "--warmup_steps -1": (["--warmup_steps", -1], ["warmup_steps", ">= 0"]),
        "--keep_checkpoints -2": (["--keep_checkpoints", -2], ["keep_checkpoints", "0 keeps"]),
        "--num_workers -1": (["--num_workers", -1], ["num_workers", ">= 0"]),
        "--batch_size 1000000 (memory)": (["--batch_size", 1_000_000, "--dataset_option", "length=2000000"],
                                          ["needs at least", "--batch_size of at most"]),
        "--dataset nope": (["--dataset", "nope"], ["unknown dataset", "shapes"]),
        "--dataset_option bogus=1": (["--dataset_option", "bogus=1"], ["--dataset_option", "bogus"]),
        "--dataset_option length=abc": (["--dataset_option", "length=abc"], ["length", "integer"]),
        "--dataset_option length=0": (["--dataset_option", "length=0"], ["length", "at least 1"]),
        "--dataset_option difficulty=hard": (["--dataset_option", "difficulty=hard"], ["difficulty", "single"]),
        "--dataset_option noequals": (["--dataset_option", "noequals"], ["key=value"]),
        "--dataset_option image_size=8": (["--dataset_option", "image_size=8"], ["dataset_options", "image_size"]),
        "--text_encoder a missing folder": (["--text_encoder", "/nonexistent/encoder"], ["--text_encoder", "folder"]),
        "--text_encoder a pickle-only folder": (["--text_encoder", pickle_only_encoder], ["safetensors", "pickle"]),
        "--text_encoder an empty folder": (["--text_encoder", lambda f, s: (f / "empty").mkdir() or f / "empty"],
                                           ["--text_encoder", "cannot load"]),
        "--init_from a missing checkpoint": (["--init_from", "/nonexistent/run"], ["no checkpoint", "mdm-lite train"]),
        "--init_from another model": (["--init_from", lambda f, s: s.run, "--image_size", 8, "--num_levels", 1],
                                      ["--init_from", "inner levels"]),
        "--init_from a checkpoint missing a key": (["--init_from", copy_run(tensors("ema.safetensors", drop_first))],
                                                   ["do not fit", "Missing key"]),
        "--init_from NaN weights": (["--init_from", copy_run(tensors("ema.safetensors", fill(math.nan)))],
                                    ["non-finite weights"]),
        "--init_from weights of 1e30": (["--init_from", copy_run(tensors("ema.safetensors", fill(1e30)))],
                                        ["non-finite outputs", "earlier checkpoint"]),
        "--resume with nothing to resume": (["--resume"], ["--resume", "drop --resume"]),
        "--output_dir a file": (["--output_dir", a_file], ["output_dir", "directory"]),
        "--output_dir under a file": (["--output_dir", lambda f, s: a_file(f, s) / "run"], ["is a file", "directory"]),
        "--batch_size abc (argparse)": (["--batch_size", "abc"], ["--batch_size", "invalid int"]),
    }
    for name, (options, words) in flags.items():
        c.append(Case(f"train {name}", train(*options), "2", tuple(words)))
    c.append(Case("train --output_dir with a 5,000-character name", train("--output_dir", lambda f, s: f / ("x" * 5000)),
                  "2", ("cannot use", "File name too long")))
    c.append(Case("train --config a folder", lambda f, s: ["train", "--config", f, "--output_dir", f / "out"], "2",
                  ("--config", "Is a directory")))
    for name, options, step in (("--max_time_s 0.001", ["--max_time_s", 0.001], 1), ("--epochs 1", ["--epochs", 1], 3),
                                ("--keep_checkpoints 0", ["--keep_checkpoints", 0, "--save_freq", 1], 2),
                                ("--sample_prompts ''", ["--sample_prompts", ""], 2)):
        c.append(Case(f"train {name} (control)", train(*options, *(["--max_steps", 9] if step == 3 else [])), "ok",
                      check=checkpoint_at(step)))
    c.append(Case("train --preset huge", lambda f, s: ["train", "--preset", "huge", "--output_dir", f / "out"], "2",
                  ("preset", "cpu")))
    c.append(Case("train --batch_size 1000000 from the cpu preset", lambda f, s: [
        "train", "--batch_size", 1_000_000, "--output_dir", f / "out"], "2", ("needs at least", "batch_size")))

    # Resuming a damaged run (a copy of the tiny run; the original never changes).
    damaged = {
        "truncated optimizer tensor": (truncate("optimizer.safetensors"), ["corrupt", "ln -sfn"]),
        "renamed optimizer tensor": (tensors("optimizer.safetensors", rename_first), ["'bogus'", "fits no parameter"]),
        "misshapen optimizer moment": (tensors("optimizer.safetensors", reshape_first_moment), ["fits no parameter"]),
        "truncated model weights": (truncate("model.safetensors"), ["corrupt", "checkpoint_000002"]),
        "model weights missing a key": (tensors("model.safetensors", drop_first), ["do not fit", "Missing"]),
        "NaN model weights": (tensors("model.safetensors", fill(math.nan)), ["non-finite weights"]),
        "weights of 1e30": (tensors("model.safetensors", fill(1e30)), ["non-finite outputs", "earlier"]),
        "state.json without a step": (json_file("state.json", lambda d: json.dumps({**d, "step": None})),
                                      ["state.json", "step"]),
        "state.json a list": (json_file("state.json", "[]"), ["state.json", "JSON object"]),
        "state.json not JSON": (json_file("state.json", "{"), ["corrupt", "state.json"]),
        "state.json without optimizer groups": (json_file("state.json", lambda d: json.dumps(
            {k: v for k, v in d.items() if k != "optimizer_param_groups"})), ["optimizer_param_groups"]),
        "config.json with channels 0": (json_file("config.json", lambda d: json.dumps(
            {**d, "model": {**d["model"], "inner": {**d["model"]["inner"], "channels": 0}}})),
            ["config.json", "model.inner.channels"]),
        "ema.safetensors missing": (remove("ema.safetensors"), ["missing ema.safetensors"]),
        "rng.safetensors truncated": (truncate("rng.safetensors"), ["corrupt", "rng.safetensors"]),
    }
    for name, (change, words) in damaged.items():
        c.append(Case(f"resume: {name}", lambda f, s, change=change: [
            "train", "--config", s.config, "--output_dir", copy_run(change)(f, s), "--resume", "--max_steps", 6,
            "--no_progress"], "2", tuple(words), unchanged_run))
    c.append(Case("resume: a dangling checkpoint_latest", lambda f, s: [
        "train", "--config", s.config, "--output_dir", _dangling(f, s), "--resume", "--no_progress"], "2",
        ("no checkpoint", "checkpoint")))
    c.append(Case("resume: another model config", lambda f, s: [
        "train", "--config", s.config, "--output_dir", copy_run()(f, s), "--resume", "--image_size", 8,
        "--num_levels", 1, "--no_progress"], "2", ("different model config",), unchanged_run))
    c.append(Case("resume: without --resume", lambda f, s: [
        "train", "--config", s.config, "--output_dir", copy_run()(f, s), "--no_progress"], "2", ("--resume",),
        unchanged_run))
    c.append(Case("resume: metrics.jsonl with a half-written last line (control)", lambda f, s: [
        "train", "--config", s.config, "--output_dir", _half_written_log(f, s), "--resume", "--max_steps", 6,
        "--no_progress"], "ok", check=checkpoint_at(6, "copy")))
    c.append(Case("resume: a good copy (control)", lambda f, s: [
        "train", "--config", s.config, "--output_dir", copy_run()(f, s), "--resume", "--max_steps", 6,
        "--no_progress"], "ok", check=checkpoint_at(6, "copy")))

    c.append(Case("resume: a .lock that is a folder", lambda f, s: [
        "train", "--config", s.config, "--output_dir", _folder_at(f, s, ".lock"), "--resume", "--max_steps", 6,
        "--no_progress"], "2", ("cannot use", ".lock", "Is a directory")))
    c.append(Case("resume: metrics.jsonl that is a folder", lambda f, s: [
        "train", "--config", s.config, "--output_dir", _folder_at(f, s, "metrics.jsonl"), "--resume", "--max_steps",
        6, "--no_progress"], "2", ("cannot use", "metrics.jsonl", "Is a directory")))
    c.append(Case("resume: checkpoint_latest a text file naming nothing", lambda f, s: [
        "train", "--config", s.config, "--output_dir", _latest_as_text(f, s), "--resume", "--no_progress"], "2",
        ("no checkpoint", "checkpoint_000009")))

    # Divergence.
    c.append(Case("diverge: --lr 1e30, a save every step", train("--lr", "1e30", "--warmup_steps", 0,
                                                                 "--save_freq", 1), "1",
                  ("diverged at step 1", "no checkpoint was saved yet"), no_checkpoint))
    c.append(Case("diverge: --lr 1e30, a save every 2 steps", train("--lr", "1e30", "--warmup_steps", 0), "1",
                  ("step 2", "no checkpoint was saved yet"), no_checkpoint))
    c.append(Case("diverge: --lr 1e30 after a good save", lambda f, s: _diverge_after_a_save(f, s), "1",
                  ("checkpoint_000002", "--resume"), checkpoint_at(2)))
    c.append(Case("diverge: --lr 1e6 (finite, large)", train("--lr", "1e6", "--warmup_steps", 0, "--save_freq", 1),
                  "any", ("diverged",), _good_or_none))

    # Sampling options and checkpoints.
    sampling = {
        "--guidance_scale nan": (["--guidance_scale", "nan"], ["--guidance_scale", "finite"]),
        "--guidance_scale inf": (["--guidance_scale", "inf"], ["--guidance_scale", "finite"]),
        "--guidance_scale=-inf": (["--guidance_scale=-inf"], ["--guidance_scale", "finite"]),
        "--guidance_interval 0.6 0.2": (["--guidance_interval", 0.6, 0.2], ["--guidance_interval", "0 <= low"]),
        "--guidance_interval nan 1": (["--guidance_interval", "nan", 1], ["--guidance_interval", "0 <= low"]),
        "--guidance_interval -1 2": (["--guidance_interval", -1, 2], ["--guidance_interval", "0 <= low"]),
        "--guidance_interval 0.4 (argparse)": (["--guidance_interval", 0.4], ["--guidance_interval", "expected 2"]),
        "--eta nan": (["--eta", "nan"], ["--eta", "finite"]),
        "--eta inf": (["--eta", "inf"], ["--eta", "finite"]),
        "--eta -1": (["--eta", -1], ["--eta", ">= 0"]),
        "--num_inference_steps 0": (["--num_inference_steps", 0], ["--num_inference_steps", "positive"]),
        "--num_inference_steps -5": (["--num_inference_steps", -5], ["--num_inference_steps", "positive"]),
        "--num_per_prompt 0": (["--num_per_prompt", 0], ["--num_per_prompt", "positive"]),
        "--seed -1": (["--seed", -1], ["--seed", "[0,"]),
        "--seed 2**70": (["--seed", 2 ** 70], ["--seed", "[0,"]),
        "--device tpu": (["--device", "tpu"], ["--device", "auto, cpu, cuda"]),
        "--device cuda:x": (["--device", "cuda:x"], ["--device", "cuda:N"]),
        "--device cuda (no GPU)": (["--device", "cuda"], ["--device cpu"]),
        "--sampler euler (argparse)": (["--sampler", "euler"], ["--sampler", "invalid choice"]),
    }
    for name, (options, words) in sampling.items():
        c.append(Case(f"sample {name}", sample(*options), "2", tuple(words), nothing_at("out")))
    c.append(Case("sample --output_dir a file", sample(out="file", checkpoint=lambda f, s: a_file(f, s) and s.run),
                  "2", ("output_dir", "directory")))
    c.append(Case("sample --num_per_prompt 100000 (shipped model)", sample("--num_per_prompt", 100000,
                                                                           checkpoint="shapes"), "2",
                  ("sampling 100000 images", "--num_per_prompt"), nothing_at("out")))
    c.append(Case("sample --guidance_scale 1e30 (saturated images, control)", sample("--guidance_scale", "1e30"), "ok",
                  check=images_written(1)))
    checkpoints = {
        "a missing checkpoint": (lambda f, s: f / "nothing", ["no checkpoint", "mdm-lite train"]),
        "a file as checkpoint": (a_file, ["is a file", "directory"]),
        "NaN EMA weights": (copy_run(tensors("ema.safetensors", fill(math.nan))), ["non-finite weights"]),
        "EMA weights of 1e30": (copy_run(tensors("ema.safetensors", fill(1e30))), ["non-finite outputs"]),
        "EMA weights missing a key": (copy_run(tensors("ema.safetensors", drop_first)), ["do not fit"]),
        "truncated EMA weights": (copy_run(truncate("ema.safetensors")), ["corrupt", "checkpoint_000002"]),
        "config.json not JSON": (copy_run(json_file("config.json", "{")), ["corrupt", "config.json"]),
        "config.json null": (copy_run(json_file("config.json", "null")), ["config.json", "JSON object"]),
        "config.json with a bad field": (copy_run(json_file("config.json", lambda d: json.dumps(
            {**d, "model": {**d["model"], "num_levels": "two"}}))), ["config.json", "model.num_levels"]),
        "config.json with channels 1000000": (copy_run(json_file("config.json", lambda d: json.dumps(
            {**d, "model": {**d["model"], "inner": {**d["model"]["inner"], "channels": 1_000_000}}}))),
            ["needs at least"]),
        "a dangling checkpoint_latest": (lambda f, s: _dangling(f, s), ["no checkpoint"]),
    }
    for name, (source, words) in checkpoints.items():
        c.append(Case(f"sample from {name}", sample(checkpoint=source), "2", tuple(words), nothing_at("out")))
    c.append(Case("sample --no_ema from an exported checkpoint", lambda f, s: _exported(f, s), "2",
                  ("exported", "--no_ema")))
    prompts = {
        "an empty --prompts_file": (text_file("\n  \n"), "2", ["no prompts"]),
        "a missing --prompts_file": (lambda f, s: f / "nope.txt", "2", ["--prompts_file", "No such file"]),
        "a binary --prompts_file": (text_file(b"\xff\xfe\x00\x81"), "2", ["--prompts_file", "UTF-8"]),
    }
    for name, (path, expect, words) in prompts.items():
        c.append(Case(f"sample with {name}", lambda f, s, path=path: [
            "sample", "--checkpoint", s.run, "--prompts_file", path(f, s), "--output_dir", f / "out"],
            expect, tuple(words), nothing_at("out")))
    c.append(Case("sample with a folder as --prompts_file", lambda f, s: [
        "sample", "--checkpoint", s.run, "--prompts_file", f, "--output_dir", f / "out"], "2",
        ("--prompts_file", "Is a directory")))
    c.append(Case("sample from a checkpoint whose text encoder is gone", sample(checkpoint=copy_run(json_file(
        "config.json", lambda d: json.dumps({**d, "text_encoder": "/nonexistent/encoder"})))), "2",
        ("text encoder", "--text_encoder")))
    c.append(Case("sample with no prompts at all", lambda f, s: ["sample", "--checkpoint", s.run, "--output_dir",
                                                                 f / "out"], "2", ("no prompts",)))
    successes = {
        "--guidance_scale 0": (["--guidance_scale", 0], 1),
        "--guidance_scale 1": (["--guidance_scale", 1], 1),
        "--eta 1": (["--eta", 1], 1),
        "--num_inference_steps 1": (["--num_inference_steps", 1], 1),
        "--num_per_prompt 3": (["--num_per_prompt", 3], 3),
        "--sampler ddpm": (["--sampler", "ddpm"], 1),
        "--sampler dpmpp": (["--sampler", "dpmpp"], 1),
        "--save_levels": (["--save_levels"], 1),
        "--no_ema": (["--no_ema"], 1),
        "--seed 2**63-1": (["--seed", 2 ** 63 - 1], 1),
    }
    for name, (options, count) in successes.items():
        c.append(Case(f"sample {name} (control)", sample(*options), "ok", check=images_written(count)))
    for name, prompt in (("an empty prompt", ""), ("a 2,000-character prompt", "a red circle " * 150),
                         ("a prompt in Chinese and emoji", "红色的圆 🔴")):
        c.append(Case(f"sample {name} (control)", lambda f, s, prompt=prompt: [
            "sample", "--checkpoint", s.run, "--prompts", prompt, "--output_dir", f / "out", "--num_inference_steps",
            2], "ok", check=images_written(1)))

    # eval and prefetch.
    c.append(Case("eval of the tiny run, 2 samples (control)", lambda f, s: [
        "eval", "--checkpoint", s.run, "--num_samples", 2, "--num_inference_steps", 1, "--output", f / "eval.json",
        "--no_progress"], "ok", check=lambda f, err: None if (f / "eval.json").exists() else "no eval.json"))
    c.append(Case("eval --num_samples 0", lambda f, s: ["eval", "--checkpoint", s.run, "--num_samples", 0,
                                                        "--output", f / "eval.json"], "2", ("--num_samples",)))
    c.append(Case("eval --guidance_scale nan", lambda f, s: ["eval", "--checkpoint", s.run, "--guidance_scale", "nan",
                                                             "--output", f / "eval.json"], "2", ("--guidance_scale",)))
    c.append(Case("eval a checkpoint not trained on Shapes", lambda f, s: [
        "eval", "--checkpoint", copy_run(json_file("config.json", lambda d: json.dumps({**d, "dataset": "a/b"})))(f, s),
        "--output", f / "eval.json"], "2", ("judge reads Shapes",)))
    c.append(Case("eval --output under a file", lambda f, s: ["eval", "--checkpoint", s.run, "--output",
                                                              a_file(f, s) / "eval.json"], "2", ("--output", "file")))
    c.append(Case("prefetch --dataset_option bogus=1", lambda f, s: ["prefetch", "--dataset", "shapes",
                                                                    "--dataset_option", "bogus=1"], "2", ("bogus",)))
    c.append(Case("prefetch --dataset nope", lambda f, s: ["prefetch", "--dataset", "nope"], "2", ("unknown dataset",)))
    c.append(Case("no command (argparse)", lambda f, s: [], "2", ("required",)))

    # A full disk and read-only folders: a tmpfs of its own at folder/m, in a private mount namespace.
    c.append(Case("disk: train into a read-only folder", train(out="m/out"), "2", ("not writable", "Read-only"),
                  mount=("ro", "1m", False)))
    c.append(Case("disk: sample into a read-only folder", sample(out="m/out"), "2", ("not writable", "--output_dir"),
                  mount=("ro", "1m", False)))
    c.append(Case("disk: resume in a read-only run folder", lambda f, s: [
        "train", "--config", s.config, "--output_dir", f / "m", "--resume", "--max_steps", 6, "--no_progress"], "2",
        ("not writable",), mount=("ro", "30m", True)))
    c.append(Case("disk: eval --output in a read-only folder", lambda f, s: [
        "eval", "--checkpoint", s.run, "--output", f / "m" / "eval.json"], "2", ("--output", "not writable"),
        mount=("ro", "1m", False)))
    c.append(Case("disk: full at the first save", train(out="m/out"), "1", ("No space left", "no checkpoint was saved yet"),
                  mount=("full", "1m", False)))
    c.append(Case("disk: full at a save after a good one", lambda f, s: [
        "train", "--config", s.config, "--output_dir", f / "m", "--resume", "--max_steps", 6, "--no_progress"], "1",
        ("No space left", "checkpoint_000004, is intact", "--resume"), _intact_after_full, mount=("full", 0, True)))
    c.append(Case("disk: sample into a full disk", sample("--num_per_prompt", 8, out="m/out"), "1", ("No space left",),
                  mount=("full", "4k", False)))
    c.append(Case("disk: an immutable run folder (chattr +i)", lambda f, s: _immutable(f, s), "2",
                  ("not writable",), check=lambda f, err: subprocess.run(["chattr", "-i", str(f / "out")]) and None))

    # One run per folder, and Ctrl-C.
    c.append(Case("lock: a second trainer on a folder in use", run=second_trainer(False),
                  words=("in use by another training run",)))
    c.append(Case("lock: a second trainer resuming a folder in use", run=second_trainer(True),
                  words=("in use by another training run",)))
    c.append(Case("lock: a stale lock file (its process gone)", run=stale_lock, expect="ok", check=checkpoint_at(2)))
    c.append(Case("ctrl-c: once, mid-run", run=ctrl_c(1), expect="130", words=("interrupted at step", "--resume")))
    c.append(Case("ctrl-c: twice", run=ctrl_c(2), expect="130", words=("interrupted",)))
    c.append(Case("ctrl-c: once, with 2 DataLoader workers", run=ctrl_c(1, workers=2), expect="130",
                  words=("interrupted at step", "--resume"),
                  check=lambda f, err: None if err.count("stopping after this step") == 1 else "said more than once"))
    c.append(Case("ctrl-c: once, then --resume", run=interrupted_then_resumed, expect="ok"))
    return c


def _dangling(folder, setup):
    copy = copy_run()(folder, setup)
    (copy / "checkpoint_latest").unlink()
    (copy / "checkpoint_latest").symlink_to("checkpoint_999999")
    return copy


def _half_written_log(folder, setup):
    copy = copy_run()(folder, setup)
    with open(copy / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 0.3')
    return copy


def _folder_at(folder, setup, name):
    copy = copy_run()(folder, setup)
    (copy / name).unlink(missing_ok=True)
    (copy / name).mkdir()
    return copy


def _latest_as_text(folder, setup):
    copy = copy_run()(folder, setup)
    (copy / "checkpoint_latest").unlink()
    (copy / "checkpoint_latest").write_text("checkpoint_000009\n")
    return copy


def _diverge_after_a_save(folder, setup):
    subprocess.run([MDM, "train", "--config", str(setup.config), "--output_dir", str(folder / "out"), "--no_progress"],
                   env=ENV, capture_output=True, check=True)
    return ["train", "--config", setup.config, "--output_dir", folder / "out", "--resume", "--max_steps", 4,
            "--lr", "1e30", "--warmup_steps", 0, "--no_progress"]


def _good_or_none(folder, err):
    """After a run that may or may not diverge: any checkpoint it left samples real images."""
    if not (folder / "out" / "checkpoint_latest").exists():
        return None
    done = subprocess.run([MDM, "sample", "--checkpoint", str(folder / "out"), "--prompts", "a", "--output_dir",
                           str(folder / "samples"), "--num_inference_steps", "2"], env=ENV, capture_output=True,
                          text=True)
    return None if done.returncode == 0 else f"its checkpoint does not sample: {done.stderr.strip()[-200:]}"


def _exported(folder, setup):
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from mdm_lite.checkpoint import export

    export(setup.run, folder / "exported")
    return ["sample", "--checkpoint", folder / "exported", "--prompts", "a", "--no_ema", "--output_dir", folder / "out"]


def _immutable(folder, setup):
    out = folder / "out"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        raise Skip("chattr +i is not allowed here")
    return train()(folder, setup)


def _intact_after_full(folder, err):
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from mdm_lite.checkpoint import load_checkpoint

    copy = folder / "m.after"
    if list(copy.glob(".tmp_*")):
        return "the failed save left its temporary folder"
    return None if load_checkpoint(copy).state["step"] == 4 else "checkpoint_latest moved"


class Skip(Exception):
    """The case needs what this machine lacks."""


# --- running and judging -------------------------------------------------------------------

def _mounted(case: Case, argv: list, folder: Path, setup: Setup) -> list:
    """argv run in a private mount namespace with a tmpfs at folder/m, filled and remounted as asked;
    what it holds afterwards is copied to folder/m.after."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        raise Skip("a tmpfs of its own needs root and unshare")
    kind, size, prefill = case.mount
    mount = folder / "m"
    mount.mkdir()
    if prefill and kind == "full":  # just enough room for the run as it is
        size = f"{sum(p.stat().st_size for p in setup.run.rglob('*') if p.is_file()) // 1024 + 512}k"
    steps = [f"mount -t tmpfs -o size={size} tmpfs {mount}"]
    if prefill:
        steps.append(f"cp -a {setup.run}/. {mount}/")
    if kind == "ro":
        steps.append(f"mount -o remount,ro {mount}")
    command = " ".join(_quote(a) for a in [MDM, *map(str, argv)])
    script = " && ".join(steps) + f" && {{ {command}; rc=$?; cp -a {mount}/. {folder}/m.after/ 2>/dev/null; exit $rc; }}"
    (folder / "m.after").mkdir()
    return ["unshare", "-m", "sh", "-c", script]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def run_case(case: Case, folder: Path, setup: Setup) -> None:
    try:
        if case.run is not None:
            status, err = case.run(folder, setup)
        else:
            argv = [str(a) for a in case.argv(folder, setup)]
            copy = folder / "copy"
            if copy.exists():
                (folder / "copy.before.json").write_text(json.dumps(_listing(copy)))
            command = _mounted(case, argv, folder, setup) if case.mount else [MDM, *argv]
            done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, cwd=folder)
            status, err = done.returncode, done.stderr
    except Skip as reason:
        case.outcome, case.detail = "skipped", str(reason)
        return
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    problem = case.check(folder, err) if case.check else None
    if "Traceback (most recent call last)" in err:
        case.outcome, case.detail = "traceback", (lines[-1] if lines else "")[:160]
    elif status == 0:
        if case.expect in ("ok", "any"):
            case.outcome, case.detail = ("silent", problem) if problem else ("ok", "")
        else:
            case.outcome, case.detail = "silent", f"exit 0; {problem or 'no error'}"
    elif status < 0 or status > 130:
        case.outcome, case.detail = "traceback", f"killed by a signal (status {status})"
    elif problem and problem.startswith(("the run folder changed", "checkpoint_latest moved", "the failed save")):
        case.outcome, case.detail = "lost", problem
    else:
        expected = {"2": 2, "1": 1, "130": 130}.get(case.expect, status)
        named = last.startswith("mdm-lite") and all(w in last for w in case.words)
        good = named and status == expected and case.expect != "ok" and not problem
        case.outcome = "clean" if good else "vague"
        case.detail = last[:240] if good else f"exit {status}; {problem or ''} {last[:200]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run only the cases whose name holds this text")
    parser.add_argument("--keep", help="keep the case folders in this directory")
    parser.add_argument("--json", help="write every case and its outcome here")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="mdm-hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = Setup(root / "setup")
    battery = [case for case in cases() if not args.only or args.only in case.name]
    for number, case in enumerate(battery, 1):
        folder = root / f"case_{number:03d}"
        folder.mkdir()
        began = time.perf_counter()
        run_case(case, folder, setup)
        print(f"{number:3d} {case.outcome:9s} {time.perf_counter() - began:5.1f}s  {case.name}: {case.detail}",
              flush=True)
    counts = Counter(case.outcome for case in battery)
    print(f"\n{len(battery)} cases in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{counts[k]} {k}" for k in ("clean", "ok", "traceback", "silent", "vague", "lost", "skipped")))
    if args.json:
        Path(args.json).write_text(json.dumps([{"name": c.name, "expect": c.expect, "outcome": c.outcome,
                                                "detail": c.detail} for c in battery], indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if counts["traceback"] + counts["silent"] + counts["vague"] + counts["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
