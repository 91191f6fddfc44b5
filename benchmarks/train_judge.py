"""Train the Shapes judge shipped in mdm_lite/assets/, and measure it on fresh renders.

    OMP_NUM_THREADS=1 python benchmarks/train_judge.py [--steps 1500] [--out mdm_lite/assets/judge.safetensors]

Trains with `mdm_lite.judge.train_judge` (fp32, one CPU thread), then scores the judge on
scenes drawn with a seed the training never used, from both splits (train pairs and held-out
shape-colour pairs): clean renders, renders under the training perturbations (fresh random
draws), and under perturbations 1.5x stronger than any seen in training. Writes the weights and
a JSON record (command, time, settings, accuracies) beside them.
"""
import argparse
import json
import sys
import time

import torch

from mdm_lite.data import ShapesDataset
from mdm_lite.judge import JUDGE_PATH, perturb, save_judge, train_judge
from mdm_lite.metrics import frechet_distance, prompt_accuracy


def fresh_renders(n: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """n renders, half from each split, of scenes drawn with `seed`."""
    items = [ShapesDataset(length=n // 2, seed=seed, split=split)[i] for split in ("train", "heldout")
             for i in range(n // 2)]
    return torch.stack([it["image"] for it in items]), [it["attributes"] for it in items]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_samples", type=int, default=4000)
    parser.add_argument("--eval_seed", type=int, default=1)
    parser.add_argument("--out", default=str(JUDGE_PATH))
    args = parser.parse_args()
    torch.set_num_threads(1)

    judge, record = train_judge(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    images, attributes = fresh_renders(args.eval_samples, args.eval_seed)
    generator = torch.Generator().manual_seed(args.eval_seed)
    evaluation = {}
    for name, strength in (("clean", 0.0), ("perturbed", 1.0), ("perturbed_x1.5", 1.5)):
        x = images if strength == 0 else perturb(images, generator, strength)
        scores = prompt_accuracy(x, attributes, judge)
        evaluation[name] = {"accuracy": scores["accuracy"], "ci95": scores["ci95"], **scores["per_attribute"]}
    noise = torch.rand(images.shape, generator=generator) * 2 - 1
    scores = prompt_accuracy(noise, attributes, judge)
    evaluation["noise"] = {"accuracy": scores["accuracy"], **scores["per_attribute"]}
    half = len(images) // 2
    other, _ = fresh_renders(args.eval_samples, args.eval_seed + 1)
    evaluation["judge_fd"] = {"real_vs_real": frechet_distance(images, other, judge),
                              "real_vs_noise": frechet_distance(images, noise, judge),
                              "train_split_vs_heldout_split": frechet_distance(images[:half], images[half:], judge)}
    record |= {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
               "parameters": sum(p.numel() for p in judge.parameters()),
               "eval": {"samples": len(images), "seed": args.eval_seed, **evaluation}}
    save_judge(judge, args.out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
