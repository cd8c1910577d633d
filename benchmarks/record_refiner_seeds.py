"""Chapter 09's whole pipeline (Mask R-CNN, then the refiner) trained with several seeds, recorded once.

    .venv/bin/python benchmarks/record_refiner_seeds.py          # all runs: about 40 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/record_refiner_seeds.py --runs seeds     # the three seeds only: about 20 min

Chapter 09 trains its pipeline once, with seed 0, and reports the refiner's change in mask AP. One
seed is one sample; chapter 08's rule asks for several seeds and a standard error before a gap is
called a finding. Three runs of the pipeline do not fit the chapter's 10 minutes, so this script
makes them and the chapter reads ``data/results/refiner_seeds.json``.

Each run is chapter 09's section 3-4 with seed s: ``utils.seed_everything(s)``, ``MaskRCNN(
presets.cpu_config())`` trained by ``train.fit`` with ``presets.cpu_training(steps, seed=s)`` (the
seed also sets the data order) on ``ShapesDataset(4000, seed=1)``; then ``seed_everything(s)``,
``model.add_refiner`` and ``train.fit`` with ``presets.refiner_training(1000, seed=s)`` (the seed
also sets the box jitter). Both models are scored on ``ShapesDataset(150, seed=2)``: pycocotools
mask AP/AP50/AP75 (``evaluate.coco_evaluate``) and, on the true boxes (``evaluate.roi_masks``), the
share of wrong pixels and the boundary F-score of the 112 x 112 masks. Seed 0 is the chapter's own run.

The runs (``--runs`` picks groups):
    seeds      seed0, seed1, seed2: the chapter's settings (1,200 detector steps)
    exercise3  detector600, detector2400: seed 0 with a weaker and a stronger Mask R-CNN
    exercise4  l1, strict: seed 0's detector with ``TransfinerConfig(node_loss="l1")`` and
               ``incoherent_target="strict"`` (the paper's choices)

Each run records the command that made it, the machine and the date. The file is rewritten
atomically after every run, so a stopped script resumes where it was: runs already recorded are
skipped (``--force`` redoes them). A trained Mask R-CNN is kept under ``data/generated/refiner_seeds/``
so the runs that share it (seed0, l1, strict) train it once. A file recorded with other settings is
refused. ``--quick`` is a smoke test (a few steps, a few images)
that writes ``data/generated/refiner_seeds/quick.json`` and never the recorded file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from course_lib import checkpoints, data, evaluate, model, presets, refinement, train, transfiner, utils
from course_lib.config import TransfinerConfig

ROOT = utils.repo_root()
DEFAULT_OUT = ROOT / "data" / "results" / "refiner_seeds.json"
GROUPS = {
    "seeds": {"seed0": (0, 1200, {}), "seed1": (1, 1200, {}), "seed2": (2, 1200, {})},
    "exercise3": {"detector600": (0, 600, {}), "detector2400": (0, 2400, {})},
    "exercise4": {"l1": (0, 1200, {"node_loss": "l1"}), "strict": (0, 1200, {"incoherent_target": "strict"})},
}  # run name -> (seed, Mask R-CNN steps, TransfinerConfig changes)
SETTINGS = {"train_images": 4000, "train_data_seed": 1, "val_images": 150, "val_data_seed": 2,
            "model": "presets.cpu_config()", "detector_training": "presets.cpu_training(steps, seed=seed)",
            "refiner_steps": 1000, "refiner_training": "presets.refiner_training(refiner_steps, seed=seed)"}
QUICK_SETTINGS = {**SETTINGS, "train_images": 64, "val_images": 4, "refiner_steps": 4, "quick": True}


def detector(seed: int, steps: int, settings: dict, cache: Path) -> tuple[model.MaskRCNN, float]:
    """Seed ``seed``'s Mask R-CNN after ``steps`` steps (and its training minutes), trained or read back."""
    path = cache / f"{'quick_' if settings.get('quick') else ''}detector_seed{seed}_steps{steps}.pt"
    if path.exists():
        net, info = checkpoints.load_model(path)
        return net, info["train_minutes"]
    utils.seed_everything(seed)
    net = model.MaskRCNN(presets.cpu_config())
    start = time.perf_counter()
    train.fit(net, data.ShapesDataset(settings["train_images"], seed=settings["train_data_seed"]),
              presets.cpu_training(steps, seed=seed), progress=False)
    minutes = (time.perf_counter() - start) / 60
    checkpoints.save_model(path, net, seed=seed, steps=steps, train_minutes=minutes)
    return net.eval(), minutes


