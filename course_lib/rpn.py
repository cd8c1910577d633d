"""The Region Proposal Network: a small conv head that scores every anchor and nudges it onto
an object, then keeps the best few hundred boxes as proposals (Faster R-CNN §3.1, Ren et al. 2015).

Pipeline, one line each in ``RegionProposalNetwork.forward``:

1. ``RPNHead``: a 3x3 conv + ReLU, then two 1x1 convs: ``A`` objectness logits and ``4A`` deltas
   per feature cell (``A`` anchors per location), the same weights on every level;
2. ``flatten_predictions``: ``[N, A, h, w]`` maps to one row per anchor, in the anchor order of
   ``course_lib.anchors.AnchorGenerator`` (location-major, then the ``A`` anchors);
3. decode the deltas against the anchors (``boxes.BoxCoder`` with weights 1, 1, 1, 1), detached:
   Faster R-CNN does not backpropagate through proposal coordinates;
4. ``select_proposals``: top-k by objectness per level, clip to the image, drop tiny boxes, NMS
   per level, keep the best ``post_nms_top_n``;
5. in training, ``matching.label_anchors`` (IoU >= 0.7 positive, < 0.3 negative, each ground-truth box's
   best anchors positive), ``matching.sample_balanced`` (256 anchors, at most half positive) and
   ``rpn_loss`` (binary cross-entropy + smooth L1).

Dimension letters: ``N`` images, ``A`` anchors per location, ``R`` anchors of one image over all
levels, ``G`` ground-truth boxes, ``P`` proposals. Boxes are xyxy image pixels.

Public names: ``RPNHead``, ``RegionProposalNetwork``, ``flatten_predictions``,
``rpn_loss``, ``top_per_level``, ``select_proposals``, ``level_anchor_sizes``. Numbers equal torchvision's
``models.detection.rpn`` (``tests/test_rpn.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib import anchors as anchor_utils
from course_lib import boxes as box_ops
from course_lib import matching
from course_lib.config import ModelConfig

# Smallest proposal side kept, in pixels: torchvision's RegionProposalNetwork.min_size. It only
# removes boxes that collapsed to (almost) nothing after clipping, whose IoU would be 0/0.
MIN_SIZE = 1e-3
# Smooth-L1 switches from quadratic to linear at |x| = 1/9 (Detectron / torchvision's RPN): the
# RPN's deltas with weights 1 are small, so a small beta keeps the loss L1-like (robust to
# outliers) for all but tiny errors.
SMOOTH_L1_BETA = 1.0 / 9
FPN_LEVELS = 5  # P2..P6: the RPN also looks at P6, the FPN's stride-64 max-pool of P5


class RPNHead(nn.Module):
    """The RPN's "mini-network" slid over the feature map (Faster R-CNN §3.1, Fig. 3).

    Args:
        in_channels: channels ``C`` of every feature level (one head serves all FPN levels).
        num_anchors: ``A``, anchors per feature location.

    ``forward(features: list[Tensor[N, C, h_l, w_l]]) -> (objectness, deltas)``: per level
    ``Tensor[N, A, h_l, w_l]`` logits and ``Tensor[N, 4A, h_l, w_l]`` box deltas. Weights start
    as N(0, 0.01) with zero bias, as the paper and torchvision: every anchor starts at objectness
    probability 0.5 and deltas near 0 (proposals = anchors).
    """

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = [], []
        for feature in features:
            t = torch.relu(self.conv(feature))  # [N, C, h, w]
            objectness.append(self.cls_logits(t))  # [N, A, h, w]
            deltas.append(self.bbox_pred(t))  # [N, 4A, h, w]
        return objectness, deltas


def flatten_predictions(objectness: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Put the head's maps in anchor order: one row per (location, anchor), levels concatenated.

    Args:
        objectness: per level ``Tensor[N, A, h_l, w_l]``.
        deltas: per level ``Tensor[N, 4A, h_l, w_l]``; channel ``4a + j`` is coordinate ``j`` of
            anchor ``a`` (torchvision's layout).
    Returns:
        ``(objectness Tensor[N, R], deltas Tensor[N, R, 4])`` with ``R = sum_l h_l * w_l * A``.
    """
    flat_objectness, flat_deltas = [], []
    for obj, dlt in zip(objectness, deltas):
        n, a, h, w = obj.shape
        flat_objectness.append(obj.permute(0, 2, 3, 1).reshape(n, -1))  # [N, h*w*A]
        dlt = dlt.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2)  # [N, h, w, A, 4]
        flat_deltas.append(dlt.reshape(n, -1, 4))  # [N, h*w*A, 4]
    return torch.cat(flat_objectness, dim=1), torch.cat(flat_deltas, dim=1)


