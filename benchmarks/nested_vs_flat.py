"""Nested against flat at equal training time and parameters, on Shapes (issue 18; book chapter 9).

Trains the CPU preset's 3-level NestedUNet end to end, its flat baseline of equal parameters, and
the NestedUNet grown progressively, each for --budget_s seconds of training with the project's
recipe where it applies (`mdm_lite.compare.RACE`); evaluates every 64x64 model at --points
(prompt accuracy and layout accuracy with their 95% intervals, judge Fréchet distance, on
training-style prompts and held-out phrasings); writes the rows as JSON after every point (the
chapter reads it), the curves as a PNG beside it, and a grid of samples of each final model.

    OMP_NUM_THREADS=1 python benchmarks/nested_vs_flat.py --budget_s 1800 \\
        --output book/results/nested_vs_flat.json --work_dir runs/race

Models run one after another; --models runs some of them (two processes can run two at once,
each with its own --output, and --merge joins their JSON files).
"""
import argparse
import json
from pathlib import Path

from mdm_lite import MDMPipeline
from mdm_lite.compare import RACE, nested_vs_flat, plot_comparison, race_prompts
from mdm_lite.plotting import save_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_s", type=float, default=1800, help="seconds of training per model")
    parser.add_argument("--points", type=float, nargs="+", default=[150, 300, 600, 900, 1200, 1500, 1800],
                        help="seconds of training at which each model is evaluated; training stops at the last")
    parser.add_argument("--num_samples", type=int, default=64, help="generated images per prompt set and point")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LOW", "HIGH"),
                        help="guided times (default: every step, as book/results/nested_vs_flat.json was sampled)")
    parser.add_argument("--models", nargs="+", default=list(RACE), choices=list(RACE))
    parser.add_argument("--work_dir", default="runs/race", help="where the training runs go")
    parser.add_argument("--output", default="nested_vs_flat.json", help="the rows as JSON; the plot goes beside it")
    parser.add_argument("--merge", nargs="*", default=[], help="JSON files of earlier runs to put in front of this one's")
    args = parser.parse_args()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    earlier = [row for path in args.merge for row in json.loads(Path(path).read_text())]
    rows = list(earlier)

    def write(row):
        rows.append(row)
        output.write_text(json.dumps(rows, indent=1))

    nested_vs_flat(args.work_dir, budget_s=args.budget_s, points_s=args.points, num_samples=args.num_samples,
                   num_inference_steps=args.num_inference_steps, guidance_interval=tuple(args.guidance_interval),
                   models=tuple(args.models), on_row=write)
    plot_comparison(rows).savefig(output.with_suffix(".png"))
    prompts = race_prompts()
    for name in args.models:
        pipe = MDMPipeline.from_pretrained(Path(args.work_dir, name, RACE[name][-1][0].name), device="cpu")
        images = pipe(prompts, num_inference_steps=args.num_inference_steps, guidance_scale=3.0,
                      guidance_interval=tuple(args.guidance_interval), seed=0, output_type="pt").images
        save_grid(images, output.with_name(f"samples_{name}.png"), nrow=len(prompts))
    print(f"wrote {output}, {output.with_suffix('.png')} and a sample grid per model beside them")


if __name__ == "__main__":
    main()
