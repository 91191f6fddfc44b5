"""The flat baseline of the nested-against-flat comparison (`mdm_lite.compare`)."""
import pytest
import torch

from mdm_lite import NestedUNet, NestedUNetConfig
from mdm_lite.compare import flat_baseline
from mdm_lite.train import PRESETS


@pytest.mark.parametrize("nested", [PRESETS["cpu"]().model, NestedUNetConfig()], ids=["cpu-preset", "default"])
def test_the_flat_baseline_is_one_level_with_about_as_many_parameters(nested):
    flat = flat_baseline(nested)
    with torch.device("meta"):
        count = {name: sum(p.numel() for p in NestedUNet(c).parameters()) for name, c in
                 (("nested", nested), ("flat", flat))}
    assert flat.num_levels == 1 and flat.image_size == nested.image_size
    assert abs(count["flat"] - count["nested"]) <= 0.001 * count["nested"], count
