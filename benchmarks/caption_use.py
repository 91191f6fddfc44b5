"""Which words of a caption does a checkpoint use? The loss with one attribute of the caption changed.

    OMP_NUM_THREADS=1 python benchmarks/caption_use.py [--checkpoint shapes] [--num_scenes 64] [--no_ema]

For a fixed set of single-object Shapes scenes, noised at a few fixed times t with fixed noise,
prints the model's v-MSE per level with the true caption and with the same caption in which one
attribute (position, shape, colour, size or background) is replaced by another value. A model
that uses a word does worse when the word is wrong; a model that ignores it scores the same.
It tells from the loss alone (about 90 s on one CPU thread for the shipped model) what
`mdm-lite eval` tells from samples, and it shows at which noise levels the caption matters (near t = 1, where the image is noise).
"""
import argparse
import random

import torch

from mdm_lite import MDMPipeline
from mdm_lite.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, caption_for, make_scene, render_scene
from mdm_lite.diffusion import image_pyramid
from mdm_lite.schedule import add_noise, velocity

VALUES = {"position": POSITIONS, "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES),
          "background": tuple(BACKGROUNDS)}


def changed(scenes: list[dict], attribute: str) -> list[dict]:
    """The scenes with `attribute` replaced by another value, drawn with a fixed seed per scene."""
    out = []
    for i, scene in enumerate(scenes):
        others = [v for v in VALUES[attribute] if v != scene[attribute]]
        out.append({**scene, attribute: random.Random(f"{attribute}/{i}").choice(others)})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="shapes", help="checkpoint directory, output_dir, or shapes")
    parser.add_argument("--num_scenes", type=int, default=64, help="training-split scenes, seed 0")
    parser.add_argument("--times", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.98, 0.995])
    parser.add_argument("--no_ema", action="store_true", help="the raw weights instead of their moving average")
    args = parser.parse_args()

    pipe = MDMPipeline.from_pretrained(args.checkpoint, device="cpu", use_ema=not args.no_ema)
    model = pipe.model.eval()
    scenes = [make_scene(i, seed=0, difficulty="single")[1] for i in range(args.num_scenes)]
    xs = image_pyramid(torch.stack([render_scene(s, pipe.resolutions[0]) for s in scenes]), len(pipe.resolutions))
    captions = {"true": scenes, **{a: changed(scenes, a) for a in VALUES}}
    text = {name: pipe.text_encoder.encode([caption_for(s) for s in variant]) for name, variant in captions.items()}

    levels = "/".join(str(r) for r in pipe.resolutions)
    print(f"{args.checkpoint}: v-MSE per level ({levels}), {args.num_scenes} scenes, canonical captions")
    print(f"{'t':>6}" + "".join(f"{name:>22}" for name in captions))
    generator = torch.Generator()
    for t_value in args.times:
        t = torch.full((args.num_scenes,), t_value)
        generator.manual_seed(0)  # the same noise for every caption variant
        zs, targets = [], []
        for x in xs:
            logsnr = pipe.diffusion.logsnr(t, x.shape[-1])
            eps = torch.randn(x.shape, generator=generator)
            zs.append(add_noise(x, eps, logsnr))
            targets.append(velocity(x, eps, logsnr))
        row = []
        for embedding in text.values():
            with torch.no_grad():
                predictions = model(zs, t, embedding.tokens, embedding.mask)
            row.append("/".join(f"{(p - y).pow(2).mean().item():.4f}" for p, y in zip(predictions, targets)))
        print(f"{t_value:>6}" + "".join(f"{cell:>22}" for cell in row))


if __name__ == "__main__":
    main()
