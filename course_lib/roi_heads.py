"""The RoI heads: Fast R-CNN's box head on pooled proposals, plus Mask R-CNN's mask branch.

Second stage of Faster R-CNN (Ren et al. 2015, §3; Fast R-CNN, Girshick 2015, §2) and the parallel
mask branch of Mask R-CNN (He et al. 2017, §3). In training, each image's proposals (with its
ground-truth boxes appended) are matched to the ground truth and a fixed number of RoIs is sampled
with a fixed fraction of positives; in eval every proposal is scored, decoded, and filtered by
per-class NMS.

Public names: ``select_training_samples``, ``fastrcnn_loss``, ``postprocess_detections``,
``BoxHead``, ``BoxPredictor``, ``RoIHeads``.

Dimensions: N images, K RoIs (all images together), C feature channels, S pooled size,
L classes including background (index 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib import boxes, fpn, mask_head, matching, roi_ops
from course_lib.config import ModelConfig

# Fast R-CNN's box-delta weights (torchvision/Detectron: 10, 10, 5, 5): the second stage's deltas
# are small (proposals are already close), so scaling them up balances the box loss against the
# classification loss without a loss weight.
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Smooth-L1 transition point as torchvision's RoI heads (1/9): nearly L1, so outliers don't dominate.
SMOOTH_L1_BETA = 1.0 / 9.0


def select_training_samples(proposals: list[Tensor], targets: list[dict], config: ModelConfig,
                            box_coder: boxes.BoxCoder, generator: torch.Generator | None = None,
                            ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Proposal targets: append gt boxes, match, sample, and encode regression targets.

    Args:
        proposals: per image ``Tensor[P_i, 4]`` xyxy image pixels (detached RPN output).
        targets: per image dict with ``boxes`` ``Tensor[G_i, 4]`` and ``labels`` ``Tensor[G_i]``.
    Returns:
        per image: sampled rois ``Tensor[R_i, 4]``, matched_idxs ``Tensor[R_i]`` (index into the
        gt; only meaningful for positives), labels ``Tensor[R_i]`` (0 = background) and regression
        targets ``Tensor[R_i, 4]`` (weighted deltas; only positives' rows are used).

    Why append the gt boxes: early in training the RPN's proposals are poor, and the gt boxes
    guarantee the box head always sees some perfect positives (Detectron, torchvision).
    """
    all_labels, all_matched = [], []
    proposals = [torch.cat([p, t["boxes"].to(p)]) for p, t in zip(proposals, targets)]
    for rois, target in zip(proposals, targets):
        matched_idxs, labels = _match_rois(rois, target["boxes"], target["labels"], config)
        all_matched.append(matched_idxs)
        all_labels.append(labels)
    pos_masks, neg_masks = matching.sample_balanced(
        all_labels, config.box_batch_size_per_image, config.box_positive_fraction, generator)
    sampled_rois, sampled_matched, sampled_labels, regression_targets = [], [], [], []
    for rois, matched_idxs, labels, pos, neg, target in zip(
            proposals, all_matched, all_labels, pos_masks, neg_masks, targets):
        keep = torch.where(pos | neg)[0]
        gt_boxes = target["boxes"].to(rois)
        if gt_boxes.numel() == 0:  # no objects: every roi is background, "match" it to itself
            gt_boxes, matched_idxs = rois, torch.arange(len(rois), device=rois.device)
        sampled_rois.append(rois[keep])                                            # [R_i, 4]
        sampled_matched.append(matched_idxs[keep])
        sampled_labels.append(labels[keep])
        regression_targets.append(box_coder.encode(gt_boxes[matched_idxs[keep]], rois[keep]))
    return sampled_rois, sampled_matched, sampled_labels, regression_targets


def _match_rois(rois: Tensor, gt_boxes: Tensor, gt_labels: Tensor, config: ModelConfig,
                ) -> tuple[Tensor, Tensor]:
    """Match one image's rois to its gt: ``(matched_idxs clamped >= 0, labels with -1 = ignore)``."""
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        return zeros, zeros.clone()
    iou = boxes.box_iou(gt_boxes.to(rois), rois)                                   # [G, R]
    matched_idxs = matching.match(iou, config.box_fg_iou, config.box_bg_iou, False)
    labels = gt_labels[matched_idxs.clamp(min=0)].to(torch.int64)
    labels[matched_idxs == matching.BELOW_LOW_THRESHOLD] = 0
    labels[matched_idxs == matching.BETWEEN_THRESHOLDS] = -1
    return matched_idxs.clamp(min=0), labels


def fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Fast R-CNN's multi-task loss: cross-entropy over classes + smooth L1 on the gt class's deltas.

    Args:
        class_logits: ``Tensor[K, L]``; box_regression: ``Tensor[K, 4L]`` (class-specific deltas).
        labels: per image ``Tensor[R_i]`` int64, sum R_i = K; regression_targets: per image ``Tensor[R_i, 4]``.
    Returns:
        ``(loss_classifier, loss_box_reg)``, scalars.

    The box loss is summed over positives and divided by the number of *sampled* RoIs (not the
    positives), as torchvision: this is Fast R-CNN's lambda = 1 with its normaliser.
    Only the gt class's 4 deltas are trained (Fast R-CNN §2.3); background RoIs have none.
    """
    labels = torch.cat(labels)                                                     # [K]
    regression_targets = torch.cat(regression_targets)                             # [K, 4]
    loss_classifier = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(len(labels), -1, 4)                    # [K, L, 4]
    loss_box_reg = F.smooth_l1_loss(box_regression[positive, labels[positive]],
                                    regression_targets[positive], beta=SMOOTH_L1_BETA, reduction="sum")
    return loss_classifier, loss_box_reg / labels.numel()


def postprocess_detections(class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                           image_sizes: list[tuple[int, int]], box_coder: boxes.BoxCoder,
                           score_thresh: float, nms_thresh: float, detections_per_img: int,
                           ) -> list[dict[str, Tensor]]:
    """From scores and deltas to detections: softmax, decode, clip, threshold, per-class NMS, top-k.

    Args:
        class_logits: ``Tensor[K, L]``; box_regression: ``Tensor[K, 4L]``;
        proposals: per image ``Tensor[P_i, 4]`` with sum P_i = K; image_sizes: per image (H, W).
    Returns:
        per image a dict with ``boxes`` ``Tensor[D, 4]``, ``scores`` ``Tensor[D]``,
        ``labels`` ``Tensor[D]`` (1..L-1), sorted by score, D <= detections_per_img.

    Each proposal yields one candidate per foreground class (its own decoded box and score);
    NMS runs per class, so a square never suppresses an overlapping circle.
    """
    num_classes = class_logits.shape[-1]
    rois = torch.cat(proposals)
    pred_boxes = box_coder.decode(box_regression, rois).reshape(len(rois), num_classes, 4)  # [K, L, 4]
    pred_scores = F.softmax(class_logits, -1)                                      # [K, L]
    detections = []
    for boxes_i, scores_i, size in zip(pred_boxes.split([len(p) for p in proposals]),
                                       pred_scores.split([len(p) for p in proposals]), image_sizes):
        boxes_i = boxes.clip_boxes_to_image(boxes_i.reshape(-1, 4), size).reshape(-1, num_classes, 4)
        labels_i = torch.arange(num_classes, device=rois.device).expand_as(scores_i)
        boxes_i, scores_i = boxes_i[:, 1:].reshape(-1, 4), scores_i[:, 1:].reshape(-1)  # drop background
        labels_i = labels_i[:, 1:].reshape(-1)
        keep = torch.where(scores_i > score_thresh)[0]
        keep = keep[boxes.remove_small_boxes(boxes_i[keep], 1e-2)]
        boxes_i, scores_i, labels_i = boxes_i[keep], scores_i[keep], labels_i[keep]
        keep = boxes.batched_nms(boxes_i, scores_i, labels_i, nms_thresh)[:detections_per_img]
        detections.append({"boxes": boxes_i[keep], "scores": scores_i[keep], "labels": labels_i[keep]})
    return detections


class BoxHead(nn.Module):
    """Two fully connected layers on the flattened pooled RoI (torchvision's ``TwoMLPHead``).

    ``Tensor[K, C, S, S] -> Tensor[K, representation_size]``.
    """

    def __init__(self, in_features: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc6(x.flatten(start_dim=1)))                               # [K, D]
        return F.relu(self.fc7(x))                                                 # [K, D]


class BoxPredictor(nn.Module):
    """Class scores and class-specific box deltas (Fast R-CNN's two sibling layers).

    ``Tensor[K, D] -> (class_logits Tensor[K, L], box_regression Tensor[K, 4L])``.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Pool each RoI, run the box head (and mask branch), return losses or detections.

    ``forward(features, proposals, image_sizes, targets=None) -> (detections, losses)``:
    features ``list[Tensor[N, C, h_l, w_l]]`` (one map at ``config.stride``, or P2..P5(, P6) with
    FPN), proposals per image ``Tensor[P_i, 4]``, image sizes (H, W) before padding. Detections
    (eval) per image: ``boxes``, ``labels``, ``scores`` (+ ``masks`` ``Tensor[D, 1, M, M]``
    probabilities in the box, before pasting); losses (train): ``loss_classifier``,
    ``loss_box_reg`` (+ ``loss_mask``). Under mixed precision the heads' logits and deltas are cast
    to fp32 first, so losses, boxes, scores and masks are fp32 as without autocast.
    """

    def __init__(self, config: ModelConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.box_coder = boxes.BoxCoder(weights=BOX_WEIGHTS)
        size = config.box_roi_size
        self.box_head = BoxHead(in_channels * size * size, config.representation_size)
        self.box_predictor = BoxPredictor(config.representation_size, config.num_classes)
        if config.with_mask:
            self.mask_head = mask_head.MaskHead(config, in_channels)

    def forward(self, features: list[Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict] | None = None,
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            proposals, matched_idxs, labels, regression_targets = select_training_samples(
                proposals, targets, self.config, self.box_coder)
        box_features = self.pool(features, proposals, self.config.box_roi_size)      # [K, C, 7, 7]
        class_logits, box_regression = self.box_predictor(self.box_head(box_features))
        class_logits, box_regression = class_logits.float(), box_regression.float()  # fp32 under autocast
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels,
                                                          regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            if self.config.with_mask:
                losses["loss_mask"] = self.mask_loss(features, proposals, matched_idxs, labels, targets)
            return [], losses
        c = self.config
        detections = postprocess_detections(class_logits, box_regression, proposals, image_sizes,
                                            self.box_coder, c.box_score_thresh, c.box_nms_thresh,
                                            c.detections_per_img)
        if self.config.with_mask:
            self.predict_masks(features, detections)
        return detections, {}

    def pool(self, features: list[Tensor], rois: list[Tensor], output_size: int) -> Tensor:
        """Pool every RoI to ``Tensor[K, C, S, S]``: one map (``pool_rois``) or the FPN levels."""
        c = self.config
        if c.fpn:  # P2..P5 at strides 4..32; P6 only feeds the RPN (FPN paper §4.2)
            scales = [1.0 / 2 ** (k + 2) for k in range(4)]
            return fpn.multiscale_roi_align(features[:4], rois, output_size, scales, c.sampling_ratio,
                                            c.canonical_size, c.canonical_level, c.aligned, c.fast_ops)
        return roi_ops.pool_rois(features[-1], rois, output_size, 1.0 / c.stride, pooler=c.pooler,
                                 sampling_ratio=c.sampling_ratio, aligned=c.aligned, fast=c.fast_ops)

    def mask_loss(self, features: list[Tensor], rois: list[Tensor], matched_idxs: list[Tensor],
                  labels: list[Tensor], targets: list[dict]) -> Tensor:
        """Mask loss on the positive sampled RoIs only (Mask R-CNN §3: L_mask is defined on positives)."""
        positive = [torch.where(lab > 0)[0] for lab in labels]
        pos_rois = [r[p] for r, p in zip(rois, positive)]
        mask_logits = self.mask_head(self.pool(features, pos_rois, self.config.mask_roi_size)).float()
        resolution = mask_logits.shape[-1]                                          # 2S = 28
        mask_targets = [mask_head.mask_targets(t["masks"], r, m[p], resolution)
                        for t, r, m, p in zip(targets, pos_rois, matched_idxs, positive)]
        pos_labels = torch.cat([lab[p] for lab, p in zip(labels, positive)])
        return mask_head.mask_loss(mask_logits, torch.cat(mask_targets), pos_labels, kind=self.config.mask_loss)

    def predict_masks(self, features: list[Tensor], detections: list[dict[str, Tensor]]) -> None:
        """Add ``masks`` ``Tensor[D, 1, M, M]`` (probabilities of the predicted class) to each detection."""
        mask_logits = self.mask_head(self.pool(features, [d["boxes"] for d in detections],
                                                self.config.mask_roi_size)).float()  # [K, L, M, M]
        labels = torch.cat([d["labels"] for d in detections])
        probs = mask_head.mask_probs(mask_logits, labels, self.config.mask_loss,
                                     self.config.softmax_mask_rule)                    # [K, 1, M, M]
        for det, masks in zip(detections, probs.split([len(d["boxes"]) for d in detections])):
            det["masks"] = masks
