"""Chapter 07, exercise 1: the FPN model trained with the level mapping's canonical size 36 and 224.

    .venv/bin/python benchmarks/fpn_canonical.py --jobs 2      # about 5 min on a quiet 2-core CPU

Trains chapter 07's FPN model (``presets.cpu_config(fpn=True)``, its data, steps and schedule)
once with ``canonical_size=36`` (the course's) and once with 224 (the FPN paper's, made for
800 px images), one thread per run, and records box and mask AP by object size and which pyramid
levels the RoI heads pool from: the level of every RPN proposal the heads receive on the
validation images, and of every detection scoring at least 0.5. Writes
``data/results/fpn_canonical.json``; chapter 07's solution prints it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import time
from pathlib import Path

import torch

from course_lib import data, evaluate, fpn, model, presets, train, utils

DEFAULT_OUT = utils.repo_root() / "data" / "results" / "fpn_canonical.json"
STEPS, NUM_TRAIN, NUM_VAL = 300, 4000, 200    # chapter 07, section 4 (default mode)
CANONICAL_SIZES = (36, 224)


def levels_used(detector: model.MaskRCNN, dataset) -> dict[str, list[int]]:
    """How many RPN proposals (the RoI heads' input) and detections >= 0.5 fall on P2, P3, P4, P5."""
    proposals = []
    hook = detector.rpn.register_forward_hook(lambda module, inputs, output: proposals.extend(output[0]))
    detections = evaluate.predict(detector, dataset)
    hook.remove()
    config = detector.config

    def count(boxes: list[torch.Tensor]) -> list[int]:
        levels = fpn.assign_levels(torch.cat(boxes), 2, 5, config.canonical_size, config.canonical_level)
        return torch.bincount(levels, minlength=4).tolist()                       # [4]: P2..P5

    return {"proposals": count(proposals),
            "detections": count([d["boxes"][d["scores"] >= 0.5] for d in detections])}


def measure(canonical_size: int) -> dict:
    """Train and evaluate one canonical size with one thread (runs in a worker process)."""
    torch.set_num_threads(1)
    utils.seed_everything(0)
    detector = model.MaskRCNN(presets.cpu_config(fpn=True, canonical_size=canonical_size))
    start = time.perf_counter()
    train.fit(detector, data.ShapesDataset(NUM_TRAIN, seed=1), presets.cpu_training(STEPS), progress=False)
    minutes = (time.perf_counter() - start) / 60
    val_set = data.ShapesDataset(NUM_VAL, seed=2)
    metrics = evaluate.coco_evaluate(detector, val_set)
    return {"canonical_size": canonical_size, "train_minutes": round(minutes, 2), "threads": 1, **metrics,
            "levels": levels_used(detector, val_set), "machine": utils.machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        runs = list(pool.map(measure, CANONICAL_SIZES))
    record = {"command": "python benchmarks/fpn_canonical.py --jobs 2", "steps": STEPS, "num_train": NUM_TRAIN,
              "num_val": NUM_VAL, "levels": ["P2", "P3", "P4", "P5"], "runs": runs}
    utils.atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    for run in runs:
        print(f"canonical {run['canonical_size']:3d}: box AP {run['bbox']['AP']:.3f} APs {run['bbox']['APs']:.3f} "
              f"APm {run['bbox']['APm']:.3f}; proposals per level P2..P5 {run['levels']['proposals']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
