"""Recipes: stages trained in turn, each growing from the last, resumable; the precision choice."""

import dataclasses
import shutil

import pytest
import torch

from mdm_lite.checkpoint import load_checkpoint
from mdm_lite.cli import main
from mdm_lite.recipe import RECIPES, Stage, run_recipe, stage_configs
from mdm_lite.device import choose_precision
from mdm_lite.text import TextEncoder
from mdm_lite.train import ConfigError, TrainConfig, train
from tiny_run import snapshot, state_equal, tiny_config

# The progressive recipe's shape at the tiny model's sizes: one level at 8x8 at a single noise
# level, the same model over every noise level, then grown to 16/8.
TINY_RECIPE = (
    Stage("1_layout", 8, 1, 2, time_range=(0.97, 0.97)),
    Stage("2_all", 8, 1, 1, time_power=3.0),
    Stage("3_grown", 16, 2, 2, time_power=3.0),
)


@pytest.fixture
def tiny_recipe(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setitem(RECIPES, "tiny", TINY_RECIPE)
    return "tiny"


@pytest.mark.parametrize("outer_patch", [1, 2])
def test_every_stage_of_the_progressive_recipe_grows_from_the_one_before(outer_patch):
    model = dataclasses.replace(TrainConfig().model, outer_patch=outer_patch)
    configs = stage_configs(TrainConfig(output_dir="out", model=model), "progressive", last_steps=123)
    assert [c.output_dir for c in configs] == [f"out/{s.name}" for s in RECIPES["progressive"]]
    assert configs[0].diffusion.time_range == (0.97, 0.97) and configs[0].init_from is None
    assert configs[-1].model == model and configs[-1].max_steps == 123
    for before, after in zip(configs, configs[1:]):
        assert after.init_from == f"{before.output_dir}/checkpoint_latest"
        # the same model trained on, or one more level around it (NestedUNet.wrap)
        grown = after.model.num_levels == before.model.num_levels + 1 and after.model.inner_levels() == before.model
        assert after.model == before.model or grown


def test_the_lr_cool_down_applies_to_the_last_stage_only():
    configs = stage_configs(TrainConfig(output_dir="out", lr_decay_steps=100), "progressive", last_steps=1000)
    assert [c.lr_decay_steps for c in configs] == [0] * (len(configs) - 1) + [100]


def test_the_layout_stage_trains_on_shapes_captions_that_name_every_attribute():
    shapes = stage_configs(TrainConfig(output_dir="out", dataset_options={"seed": 3}), "progressive")
    assert shapes[0].dataset_options == {"seed": 3, "omit": False}
    assert all(c.dataset_options == {"seed": 3} for c in shapes[1:])
    other = stage_configs(TrainConfig(output_dir="out", dataset="flickr30k"), "progressive")
    assert all(c.dataset_options == {} for c in other)


def test_a_recipe_trains_its_stages_in_turn_and_a_second_call_resumes_nothing(tiny_recipe, tmp_path):
    base = tiny_config(tmp_path / "run")
    result = run_recipe(base, tiny_recipe, progress=False)
    for stage in TINY_RECIPE:
        ckpt = load_checkpoint(tmp_path / "run" / stage.name)
        assert ckpt.state["step"] == stage.steps
        assert ckpt.config["model"]["num_levels"] == stage.num_levels
        assert tuple(ckpt.config["diffusion"]["time_range"]) == stage.time_range
    assert result.config.output_dir == str(tmp_path / "run" / "3_grown")
    before = snapshot(tmp_path / "run")
    assert run_recipe(base, tiny_recipe, progress=False, resume=True) is None
    assert snapshot(tmp_path / "run") == before
    with pytest.raises(ConfigError, match="--resume"):
        run_recipe(base, tiny_recipe, progress=False)


def test_the_stages_of_a_recipe_share_one_encoder_and_embed_each_caption_once(tiny_recipe, tmp_path, monkeypatch):
    # the later stages draw the same captions again; a new encoder per stage embedded them anew
    embedded, original = [], TextEncoder._encode_uncached
    monkeypatch.setattr(TextEncoder, "_encode_uncached", lambda self, c: embedded.extend(c) or original(self, c))
    run_recipe(tiny_config(tmp_path / "run"), tiny_recipe, progress=False)
    assert embedded and len(embedded) == len(set(embedded))


def test_train_refuses_an_encoder_other_than_its_configs(tmp_path):
    other = TextEncoder()
    other.name_or_path = "someone/else"
    with pytest.raises(ConfigError, match="text encoder passed to train is 'someone/else'"):
        train(tiny_config(tmp_path / "run"), progress=False, encoder=other)


def test_a_recipe_stopped_in_its_last_stage_resumes_to_the_weights_of_an_unbroken_one(tiny_recipe, tmp_path):
    straight = run_recipe(tiny_config(tmp_path / "a"), tiny_recipe, progress=False)
    run_recipe(tiny_config(tmp_path / "b"), tiny_recipe, last_steps=1, progress=False)
    resumed = run_recipe(tiny_config(tmp_path / "b"), tiny_recipe, last_steps=2, progress=False, resume=True)
    assert state_equal(straight.model.state_dict(), resumed.model.state_dict())


def test_a_grown_run_resumes_without_the_checkpoint_it_grew_from(tiny_recipe, tmp_path):
    # the shipped model's last stage is committed alone (runs/shapes/4_full64), without stage 3
    straight = run_recipe(tiny_config(tmp_path / "a"), tiny_recipe, progress=False)
    run_recipe(tiny_config(tmp_path / "b"), tiny_recipe, last_steps=1, progress=False)
    shutil.rmtree(tmp_path / "b" / "2_all")
    last = stage_configs(tiny_config(tmp_path / "b"), tiny_recipe, last_steps=2)[-1]
    resumed = train(last, progress=False, resume=True)
    assert state_equal(straight.model.state_dict(), resumed.model.state_dict())


def test_options_of_a_single_run_with_the_default_recipe_exit_2_naming_recipe_none(tmp_path, capsys):
    assert main(["train", "--image_size", "32", "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recipe none" in err[0]


def test_precision_auto_uses_bf16_exactly_where_the_cpu_has_bf16_dot_products_and_says_why(monkeypatch):
    assert choose_precision("fp32", torch.device("cpu")) == (False, "--precision fp32")
    assert choose_precision("bf16", torch.device("cpu"))[0] is True
    bf16, why = choose_precision("auto", torch.device("cpu"))
    assert bf16 == (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    assert "AMX" in why or "AVX512-BF16" in why
    lacks = "this CPU lacks native bf16 (neither AMX nor AVX512-BF16)"
    for amx, avx512_bf16, expected in [(True, True, (True, "this CPU has AMX bf16 matrix units")),
                                       (False, True, (True, "this CPU has AVX512-BF16 dot products")),
                                       (False, False, (False, lacks))]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert choose_precision("auto", torch.device("cpu")) == expected
