"""The nested-against-flat comparison (`mdm_lite.compare`): the flat baseline and the race."""
import json

import pytest
import torch

from mdm_lite import NestedUNet, NestedUNetConfig
from mdm_lite.compare import RACE, flat_baseline, nested_vs_flat
from mdm_lite.train import PRESETS


@pytest.mark.parametrize("nested", [PRESETS["cpu"]().model, NestedUNetConfig()], ids=["cpu-preset", "default"])
def test_the_flat_baseline_is_one_level_with_about_as_many_parameters(nested):
    flat = flat_baseline(nested)
    with torch.device("meta"):
        count = {name: sum(p.numel() for p in NestedUNet(c).parameters()) for name, c in
                 (("nested", nested), ("flat", flat))}
    assert flat.num_levels == 1 and flat.image_size == nested.image_size
    assert abs(count["flat"] - count["nested"]) <= 0.001 * count["nested"], count


def test_the_race_trains_every_model_stage_by_stage_for_its_budget_and_scores_only_64x64_models(tmp_path):
    budget = 6.0
    rows = nested_vs_flat(tmp_path, budget_s=budget, points_s=(budget / 2, budget), num_samples=2, num_inference_steps=2,
                          prompt_sets=("train",))
    assert list(dict.fromkeys(r["model"] for r in rows)) == list(RACE)
    for name, stages in RACE.items():
        mine = [r for r in rows if r["model"] == name]
        sizes = {stage.name: stage.image_size for stage, _ in stages}
        assert mine and all(sizes[r["stage"]] == 64 for r in mine)  # 64x64 stages only
        assert [r["images_seen"] for r in mine] == sorted(r["images_seen"] for r in mine)
        assert mine[-1]["train_time_s"] >= budget and mine[-1]["sets"]["train"]["n"] == 2
        for stage, _ in stages:  # every stage ran, with its own training times and captions
            config = json.loads((tmp_path / name / stage.name / "checkpoint_latest" / "config.json").read_text())
            assert config["model"]["image_size"] == stage.image_size
            assert tuple(config["diffusion"]["time_range"]) == stage.time_range
            assert config["dataset_options"].get("omit", True) is not stage.all_attributes
    params = {r["model"]: r["params"] for r in rows}
    assert abs(params["flat"] - params["nested"]) <= 0.001 * params["nested"]
    assert sum(share for _, share in RACE["progressive"]) == pytest.approx(1.0)
