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
with status "failed" and its error, and the grid goes on. A file written with other ``Settings``
is refused rather than mixed.

Object sizes: pycocotools' APs/APm/APl use COCO's fixed area ranges (32^2 and 96^2 px^2), made for
COCO images of about 640 px. On 128 px images they put nearly every object in "small" and none in
"large" (APl = -1). Each record therefore also carries ``APs``/``APm``/``APl`` with the ranges scaled
by (image_size / 640)^2 (``scaled_area_ranges``), under ``box_scaled`` and ``mask_scaled``.

Public names: ``PAPER_TABLE2``, ``ablation_grid``, ``Settings``, ``train_variant``, ``run_one``,
``run_grid``, ``scaled_area_ranges``, ``scaled_area_metrics``, ``summarize``,
``load_records``, ``save_records``, ``main``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course_lib import data, evaluate, model, presets, train, utils
from course_lib.config import TrainConfig

SIZE_METRICS = ("APs", "APm", "APl")
COCO_IMAGE_SIZE = 640     # px, the long side of a typical COCO image, where 32^2 / 96^2 were set

# He et al. 2017, Table 2 (COCO minival, ResNet-50, mask AP / AP50 / AP75 in %): quoted, not measured.
PAPER_TABLE2 = {
    "2b R-50-C4 softmax": {"mask": (24.8, 44.1, 25.1)},
    "2b R-50-C4 sigmoid": {"mask": (30.3, 51.2, 31.5)},
    "2b R-50-C4 class-agnostic sigmoid": {"mask": (29.7, None, None)},
    "2c R-50-C4 RoIPool": {"mask": (26.9, 48.8, 26.4)},
    "2c R-50-C4 RoIWarp": {"mask": (27.2, 49.2, 27.1)},
    "2c R-50-C4 RoIAlign": {"mask": (30.3, 51.2, 31.5)},
    "2d R-50-C5 RoIPool": {"mask": (23.6, 46.5, 21.6), "box": (28.2, 52.7, 26.9)},
    "2d R-50-C5 RoIAlign": {"mask": (30.9, 51.8, 32.1), "box": (34.0, 55.3, 36.4)},
}


def ablation_grid() -> dict[str, dict]:
    """The variants of Table 2 (b, c, d): name -> the ``ModelConfig`` fields it changes."""
    grid = {}
    for stride in (16, 32):
        grid[f"s{stride}-roi_pool"] = dict(stride=stride, pooler="roi_pool", aligned=False)
        grid[f"s{stride}-roi_align-unaligned"] = dict(stride=stride, pooler="roi_align", aligned=False)
        grid[f"s{stride}-roi_align"] = dict(stride=stride, pooler="roi_align", aligned=True)
    grid["s16-roi_align-softmax"] = dict(stride=16, pooler="roi_align", aligned=True, mask_loss="softmax")
    return grid


def load_records(path: Path) -> list[dict]:
    """The records already in ``path`` (an empty list when it does not exist yet)."""
    return _load(Path(path)).get("runs", [])


