"""Chapter 10's GPU session, step by step (``benchmarks/gpu_session.sh`` prepares the machine, then runs this).

    benchmarks/gpu_session.sh [--results DIR] [--run-dir DIR] [--train-budget-s S]
    benchmarks/gpu_session.sh --cpu-smoke        # every step on the CPU at toy size, into a temp folder

1. Throughput: ``benchmarks/gpu_throughput.py`` trains our model and torchvision's
   ``maskrcnn_resnet50_fpn`` (weights None, same batches, image size, batch and AMP) and writes
   ``RESULTS/gpu_throughput.json`` (images/s of both, their ratio, peak memory, the machine).
2. The data loader's rate: a few 512 px images made here, times the preset's workers.
3. Steps: as many as fit ``--train-budget-s`` at the slower of the model's rate (1.) and the
   loader's (2.), with a margin; at most the preset's 6000.
4. Training: ``presets.gpu_run(steps)`` (the gpu preset; warm-up, evaluations and checkpoints scale
   with the steps) through ``train_cli.run_training``, into ``--run-dir``.
5. ``RESULTS/gpu_run.json``: the run's record (``record_run.record``: command, settings, machine,
   curve, evaluations, wall time) with the benchmark's figures and how the steps were chosen.

The default budget aims at a whole session under 9 minutes on one H200 with 16 cores (an estimate
until a GPU has run it; the session's own total goes into gpu_run.json). RESULTS is
``data/results`` by default; ``--cpu-smoke`` writes into a new temp folder (printed) and never
touches ``data/results``: it checks that every step runs, its figures mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import record_run
from course_lib import data, presets, train_cli, utils

ROOT = Path(__file__).resolve().parent.parent
TRAIN_BUDGET_S = 270   # training's share of the 9-minute session; the rest: benchmark, evaluations, start-up
MARGIN = 0.75          # of the steps the budget allows: start-up, checkpoints, a slower data loader
SMOKE = dict(image_size=64, train_images=4, val_images=2)
SMOKE_MODEL = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                   rpn_post_nms_top_n_test=20, box_batch_size_per_image=8, detections_per_img=10)


def throughput(results: Path, smoke: bool) -> dict:
    """Step 1: run the benchmark in its own process (its GPU memory is freed before training)."""
    out = results / "gpu_throughput.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--json", str(out)]
    subprocess.run(command + (["--cpu-smoke"] if smoke else []), check=True)
    return json.loads(out.read_text())


def loader_images_per_s(run, images: int = 8) -> float:
    """Step 2: images/s the DataLoader's workers can make (one image timed here, times the workers)."""
    dataset = data.ShapesDataset(images, image_size=run.image_size, seed=0)
    tick = time.perf_counter()
    for i in range(images):
        dataset[i]
    return max(1, run.train.workers) * images / (time.perf_counter() - tick)


def choose_steps(budget_s: float, model_ips: float, loader_ips: float, batch_size: int, most: int = 6000) -> int:
    """Step 3: the steps that fit ``budget_s`` at the slower rate, times ``MARGIN`` (at least 12)."""
    return int(min(most, max(12, MARGIN * budget_s * min(model_ips, loader_ips) / batch_size)))


def session_run(steps: int, smoke: bool):
    """Step 4's ``RunConfig``: the gpu preset, or its toy version on the CPU."""
    run = presets.gpu_run(steps)
    if not smoke:  # two evaluations of 200 held-out images and two checkpoints fit the session
        fit = dataclasses.replace(run.train, eval_every=max(1, steps // 2), checkpoint_every=max(1, steps // 2))
        return dataclasses.replace(run, train=fit, val_images=200)
    model = presets.gpu_config(SMOKE["image_size"], **SMOKE_MODEL)
    fit = dataclasses.replace(run.train, batch_size=2, workers=0, amp=False, channels_last=False,
                              eval_every=steps, checkpoint_every=steps)
    return dataclasses.replace(run, model=model, train=fit, device="cpu", **SMOKE)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every step on the CPU at toy size (seconds)")
    parser.add_argument("--results", help="folder for gpu_throughput.json and gpu_run.json (default: data/results; "
                                          "--cpu-smoke: a new temp folder)")
    parser.add_argument("--run-dir", help="the training run's folder (default: runs/gpu_session; smoke: in the temp folder)")
    parser.add_argument("--train-budget-s", type=float, default=TRAIN_BUDGET_S)
    args = parser.parse_args(argv)
    smoke, start = args.cpu_smoke, time.perf_counter()
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_session: no CUDA GPU visible; run it on a GPU machine, or --cpu-smoke to check it")
    temp = Path(tempfile.mkdtemp(prefix="gpu_session_smoke_")) if smoke else None
    results = Path(args.results) if args.results else (temp if smoke else ROOT / "data" / "results")
    run_dir = Path(args.run_dir) if args.run_dir else (temp / "run" if smoke else ROOT / "runs" / "gpu_session")
    results.mkdir(parents=True, exist_ok=True)
    bench = throughput(results, smoke)
    print(f"[{time.perf_counter() - start:.0f} s] 1. throughput: ours {bench['ours']['images_per_s']:.1f} images/s, "
          f"torchvision {bench['torchvision']['images_per_s']:.1f}, ratio {bench['ratio_images_per_s']:.2f}")
    loader_ips = loader_images_per_s(session_run(12, smoke))
    steps = 1 if smoke else choose_steps(args.train_budget_s, bench["ours"]["images_per_s"], loader_ips, 8)
    run = session_run(steps, smoke)
    print(f"[{time.perf_counter() - start:.0f} s] 2.-3. loader about {loader_ips:.0f} images/s with "
          f"{run.train.workers} workers: {steps} steps of {run.train.batch_size} images")
    train_cli.run_training(run, run_dir, overwrite=True, progress=False)
    command = "benchmarks/gpu_session.sh" + (" --cpu-smoke" if smoke else "")
    rec = record_run.record(run_dir, command=command)
    rec.update(status="cpu smoke test: figures mean nothing" if smoke else "measured",
               session={"train_budget_s": args.train_budget_s, "loader_images_per_s": round(loader_ips, 1),
                        "steps_chosen": steps, "preset_steps": presets.gpu_run().train.steps,
                        "total_s": round(time.perf_counter() - start, 1)},
               benchmark={k: bench[k] for k in ("ours", "torchvision", "ratio_images_per_s", "batch_size", "image_size")})
    record_run.write(results / "gpu_run.json", rec)
    final = rec["final"] or {}
    print(f"[{time.perf_counter() - start:.0f} s] 4.-5. {steps} steps in {rec['wall_s_last_session']:.0f} s, box AP50 "
          f"{final.get('box_AP50', float('nan')):.3f}; wrote {results / 'gpu_throughput.json'} and "
          f"{results / 'gpu_run.json'}")
    return rec


if __name__ == "__main__":
    main()
