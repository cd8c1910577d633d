"""Why ``presets.cpu_config`` looks the way it does: the CPU recipe built up one change at a time.

    .venv/bin/python benchmarks/cpu_recipe.py [--variants paper-c4,stride8,...] [--threads 1]

Each variant trains Faster R-CNN from scratch on the shapes data (batch 8, one-cycle schedule,
seed 0) and prints box AP50 / AP on 500 held-out images with the training time. The ladder starts
at ``ModelConfig``'s paper-like defaults (stride 16, RPN IoU 0.7 and 256 anchors per image, 25 %
positive RoIs, lr 0.02) and adds the recipe's changes; chapter 05 quotes the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from course_lib import data, evaluate, model, presets, train, utils

PAPER = dict(width=32)   # ModelConfig's defaults are the paper-like design; only the trunk is the recipe's width
RPN = {**PAPER, "rpn_fg_iou": 0.5, "rpn_batch_size_per_image": 64}
STRIDE8 = {**RPN, "stride": 8}
POSITIVES = {**STRIDE8, "box_positive_fraction": 0.5}
# name: (changes to ModelConfig, steps, lr); "cpu_config" is exactly presets.cpu_config()
VARIANTS = {
    "paper-c4":        (PAPER, 800, 0.02),
    "rpn-iou-0.5":     (RPN, 800, 0.02),
    "stride8":         (STRIDE8, 800, 0.02),
    "fpn":             ({**RPN, "fpn": True}, 800, 0.02),
    "pos0.5-lr0.06":   (POSITIVES, 800, 0.06),
    "width64":         ({**POSITIVES, "width": 64}, 800, 0.06),
    "1600-steps":      (POSITIVES, 1600, 0.06),
    "cpu_config":      (presets.CPU_RECIPE, 2400, 0.06),
}


def run(name: str, threads: int) -> str:
    changes, steps, lr = VARIANTS[name]
    torch.set_num_threads(threads)
    utils.seed_everything(0)
    detector = model.MaskRCNN(dataclasses.replace(model.ModelConfig(), **changes, with_mask=False))
    start = time.perf_counter()
    train.fit(detector, data.ShapesDataset(steps * 8, seed=0), presets.cpu_training(steps, lr=lr), progress=False)
    minutes = (time.perf_counter() - start) / 60
    box = evaluate.coco_evaluate(detector, data.ShapesDataset(500, seed=1))["bbox"]
    return (f"{name:14s} steps {steps:5d}  lr {lr:.2f}  train {minutes:4.1f} min ({threads} threads)  "
            f"box AP50 {box['AP50']:.3f}  AP {box['AP']:.3f}  APs {box['APs']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        print(run(name, args.threads), flush=True)


if __name__ == "__main__":
    main()
