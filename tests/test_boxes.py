"""course_lib.boxes against torchvision.ops / det_utils and hand-worked values."""
import math

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils

from course_lib import boxes


def random_boxes(n, size=100.0, seed=0, min_wh=1.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + min_wh
    return torch.cat([xy, xy + wh], dim=1)


# ---- area and IoU --------------------------------------------------------------------------

def test_box_area_hand_worked_no_plus_one():
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 2.0, 4.0, 3.0]])
    assert boxes.box_area(b).tolist() == [4.0, 3.0]


def test_box_iou_hand_worked():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    # overlap 1 of union 7; identical; disjoint; half inside
    torch.testing.assert_close(boxes.box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0, 0.5]]))


def test_box_iou_matches_torchvision():
    a, b = random_boxes(30, seed=1), random_boxes(50, seed=2)
    ours = boxes.box_iou(a, b)
    assert ours.shape == (30, 50)
    assert torch.equal(ours, torchvision.ops.box_iou(a, b))


def test_box_iou_empty_and_int_inputs():
    assert boxes.box_iou(torch.zeros(0, 4), random_boxes(3)).shape == (0, 3)
    ints = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 15]])
    torch.testing.assert_close(boxes.box_iou(ints, ints), torchvision.ops.box_iou(ints.float(), ints.float()))


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(3, 5), torch.zeros(2, 4, 1)])
def test_box_iou_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="boxes1"):
        boxes.box_iou(bad, torch.zeros(1, 4))


# ---- NMS -----------------------------------------------------------------------------------

@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision(thr):
    b = random_boxes(300, seed=3)
    s = torch.rand(300, generator=torch.Generator().manual_seed(4))
    assert torch.equal(boxes.nms(b, s, thr), torchvision.ops.nms(b, s, thr))


def test_nms_threshold_edges_hand_worked():
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 4.0, 4.0]])
    s = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert boxes.nms(b, s, 1.0).tolist() == [0, 1, 2, 3]  # IoU 1 is not > 1
    assert boxes.nms(b, s, 0.5).tolist() == [0, 1, 3]    # the duplicate goes
    assert boxes.nms(b, s, 0.0).tolist() == [0, 3]       # box 3 only touches box 0


def test_nms_ties_are_stable_like_torchvision():
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4 + [[50.0, 50.0, 60.0, 60.0]] * 2)
    s = torch.tensor([0.5, 0.5, 0.9, 0.5, 0.5, 0.5])
    ours = boxes.nms(b, s, 0.5)
    assert ours.tolist() == [2, 4]
    assert torch.equal(ours, torchvision.ops.nms(b, s, 0.5))


def test_nms_empty():
    keep = boxes.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.numel() == 0


def test_nms_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="scores"):
        boxes.nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


def test_batched_nms_matches_torchvision_and_separates_classes():
    b = random_boxes(200, seed=5)
    s = torch.rand(200, generator=torch.Generator().manual_seed(6))
    idxs = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(7))
    ours = boxes.batched_nms(b, s, idxs, 0.5, fast=False)
    assert torch.equal(ours, torchvision.ops.batched_nms(b, s, idxs, 0.5))
    assert torch.equal(boxes.batched_nms(b, s, idxs, 0.5, fast=True), ours)
    # two identical boxes survive when they belong to different classes
    same = torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 2)
    for fast in (False, True):
        two = torch.tensor([0.9, 0.8])
        assert boxes.batched_nms(same, two, torch.tensor([1, 2]), 0.5, fast=fast).tolist() == [0, 1]
        assert boxes.batched_nms(same, two, torch.tensor([1, 1]), 0.5, fast=fast).tolist() == [0]
        empty = boxes.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5, fast=fast)
        assert empty.numel() == 0 and empty.dtype == torch.int64


# ---- clipping, small boxes, formats -----------------------------------------------------------

def test_clip_and_remove_small_match_torchvision():
    b = random_boxes(100, size=200.0, seed=8, min_wh=0.0) - 50
    assert torch.equal(boxes.clip_boxes_to_image(b, (90, 120)), torchvision.ops.clip_boxes_to_image(b, (90, 120)))
    assert torch.equal(boxes.remove_small_boxes(b, 20.0), torchvision.ops.remove_small_boxes(b, 20.0))
    hand = boxes.clip_boxes_to_image(torch.tensor([[-5.0, 3.0, 130.0, 99.0]]), (64, 128))
    assert hand.tolist() == [[0.0, 3.0, 128.0, 64.0]]


def test_format_round_trip_and_torchvision():
    b = random_boxes(20, seed=9)
    cxcywh = boxes.box_xyxy_to_cxcywh(b)
    torch.testing.assert_close(cxcywh, torchvision.ops.box_convert(b, "xyxy", "cxcywh"))
    torch.testing.assert_close(boxes.box_cxcywh_to_xyxy(cxcywh), b)
    assert boxes.box_xyxy_to_cxcywh(torch.tensor([[0.0, 0.0, 4.0, 2.0]])).tolist() == [[2.0, 1.0, 4.0, 2.0]]


# ---- box coding -------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(weights):
    gt, anchors = random_boxes(64, seed=10), random_boxes(64, seed=11)
    ours, theirs = boxes.BoxCoder(weights), det_utils.BoxCoder(weights)
    deltas = ours.encode(gt, anchors)
    assert torch.equal(deltas, theirs.encode_single(gt, anchors))
    noisy = deltas + torch.randn(64, 4, generator=torch.Generator().manual_seed(12))
    assert torch.equal(ours.decode(noisy, anchors), theirs.decode_single(noisy, anchors))
    per_class = torch.randn(64, 12, generator=torch.Generator().manual_seed(13))  # C = 3
    assert torch.equal(ours.decode(per_class, anchors), theirs.decode_single(per_class, anchors))


def test_box_coder_hand_worked_and_round_trip():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[5.0, 0.0, 25.0, 20.0]])  # centre +10 px = one anchor width, twice as wide
    torch.testing.assert_close(boxes.BoxCoder().encode(gt, anchor), torch.tensor([[1.0, 0.0, math.log(2), 0.0]]))
    torch.testing.assert_close(boxes.BoxCoder((10, 10, 5, 5)).encode(gt, anchor),
                               torch.tensor([[10.0, 0.0, 5 * math.log(2), 0.0]]))
    coder = boxes.BoxCoder((10.0, 10.0, 5.0, 5.0))
    gt, anchors = random_boxes(50, seed=14), random_boxes(50, seed=15)
    torch.testing.assert_close(coder.decode(coder.encode(gt, anchors), anchors), gt, rtol=1e-5, atol=1e-4)


def test_box_coder_clip_prevents_overflow():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    out = boxes.BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchor)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(1000.0))  # 16 * 1000/16


def test_box_coder_validates():
    coder = boxes.BoxCoder()
    with pytest.raises(ValueError, match="anchors"):
        coder.encode(torch.zeros(3, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="deltas"):
        coder.decode(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="differ"):
        coder.decode(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weights"):
        boxes.BoxCoder((1.0, 1.0, 1.0))


def test_nms_degenerate_boxes_like_torchvision():
    # zero-area boxes have IoU 0/0 = NaN with each other: "NaN > threshold" is false, both stay
    b = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]])
    s = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert boxes.nms(b, s, 0.5).tolist() == [0, 1, 2]
    assert torch.equal(boxes.nms(b, s, 0.5), torchvision.ops.nms(b, s, 0.5))
