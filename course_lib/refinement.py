"""Mask Transfiner, part 3: the refinement stage inside a trained Mask R-CNN (the model side).

``ModelConfig.refiner`` gives ``MaskRCNN`` a ``transfiner_refiner.TransfinerRefiner`` (built by
``build_refiner``). In eval mode the model's last step is ``refine_detections``: the refiner sees
the model's RoI features at three resolutions and its coarse 28x28 mask, and corrects the mask
near the boundary. Training is a second stage on the frozen detector (``train.fit`` with
``TrainConfig(stage="refiner")``), whose inputs come from ``ground_truth_inputs``: one RoI per
ground-truth object, its box jittered so training RoIs look like detections.

The RoI features per quadtree level (28, 56, 112) come from the backbone map whose stride is
finer by the same factor: stride s for 28 (s = ``config.stride``; P4 with FPN), s/2 for 56 and
s/4 for 112 (stride 4 = the finest stage, P2 with FPN), each concatenated with the normalised
image pooled at that level (3 channels). Mask Transfiner uses P2-P4 the same way; the image
channels are ours: a small CPU backbone's stride-4 features are weak, and the pixels themselves
say where a shape's edge is.

These functions take the model (or its parts) as an argument and never import ``model``, which
imports this module: inside the model layer, too, imports go one way.

Public names: ``refiner_in_channels``, ``build_refiner``, ``roi_features``, ``coarse_mask_logits``,
``jitter_boxes``, ``ground_truth_inputs``, ``refine_detections``, ``upsample_coarse``.

Dimensions: N images, K RoIs (all images together), C_l channels and S_l side at level l.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from course_lib import mask_head, roi_ops, transfiner, transfiner_refiner
from course_lib.config import ModelConfig


def _level_strides(config: ModelConfig, num_levels: int) -> list[int]:
    """Stride of the map pooled at each level: the heads' stride, then halving (>= 4)."""
    return [max(config.stride // 2 ** level, 4) for level in range(num_levels)]


def refiner_in_channels(config: ModelConfig, backbone: nn.Module, num_levels: int = 3) -> list[int]:
    """Channels of ``roi_features`` per level: the chosen map's channels + 3 image channels."""
    if config.fpn:
        return [config.fpn_channels + 3] * num_levels
    by_stride = dict(zip(backbone.strides, backbone.out_channels))
    return [by_stride[s] + 3 for s in _level_strides(config, num_levels)]


def build_refiner(config: ModelConfig, backbone: nn.Module) -> transfiner_refiner.TransfinerRefiner:
    """A fresh refiner sized for the backbone's maps (``MaskRCNN`` calls it when ``config.refiner``)."""
    channels = refiner_in_channels(config, backbone, len(config.refiner.sizes))
    return transfiner_refiner.TransfinerRefiner(config.refiner, channels)


def roi_features(config: ModelConfig, batch: Tensor, maps: dict[int, Tensor], rois: list[Tensor],
                 sizes: tuple[int, ...]) -> list[Tensor]:
    """RoIAlign every RoI at each level: per level ``Tensor[K, C_l, S_l, S_l]`` (map + image)."""
    features = []
    for size, stride in zip(sizes, _level_strides(config, len(sizes))):
        pooled = roi_ops.pool_rois(maps[stride], rois, size, 1.0 / stride)  # [K, C, S, S]
        pixels = roi_ops.pool_rois(batch, rois, size, 1.0)  # [K, 3, S, S]
        features.append(torch.cat([pooled, pixels], dim=1))
    return features


def coarse_mask_logits(roi_heads: nn.Module, head_features: list[Tensor], rois: list[Tensor],
                       labels: Tensor) -> Tensor:
    """The mask head's 28x28 logits of each RoI's class ``labels: Tensor[K]`` -> ``Tensor[K, 28, 28]``."""
    pooled = roi_heads.pool(head_features, rois, roi_heads.config.mask_roi_size)  # [K, C, 14, 14]
    logits = roi_heads.mask_head(pooled)  # [K, L, 28, 28]
    return logits[torch.arange(len(labels), device=labels.device), labels]


def jitter_boxes(gt_boxes: Tensor, image_size: tuple[int, int], scale: float, generator: torch.Generator) -> Tensor:
    """Move each box edge by up to ``scale`` of the box size, so training RoIs look like detections."""
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).repeat(1, 2)  # [G, 4]
    noise = (torch.rand(gt_boxes.shape, generator=generator) * 2 - 1).to(gt_boxes) * scale * wh
    jittered = gt_boxes + noise
    jittered[:, 0::2] = jittered[:, 0::2].clamp(0, image_size[1])
    jittered[:, 1::2] = jittered[:, 1::2].clamp(0, image_size[0])
    ok = (jittered[:, 2] - jittered[:, 0] > 1) & (jittered[:, 3] - jittered[:, 1] > 1)
    return torch.where(ok[:, None], jittered, gt_boxes)


@torch.no_grad()
def ground_truth_inputs(net: nn.Module, images: list[Tensor], targets: list[dict], sizes: tuple[int, ...],
                        jitter: float, generator: torch.Generator) -> dict:
    """A frozen ``MaskRCNN``'s view of the ground-truth objects, ready for ``TransfinerRefiner``.

    Returns ``{"features": per level Tensor[K, C_l, S_l, S_l], "coarse_mask_logits": Tensor[K, 28, 28],
    "gt_masks": per level Tensor[K, S_l, S_l] in [0, 1], "rois": per image Tensor[G_i, 4],
    "labels": Tensor[K]}`` with one RoI per ground-truth object (its box, jittered).
    """
    batch = net.batch(images)
    head_features, maps = net.feature_maps(batch)
    rois = [jitter_boxes(t["boxes"].to(batch), img.shape[-2:], jitter, generator) for t, img in zip(targets, images)]
    labels = torch.cat([t["labels"] for t in targets]).to(batch.device)  # [K]
    gt_masks = [torch.cat([mask_head.mask_targets(t["masks"].to(batch.device), r, torch.arange(len(r), device=r.device),
                                                  size) for t, r in zip(targets, rois)]) for size in sizes]
    return {"features": roi_features(net.config, batch, maps, rois, sizes),
            "coarse_mask_logits": coarse_mask_logits(net.roi_heads, head_features, rois, labels),
            "gt_masks": gt_masks, "rois": rois, "labels": labels}


@torch.no_grad()
def refine_detections(net: nn.Module, batch: Tensor, head_features: list[Tensor], maps: dict[int, Tensor],
                      detections: list[dict[str, Tensor]]) -> None:
    """``MaskRCNN.forward``'s last step when ``config.refiner``: refine the confident detections' masks.

    ``detections`` (eval mode, masks already pasted) are changed in place: the masks of detections
    scoring at least ``config.refiner.score_thresh`` are replaced by the refiner's 112x112 masks
    pasted at the same boxes; boxes, labels, scores and the other masks stay the plain model's. Like
    the released code (which refines at most 10 RoIs per image), this keeps inference cheap: the many
    low-score detections barely move mask AP.
    """
    refiner = net.refiner.eval()
    keep = [det["scores"] >= net.config.refiner.score_thresh for det in detections]
    kept_rois = [det["boxes"][k] for det, k in zip(detections, keep)]
    if not any(len(r) for r in kept_rois):
        return
    labels = torch.cat([det["labels"][k] for det, k in zip(detections, keep)])
    coarse = coarse_mask_logits(net.roi_heads, head_features, kept_rois, labels)  # [K', 28, 28]
    features = roi_features(net.config, batch, maps, kept_rois, refiner.config.sizes)
    refined = refiner(features, coarse)  # [K', 112, 112]
    # padded by one coarse cell (4 cells of 112), as the plain 28x28 masks are padded by one: the same
    # grown box. One 112-cell of padding would stretch each mask by most of a pixel: a lot on a 10 px shape.
    padding = refiner.config.sizes[-1] // refiner.config.sizes[0]
    for det, fine, k in zip(detections, refined.split([len(r) for r in kept_rois]), keep):
        if k.any():
            size = tuple(det["masks"].shape[-2:])
            det["masks"][k] = mask_head.paste_masks_in_image(fine[:, None], det["boxes"][k], size, padding=padding)


def upsample_coarse(coarse_probs: Tensor, num_levels: int = 3) -> Tensor:
    """The unrefined baseline at the refiner's resolution: ``paste_refined`` with no nodes.

    ``Tensor[K, S, S] -> Tensor[K, S*2^(L-1), S*2^(L-1)]`` (bilinear x2, level by level).
    """
    empty = transfiner.build_quadtree(torch.zeros_like(coarse_probs, dtype=torch.bool), num_levels)
    return transfiner.paste_refined(coarse_probs, [coarse_probs.new_zeros(0)] * num_levels, empty)
