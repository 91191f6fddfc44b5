"""Nested against flat at equal wall-clock time and parameters, on Shapes (issue 7; book chapter 9).

Trains the CPU preset's 3-level NestedUNet and `flat_baseline` of it for the same training time,
evaluates both at several points (prompt accuracy with its 95% interval, judge Fréchet distance),
prints the table, and writes it as JSON with a plot next to it.

    OMP_NUM_THREADS=2 python benchmarks/nested_vs_flat.py --budget_s 1800 --num_points 6 --num_samples 256
"""
import argparse
import json
import tempfile
from pathlib import Path

from mdm_lite.compare import nested_vs_flat, plot_comparison


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_s", type=float, default=600, help="training seconds per model")
    parser.add_argument("--num_points", type=int, default=3)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--output", default="nested_vs_flat.json", help="the table as JSON; the plot goes beside it")
    args = parser.parse_args()
    rows = nested_vs_flat(tempfile.mkdtemp(prefix="nested_vs_flat_"), budget_s=args.budget_s,
                          num_points=args.num_points, num_samples=args.num_samples,
                          num_inference_steps=args.num_inference_steps)
    for r in rows:
        lo, hi = r["prompt_accuracy_ci95"]
        print(f"{r['model']:6s} {r['params'] / 1e6:5.2f}M  t={r['train_time_s']:6.0f}s  step {r['step']:5d}  "
              f"prompt accuracy {r['prompt_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  judge FD {r['judge_fd']:8.1f}")
    output = Path(args.output)
    output.write_text(json.dumps(rows, indent=2))
    plot_comparison(rows).savefig(output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
