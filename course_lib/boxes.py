"""Box maths: areas, IoU, non-maximum suppression and the box coding the regressors learn.

The idea: a detector never regresses pixel corners directly. It predicts *deltas* relative to a
reference box (an anchor in the RPN, a proposal in the box head), and duplicate detections of the
same object are removed by non-maximum suppression. Faster R-CNN §3.1.2 (Ren et al., 2015) and
R-CNN appendix C (Girshick et al., 2014) define the coding used here.

Conventions (torchvision's): boxes are ``Tensor[K, 4]`` in ``(x1, y1, x2, y2)`` image pixels, in
*continuous* coordinates: pixel ``i`` covers ``[i, i + 1)`` and its centre is at ``i + 0.5``, so
a box's width is ``x2 - x1`` with no "+1". Dimension letters: ``K`` and ``M`` count boxes,
``C`` counts classes.

Public names: ``box_area``, ``box_iou``, ``nms``, ``batched_nms``, ``clip_boxes_to_image``,
``remove_small_boxes``, ``box_xyxy_to_cxcywh``, ``box_cxcywh_to_xyxy``, ``BoxCoder``.
Every function has torchvision.ops' semantics; ``tests/test_boxes.py`` checks the numbers.
"""
from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor


def _check_boxes(boxes: Tensor, name: str, last: int = 4) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``boxes`` is a ``Tensor[K, last]``."""
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != last:
        raise ValueError(f"{name} must have shape [K, {last}], got {list(boxes.shape)}")


def _upcast(t: Tensor) -> Tensor:
    """Integers and half floats overflow in products of widths; compute in float32 or wider."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.float()


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of each box.

    Args:
        boxes: ``Tensor[K, 4]`` xyxy pixels.
    Returns:
        ``Tensor[K]``. No "+1": in continuous coordinates the box ``[0, 0, 2, 2]`` covers
        exactly the four pixels with centres at 0.5 and 1.5, area 4.
    """
    _check_boxes(boxes, "boxes")
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair: ``IoU = |A n B| / (|A| + |B| - |A n B|)``.

    Args:
        boxes1: ``Tensor[K, 4]`` xyxy pixels.
        boxes2: ``Tensor[M, 4]`` xyxy pixels.
    Returns:
        ``Tensor[K, M]`` in [0, 1], one row per box of ``boxes1``. Computed by broadcasting, with
        no Python loop: the RPN calls it on (ground-truth boxes x thousands of anchors).
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    area1, area2 = box_area(boxes1), box_area(boxes2)
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])      # [K, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [K, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)                         # [K, M, 2]
    inter = wh[..., 0] * wh[..., 1]                                     # [K, M]
    union = area1[:, None] + area2[None, :] - inter                    # [K, M]
    return inter / union


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression: keep the best box, drop every box overlapping it by more than
    ``iou_threshold``, repeat with the best of the rest.

    Args:
        boxes: ``Tensor[K, 4]`` xyxy pixels.
        scores: ``Tensor[K]``.
        iou_threshold: a box is dropped when its IoU with a kept box is ``> iou_threshold``
            (strictly: at 1.0 nothing is dropped, at 0.0 only boxes that touch no kept box with
            positive area survive).
    Returns:
        ``Tensor[k]`` int64 indices of the kept boxes, by decreasing score. Equal scores keep
        their input order (a stable sort), as torchvision's CPU kernel does.

    Greedy, as in the paper: sort by score once, compute the IoU matrix of the sorted boxes in
    one vectorised call, then walk down the rows; a box still alive when its row comes up is
    kept and kills every lower-scored box it overlaps. Memory is ``O(K^2)`` (K = 2000 boxes:
    16 MB), fine for the few thousand proposals per image the RPN passes in.
    """
    _check_boxes(boxes, "boxes")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape [{boxes.shape[0]}], got {list(scores.shape)}")
    order = torch.sort(scores, descending=True, stable=True).indices  # [K] best first
    sorted_boxes = boxes[order]                                        # [K, 4]
    overlaps = box_iou(sorted_boxes, sorted_boxes) > iou_threshold     # [K, K]; NaN (empty boxes) is not >
    alive = torch.ones(order.shape[0], dtype=torch.bool, device=boxes.device)  # [K]
    for i in range(order.shape[0]):
        if alive[i]:  # box i survives everything above it: keep it, drop what it overlaps below
            alive[i + 1:] &= ~overlaps[i, i + 1:]
    return order[alive]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                fast: bool = True) -> Tensor:
    """NMS run independently per category ``idxs`` (per class in the box head, per image...).

    Args:
        boxes: ``Tensor[K, 4]`` xyxy pixels.
        scores: ``Tensor[K]``.
        idxs: ``Tensor[K]`` int64 category of each box.
        iou_threshold: as in :func:`nms`.
    Returns:
        ``Tensor[k]`` int64 indices of the kept boxes, by decreasing score.

    The coordinate-offset trick: shift every box of category ``c`` by ``c * (max_coord + 1)``
    along both axes. Boxes of different categories then lie in disjoint squares, their IoU is 0,
    and ONE call of :func:`nms` does the work of one call per category.

    ``fast=True`` (the default, used by the RPN and the box head in training) runs
    ``torchvision.ops.batched_nms``'s C++ kernel: the same indices (``tests/test_boxes.py``),
    because the hand-built :func:`nms` (an ``O(K^2)`` IoU matrix and a Python loop) is several
    times slower on the thousands of proposals of a training step. ``fast=False`` runs the
    hand-built version shown here.
    """
    _check_boxes(boxes, "boxes")
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have the shape of scores {list(scores.shape)}, got {list(idxs.shape)}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if fast:
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))  # [K]
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def clip_boxes_to_image(boxes: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Clamp x to ``[0, width]`` and y to ``[0, height]`` (continuous coordinates: the right
    edge of the last pixel column is at ``x = width``).

    Args:
        boxes: ``Tensor[K, 4]`` xyxy pixels.
        size_hw: ``(height, width)`` of the image.
    Returns:
        ``Tensor[K, 4]`` clipped copy.
    """
    _check_boxes(boxes, "boxes")
    height, width = size_hw
    x = boxes[:, 0::2].clamp(min=0, max=width)   # [K, 2]
    y = boxes[:, 1::2].clamp(min=0, max=height)  # [K, 2]
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)  # [K, 4]


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width AND height are ``>= min_size`` pixels.

    Args:
        boxes: ``Tensor[K, 4]`` xyxy pixels.
        min_size: smallest side kept, in pixels.
    Returns:
        ``Tensor[k]`` int64 indices, increasing.
    """
    _check_boxes(boxes, "boxes")
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((widths >= min_size) & (heights >= min_size))[0]


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``Tensor[K, 4]`` corners ``(x1, y1, x2, y2)`` -> ``Tensor[K, 4]`` ``(cx, cy, w, h)``."""
    _check_boxes(boxes, "boxes")
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=1)


def box_cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """``Tensor[K, 4]`` ``(cx, cy, w, h)`` -> ``Tensor[K, 4]`` corners ``(x1, y1, x2, y2)``."""
    _check_boxes(boxes_cxcywh, "boxes_cxcywh")
    cx, cy, w, h = boxes_cxcywh.unbind(dim=1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1)


class BoxCoder:
    """Encode a box relative to a reference box as four deltas, and decode deltas back.

    With reference (anchor or proposal) centre ``(xa, ya)`` and size ``(wa, ha)``, and target box
    ``(x, y, w, h)`` (Faster R-CNN eq. 2)::

        dx = wx * (x - xa) / wa      dy = wy * (y - ya) / ha
        dw = ww * log(w / wa)        dh = wh * log(h / ha)

    Why these four numbers: dividing by the anchor size makes the target *scale invariant* (a
    shift of 10 % of the box reads the same for a 16 px and a 512 px box), and the log turns
    the positive ratio ``w / wa`` into an unbounded number that is 0 when the sizes agree and
    symmetric for halving and doubling.

    Args:
        weights: ``(wx, wy, ww, wh)`` multiply the deltas so the regression targets have roughly
            unit variance and the box loss is balanced against the classification loss. The RPN
            uses ``(1, 1, 1, 1)``; the box head uses ``(10, 10, 5, 5)`` (Detectron), because its
            proposals already sit close to the objects and the raw deltas are small (std ~0.1
            for the centre, ~0.2 for the size).
        clip: ``dw`` and ``dh`` are clamped to ``log(1000 / 16)`` before ``exp`` when decoding.
            Early in training the regressor outputs arbitrary values; ``exp(100)`` overflows
            float32 to ``inf`` and one infinite box poisons NMS and the losses. The clip caps
            a box at 1000/16 = 62.5 times its anchor.

    Numbers match torchvision's ``det_utils.BoxCoder.encode_single`` / ``decode_single``.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = math.log(1000.0 / 16)) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be 4 positive numbers, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.clip = float(clip)

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas that move each anchor onto its box.

        Args:
            boxes: ``Tensor[K, 4]`` xyxy pixels, the targets (matched ground-truth boxes).
            anchors: ``Tensor[K, 4]`` xyxy pixels, the references (anchors or proposals).
        Returns:
            ``Tensor[K, 4]`` deltas ``(dx, dy, dw, dh)``, weights applied.
        """
        _check_boxes(boxes, "boxes")
        _check_boxes(anchors, "anchors")
        if boxes.shape[0] != anchors.shape[0]:
            raise ValueError(f"boxes {list(boxes.shape)} and anchors {list(anchors.shape)} differ in K")
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(boxes.dtype)
        anchor_w = anchors[:, 2] - anchors[:, 0]             # [K]
        anchor_h = anchors[:, 3] - anchors[:, 1]
        anchor_cx = anchors[:, 0] + 0.5 * anchor_w
        anchor_cy = anchors[:, 1] + 0.5 * anchor_h
        box_w = boxes[:, 2] - boxes[:, 0]
        box_h = boxes[:, 3] - boxes[:, 1]
        box_cx = boxes[:, 0] + 0.5 * box_w
        box_cy = boxes[:, 1] + 0.5 * box_h
        dx = wx * (box_cx - anchor_cx) / anchor_w
        dy = wy * (box_cy - anchor_cy) / anchor_h
        dw = ww * torch.log(box_w / anchor_w)
        dh = wh * torch.log(box_h / anchor_h)
        return torch.stack((dx, dy, dw, dh), dim=1)          # [K, 4]

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Apply deltas to anchors: the inverse of :meth:`encode`.

        Args:
            deltas: ``Tensor[K, 4]`` (or ``Tensor[K, 4 * C]``: one set of deltas per class, as
                the box head predicts; each group of four is decoded against the same anchor).
            anchors: ``Tensor[K, 4]`` xyxy pixels.
        Returns:
            boxes: ``Tensor[K, 4]`` (or ``Tensor[K, 4 * C]``) xyxy pixels, not clipped to the image.
        """
        if not isinstance(deltas, Tensor) or deltas.dim() != 2 or deltas.shape[1] % 4 != 0 \
                or deltas.shape[1] == 0:
            shape = list(deltas.shape) if isinstance(deltas, Tensor) else type(deltas).__name__
            raise ValueError(f"deltas must have shape [K, 4] or [K, 4 * C], got {shape}")
        _check_boxes(anchors, "anchors")
        if deltas.shape[0] != anchors.shape[0]:
            raise ValueError(f"deltas {list(deltas.shape)} and anchors {list(anchors.shape)} differ in K")
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        widths = (anchors[:, 2] - anchors[:, 0])[:, None]    # [K, 1]
        heights = (anchors[:, 3] - anchors[:, 1])[:, None]
        ctr_x = anchors[:, 0, None] + 0.5 * widths
        ctr_y = anchors[:, 1, None] + 0.5 * heights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy  # [K, C]
        dw = (deltas[:, 2::4] / ww).clamp(max=self.clip)     # exp overflow guard, see class doc
        dh = (deltas[:, 3::4] / wh).clamp(max=self.clip)
        pred_cx, pred_cy = dx * widths + ctr_x, dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)                # [K, C], torchvision's rounding order
        half_h = 0.5 * (torch.exp(dh) * heights)
        boxes = torch.stack((pred_cx - half_w, pred_cy - half_h,
                             pred_cx + half_w, pred_cy + half_h), dim=2)  # [K, C, 4]
        return boxes.flatten(1)                                           # [K, 4 * C]
