"""Matching and sampling: which anchors (or proposals) learn which ground-truth box.

The idea: training needs a label for every anchor. Faster R-CNN §3.1.2 matches by IoU: an anchor
is positive when its IoU with some ground-truth box is ``>= 0.7`` (or when it is that box's best
anchor, so that no object goes without one), negative below ``0.3``, and ignored in between.
Because negatives outnumber positives by hundreds to one, each image then contributes a fixed
mini-batch (256 anchors in the RPN, up to half positive; 512 RoIs in the box head, a quarter
positive). The box head reuses both with one threshold of 0.5 and no low-quality matches.

Dimension letters: ``G`` ground-truth boxes, ``A`` anchors (or proposals) of one image.

Public names: ``BELOW_LOW_THRESHOLD``, ``BETWEEN_THRESHOLDS``, ``match``, ``sample_balanced``,
``label_anchors`` (the RPN's rule, also what chapter 02's widget shows), with the semantics of torchvision's ``det_utils.Matcher`` and
``det_utils.BalancedPositiveNegativeSampler`` (``tests/test_matching.py`` checks equality).
"""
from __future__ import annotations

import torch
from torch import Tensor

from course_lib import boxes

BELOW_LOW_THRESHOLD = -1  # best IoU < low: a negative (background) anchor
BETWEEN_THRESHOLDS = -2   # low <= best IoU < high: ignored by the loss


