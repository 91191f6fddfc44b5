"""The Shapes checkpoint shipped in the package loads by name and samples."""
import json

import torch

from mdm_lite import MDMPipeline
from mdm_lite.checkpoint import PRETRAINED, load_checkpoint


def test_shipped_checkpoint_is_small_safetensors_and_json():
    path = PRETRAINED["shapes"]
    assert {p.name for p in path.iterdir()} >= {"ema.safetensors", "config.json", "state.json", "TRAINING.md"}
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin")) and not list(path.glob("*.pkl"))
    assert sum(p.stat().st_size for p in path.iterdir()) < 8_000_000
    ckpt = load_checkpoint("shapes")
    assert ckpt.model is None and ckpt.state["step"] > 0
    assert json.loads((path / "config.json").read_text())["dataset"] == "shapes"


def test_shipped_checkpoint_samples_every_level_by_name():
    pipe = MDMPipeline.from_pretrained("shapes", device="cpu")
    out = pipe(["a large red circle in the center on a white background"], num_inference_steps=2, output_type="pt")
    assert [x.shape[-1] for x in out.levels] == [64, 32, 16]
    assert out.images.shape == (1, 3, 64, 64) and out.images.abs().max() <= 1
    again = pipe(["a large red circle in the center on a white background"], num_inference_steps=2, output_type="pt")
    assert torch.equal(out.images, again.images)


def test_bf16_sampling_follows_fp32_to_bf16_rounding_and_auto_picks_it_where_training_does():
    from mdm_lite.device import choose_precision

    pipe = MDMPipeline.from_pretrained("shapes", device="cpu")
    prompts = ["a large red circle in the center on a white background", "a small blue star top left"]
    fp32, bf16, auto = (pipe(prompts, num_inference_steps=5, output_type="pt", precision=precision)
                        for precision in ("fp32", "bf16", "auto"))
    for a, b in zip(fp32.levels, bf16.levels):  # measured: mean 0.005 to 0.008, on images in [-1, 1]
        assert 0 < (a - b).abs().mean() < 0.03
    native = choose_precision("auto", pipe.device)[0]
    assert pipe.uses_bf16("auto") == native
    assert all(torch.equal(a, b) for a, b in zip(auto.levels, (bf16 if native else fp32).levels))


def test_a_checkpoint_from_before_the_downsample_option_loads_with_the_stride_2_conv_it_was_trained_with(tmp_path):
    from mdm_lite.unet import Downsample

    path = PRETRAINED["shapes"]
    shipped = json.loads((path / "config.json").read_text())
    for name, choice in (("old", None), ("stride", "stride"), ("pool", "pool")):
        config = json.loads(json.dumps(shipped))
        config["model"]["inner"].pop("downsample", None)  # config.json as written before the option
        if choice:
            config["model"]["inner"]["downsample"] = choice
        copy = tmp_path / name
        copy.mkdir()
        for f in path.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        (copy / "config.json").write_text(json.dumps(config))
        expected = choice or "stride"
        assert load_checkpoint(copy).config["model"]["inner"]["downsample"] == expected
        pipe = MDMPipeline.from_pretrained(copy, device="cpu")
        layers = [m for m in pipe.model.modules() if isinstance(m, Downsample)]
        assert layers and all(m.stride == (expected == "stride") for m in layers), name
