"""The mdm-lite command: bad input ends in one line that says what to do; sample writes what it says."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mdm_lite.checkpoint import resolve_checkpoint
from mdm_lite.cli import main
from tiny_run import snapshot, trained_run, write_tiny_json

train_module = importlib.import_module("mdm_lite.train")  # `import mdm_lite.train` gives the function


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _call(capsys, *argv) -> tuple[int, list[str], str]:
    """Run `mdm-lite argv` in this process: (exit status, stderr lines, stdout)."""
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.err.splitlines(), out.out


# Each bad input: (what to run given tmp_path, the run's output_dir and a --config file;
# the path that must stay as it was; words of the one-line message that say what to do).
def _copy_of_run(tmp, run_dir):
    shutil.copytree(run_dir, tmp / "copy", symlinks=True)
    return tmp / "copy"


def _corrupt_copy(tmp, run_dir):
    copy = tmp / "corrupt"
    shutil.copytree(resolve_checkpoint(run_dir), copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy


def _a_file(tmp):
    (tmp / "file").write_text("not a directory\n")
    return tmp / "file"


def _misspelt_config(tmp):
    config = json.loads(write_tiny_json(tmp / "misspelt.json").read_text())
    config["model"]["image_sise"] = config["model"].pop("image_size")
    (tmp / "misspelt.json").write_text(json.dumps(config))
    return tmp / "misspelt.json"


def _empty_prompts(tmp):
    (tmp / "prompts.txt").write_text("\n  \n")
    return tmp / "prompts.txt"


BAD_INPUT = {
    "missing checkpoint": (lambda tmp, run, cfg: ["sample", "--checkpoint", tmp / "nothing", "--prompts", "a",
                                                  "--output_dir", tmp / "out"], "out", "mdm-lite train"),
    "corrupt checkpoint": (lambda tmp, run, cfg: ["sample", "--checkpoint", _corrupt_copy(tmp, run), "--prompts", "a",
                                                  "--output_dir", tmp / "out"], "corrupt", "checkpoint_NNNNNN"),
    "checkpoint of another config": (
        lambda tmp, run, cfg: ["train", "--config", cfg, "--output_dir", _copy_of_run(tmp, run), "--resume",
                               "--image_size", "8", "--num_levels", "1", "--no_progress"], "copy", "resume with the same"),
    "unknown preset": (lambda tmp, run, cfg: ["train", "--preset", "huge", "--output_dir", tmp / "out"], "out",
                       "use one of cpu"),
    "unknown dataset": (lambda tmp, run, cfg: ["train", "--config", cfg, "--dataset", "imagenet-21k", "--output_dir",
                                               tmp / "out", "--no_progress"], "out", "use shapes"),
    "misspelt model field in --config": (lambda tmp, run, cfg: ["train", "--config", _misspelt_config(tmp),
                                                                "--output_dir", tmp / "out"], "out", "image_sise"),
    "batch size 0": (lambda tmp, run, cfg: ["train", "--config", cfg, "--batch_size", "0", "--output_dir", tmp / "out"],
                     "out", "positive integer"),
    "time_power 0": (lambda tmp, run, cfg: ["train", "--config", cfg, "--time_power", "0", "--output_dir",
                                            tmp / "out"], "out", "1: uniform"),
    "time_range reversed": (lambda tmp, run, cfg: ["train", "--config", cfg, "--time_range", "0.9", "0.5",
                                                   "--output_dir", tmp / "out"], "out", "0.97 0.97 for one"),
    "negative lr": (lambda tmp, run, cfg: ["train", "--config", cfg, "--lr", "-1", "--output_dir", tmp / "out"], "out",
                    "positive number"),
    "no prompts": (lambda tmp, run, cfg: ["sample", "--checkpoint", run, "--prompts_file", _empty_prompts(tmp),
                                          "--output_dir", tmp / "out"], "out", "pass --prompts"),
    "train output_dir is a file": (lambda tmp, run, cfg: ["train", "--config", cfg, "--output_dir", _a_file(tmp)],
                                   "file", "pass a directory"),
    "sample output_dir is a file": (lambda tmp, run, cfg: ["sample", "--checkpoint", run, "--prompts", "a",
                                                           "--output_dir", _a_file(tmp)], "file", "pass a directory"),
    "train on a missing GPU": (lambda tmp, run, cfg: ["train", "--config", cfg, "--device", "cuda", "--output_dir",
                                                      tmp / "out"], "out", "use --device cpu"),
    "sample on a missing GPU": (lambda tmp, run, cfg: ["sample", "--checkpoint", run, "--prompts", "a", "--device",
                                                       "cuda", "--output_dir", tmp / "out"], "out", "use --device cpu"),
    "output_dir holds a run": (lambda tmp, run, cfg: ["train", "--config", cfg, "--output_dir", _copy_of_run(tmp, run),
                                                      "--no_progress"], "copy", "pass --resume"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_that_says_what_to_do_and_touches_nothing(case, run, tmp_path, capsys):
    if "GPU" in case and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    argv, watched, advice = BAD_INPUT[case]
    argv = argv(tmp_path, run.config.output_dir, write_tiny_json(tmp_path / "tiny.json"))
    watched, before_run = tmp_path / watched, snapshot(Path(run.config.output_dir))
    before = snapshot(watched) if watched.is_dir() else watched.read_bytes() if watched.exists() else None
    status, err, _ = _call(capsys, *argv)
    assert status == 2
    assert len(err) == 1 and err[0].startswith("mdm-lite: error: ") and advice in err[0], err
    after = snapshot(watched) if watched.is_dir() else watched.read_bytes() if watched.exists() else None
    assert after == before  # nothing saved is touched, nothing new written
    assert snapshot(Path(run.config.output_dir)) == before_run


def test_a_diverged_run_exits_1_with_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    multires_loss, calls = train_module.multires_loss, []

    def nan_on_the_third_step(*args, **kwargs):
        total, losses = multires_loss(*args, **kwargs)
        calls.append(1)
        return (total * float("nan") if len(calls) == 3 else total), losses

    monkeypatch.setattr(train_module, "multires_loss", nan_on_the_third_step)
    output_dir = tmp_path / "run"
    status, err, _ = _call(capsys, "train", "--config", write_tiny_json(tmp_path / "tiny.json"), "--output_dir",
                           output_dir, "--no_progress")
    assert status == 1
    # The run's one-line header, then the error: one line, no traceback.
    assert len(err) == 2 and err[0].startswith("mdm-lite train: ") and err[1].startswith("mdm-lite: loss became nan")
    assert str((output_dir / "checkpoint_000002").resolve()) in err[1] and "Traceback" not in "".join(err)
    assert resolve_checkpoint(output_dir).name == "checkpoint_000002"


def test_resuming_a_finished_run_says_there_is_nothing_to_train_and_prints_the_summary(run, tmp_path, capsys):
    copy = _copy_of_run(tmp_path, run.config.output_dir)
    checkpoints = sorted(p.name for p in copy.glob("checkpoint_0*"))
    status, err, out = _call(capsys, "train", "--config", write_tiny_json(tmp_path / "tiny.json"), "--output_dir", copy,
                             "--resume", "--no_progress")
    assert status == 0, err
    assert f"mdm-lite train: {copy} is already at step 4 of 4, nothing to train; raise --max_steps (or --epochs) " \
           "to train on" in err, err
    assert "checkpoint_000004" in out and "next: mdm-lite sample" in out
    assert sorted(p.name for p in copy.glob("checkpoint_0*")) == checkpoints


def test_a_real_mdm_lite_process_with_a_missing_checkpoint_prints_one_line_and_no_traceback(tmp_path):
    command = [str(Path(sys.executable).parent / "mdm-lite"), "sample", "--checkpoint", str(tmp_path / "nothing"),
               "--prompts", "a red circle", "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "no checkpoint at" in done.stderr and not (tmp_path / "out").exists()


def _sample(capsys, run, output_dir, *options):
    status, err, out = _call(capsys, "sample", "--checkpoint", run.config.output_dir, "--prompts", "a red circle",
                             "a small blue star", "--output_dir", output_dir, "--num_inference_steps", 2, *options)
    assert status == 0, err
    return out


def test_sample_writes_numbered_pngs_a_grid_and_prompts_json(run, tmp_path, capsys):
    _sample(capsys, run, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "grid.png", "prompts.json", "sample_0000.png", "sample_0001.png"]
    assert Image.open(tmp_path / "out" / "sample_0000.png").size == (16, 16)
    assert json.loads((tmp_path / "out" / "prompts.json").read_text()) == [
        {"file": "sample_0000.png", "prompt": "a red circle"},
        {"file": "sample_0001.png", "prompt": "a small blue star"}]


def test_sample_shows_a_progress_bar_unless_no_progress_and_reports_seconds_per_image(run, tmp_path, capsys):
    for flag in ([], ["--no_progress"]):
        status, err, out = _call(capsys, "sample", "--checkpoint", run.config.output_dir, "--prompts", "a red circle",
                                 "--output_dir", tmp_path / "out", "--num_inference_steps", 3, "--sampler", "dpmpp",
                                 "--num_per_prompt", 2, *flag)
        assert status == 0
        assert ("dpmpp steps, 2 images" in "".join(err)) == (not flag)  # tqdm draws on stderr
        assert re.search(r"3 dpmpp steps in (fp32|bf16), [0-9.]+ s \([0-9.]+ s/image\)", out), out


def test_save_levels_puts_every_level_side_by_side(run, tmp_path, capsys):
    _sample(capsys, run, tmp_path / "out", "--save_levels")
    assert Image.open(tmp_path / "out" / "sample_0001.png").size == (16 * 2, 16)  # width R * num_levels


def test_the_same_seed_gives_identical_files_and_another_seed_does_not(run, tmp_path, capsys):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        _sample(capsys, run, tmp_path / name, "--seed", seed)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert (tmp_path / "a" / "sample_0000.png").read_bytes() != (tmp_path / "c" / "sample_0000.png").read_bytes()


@pytest.mark.parametrize("command, shown", [
    ("train", ["--max_steps MAX_STEPS", "(cpu preset: 300)", "--lr LR", "(cpu preset: 0.002)",
               "(cpu preset: 1.0)", "(cpu preset: 0.0 1.0)"]),
    ("sample", ["(default: 15)", "(default: [0.4, 1.0])", "(default: dpmpp)", "(default: auto)",
                "(default: generated)", "(default: 0)", "or shapes (the one shipped in the package)"]),
    ("eval", ["(default: 256)", "(default: ['train', 'phrasing', 'pairs'])", "(default: eval.json)",
              "(default: 15)", "(default: [0.4, 1.0])", "(default: dpmpp)", "(default: auto)"]),
    ("demo", ["(default: shapes)", "(default: 7860)", "(default: 127.0.0.1)"]),
])
def test_help_shows_every_default(command, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for fragment in shown:
        assert fragment in text, fragment
    assert "(default: None)" not in text and "(default: False)" not in text


def test_eval_of_the_shipped_checkpoint_writes_eval_json_in_the_current_folder_not_in_the_package(
        tmp_path, monkeypatch, capsys):
    shipped = resolve_checkpoint("shapes")
    before = snapshot(shipped)
    monkeypatch.chdir(tmp_path)
    status, err, out = _call(capsys, "eval", "--checkpoint", "shapes", "--num_samples", 2, "--num_inference_steps", 1,
                             "--prompts", "train", "--device", "cpu")
    assert status == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint"] == str(shipped)
    assert "wrote eval.json" in out and snapshot(shipped) == before


def test_demo_without_gradio_is_one_line_that_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "mdm_lite.demo", raising=False)
    status, err, _ = _call(capsys, "demo")
    assert status == 2 and err == ['mdm-lite: error: the demo needs Gradio: pip install "mdm-lite[demo]"']
