"""Anchors: a fixed set of reference boxes at every feature-map location.

The idea (Faster R-CNN §3.1): the RPN slides over the backbone's feature map; at each location
it scores ``A`` reference boxes, the *anchors*, of several sizes and aspect ratios, centred on
that location's position in the image, and regresses deltas from each (``boxes.BoxCoder``).
The anchors are never learned; they only fix what "box number ``a`` at cell ``(i, j)``" means.

Order and numbers are torchvision's ``anchor_utils.AnchorGenerator``: for each feature level,
location-major (row by row over the feature map), then the ``A = len(ratios) * len(sizes)``
anchors of a location in (ratio, size) order, with the zero-centred *cell anchors* rounded to
whole pixels and placed at ``(j * stride_x, i * stride_y)``, the top-left corner of feature cell
``(i, j)`` in image pixels. (Detectron2 does the same by default; its ``ANCHOR_GENERATOR.OFFSET
= 0.5`` would move them to the cell centre. We keep torchvision's numbers so the two can be
compared one to one.)

Dimension letters: ``L`` feature levels, ``A`` anchors per location, ``H_l x W_l`` feature map
of level ``l`` in feature cells.

Public names: ``AnchorGenerator``, ``anchor_match_summary``, ``summary_text`` (the last two are
the chapter 02 widget's callback, also called by ``tests/test_anchors.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from course_lib import boxes, matching


def _check_per_level(value, name: str) -> tuple[tuple[float, ...], ...]:
    """``((16, 32), (64,))`` -> tuple of tuples of positive numbers, else ``ValueError``."""
    if not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(v, (list, tuple)) and v for v in value):
        raise ValueError(f"{name} must be one non-empty tuple per feature level, "
                         f"e.g. ((16, 32, 64),), got {value!r}")
    if not all(x > 0 for level in value for x in level):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return tuple(tuple(level) for level in value)


class AnchorGenerator:
    """Anchors for every location of one or several feature maps.

    Args:
        sizes: one tuple per feature level of anchor sizes in image pixels (the square root of
            the anchor's area), e.g. ``((16, 32, 64),)``; FPN uses one size per level,
            ``((32,), (64,), (128,), (256,), (512,))``.
        aspect_ratios: one tuple per level of ratios ``height / width``, e.g. ``((0.5, 1.0, 2.0),)``.
            A ratio ``r`` keeps the area ``size**2``: ``w = size / sqrt(r)``, ``h = size * sqrt(r)``.

    No parameters are learned, so this is a plain class, not an ``nn.Module``.
    """

    def __init__(self, sizes, aspect_ratios) -> None:
        self.sizes = _check_per_level(sizes, "sizes")
        self.aspect_ratios = _check_per_level(aspect_ratios, "aspect_ratios")
        if len(self.sizes) != len(self.aspect_ratios):
            raise ValueError(f"sizes has {len(self.sizes)} levels but aspect_ratios has "
                             f"{len(self.aspect_ratios)}")
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        """``A_l = len(aspect_ratios[l]) * len(sizes[l])`` for each level: the RPN head's outputs."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def __call__(self, image_size_hw: tuple[int, int], feature_shapes_hw: list[tuple[int, int]],
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                 ) -> list[Tensor]:
        """Anchors of every level.

        Args:
            image_size_hw: ``(H, W)`` of the (padded) image batch in pixels.
            feature_shapes_hw: one ``(H_l, W_l)`` per level, in feature cells.
        Returns:
            one ``Tensor[H_l * W_l * A_l, 4]`` per level, xyxy image pixels. The stride of level
            ``l`` is ``H // H_l`` and ``W // W_l`` pixels per feature cell, as in torchvision.
        """
        if len(feature_shapes_hw) != len(self.cell_anchors):
            raise ValueError(f"feature_shapes_hw has {len(feature_shapes_hw)} levels, the generator "
                             f"{len(self.cell_anchors)}")
        height, width = (int(v) for v in image_size_hw)
        out = []
        for (grid_h, grid_w), base in zip(feature_shapes_hw, self.cell_anchors):
            if not (0 < grid_h <= height and 0 < grid_w <= width):
                raise ValueError(f"feature shape {(grid_h, grid_w)} must be positive and fit in "
                                 f"the image {(height, width)}")
            stride_hw = (height // grid_h, width // grid_w)
            out.append(grid_anchors(base.to(dtype=dtype, device=device), (grid_h, grid_w), stride_hw))
        return out


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> Tensor:
    """The ``A`` zero-centred anchors of one location.

    Returns:
        ``Tensor[A, 4]`` xyxy pixels ``(-w/2, -h/2, w/2, h/2)``, rounded to whole pixels as
        torchvision rounds them; row ``a = ratio_index * len(sizes) + size_index``.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # [A] ratio-major
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)  # [A]
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [A, 4]


def grid_anchors(base: Tensor, grid_hw: tuple[int, int], stride_hw: tuple[int, int]) -> Tensor:
    """Place the cell anchors ``base`` (``Tensor[A, 4]``) at every location of an
    ``H_l x W_l`` grid, ``stride_hw`` pixels apart. Returns ``Tensor[H_l * W_l * A, 4]``."""
    shifts_x = torch.arange(grid_hw[1], dtype=base.dtype, device=base.device) * stride_hw[1]  # [W_l]
    shifts_y = torch.arange(grid_hw[0], dtype=base.dtype, device=base.device) * stride_hw[0]  # [H_l]
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")                      # [H_l, W_l]
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # [H_l * W_l, 4]
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)     # [H_l * W_l * A, 4]


def anchor_match_summary(image_size: int, stride: int, sizes: tuple[float, ...],
                         ratios: tuple[float, ...], gt_box, high: float = 0.7, low: float = 0.3,
                         allow_low_quality_matches: bool = True) -> dict:
    """Anchors of a single-level RPN on a square image and their labels for one ground-truth box.

    Args:
        image_size: side of the square image, pixels.
        stride: pixels per feature cell; the feature map is ``image_size // stride`` cells a side.
        sizes: anchor sizes in pixels, e.g. ``(16, 32)``.
        ratios: aspect ratios ``h / w``, e.g. ``(0.5, 1.0, 2.0)``.
        gt_box: ``(x1, y1, x2, y2)`` pixels, the ground-truth box.
        high, low, allow_low_quality_matches: the RPN's matching rule (``matching.match``).
    Returns:
        dict with ``anchors`` ``Tensor[N, 4]``, ``ious`` ``Tensor[N]`` (IoU with the box),
        ``labels`` ``Tensor[N]`` int64 (1 positive, 0 negative, -1 ignored), ``num_anchors``,
        ``num_positive``, ``num_negative``, ``num_ignored``, ``num_low_quality`` (positives below
        ``high``, matched only as the box's best anchors), ``best_iou``, ``no_overlap`` (the box
        touches no anchor), ``feature_hw``, ``stride`` and ``anchors_per_location``.

    The labels are the RPN's own (``matching.label_anchors``), edge cases included: a box that
    touches no anchor makes every anchor a positive "best match" at IoU 0, as in torchvision.
    """
    if not 1 <= int(stride) <= int(image_size):
        raise ValueError(f"stride must be in [1, image_size={image_size}], got {stride}")
    gt = torch.as_tensor(gt_box, dtype=torch.float32).reshape(-1)
    if gt.numel() != 4 or not (gt[2] > gt[0] and gt[3] > gt[1]):
        raise ValueError(f"gt_box must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got {gt_box!r}")
    generator = AnchorGenerator((tuple(sizes),), (tuple(ratios),))
    side = int(image_size) // int(stride)
    anchors = generator((image_size, image_size), [(side, side)])[0]  # [N, 4]
    ious = boxes.box_iou(gt[None], anchors)[0]                        # [N]
    labels, _ = matching.label_anchors(anchors, gt[None], high, low, allow_low_quality_matches)
    return {
        "anchors": anchors, "ious": ious, "labels": labels.long(),
        "num_anchors": anchors.shape[0],
        "num_positive": int((labels == 1).sum()),
        "num_negative": int((labels == 0).sum()),
        "num_ignored": int((labels == -1).sum()),
        "num_low_quality": int(((labels == 1) & (ious < high)).sum()),
        "best_iou": float(ious.max()),
        "no_overlap": bool(ious.max() == 0),
        "feature_hw": (side, side),
        "stride": int(image_size) // side,
        "anchors_per_location": generator.num_anchors_per_location()[0],
    }


def summary_text(summary: dict) -> str:
    """The one-line read-out the chapter 02 widget shows for an ``anchor_match_summary``."""
    h, w = summary["feature_hw"]
    text = (f"{summary['num_anchors']} anchors ({h}x{w} cells x {summary['anchors_per_location']}"
            f" per cell, stride {summary['stride']} px): {summary['num_positive']} positive"
            f" ({summary['num_low_quality']} only as best match), {summary['num_negative']} negative,"
            f" {summary['num_ignored']} ignored; best IoU {summary['best_iou']:.2f}")
    if summary["no_overlap"]:
        text += " (the box touches no anchor: every anchor ties as its best match, so all are positive)"
    return text
