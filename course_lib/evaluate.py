"""Evaluation: COCO box and mask AP through pycocotools, and a hand-written VOC AP@0.5 beside it.

COCO's AP (Lin et al. 2014) averages precision over 10 IoU thresholds 0.50:0.05:0.95, each as a
101-point interpolated area under the precision-recall curve, with up to 100 detections per image,
and reports it also by object area (small < 32^2 px, medium < 96^2, large). Mask R-CNN reports
exactly these (Tables 1-3). ``voc_ap`` is the older PASCAL VOC metric (one IoU threshold, all-point
interpolation) written out in a page so the notebook can show how the two differ.

``roi_masks`` looks at masks alone: the coarse (and refined, chapter 09) mask of every
ground-truth object on its exact box, with no detection in between.

Public names: ``METRICS``, ``predict``, ``coco_results``, ``coco_metrics``, ``coco_evaluate``,
``average_precision``, ``voc_ap``, ``roi_masks``.

Dimensions: D detections, G ground-truth objects, H x W image size.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from course_lib import boxes, data, refinement

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _batches(model: nn.Module, dataset, indices: list[int], batch_size: int, device):
    """Yield per-batch detections (on the CPU, with ``image_id``) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start:start + batch_size]]
            with torch.no_grad():
                detections = model([image.to(device) for image, _ in items])
            yield [{**{k: v.cpu() for k, v in det.items()}, "image_id": int(target["image_id"])}
                   for det, (_, target) in zip(detections, items)]
    finally:
        model.train(was_training)


def predict(model: nn.Module, dataset, indices: list[int] | None = None, batch_size: int = 8,
            device: str | torch.device | None = None) -> list[dict[str, Tensor]]:
    """Run ``model`` in eval mode on ``dataset`` (or the given ``indices``); detections on the CPU.

    Each dict has ``boxes`` ``Tensor[D, 4]``, ``labels``, ``scores``, ``image_id`` and, for Mask
    R-CNN, ``masks`` ``Tensor[D, 1, H, W]`` probabilities. The model's train/eval mode is restored.
    """
    device = device if device is not None else next(model.parameters()).device
    indices = list(range(len(dataset))) if indices is None else list(indices)
    return [det for batch in _batches(model, dataset, indices, batch_size, device) for det in batch]


def coco_results(detections: list[dict[str, Tensor]],
                 label_to_cat_id: dict[int, int] | None = None) -> tuple[list[dict], list[dict]]:
    """Detections -> COCO result lists ``(bbox_results, segm_results)``.

    Boxes become ``[x, y, w, h]``; masks are thresholded at 0.5 and run-length encoded with
    pycocotools (``counts`` decoded to ``str`` so the results are JSON-serialisable). ``image_id``
    must be a Python ``int`` equal to the ground truth's: a tensor or a string id silently matches
    nothing and gives AP 0 (a classic pitfall). ``category_id`` is the label (1..L-1), mapped
    through ``label_to_cat_id`` when given (real COCO ids run 1..90 with gaps, labels do not).
    """
    bbox_results, segm_results = [], []
    for det in detections:
        image_id = int(det["image_id"])
        xywh = det["boxes"].clone()
        xywh[:, 2:] -= xywh[:, :2]
        for j, (box, score, label) in enumerate(zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist())):
            category = label_to_cat_id[label] if label_to_cat_id else int(label)
            result = {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            bbox_results.append(result)
            if "masks" in det:
                binary = np.asfortranarray((det["masks"][j, 0] > 0.5).numpy().astype(np.uint8))
                rle = mask_utils.encode(binary)
                rle["counts"] = rle["counts"].decode("ascii")
                segm_results.append({**result, "segmentation": rle})
    return bbox_results, segm_results


def coco_metrics(coco_gt: dict | COCO, results: list[dict], iou_type: str = "bbox",
                 verbose: bool = False, area_ranges: dict[str, tuple[float, float]] | None = None
                 ) -> dict[str, float]:
    """pycocotools' COCOeval on one result list: ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``.

    Args:
        coco_gt: the ground truth as a COCO dict (``data.to_coco``) or a ``COCO`` object.
        results: COCO results (``coco_results``); an empty list scores 0 everywhere.
        iou_type: "bbox" or "segm". ``verbose`` shows pycocotools' printed table.
        area_ranges: ``{"all", "small", "medium", "large"} -> (min, max)`` px^2 replacing COCO's
            fixed 32^2 / 96^2 limits (for images much smaller than COCO's).
    A size range with no ground truth gets -1 from pycocotools (kept: "not applicable").
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type={iou_type!r}; expected 'bbox' or 'segm'")
    if not results:
        return {name: 0.0 for name in METRICS}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gt = coco_gt if isinstance(coco_gt, COCO) else _coco_from_dict(coco_gt)
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        if area_ranges is not None:
            evaluator.params.areaRng = [list(r) for r in area_ranges.values()]
            evaluator.params.areaRngLbl = list(area_ranges)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(out.getvalue())
    return {name: float(value) for name, value in zip(METRICS, evaluator.stats[:6])}


def _coco_from_dict(coco_dict: dict) -> COCO:
    coco = COCO()
    coco.dataset = coco_dict
    coco.createIndex()
    return coco


def coco_evaluate(model: nn.Module, dataset, batch_size: int = 8,
                  device: str | torch.device | None = None, verbose: bool = False) -> dict[str, dict]:
    """Box (and mask) AP of ``model`` on ``dataset`` with pycocotools.

    The ground truth is the data set's own COCO json when it has one (``dataset.coco``, as
    ``data.CocoDataset``) or ``data.to_coco(dataset)``. Returns ``{"bbox": {...}, "segm": {...}}``
    with ``METRICS`` keys; "segm" only when the model predicts masks.
    """
    device = device if device is not None else next(model.parameters()).device
    coco_gt = getattr(dataset, "coco", None)
    coco_gt = coco_gt if coco_gt is not None else data.to_coco(dataset)
    bbox_results, segm_results, has_masks = [], [], False
    for batch in _batches(model, dataset, list(range(len(dataset))), batch_size, device):
        has_masks = has_masks or any("masks" in det for det in batch)
        b, s = coco_results(batch, getattr(dataset, "label_to_cat_id", None))
        bbox_results += b
        segm_results += s
    metrics = {"bbox": coco_metrics(coco_gt, bbox_results, "bbox", verbose)}
    if has_masks:
        metrics["segm"] = coco_metrics(coco_gt, segm_results, "segm", verbose)
    return metrics


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall curve with all-point interpolation (PASCAL VOC 2010+).

    Precision is first made monotone (each point takes the best precision at any higher recall),
    then summed over the recall steps. COCO instead samples the monotone curve at 101 recall
    points 0, 0.01, ..., 1, which differs slightly.
    """
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]       # the precision envelope
    steps = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def voc_ap(detections: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
           iou_threshold: float = 0.5) -> dict:
    """PASCAL VOC AP at one IoU threshold, per class and their mean, written out by hand.

    Args:
        detections, targets: per image, ``boxes`` ``Tensor[*, 4]`` and ``labels`` (+ ``scores``).
    Returns:
        ``{"mAP": float, "per_class": {label: AP}}`` over the classes that have ground truth.

    Greedy matching by descending score: a detection is a true positive when its best-IoU gt of
    the same class reaches ``iou_threshold`` and is not yet taken; otherwise (duplicate, poor
    box, wrong class) a false positive. Missed gt lower the recall.
    """
    classes = sorted({int(c) for t in targets for c in t["labels"].tolist()})
    per_class = {c: _voc_ap_class(detections, targets, c, iou_threshold) for c in classes}
    mean = float(np.mean(list(per_class.values()))) if per_class else 0.0
    return {"mAP": mean, "per_class": per_class}


