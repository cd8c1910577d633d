"""The paper's Table 2 in miniature: a grid of ``ModelConfig`` variants, each trained and evaluated
with several seeds, one JSON record per run.

Mask R-CNN's argument rests on its ablations (He et al. 2017, Table 2): RoIAlign against RoIPool at
stride 16 (C4) and stride 32 (C5), and a per-class sigmoid mask loss against a softmax one. This
module reruns their *direction* on the shapes data. Every variant changes one field of the same
base config (``dataclasses.replace``); data, steps and seeds are shared.

Command line::

    python -m course_lib.experiments ablations --out data/results/ablations.json [--quick]

The output file is rewritten atomically after every run, so a stopped grid resumes where it was:
finished runs (status "ok" or "failed") are skipped on the next call. A run that raises is recorded
with status "failed" and its error, and the grid goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course_lib import data, evaluate, model, train, utils

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def ablation_grid() -> dict[str, dict]:
    """The variants of Table 2 (b, c, d): name -> the ``ModelConfig`` fields it changes."""
    grid = {}
    for stride in (16, 32):
        grid[f"s{stride}-roi_pool"] = dict(stride=stride, pooler="roi_pool", aligned=False)
        grid[f"s{stride}-roi_align-unaligned"] = dict(stride=stride, pooler="roi_align", aligned=False)
        grid[f"s{stride}-roi_align"] = dict(stride=stride, pooler="roi_align", aligned=True)
    grid["s16-roi_align-softmax"] = dict(stride=16, pooler="roi_align", aligned=True, mask_loss="softmax")
    return grid


def machine_info() -> dict:
    """Where a run happened: CPU or GPU name, thread count, torch version."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "gpu": gpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def load_records(path: Path) -> list[dict]:
    """The records already in ``path`` (an empty list when it does not exist yet)."""
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path}: not an experiments results file ({err})") from err


def save_records(path: Path, records: list[dict], header: dict) -> None:
    """Write all records atomically: a crash mid-write never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({**header, "runs": records}, f, indent=1)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of a grid shares: data, schedule and evaluation size."""
    steps: int = 400
    batch_size: int = 8
    lr: float = 0.02
    num_train: int = 2000
    num_val: int = 300
    data_seed: int = 0      # the training images; validation uses data_seed + 1

    @staticmethod
    def quick() -> "Settings":
        return Settings(steps=3, batch_size=2, num_train=8, num_val=4)


def run_one(changes: dict, seed: int, settings: Settings, base: model.ModelConfig | None = None) -> dict:
    """Train one variant with one seed and evaluate it; returns the metrics and the wall time."""
    config = dataclasses.replace(base or model.cpu_config(), **changes)
    utils.seed_everything(seed)  # the model's initial weights depend on the seed
    train_set = data.ShapesDataset(settings.num_train, seed=settings.data_seed)
    val_set = data.ShapesDataset(settings.num_val, seed=settings.data_seed + 1)
    net = model.MaskRCNN(config)
    tick = time.perf_counter()
    train.fit(net, train_set, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
              warmup_steps=min(50, settings.steps // 4), seed=seed, progress=False)
    wall = time.perf_counter() - tick
    metrics = evaluate.coco_evaluate(net, val_set, batch_size=settings.batch_size)
    return {"config": dataclasses.asdict(config), "wall_time_s": round(wall, 1),
            "box": {k: metrics["bbox"][k] for k in METRICS},
            "mask": {k: metrics["segm"][k] for k in METRICS} if "segm" in metrics else None}


def run_grid(grid: dict[str, dict], out: str | Path, seeds: tuple[int, ...] = (0, 1, 2),
             settings: Settings = Settings(), command: str = "", progress: bool = True,
             base: model.ModelConfig | None = None) -> list[dict]:
    """Run every (variant, seed) of ``grid`` not already in ``out``; return all records.

    Each record: variant, changes, seed, steps, status ("ok" or "failed"), machine, metrics.
    """
    out = Path(out)
    records = load_records(out)
    done = {(r["variant"], r["seed"]) for r in records}
    todo = [(name, seed) for name in grid for seed in seeds if (name, seed) not in done]
    header = {"command": command, "settings": dataclasses.asdict(settings)}
    for name, seed in tqdm(todo, desc="grid", disable=not progress):
        record = {"variant": name, "changes": grid[name], "seed": seed, "steps": settings.steps,
                  "machine": machine_info()}
        try:
            record.update(status="ok", **run_one(grid[name], seed, settings, base))
        except Exception as err:  # a broken variant must not cost the others
            record.update(status="failed", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc(limit=5))
        records.append(record)
        save_records(out, records, header)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("grid", choices=["ablations"], help="which grid to run")
    parser.add_argument("--out", required=True, help="results JSON (resumed when it exists)")
    parser.add_argument("--quick", action="store_true", help="tiny runs, to check the machinery")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--variants", nargs="*", default=None, help="only these variants")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    grid = ablation_grid()
    if args.variants:
        unknown = sorted(set(args.variants) - set(grid))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(grid)}")
        grid = {name: grid[name] for name in args.variants}
    command = "python -m course_lib.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    records = run_grid(grid, args.out, tuple(range(args.seeds)), settings, command)
    failed = [r for r in records if r["status"] == "failed"]
    print(f"{len(records)} runs in {args.out}, {len(failed)} failed")


if __name__ == "__main__":
    main()