def _load(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        content = json.loads(path.read_text())
        content["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an experiments results file ({err})") from err
    return content


def save_records(path: Path, records: list[dict], header: dict) -> None:
    """Write all records atomically: a crash mid-write never leaves a half file."""
    utils.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({**header, "runs": records}, indent=1)))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of a grid shares: data, training schedule (its seed is each run's) and evaluation size."""
    train: TrainConfig = TrainConfig(steps=400, batch_size=8, lr=0.02, schedule="cosine")
    num_train: int = 2000
    num_val: int = 300
    image_size: int = 128      # px, the shapes images' side
    data_seed: int = 0         # the training images; validation uses data_seed + 1
    small_model: bool = False  # presets.quick_config (narrower) instead of presets.cpu_config

    @staticmethod
    def quick() -> "Settings":
        return Settings(TrainConfig(steps=2, batch_size=2, warmup_steps=0), num_train=4, num_val=2, small_model=True)


def scaled_area_ranges(image_size: int) -> dict[str, tuple[float, float]]:
    """COCO's area ranges (all, small < 32^2, medium < 96^2, large) scaled by (image_size / 640)^2.

    An object that is "small" on a 640 px COCO image covers the same fraction of a 128 px image
    when its area is 25 times smaller: on 128 px, small < 6.4^2 = 41 px^2, medium < 19.2^2 = 369 px^2.
    """
    scale = (image_size / COCO_IMAGE_SIZE) ** 2
    return {"all": (0.0, 1e10), "small": (0.0, 32 ** 2 * scale),
            "medium": (32 ** 2 * scale, 96 ** 2 * scale), "large": (96 ** 2 * scale, 1e10)}


def scaled_area_metrics(coco_gt: dict, results: list[dict], iou_type: str, image_size: int) -> dict[str, float]:
    """APs, APm, APl with ``scaled_area_ranges(image_size)``: pycocotools' COCOeval, our ``areaRng``.

    A range with no ground truth gives -1 (pycocotools' "not applicable"); no results give 0.
    """
    metrics = evaluate.coco_metrics(coco_gt, results, iou_type, area_ranges=scaled_area_ranges(image_size))
    return {name: metrics[name] for name in SIZE_METRICS}


def _evaluate(net, val_set, settings: Settings) -> dict:
    """Box and mask metrics of ``net`` on ``val_set``: COCO's fixed ranges and the scaled ones."""
    detections = evaluate.predict(net, val_set, batch_size=settings.train.batch_size)
    coco_gt = data.to_coco(val_set)
    out = {}
    for kind, iou_type, results in zip(("box", "mask"), ("bbox", "segm"), evaluate.coco_results(detections)):
        if kind == "mask" and not net.config.with_mask:
            out[kind] = out[f"{kind}_scaled"] = None
            continue
        out[kind] = evaluate.coco_metrics(coco_gt, results, iou_type)
        out[f"{kind}_scaled"] = scaled_area_metrics(coco_gt, results, iou_type, settings.image_size)
    return out


def train_variant(changes: dict, seed: int, settings: Settings, base: model.ModelConfig | None = None
                  ) -> tuple[model.MaskRCNN, dict, float]:
    """Train one variant with one seed, as the grid does: ``(model in eval mode, train.fit's history, seconds)``."""
    preset = presets.quick_config if settings.small_model else presets.cpu_config
    config = dataclasses.replace(base or preset(), **changes)
    utils.seed_everything(seed)  # the model's initial weights depend on the seed
    train_set = data.ShapesDataset(settings.num_train, settings.image_size, seed=settings.data_seed)
    net = model.MaskRCNN(config)
    tick = time.perf_counter()
    history = train.fit(net, train_set, dataclasses.replace(settings.train, seed=seed), progress=False)
    return net.eval(), history, time.perf_counter() - tick


def run_one(changes: dict, seed: int, settings: Settings, base: model.ModelConfig | None = None) -> dict:
    """Train one variant with one seed and evaluate it; returns config, metrics and wall times."""
    net, history, wall = train_variant(changes, seed, settings, base)
    tick = time.perf_counter()
    val_set = data.ShapesDataset(settings.num_val, settings.image_size, seed=settings.data_seed + 1)
    metrics = _evaluate(net, val_set, settings)
    final_loss = sum(h["loss"] for h in history["train"][-20:]) / len(history["train"][-20:])
    return {"config": dataclasses.asdict(net.config), "wall_time_s": round(wall, 1),
            "eval_time_s": round(time.perf_counter() - tick, 1),
            "final_loss": round(final_loss, 4), **metrics}


def _run_record(name: str, changes: dict, seed: int, settings: Settings, base, threads: int | None) -> dict:
    """One grid cell as a record; a run that raises is recorded as failed (the grid goes on)."""
    if threads is not None:
        torch.set_num_threads(threads)
    record = {"variant": name, "changes": changes, "seed": seed, "steps": settings.train.steps, "machine": utils.machine_info()}
    try:
        record.update(status="ok", **run_one(changes, seed, settings, base))
    except Exception as err:  # a broken variant must not cost the others
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=5))
    return record