def rpn_loss(objectness: Tensor, deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor],
             pos_masks: list[Tensor], neg_masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The RPN's two losses over the sampled anchors of all images (Faster R-CNN eq. 1).

    Args:
        objectness: ``Tensor[N, R]`` logits.
        deltas: ``Tensor[N, R, 4]`` predicted deltas.
        labels: per image ``Tensor[R]`` (1, 0, -1) from ``matching.label_anchors``.
        regression_targets: per image ``Tensor[R, 4]``, ``BoxCoder.encode(matched_gt_boxes, anchors)``.
        pos_masks, neg_masks: per image bool ``Tensor[R]``, the sampled mini-batch
            (``matching.sample_balanced``).
    Returns:
        ``(loss_objectness, loss_rpn_box_reg)``: binary cross-entropy with logits averaged over
        the sampled anchors; smooth L1 (beta 1/9) summed over sampled positives and divided by
        the number sampled (not by the positives: torchvision's normalisation, which is the
        paper's lambda balancing term in effect). An image without objects samples negatives
        only and gives a box loss of exactly 0.
    """
    pos = torch.cat(pos_masks)  # [N*R]
    sampled = pos | torch.cat(neg_masks)  # [N*R]
    num_sampled = sampled.sum().clamp(min=1)  # guards 0/0 when nothing can be sampled
    targets = torch.cat(regression_targets)[pos]  # [num_pos, 4]
    box_loss = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos], targets, beta=SMOOTH_L1_BETA,
                                reduction="sum") / num_sampled
    objectness_loss = F.binary_cross_entropy_with_logits(
        objectness.reshape(-1)[sampled], torch.cat(labels)[sampled], reduction="sum") / num_sampled
    return objectness_loss, box_loss


def top_per_level(objectness: Tensor, num_anchors_per_level: list[int], k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best-scored anchors of each level: ``(indices Tensor[N, K] into the R rows, level
    Tensor[K] of each)``, K the sum of ``min(k, anchors of the level)``; ``objectness`` is ``Tensor[N, R]``."""
    top_idx, levels, offset = [], [], 0
    for level, scores in enumerate(objectness.split(num_anchors_per_level, dim=1)):
        n = min(k, scores.shape[1])
        top_idx.append(scores.topk(n, dim=1).indices + offset)  # [N, n]
        levels.append(torch.full((n,), level, dtype=torch.int64, device=objectness.device))
        offset += scores.shape[1]
    return torch.cat(top_idx, dim=1), torch.cat(levels)


def select_proposals(proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]],
                     num_anchors_per_level: list[int], pre_nms_top_n: int, post_nms_top_n: int,
                     nms_thresh: float, min_size: float = MIN_SIZE) -> tuple[list[Tensor], list[Tensor]]:
    """From every decoded anchor to a few hundred proposals per image.

    Args:
        proposals: ``Tensor[N, R, 4]`` decoded boxes, xyxy pixels.
        objectness: ``Tensor[N, R]`` logits.
        image_sizes: ``(height, width)`` of each image before padding: proposals are clipped to it.
        num_anchors_per_level: how many of the ``R`` rows belong to each level.
        pre_nms_top_n: boxes kept *per level* before NMS (so coarse levels are not crowded out).
        post_nms_top_n: proposals kept per image after NMS.
        nms_thresh: NMS IoU threshold (0.7), applied within each level.
        min_size: boxes with a side below this (pixels) are dropped.
    Returns:
        ``(boxes, scores)``: per image ``Tensor[P, 4]`` and ``Tensor[P]`` objectness
        probabilities, best first, ``P <= post_nms_top_n``.
    """
    top_idx, levels = top_per_level(objectness, num_anchors_per_level, pre_nms_top_n)  # [N, K], [K]
    batch_idx = torch.arange(proposals.shape[0], device=proposals.device)[:, None]
    proposals, probs = proposals[batch_idx, top_idx], torch.sigmoid(objectness[batch_idx, top_idx])
    final_boxes, final_scores = [], []
    for boxes, scores, size_hw in zip(proposals, probs, image_sizes):
        boxes = box_ops.clip_boxes_to_image(boxes, size_hw)  # [K, 4]
        keep = box_ops.remove_small_boxes(boxes, min_size)
        boxes, scores, lvl = boxes[keep], scores[keep], levels[keep]
        keep = box_ops.batched_nms(boxes, scores, lvl, nms_thresh)[:post_nms_top_n]
        final_boxes.append(boxes[keep])  # [P, 4]
        final_scores.append(scores[keep])  # [P]
    return final_boxes, final_scores


