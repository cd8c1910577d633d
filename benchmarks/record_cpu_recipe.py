"""Record chapter 05's CPU-recipe ladder in a json file; the chapter prints its table from that file.

    .venv/bin/python benchmarks/record_cpu_recipe.py --jobs 2        # about 15 min on a quiet 2-core CPU

Trains the variants of ``benchmarks/cpu_recipe.py`` (the same models, data, schedule and seed; all
but "cpu_config", which chapter 05 trains itself in section 5) and writes, per variant, its
changes, steps, lr, training minutes, seconds per step, threads and box metrics on 500 held-out
images, with the machine. Each variant runs in its own process with one thread, ``--jobs`` at a
time, so the seconds per step compare like with like. The file is rewritten (atomically) after
each variant: a stopped run keeps what it measured, and a rerun trains only the missing variants
(``--force`` retrains them all). Default output: ``data/results/cpu_recipe.json``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import torch

import cpu_recipe  # benchmarks/cpu_recipe.py: the ladder's variants (this script's folder is on sys.path)
from course_lib import data, evaluate, model, presets, train, utils

DEFAULT_OUT = utils.repo_root() / "data" / "results" / "cpu_recipe.json"
LADDER = [name for name in cpu_recipe.VARIANTS if name != "cpu_config"]
NUM_VAL = 500


def measure(name: str) -> dict:
    """Train one variant with one thread and evaluate it (runs in a worker process)."""
    changes, steps, lr = cpu_recipe.VARIANTS[name]
    torch.set_num_threads(1)
    utils.seed_everything(0)
    detector = model.MaskRCNN(dataclasses.replace(model.ModelConfig(), **changes, with_mask=False))
    start = time.perf_counter()
    train.fit(detector, data.ShapesDataset(steps * 8, seed=0), presets.cpu_training(steps, lr=lr), progress=False)
    minutes = (time.perf_counter() - start) / 60
    box = evaluate.coco_evaluate(detector, data.ShapesDataset(NUM_VAL, seed=1))["bbox"]
    return {"variant": name, "changes": changes, "steps": steps, "lr": lr, "train_minutes": round(minutes, 2),
            "seconds_per_step": round(60 * minutes / steps, 4), "threads": 1, "box": box,
            "machine": utils.machine_info()}


def write(path: Path, command: str, runs: dict) -> None:
    record = {"command": command, "num_val": NUM_VAL, "data": "ShapesDataset(steps * 8, seed=0), val seed 1",
              "runs": [runs[name] for name in LADDER if name in runs]}
    utils.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once, one thread each")
    parser.add_argument("--variants", default=",".join(LADDER), help="comma-separated: " + ", ".join(LADDER))
    parser.add_argument("--force", action="store_true", help="retrain variants already in --out")
    args = parser.parse_args()
    wanted = args.variants.split(",")
    for name in wanted:
        if name not in LADDER:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(LADDER)}")
    runs = {}
    if args.out.exists() and not args.force:
        runs = {run["variant"]: run for run in json.loads(args.out.read_text())["runs"]}
    todo = [name for name in wanted if name not in runs]
    command = "python benchmarks/record_cpu_recipe.py --jobs N"
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        for future in concurrent.futures.as_completed([pool.submit(measure, name) for name in todo]):
            result = future.result()
            runs[result["variant"]] = result
            write(args.out, command, runs)
            box = result["box"]
            print(f"{result['variant']:14s} steps {result['steps']:5d}  lr {result['lr']:.2f}  "
                  f"{result['seconds_per_step']:.3f} s/step  box AP50 {box['AP50']:.3f}  AP {box['AP']:.3f}", flush=True)
    print(f"wrote {args.out} ({len(runs)} variants)")


if __name__ == "__main__":
    main()
