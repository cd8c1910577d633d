"""The feature pyramid (Lin et al. 2017, "Feature Pyramid Networks for Object Detection") and
multi-level RoIAlign: which pyramid level each RoI is pooled from.

Public names: ``FPN``, ``assign_levels``, ``level_for_box_size``, ``level_summary``,
``multiscale_roi_align``.

Dimensions: N images, L pyramid levels, K RoIs, C channels, S the pooled size.
Levels are named as in the paper: C_k / P_k has stride 2^k (C2..C5 at strides 4..32).

Why a pyramid: a single stride-16 map is too coarse for small objects and has too small a
receptive field for large ones. FPN keeps the backbone's finer maps and adds the coarse, strongly
semantic map to each of them on the way down, so every level is both fine and semantic; each RoI
is then pooled from the level whose stride suits its size (Mask R-CNN §3.1, "FPN").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib import roi_ops

# Added inside the floor, as torchvision's LevelMapper does, so a box exactly at a level boundary
# (sqrt(wh) = canonical_size * 2^j, where log2 may come out as j - 1e-7) lands on the upper level.
_LEVEL_EPS = 1e-6


class FPN(nn.Module):
    """Top-down pathway with lateral connections (FPN paper §3, Fig. 3).

    ``forward(features: list[Tensor[N, C_l, h_l, w_l]]) -> list[Tensor[N, D, h_l, w_l]]``: given
    C2..C5 finest first, returns P2..P5 (plus P6 when ``extra_p6``), all with ``out_channels`` = D.

    Per level: a 1x1 *lateral* conv brings C_k to D channels; the coarser merged map is upsampled
    2x by nearest neighbour (to the lateral's exact size, so odd sizes work) and *added*; a 3x3
    conv smooths the sum ("to reduce the aliasing effect of upsampling"). P6 is P5 subsampled by a
    stride-2 max-pool of kernel 1 (i.e. every other cell, as the paper and torchvision): it only
    serves the RPN's largest anchors, RoIs are never pooled from it. Init as torchvision:
    Kaiming uniform with a=1, zero bias.
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, extra_p6: bool = True):
        super().__init__()
        if not in_channels_list or min(in_channels_list) <= 0:
            raise ValueError(f"in_channels_list must be positive channel counts, got {in_channels_list}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_list)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                    for _ in in_channels_list)
        self.extra_p6 = extra_p6
        self.out_channels = out_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self.lateral):
            raise ValueError(f"FPN expects {len(self.lateral)} feature maps, got {len(features)}")
        merged = self.lateral[-1](features[-1])                          # [N, D, h_5, w_5]
        outputs = [self.output[-1](merged)]
        for level in range(len(features) - 2, -1, -1):                   # coarse to fine
            lateral = self.lateral[level](features[level])               # [N, D, h_l, w_l]
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = lateral + top_down
            outputs.insert(0, self.output[level](merged))
        if self.extra_p6:
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))  # [N, D, h_5/2, w_5/2]
        return outputs


