"""Chapter 00's tour of the finished model: its predictions on eight held-out images, recorded once.

    .venv/bin/python benchmarks/record_tour.py [--checkpoint PATH] [--out data/results/tour.json]

Chapter 00 is read before any model is trained, so it draws this record instead of training one.
The finished model is chapter 06's Mask R-CNN (``presets.cpu_config()``, 2,400 steps of 8 images),
which chapter 06 saves in the default mode to ``data/generated/models/06_mask_rcnn.pt``; with that
file this script takes about a minute on 2 cores. Without it (and without ``--checkpoint``) the
script first trains the same model and schedule with the course's command line,
``python -m course_lib.train --config cpu --out data/generated/runs/tour`` (about 8 minutes on
2 cores, plus its evaluations), and uses that run's ``last.pt``.

The record holds the model's detections with score >= 0.3 on images 0-7 of
``ShapesDataset(seed=2)`` as COCO results (boxes ``[x, y, w, h]``, masks as RLE at 0.5), its box
and mask AP on the first 500 images of that set, where the model came from and the machine. Seed 2
is chapter 06's held-out set; neither chapter 06 (seed 1) nor the ``cpu`` run (seed 0, validated on
seed 1) trains on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from course_lib import checkpoints, data, evaluate, predict, utils

ROOT = utils.repo_root()
CHAPTER_06_MODEL = ROOT / "data" / "generated" / "models" / "06_mask_rcnn.pt"
FALLBACK_RUN = ROOT / "data" / "generated" / "runs" / "tour"
SEED, TOUR_IMAGES, EVAL_IMAGES, SCORE_THRESH = 2, 8, 500, 0.3


def finished_model() -> Path:
    """Chapter 06's default-mode model when it is there, else a ``--config cpu`` run's last checkpoint."""
    if CHAPTER_06_MODEL.exists():
        if checkpoints.read_checkpoint(CHAPTER_06_MODEL).get("info", {}).get("mode") == "default":
            return CHAPTER_06_MODEL
        print(f"{CHAPTER_06_MODEL.relative_to(ROOT)} was trained in quick mode: not the finished model")
    if not (FALLBACK_RUN / "summary.json").exists():
        command = [sys.executable, "-m", "course_lib.train", "--config", "cpu", "--out", str(FALLBACK_RUN),
                   "--overwrite", "--no-progress"]
        print("training the finished model:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return FALLBACK_RUN / "last.pt"


def record(checkpoint: Path, eval_images: int = EVAL_IMAGES) -> dict:
    net, info = checkpoints.load_model(checkpoint)
    tour_set = data.ShapesDataset(TOUR_IMAGES, seed=SEED)
    detections = evaluate.predict(net, tour_set)
    for det in detections:
        keep = det["scores"] >= SCORE_THRESH
        det.update({key: det[key][keep] for key in ("boxes", "labels", "scores", "masks")})
    start = time.perf_counter()
    metrics = evaluate.coco_evaluate(net, data.ShapesDataset(eval_images, seed=SEED))
    return {
        "what": "chapter 00's tour: the finished model's detections on held-out shapes images (benchmarks/record_tour.py)",
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "checkpoint": str(checkpoint.resolve().relative_to(ROOT)) if checkpoint.resolve().is_relative_to(ROOT) else str(checkpoint),
        "checkpoint_info": info,
        "model_config": dataclasses.asdict(net.config),
        "classes": list(predict.class_names(info, net.config.num_classes)),
        "machine": utils.machine_info(),
        "tour_images": {"dataset": "ShapesDataset", "seed": SEED, "indices": list(range(TOUR_IMAGES)),
                        "image_size": tour_set.image_size},
        "score_thresh": SCORE_THRESH,
        "detections": predict.detection_records(detections),  # COCO results: image_id, category_id, bbox, score, segmentation
        "evaluation": {"dataset": f"ShapesDataset({eval_images}, seed={SEED})", **metrics,
                       "seconds": round(time.perf_counter() - start, 1)},
        "recorded": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a course checkpoint (default: chapter 06's model, else a cpu run)")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "tour.json")
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="held-out images for box and mask AP")
    args = parser.parse_args()
    checkpoint = args.checkpoint or finished_model()
    result = record(checkpoint, args.eval_images)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    segm = result["evaluation"].get("segm", {})
    print(f"wrote {args.out}: {len(result['detections'])} detections on {TOUR_IMAGES} images from {result['checkpoint']}; "
          f"box AP50 {result['evaluation']['bbox']['AP50']:.3f}, mask AP50 {segm.get('AP50', float('nan')):.3f} "
          f"on {args.eval_images} held-out images")


if __name__ == "__main__":
    main()