def mean_loss(history: list[dict], name: str, part: slice) -> float:
    values = [step[name] for step in history[part]]
    return sum(values) / len(values)


def on_true_boxes(net: model.MaskRCNN, val_set) -> dict:
    """Wrong pixels and boundary F of the 112 x 112 masks on the true boxes, coarse and refined."""
    rois = evaluate.roi_masks(net, val_set)
    gt = rois["gt_112"] >= 0.5
    masks = {"coarse": refinement.upsample_coarse(rois["coarse"]), "refined": rois["refined"]}
    return {"objects": len(gt), "nodes_per_object": rois["nodes"].float().mean().item(),
            **{f"wrong_px_{k}": ((m >= 0.5) != gt).float().mean().item() for k, m in masks.items()},
            **{f"boundary_f_{k}": transfiner.boundary_fscore(m, gt).mean().item() for k, m in masks.items()}}


def run_one(name: str, seed: int, steps: int, changes: dict, settings: dict, cache: Path) -> dict:
    """Train (or read) the detector, train a fresh refiner on it, and score both."""
    net, detector_minutes = detector(seed, steps, settings, cache)
    val_set = data.ShapesDataset(settings["val_images"], seed=settings["val_data_seed"])
    utils.seed_everything(seed)
    refined = model.add_refiner(net, TransfinerConfig(**changes))
    start = time.perf_counter()
    history = train.fit(refined, data.ShapesDataset(settings["train_images"], seed=settings["train_data_seed"]),
                        presets.refiner_training(settings["refiner_steps"], seed=seed), progress=False)["train"]
    refiner_minutes = (time.perf_counter() - start) / 60
    start = time.perf_counter()
    plain, after = evaluate.coco_evaluate(net, val_set), evaluate.coco_evaluate(refined, val_set)
    window = slice(0, min(20, len(history))), slice(-min(20, len(history)), None)
    losses = {loss: {"first_20": mean_loss(history, loss, window[0]), "last_20": mean_loss(history, loss, window[1]),
                     "every_10th": [round(step[loss], 4) for step in history[::10]]}
              for loss in ("loss_incoherent", "loss_refine")}
    return {"name": name, "status": "ok", "seed": seed, "detector_steps": steps, "refiner_changes": changes,
            "plain": {"segm": plain["segm"], "bbox": plain["bbox"]},
            "refined": {"segm": after["segm"], "bbox": after["bbox"]},
            "true_boxes": on_true_boxes(refined, val_set), "refiner_losses": losses,
            "minutes": {"detector": round(detector_minutes, 2), "refiner": round(refiner_minutes, 2),
                        "evaluation": round((time.perf_counter() - start) / 60, 2)}}


def save(path: Path, header: dict, runs: dict) -> None:
    content = {**header, "runs": list(runs.values())}
    utils.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1) + "\n"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=sorted(GROUPS), default=list(GROUPS), help="groups of runs")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--force", action="store_true", help="redo runs already in the file")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few steps, a separate file")
    args = parser.parse_args(argv)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    cache = utils.generated_dir("refiner_seeds")
    out = args.out or (cache / "quick.json" if args.quick else DEFAULT_OUT)
    old = json.loads(out.read_text()) if out.exists() else {"settings": settings, "runs": []}
    if old.get("settings") != settings:
        parser.error(f"{out} was recorded with other settings {old.get('settings')}; use another --out")
    runs = {} if args.force else {r["name"]: r for r in old["runs"] if r.get("status") == "ok"}
    argv_shown = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/record_refiner_seeds.py", *argv_shown])
    header = {"what": "chapter 09's pipeline over seeds (benchmarks/record_refiner_seeds.py)",
              "settings": settings, "runs_by_group": {group: list(runs_) for group, runs_ in GROUPS.items()}}
    steps_scale = (lambda s: max(2, s // 200)) if args.quick else (lambda s: s)
    for group in args.runs:
        for name, (seed, steps, changes) in GROUPS[group].items():
            if name in runs:
                print(f"{name}: already recorded, skipped")
                continue
            start = time.perf_counter()
            runs[name] = {**run_one(name, seed, steps_scale(steps), changes, settings, cache),
                          "command": command, "machine": utils.machine_info(), "recorded": time.strftime("%Y-%m-%d")}
            save(out, header, runs)
            r = runs[name]
            print(f"{name}: mask AP {r['plain']['segm']['AP']:.3f} -> {r['refined']['segm']['AP']:.3f}, "
                  f"boundary F {r['true_boxes']['boundary_f_coarse']:.3f} -> {r['true_boxes']['boundary_f_refined']:.3f} "
                  f"({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    print(f"wrote {out} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
