"""COCO AP through pycocotools (1.0 for perfect predictions, lower when perturbed) and VOC AP by hand."""
import numpy as np
import pytest
import torch
from torch import nn

from course_lib import data, evaluate


@pytest.fixture(scope="module")
def dataset():
    return data.ShapesDataset(8, image_size=64, seed=3, image_id_offset=500)


def _perfect(ds, shift=0.0):
    dets = []
    for i in range(len(ds)):
        _, t = ds[i]
        dets.append({"boxes": t["boxes"] + shift, "labels": t["labels"], "scores": torch.linspace(1, 0.5, len(t["labels"])),
                     "masks": t["masks"][:, None].float(), "image_id": t["image_id"]})
    return dets


def test_perfect_predictions_score_one_and_perturbed_lower(dataset):
    gt = data.to_coco(dataset)
    assert any(len(dataset[i][1]["labels"]) == 0 for i in range(len(dataset)))  # empty images included
    bbox, segm = evaluate.coco_results(_perfect(dataset))
    for results, kind in ((bbox, "bbox"), (segm, "segm")):
        metrics = evaluate.coco_metrics(gt, results, kind)
        assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    shifted, _ = evaluate.coco_results(_perfect(dataset, shift=3.0))
    worse = evaluate.coco_metrics(gt, shifted, "bbox")
    assert worse["AP"] < 0.9 and worse["AP50"] <= 1.0


def test_unknown_image_ids_are_refused_and_empty_results_score_zero(dataset):
    gt = data.to_coco(dataset)
    bbox, _ = evaluate.coco_results(_perfect(dataset))
    offset = [{**r, "image_id": r["image_id"] + 10_000} for r in bbox]  # ids that are not in the gt
    with pytest.raises(Exception):
        evaluate.coco_metrics(gt, offset, "bbox")
    assert evaluate.coco_metrics(gt, [], "bbox") == {name: 0.0 for name in evaluate.METRICS}
    with pytest.raises(ValueError, match="iou_type='keypoints'"):
        evaluate.coco_metrics(gt, bbox, "keypoints")


class _Oracle(nn.Module):
    """Predicts each image's ground truth, in the order the data set is read."""

    def __init__(self, ds):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.queue = _perfect(ds)

    def forward(self, images):
        out = [self.queue.pop(0) for _ in images]
        return [{k: v for k, v in d.items() if k != "image_id"} for d in out]


def test_coco_evaluate_with_an_oracle_model(dataset):
    metrics = evaluate.coco_evaluate(_Oracle(dataset), dataset, batch_size=3)
    assert set(metrics) == {"bbox", "segm"} and set(metrics["bbox"]) == set(evaluate.METRICS)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)


def test_average_precision_hand_worked():
    # detections by score: TP, FP, TP with 2 ground truths -> recall .5 .5 1, precision 1 .5 2/3
    ap = evaluate.average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_voc_ap_hand_worked():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1, 2])}]
    detections = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 10.0, 10.0]]),   # TP, then duplicate: FP
         "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])},
        {"boxes": torch.tensor([[21.0, 21.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]]),  # TP (IoU .81), class 2 miss
         "scores": torch.tensor([0.7, 0.6]), "labels": torch.tensor([1, 2])}]
    result = evaluate.voc_ap(detections, targets)
    assert result["per_class"][1] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert result["per_class"][2] == 0.0
    assert result["mAP"] == pytest.approx((0.5 + 1 / 3) / 2)


def test_coco_evaluate_maps_labels_back_to_category_ids(dataset, tmp_path):
    # Real COCO category ids have gaps (1..90): labels 1..K must be mapped back before scoring.
    import json
    folder = data.save_coco(dataset, tmp_path)
    annotations = folder / "annotations.json"
    coco = json.loads(annotations.read_text())
    new_id = {1: 7, 2: 42, 3: 90}
    for cat in coco["categories"]:
        cat["id"] = new_id[cat["id"]]
    for ann in coco["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    annotations.write_text(json.dumps(coco))
    coco_ds = data.CocoDataset(folder / "images", annotations)
    metrics = evaluate.coco_evaluate(_Oracle(coco_ds), coco_ds, batch_size=3)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