def _voc_ap_class(detections, targets, label: int, iou_threshold: float) -> float:
    gts = [t["boxes"][t["labels"] == label] for t in targets]
    taken = [torch.zeros(len(g), dtype=torch.bool) for g in gts]
    found = [(float(s), i, d["boxes"][j]) for i, d in enumerate(detections)
             for j, s in enumerate(d["scores"].tolist()) if int(d["labels"][j]) == label]
    found.sort(key=lambda item: -item[0])          # stable: ties keep image order
    tp = np.zeros(len(found))
    for k, (_, i, box) in enumerate(found):
        if len(gts[i]) == 0:
            continue
        iou = boxes.box_iou(box[None], gts[i])[0]                                   # [G_i]
        best = int(iou.argmax())
        if iou[best] >= iou_threshold and not taken[i][best]:
            taken[i][best] = True
            tp[k] = 1
    num_gt = sum(len(g) for g in gts)
    cum_tp = np.cumsum(tp)
    recall = cum_tp / max(num_gt, 1)
    precision = cum_tp / np.arange(1, len(found) + 1)
    return average_precision(recall, precision)


@torch.no_grad()
def roi_masks(model: nn.Module, dataset, indices: list[int] | None = None, batch_size: int = 8) -> dict[str, Tensor]:
    """Coarse (and, with a refiner, refined) masks of every ground-truth object, on its exact box.

    Returns ``{"coarse": Tensor[K, 28, 28]`` probabilities, ``"gt_28", "gt_56", "gt_112"``: ground
    truth per level in [0, 1], ``"labels": Tensor[K]``, and when ``model.refiner`` exists: ``"refined":
    Tensor[K, 112, 112]``, ``"incoherent_probs": Tensor[K, 28, 28]``, ``"nodes": Tensor[K]`` quadtree
    nodes per RoI}``. Isolates mask quality from detection quality: chapter 09's error analysis runs on this.
    """
    model.eval()
    refiner = model.refiner
    sizes = refiner.config.sizes if refiner is not None else (28, 56, 112)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(indices), batch_size):
        images, targets = data.collate_fn([dataset[i] for i in indices[start:start + batch_size]])
        inputs = refinement.ground_truth_inputs(model, images, targets, sizes, 0.0, torch.Generator())
        found = {"coarse": inputs["coarse_mask_logits"].sigmoid(), "labels": inputs["labels"]}
        found.update({f"gt_{size}": gt for size, gt in zip(sizes, inputs["gt_masks"])})
        if refiner is not None:
            out = refiner.eval().refine(inputs["features"], inputs["coarse_mask_logits"])
            roi_index = torch.cat([nodes[:, 0] for nodes in out["quadtree"].nodes])
            found.update(refined=out["masks"], incoherent_probs=out["incoherent_probs"],
                         nodes=torch.bincount(roi_index, minlength=len(inputs["labels"])))
        for name, value in found.items():
            parts.setdefault(name, []).append(value.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}
