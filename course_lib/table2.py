"""He et al. 2017, Table 2 beside ours: the paper's numbers, and the statistics that compare runs.

The paper reports one run per row; ours are several seeds per variant (``experiments`` runs them),
so a row of ours is a mean with its standard error (``summarize``), a gap between two variants is
the mean of per-seed differences (``paired_gap``: same seed, same initial weights where the layers
agree, same images in the same order), and whether a run has stopped learning is read off a run of
the same seed trained longer (``plateau``). The records are the runner's JSON records: dicts with
``variant``, ``seed``, ``steps_factor``, ``status`` and metric dicts under ``box``, ``mask``, ...

Public names: ``PAPER_TABLE2``, ``PAPER_ROW``, ``PAPER_SCHEDULE``, ``COCO_OBJECTS``, ``summarize``, ``paired_gap``, ``plateau``.
"""
from __future__ import annotations

import math

# He et al. 2017, Table 2 (COCO minival, ResNet-50, AP / AP50 / AP75 in %): quoted, not measured.
# 2c's RoIWarp row is the one with average pooling of its bilinear samples, as ours.
PAPER_TABLE2 = {
    "2b R-50-C4 softmax": {"mask": (24.8, 44.1, 25.1)},
    "2b R-50-C4 sigmoid": {"mask": (30.3, 51.2, 31.5)},
    "2b R-50-C4 class-agnostic sigmoid": {"mask": (29.7, None, None)},
    "2c R-50-C4 RoIPool": {"mask": (26.9, 48.8, 26.4)},
    "2c R-50-C4 RoIWarp (ave)": {"mask": (27.1, 48.9, 27.1)},
    "2c R-50-C4 RoIAlign (max)": {"mask": (30.2, 51.0, 31.8)},
    "2c R-50-C4 RoIAlign (ave)": {"mask": (30.3, 51.2, 31.5)},
    "2d R-50-C5 RoIPool": {"mask": (23.6, 46.5, 21.6), "box": (28.2, 52.7, 26.9)},
    "2d R-50-C5 RoIAlign": {"mask": (30.9, 51.8, 32.1), "box": (34.0, 55.3, 36.4)},
}
# Our variant -> the paper's row it reproduces (s16-roi_align is both 2b's sigmoid and 2c's RoIAlign).
PAPER_ROW = {"s16-softmax": "2b R-50-C4 softmax", "s16-roi_align": "2c R-50-C4 RoIAlign (ave)",
             "s16-agnostic": "2b R-50-C4 class-agnostic sigmoid", "s16-roi_pool": "2c R-50-C4 RoIPool",
             "s16-roi_warp": "2c R-50-C4 RoIWarp (ave)", "s16-roi_align_max": "2c R-50-C4 RoIAlign (max)",
             "s32-roi_pool": "2d R-50-C5 RoIPool", "s32-roi_align": "2d R-50-C5 RoIAlign"}
# The paper's schedule (Sec. 3.1): 160k iterations of 16 images on COCO trainval35k (~115k images),
# about 22 epochs. Quoted, to set our grid's epochs beside it.
PAPER_SCHEDULE = {"iterations": 160_000, "batch_size": 16, "train_images": 115_000}
# COCO's objects (cocodataset.org, detection evaluation): 41 % small (area < 32^2 px), 34 % medium
# (< 96^2), 24 % large, on images of about 640 x 480 that Mask R-CNN resizes to an 800 px short side.
COCO_OBJECTS = {"small": 0.41, "medium": 0.34, "large": 0.24, "resize": 800 / 480}


def summarize(records: list[dict], key: str = "mask", steps_factor: float = 1.0
              ) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Mean and standard error over seeds: variant -> metric -> (mean, s.e., n).

    Only runs with status "ok" and the given ``steps_factor`` count; a metric pycocotools marks not
    applicable (-1) is left out, so ``n`` can differ between metrics. ``key``: "box", "mask",
    "box_scaled", "mask_scaled", "mask_argmax". With one seed the s.e. is 0.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for record in records:
        if record.get("status") != "ok" or not record.get(key) or record.get("steps_factor", 1.0) != steps_factor:
            continue
        per_variant = values.setdefault(record["variant"], {})
        for metric, value in record[key].items():
            if value >= 0:
                per_variant.setdefault(metric, []).append(value)
    return {variant: {metric: _mean_se(xs) for metric, xs in metrics.items()} for variant, metrics in values.items()}


def _mean_se(xs: list[float]) -> tuple[float, float, int]:
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, math.sqrt(var / len(xs)), len(xs)


def paired_gap(records: list[dict], a: str, b: str, key: str = "mask", metric: str = "AP",
               key_b: str | None = None, steps_factor: float = 1.0) -> tuple[float, float, int]:
    """``a - b`` seed by seed (same seed, same data order, runs of one length): mean, standard error, pairs."""
    by = {}
    for r in records:
        if r.get("status") == "ok" and r.get("steps_factor", 1.0) == steps_factor and r["variant"] in (a, b):
            by.setdefault(r["seed"], {})[r["variant"]] = r
    diffs = [p[a][key][metric] - p[b][key_b or key][metric] for p in by.values() if a in p and b in p]
    return _mean_se(diffs) if diffs else (float("nan"), float("nan"), 0)


def plateau(records: list[dict], key: str = "mask", metric: str = "AP") -> dict[str, tuple[float, float, int]]:
    """variant -> (final metric of the run, of the same seed's longer run, seed): the plateau test."""
    runs = {(r["variant"], r["seed"], r.get("steps_factor", 1.0)): r for r in records if r.get("status") == "ok"}
    longer = [(v, s, f) for v, s, f in runs if f != 1.0 and (v, s, 1.0) in runs]
    return {v: (runs[(v, s, 1.0)][key][metric], runs[(v, s, f)][key][metric], s) for v, s, f in longer}