def level_anchor_sizes(config: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per feature level, the ``sizes`` argument of ``anchors.AnchorGenerator``.

    Without FPN every size sits on the one level: ``((8, 16, 32, 64),)``, ``A = 4 * 3 = 12``.
    With FPN each level P2..P6 gets ONE size (FPN §4.1; torchvision does the same), so the
    level's stride and its anchors grow together: ``A = 3``. ``config.anchor_sizes`` has one size
    per level, or one fewer: then P6 (stride 64) gets twice the last size (the default
    (8, 16, 32, 64) becomes 8, 16, 32, 64, 128 px, i.e. 2x each level's stride).
    """
    sizes = tuple(config.anchor_sizes)
    if not config.fpn:
        return (sizes,)
    if len(sizes) == FPN_LEVELS - 1:
        sizes = sizes + (2 * sizes[-1],)
    if len(sizes) != FPN_LEVELS:
        raise ValueError(f"ModelConfig.anchor_sizes={config.anchor_sizes}: with fpn=True give "
                         f"{FPN_LEVELS} sizes (P2..P6) or {FPN_LEVELS - 1} (P6 then gets twice the last)")
    return tuple((s,) for s in sizes)


class RegionProposalNetwork(nn.Module):
    """Anchors + ``RPNHead`` + proposal selection + training losses, read from ``config``.

    Args:
        config: anchor sizes and ratios, ``fpn``, and the ``rpn_*`` thresholds and top-n counts.
        in_channels: channels of the feature maps it is given.

    ``forward(features, image_sizes, padded_size, targets=None) -> (proposals, losses)``:
        features: ``list[Tensor[N, C, h_l, w_l]]``, one level without FPN, P2..P6 with it.
        image_sizes: ``(height, width)`` of each image before padding (proposals are clipped to it).
        padded_size: ``(H, W)`` of the padded batch: anchor strides are ``H // h_l``, ``W // w_l``.
        targets: in training, per image a dict with ``boxes`` ``Tensor[G, 4]`` (``G`` may be 0).
    Returns ``proposals``: per image ``Tensor[P, 4]`` detached xyxy pixels; ``losses``:
    ``{"loss_objectness", "loss_rpn_box_reg"}`` in training, ``{}`` in eval.
    """

    def __init__(self, config: ModelConfig, in_channels: int) -> None:
        super().__init__()
        self.config = config
        sizes = level_anchor_sizes(config)
        self.anchor_generator = anchor_utils.AnchorGenerator(sizes, (tuple(config.aspect_ratios),) * len(sizes))
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_location()[0])
        self.box_coder = box_ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def forward(self, features: list[Tensor], image_sizes: list[tuple[int, int]], padded_size: tuple[int, int],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        self._check_inputs(features, image_sizes, targets)
        cfg, n = self.config, features[0].shape[0]
        objectness, deltas = self.head(features)  # per level [N, A, h, w], [N, 4A, h, w]
        anchors = self.anchors(padded_size, features)  # [R, 4]
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = flatten_predictions(objectness, deltas)  # [N, R], [N, R, 4]
        objectness, deltas = objectness.to(anchors.dtype), deltas.to(anchors.dtype)  # fp32 under autocast
        proposals = self.box_coder.decode(deltas.detach().reshape(-1, 4), anchors.repeat(n, 1))  # [N*R, 4]
        pre, post = ((cfg.rpn_pre_nms_top_n_train, cfg.rpn_post_nms_top_n_train) if self.training
                     else (cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test))
        boxes, _ = select_proposals(proposals.view(n, -1, 4), objectness.detach(), image_sizes,
                                    num_anchors_per_level, pre, post, cfg.rpn_nms_thresh)
        if not self.training:
            return boxes, {}
        return boxes, self.losses(anchors, objectness, deltas, targets)

    def anchors(self, padded_size: tuple[int, int], features: list[Tensor]) -> Tensor:
        """All anchors of one (padded) image, levels concatenated: ``Tensor[R, 4]`` xyxy pixels, fp32 or wider."""
        # At least fp32 under mixed precision: a bf16 coordinate near 500 px is off by up to 2 px.
        dtype = torch.promote_types(features[0].dtype, torch.float32)
        per_level = self.anchor_generator(tuple(padded_size), [tuple(f.shape[-2:]) for f in features],
                                          dtype=dtype, device=features[0].device)
        return torch.cat(per_level)  # [R, 4]

    def losses(self, anchors: Tensor, objectness: Tensor, deltas: Tensor,
               targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Label, sample and score: ``anchors [R, 4]``, ``objectness [N, R]``, ``deltas [N, R, 4]``."""
        cfg = self.config
        labels, regression_targets = [], []
        for target in targets:
            labels_per_image, matched_gt_boxes = matching.label_anchors(anchors, target["boxes"].to(anchors),
                                                               cfg.rpn_fg_iou, cfg.rpn_bg_iou)
            labels.append(labels_per_image)  # [R]
            regression_targets.append(self.box_coder.encode(matched_gt_boxes, anchors))  # [R, 4]
        pos_masks, neg_masks = matching.sample_balanced(labels, cfg.rpn_batch_size_per_image,
                                                        cfg.rpn_positive_fraction)
        loss_objectness, loss_box = rpn_loss(objectness, deltas, labels, regression_targets, pos_masks, neg_masks)
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    def _check_inputs(self, features, image_sizes, targets) -> None:
        if not isinstance(features, (list, tuple)) or not features:
            raise ValueError(f"features must be a non-empty list of Tensor[N, C, h, w], got {type(features).__name__}")
        expected = FPN_LEVELS if self.config.fpn else 1
        if len(features) != expected:
            raise ValueError(f"features has {len(features)} levels; fpn={self.config.fpn} expects {expected}")
        n = features[0].shape[0]
        if len(image_sizes) != n:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {n} images")
        if self.training:
            if targets is None or len(targets) != n:
                raise ValueError(f"training needs targets: one dict with 'boxes' per image ({n}), got {targets!r:.80}")
            for i, target in enumerate(targets):
                gt = target.get("boxes") if isinstance(target, dict) else None
                if gt is None or gt.dim() != 2 or gt.shape[-1] != 4:
                    raise ValueError(f"targets[{i}]['boxes'] must be a Tensor[G, 4], got "
                                     f"{getattr(gt, 'shape', gt)!r}")