def match(iou: Tensor, high: float, low: float, allow_low_quality_matches: bool = False) -> Tensor:
    """Assign each anchor the index of its best ground-truth box, or a negative code.

    Args:
        iou: ``Tensor[G, A]`` IoU of every ground-truth box (rows) with every anchor (columns),
            as ``boxes.box_iou(gt_boxes, anchors)`` returns it.
        high: IoU ``>= high`` makes a match (RPN: 0.7, box head: 0.5).
        low: IoU ``< low`` makes a negative, ``BELOW_LOW_THRESHOLD``; in ``[low, high)`` the
            anchor is ``BETWEEN_THRESHOLDS`` (RPN: 0.3, box head: 0.5, so nothing is between).
        allow_low_quality_matches: also match, for every ground-truth box, the anchors with its
            highest IoU (all of them when several tie), even if that IoU is below ``high``.
            Without it a small or oddly shaped object whose best anchor has IoU 0.6 would never
            be a positive and the RPN would never learn to propose it (Faster R-CNN §3.1.2).
    Returns:
        matched_idxs: ``Tensor[A]`` int64: the matched ground-truth index in ``[0, G)``, or
        ``BELOW_LOW_THRESHOLD`` (-1), or ``BETWEEN_THRESHOLDS`` (-2). With no ground truth
        (``G = 0``, an image of pure background) every anchor is ``BELOW_LOW_THRESHOLD``.
    """
    if not isinstance(iou, Tensor) or iou.dim() != 2:
        shape = list(iou.shape) if isinstance(iou, Tensor) else type(iou).__name__
        raise ValueError(f"iou must have shape [G, A], got {shape}")
    if low > high:
        raise ValueError(f"low={low} must be <= high={high}")
    num_gt, num_anchors = iou.shape
    if num_gt == 0 or num_anchors == 0:
        return torch.full((num_anchors,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
    best_iou, matched_idxs = iou.max(dim=0)  # [A], [A]: best gt for each anchor
    best_gt_for_anchor = matched_idxs.clone()
    matched_idxs[best_iou < low] = BELOW_LOW_THRESHOLD
    matched_idxs[(best_iou >= low) & (best_iou < high)] = BETWEEN_THRESHOLDS
    if allow_low_quality_matches:
        best_iou_per_gt = iou.max(dim=1).values                           # [G]
        _, anchor_idx = torch.where(iou == best_iou_per_gt[:, None])      # ties included
        # such an anchor gets its own best gt (not necessarily the gt it was best for)
        matched_idxs[anchor_idx] = best_gt_for_anchor[anchor_idx]
    return matched_idxs


def sample_balanced(labels_list: list[Tensor], batch_size_per_image: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Pick a random mini-batch of positives and negatives in each image.

    Args:
        labels_list: one ``Tensor[A]`` per image: ``>= 1`` positive (an object label, or 1 in
            the RPN), ``0`` negative (background), ``-1`` ignored.
        batch_size_per_image: anchors (or RoIs) sampled per image (RPN: 256, box head: 512).
        positive_fraction: at most this fraction of the batch is positive (RPN: 0.5, box head:
            0.25); when an image has fewer positives, negatives fill the rest of the batch.
        generator: random source for ``torch.randperm``; ``None`` uses the global one, which
            gives exactly torchvision's draws after the same ``torch.manual_seed``.
    Returns:
        ``(pos_masks, neg_masks)``: two lists with one bool ``Tensor[A]`` per image, True where an
        element was sampled as a positive (respectively negative). Never both for one element.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    if batch_size_per_image < 0:
        raise ValueError(f"batch_size_per_image must be >= 0, got {batch_size_per_image}")
    pos_masks, neg_masks = [], []
    for labels_per_image in labels_list:
        if not isinstance(labels_per_image, Tensor) or labels_per_image.dim() != 1:
            raise ValueError("each entry of labels_list must be a 1-d Tensor[A], got "
                             f"{getattr(labels_per_image, 'shape', type(labels_per_image).__name__)}")
        positive = torch.where(labels_per_image >= 1)[0]
        negative = torch.where(labels_per_image == 0)[0]
        num_pos = min(positive.numel(), int(batch_size_per_image * positive_fraction))
        num_neg = min(negative.numel(), batch_size_per_image - num_pos)
        device = labels_per_image.device
        pos_pick = positive[torch.randperm(positive.numel(), device=device, generator=generator)[:num_pos]]
        neg_pick = negative[torch.randperm(negative.numel(), device=device, generator=generator)[:num_neg]]
        pos_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
        neg_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
        pos_mask[pos_pick] = True
        neg_mask[neg_pick] = True
        pos_masks.append(pos_mask)
        neg_masks.append(neg_mask)
    return pos_masks, neg_masks


def label_anchors(anchors: Tensor, gt_boxes: Tensor, fg_iou: float = 0.7, bg_iou: float = 0.3,
                  allow_low_quality_matches: bool = True) -> tuple[Tensor, Tensor]:
    """Label one image's anchors for the RPN loss (Faster R-CNN §3.1.2).

    Args:
        anchors: ``Tensor[R, 4]`` xyxy pixels.
        gt_boxes: ``Tensor[G, 4]`` xyxy pixels; ``G = 0`` (no object) makes every anchor negative.
        fg_iou, bg_iou: IoU ``>= fg_iou`` is positive, ``< bg_iou`` negative, between ignored.
        allow_low_quality_matches: each ground-truth box's best anchors are positive whatever their
            IoU, so no object goes without a positive anchor (``match``). The RPN always uses it.

    A box that overlaps no anchor at all has best IoU 0, tied by every anchor, so the best-match
    rule makes every anchor positive for it. torchvision's Matcher does the same and we keep its
    numbers; chapter 02 shows the case. It cannot happen in the course's models, whose largest
    anchor is at least twice the stride, so every box overlaps some anchor.

    Returns:
        ``labels Tensor[R]`` float32: 1 positive, 0 negative, -1 ignored; and
        ``matched_gt_boxes Tensor[R, 4]``: the ground-truth box each anchor regresses to
        (meaningful for positives only; zeros without ground truth).
    """
    if gt_boxes.numel() == 0:
        return anchors.new_zeros(anchors.shape[0]), torch.zeros_like(anchors)
    matched_idxs = match(boxes.box_iou(gt_boxes, anchors), fg_iou, bg_iou, allow_low_quality_matches)  # [R]
    labels = (matched_idxs >= 0).to(torch.float32)  # [R]
    labels[matched_idxs == BETWEEN_THRESHOLDS] = -1.0
    return labels, gt_boxes[matched_idxs.clamp(min=0)]  # [R], [R, 4]