def assign_levels(boxes: Tensor, k_min: int, k_max: int, canonical_size: float,
                  canonical_level: int) -> Tensor:
    """The pyramid level of each RoI, as a 0-based index into the levels k_min..k_max.

    Args:
        boxes: ``Tensor[K, 4]`` float xyxy RoIs in image pixels.
        k_min, k_max: the finest and coarsest level pooled from (2 and 5 for P2..P5).
        canonical_size: the box side (px) that maps to ``canonical_level``; FPN paper: 224.
        canonical_level: k0; FPN paper: 4.

    Returns:
        ``Tensor[K]`` int64 in 0..k_max-k_min, with
        ``k = clamp(floor(k0 + log2(sqrt(w h) / canonical_size)), k_min, k_max)`` (FPN eq. 1), minus k_min.

    Why 224 and 4: an ImageNet-pretrained ResNet sees 224 px images and its C4 (stride 16) was
    the single map Faster R-CNN pooled from, so a 224 px RoI goes to P4, and each halving of the
    box side moves one level finer. Our images are 128 px instead of ~800, so the course scales
    224 down to ``ModelConfig.canonical_size`` (36 ~ 224 * 128 / 800). Same numbers as
    torchvision's ``LevelMapper``, including its 1e-6 inside the floor.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be Tensor[K, 4], got shape {tuple(boxes.shape)}")
    if k_min > k_max:
        raise ValueError(f"k_min={k_min} must be <= k_max={k_max}")
    if canonical_size <= 0:
        raise ValueError(f"canonical_size={canonical_size} must be positive")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])   # [K]
    levels = torch.floor(canonical_level + torch.log2(areas.sqrt() / canonical_size)
                         + torch.tensor(_LEVEL_EPS, dtype=boxes.dtype))
    return levels.clamp(min=k_min, max=k_max).to(torch.int64) - k_min   # [K]


def level_for_box_size(box_size: float, k_min: int = 2, k_max: int = 5, canonical_size: float = 36,
                       canonical_level: int = 4) -> int:
    """The pyramid level k (e.g. 2 for P2) of a square box of side ``box_size`` pixels.

    The plain function behind chapter 07's box-size widget; ``box_size`` 0 maps to ``k_min``
    (log2(0) = -inf, clamped), huge boxes to ``k_max``. Raises ``ValueError`` for a negative or
    non-finite size.
    """
    if not math.isfinite(box_size) or box_size < 0:
        raise ValueError(f"box_size={box_size} must be a finite size >= 0 (pixels)")
    box = torch.tensor([[0.0, 0.0, box_size, box_size]], dtype=torch.float64)
    return k_min + int(assign_levels(box, k_min, k_max, canonical_size, canonical_level)[0])


def level_summary(box_size: float, k_min: int = 2, k_max: int = 5, canonical_size: float = 36,
                  canonical_level: int = 4) -> dict:
    """The read-out of chapter 07's widget for a square box of side ``box_size`` pixels.

    Returns ``{"level": k, "stride": 2**k, "cells": box side in feature cells of P_k,
    "text": one line for the read-out}``. Eq. 1 keeps ``cells`` near ``canonical_size /
    2**canonical_level`` (36 / 16 = 2.25 cells by default) until the clamp at P2 or P5 takes over.
    """
    level = level_for_box_size(box_size, k_min, k_max, canonical_size, canonical_level)
    stride = 2 ** level
    cells = box_size / stride
    text = (f"box {box_size:.1f} px -> P{level} (stride {stride} px): the RoI spans {cells:.2f} "
            f"feature cells of P{level}")
    return {"level": level, "stride": stride, "cells": cells, "text": text}


def _to_rois(boxes: list[Tensor]) -> Tensor:
    """``list[Tensor[L_i, 4]] -> Tensor[K, 5]`` with the image index first, as torchvision.ops."""
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(boxes)], dim=1)


def multiscale_roi_align(features: list[Tensor], boxes: list[Tensor], output_size: int | tuple[int, int],
                         scales: list[float], sampling_ratio: int, canonical_size: float,
                         canonical_level: int, aligned: bool = False, fast: bool = True) -> Tensor:
    """RoIAlign each RoI from the pyramid level ``assign_levels`` picks for it.

    Args:
        features: ``list[Tensor[N, C, h_l, w_l]]``, P2..P5 finest first (not P6: RoIs never use it).
        boxes: ``list[Tensor[L_i, 4]]`` float xyxy per image, in image pixels.
        output_size: S or (S_h, S_w).
        scales: ``1 / stride`` of each level, e.g. ``[1/4, 1/8, 1/16, 1/32]``; they fix k_min and
            k_max (k = -log2(scale)).
        sampling_ratio, aligned: as ``roi_ops.roi_align``.
        canonical_size, canonical_level: as ``assign_levels``.
        fast: torchvision's kernel (True) or the course's hand-built RoIAlign (False), via
            ``roi_ops.pool_rois``; the same numbers.

    Returns:
        ``Tensor[K, C, S_h, S_w]`` in the order of ``torch.cat(boxes)``. Same numbers as
        ``torchvision.ops.MultiScaleRoIAlign`` (which uses ``aligned=False``) for the same features,
        boxes, scales, sampling ratio and canonical settings.
    """
    if len(features) != len(scales) or not features:
        raise ValueError(f"need one scale per feature level, got {len(scales)} scales for {len(features)} levels")
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = _to_rois(boxes)                                            # [K, 5]
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    levels = assign_levels(rois[:, 1:], k_min, k_max, canonical_size, canonical_level)  # [K]
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], *size))  # [K, C, S_h, S_w]
    for level, (feature, scale) in enumerate(zip(features, scales)):
        in_level = torch.where(levels == level)[0]
        result[in_level] = roi_ops.pool_rois(feature, rois[in_level], size, scale, pooler="roi_align",
                                             sampling_ratio=sampling_ratio, aligned=aligned, fast=fast)
    return result