def run_grid(grid: dict[str, dict], out: str | Path, seeds: tuple[int, ...] = (0, 1, 2),
             settings: Settings = Settings(), command: str = "", progress: bool = True,
             base: model.ModelConfig | None = None, jobs: int = 1, threads: int | None = None) -> list[dict]:
    """Run every (variant, seed) of ``grid`` not already in ``out``; return all records.

    Each record: variant, changes, seed, steps, status ("ok" or "failed"), machine, metrics.
    ``jobs`` > 1 runs that many cells at once in worker processes with ``threads`` torch threads each
    (on a 2-core CPU, 2 jobs x 1 thread finish a grid sooner than 1 job x 2 threads). The file is
    rewritten after every finished run, in any order, so a stopped grid resumes without redoing them.
    Raises ``ValueError`` when ``out`` holds runs made with other ``settings``.
    """
    out = Path(out)
    previous = _load(out)
    records = previous.get("runs", [])
    if records and previous.get("settings") != dataclasses.asdict(settings):
        raise ValueError(f"{out} holds runs with settings={previous.get('settings')}, not "
                         f"{dataclasses.asdict(settings)}; use another --out to change settings")
    done = {(r["variant"], r["seed"]) for r in records}
    # seed-major order: a grid stopped early still has every variant at the same seeds
    todo = [(name, seed) for seed in seeds for name in grid if (name, seed) not in done]
    header = {"command": command or previous.get("command", ""), "settings": dataclasses.asdict(settings),
              "area_ranges_scaled": scaled_area_ranges(settings.image_size)}
    bar = tqdm(total=len(todo), desc="grid", disable=not progress)
    if jobs <= 1:
        for name, seed in todo:
            records.append(_run_record(name, grid[name], seed, settings, base, threads))
            save_records(out, records, header)
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_record, name, grid[name], seed, settings, base, threads)
                       for name, seed in todo]
            for future in as_completed(futures):
                records.append(future.result())
                save_records(out, records, header)
                bar.update()
    bar.close()
    return records


def summarize(records: list[dict], key: str = "mask") -> dict[str, dict[str, tuple[float, float, int]]]:
    """Mean and sample standard deviation over seeds: variant -> metric -> (mean, std, n).

    Only runs with status "ok" count; a metric pycocotools marks not applicable (-1) is left out,
    so ``n`` can differ between metrics. ``key``: "box", "mask", "box_scaled" or "mask_scaled".
    With one seed the std is 0.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for record in records:
        if record.get("status") != "ok" or not record.get(key):
            continue
        per_variant = values.setdefault(record["variant"], {})
        for metric, value in record[key].items():
            if value >= 0:
                per_variant.setdefault(metric, []).append(value)
    summary = {}
    for variant, metrics in values.items():
        summary[variant] = {}
        for metric, xs in metrics.items():
            mean = sum(xs) / len(xs)
            var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
            summary[variant][metric] = (mean, math.sqrt(var), len(xs))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("grid", choices=["ablations"], help="which grid to run")
    parser.add_argument("--out", required=True, help="results JSON (resumed when it exists)")
    parser.add_argument("--quick", action="store_true", help="tiny runs, to check the machinery")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument("--num-val", type=int, default=None, help="validation images")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--schedule", choices=train.SCHEDULES, default=None, help="learning-rate decay")
    parser.add_argument("--small-model", action="store_true", help="model.quick_config instead of cpu_config")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (1 is fastest on a busy CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    parser.add_argument("--variants", nargs="*", default=None, help="only these variants")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    fit_flags = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "schedule": args.schedule}
    settings = dataclasses.replace(settings, train=dataclasses.replace(
        settings.train, **{k: v for k, v in fit_flags.items() if v is not None}))
    for field, value in (("num_val", args.num_val), ("small_model", args.small_model or None)):
        if value is not None:
            settings = dataclasses.replace(settings, **{field: value})
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    grid = ablation_grid()
    if args.variants:
        unknown = sorted(set(args.variants) - set(grid))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(grid)}")
        grid = {name: grid[name] for name in args.variants}
    command = "python -m course_lib.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    records = run_grid(grid, args.out, tuple(range(args.seeds)), settings, command, jobs=args.jobs, threads=args.threads)
    failed = [r for r in records if r["status"] == "failed"]
    print(f"{len(records)} runs in {args.out}, {len(failed)} failed")


if __name__ == "__main__":
    main()
