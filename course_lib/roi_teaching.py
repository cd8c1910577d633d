"""Teaching helpers for chapter 04: what RoIPool's quantizations and RoIAlign's samples look like.

Everything here is computed from the same geometry the ops in ``roi_ops`` use
(``roi_pool_bins``, ``roi_align_samples``), so the pictures and read-outs cannot drift from the
numbers the ops produce; the one exception, ``floor_floor_cells``, is the simplified version a
widely read explanation draws, which no kernel computes. Frames: boxes and returned ``*_px``
values are in input-image pixels; ``*_cells`` values are in feature cells (pixels / stride).
Feature cell ``j`` covers pixels ``[j * stride, (j + 1) * stride)``, its centre at
``(j + 0.5) * stride``.

Public names: ``quantization_example``, ``floor_floor_cells``, ``roi_pool_cells``,
``roi_align_points``, ``bin_edge_offsets``, ``quantization_error``, ``roi_readout``,
``readout_text``, ``mask_roundtrip``, ``draw_roi``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from course_lib import mask_head, roi_ops

_BIG = 1 << 30  # a feature map "large enough" when the caller gives none: nothing is clipped


def _rois(box, dtype=torch.float64) -> Tensor:
    """One xyxy box (sequence or ``Tensor[4]``) as ``Tensor[1, 5]`` on image 0."""
    box = torch.as_tensor(box, dtype=dtype).reshape(-1)
    if box.numel() != 4:
        raise ValueError(f"box must hold 4 numbers (x1, y1, x2, y2), got {box.numel()}")
    return torch.cat([box.new_zeros(1), box])[None]  # [1, 5]


def _check_stride(stride) -> None:
    if not (isinstance(stride, (int, float)) and stride > 0):
        raise ValueError(f"stride must be a positive number of pixels, got {stride!r}")


def quantization_example(image_size: int = 800, stride: int = 32, box_size: float = 665,
                         output_size: int = 7, sampling_ratio: int = 2) -> dict[str, float]:
    """RoIPool's two quantizations on the 665 px box at stride 32, every number computed.

    Source: the example (800 px image, VGG16-like stride 32, a 665 px proposal) comes from a
    widely read explanation of Mask R-CNN, built on Caffe's RoIPooling code, not from the paper;
    the paper (§3) only writes ``[x/16]`` with "[.] is rounding". The explanation simplifies
    both roundings to ``floor``: the box's ``box_size / stride`` cells are floored (the first
    quantization), the bins ``cells / output_size`` floored again (the second), so the pooled
    cells cover only ``bin * output_size`` of them (``floor_floor_cells`` draws it). RoIAlign
    keeps both fractions. The ``torchvision_*`` entries are what torchvision's and Caffe's
    RoIPool (``roi_ops.roi_pool_bins``) do with the same box at the image origin: round to the
    nearest cell, count the end cell (``+ 1``), cut bins with floor (start) / ceil (end).
    """
    box_cells = box_size / stride  # 665 / 32 = 20.78
    roi_cells = math.floor(box_cells)  # 20: first quantization (the explanation's floor)
    bin_cells = roi_cells / output_size  # 2.86
    bin_quantized = math.floor(bin_cells)  # 2: second quantization
    covered = bin_quantized * output_size  # 14 cells
    y0, y1, _, _ = roi_ops.roi_pool_bins(_rois([0, 0, box_size, box_size]), (output_size,) * 2,
                                         1.0 / stride, (image_size // stride,) * 2)
    return {
        "feature_size": image_size / stride, "box_cells": box_cells, "roi_cells": roi_cells,
        "lost_px_first": (box_cells - roi_cells) * stride, "bin_cells": bin_cells,
        "bin_quantized": bin_quantized, "covered_cells": covered, "covered_px": covered * stride,
        "lost_px_second": (roi_cells - covered) * stride,
        "align_bin_cells": box_cells / output_size, "align_bin_px": box_size / output_size,
        "samples_per_bin": sampling_ratio ** 2,
        "torchvision_roi_cells": int(y1[0, -1] - y0[0, 0]),
        "torchvision_bin_cells": (int(y1[0, -1] - y0[0, 0])) / output_size,
    }


def floor_floor_cells(box, stride: float,
                      output_size: int | tuple[int, int] = 7) -> dict[str, Tensor]:
    """The explanation's simplified RoIPool for one box: both quantizations are ``floor``.

    Returns ``box_cells`` ``[4]`` (x1, y1, x2, y2 before rounding), ``floored_cells`` int64
    ``[4]`` (quantization 1: the start cell floored, the size floored, end excluded),
    ``bin_cells`` int64 ``[2]`` (bin height, width: the size over the bins, floored; quantization
    2) and ``y_bins [PH, 2]``, ``x_bins [PW, 2]`` int64 (start, end) per bin, end excluded.

    Why: this is the version the widely read explanation of the 665 px example draws (20.78 ->
    20 cells, 20 / 7 = 2.86 -> 2, 7 x 7 bins covering 14 x 14 cells). It floors the box's size;
    for a box that does not start on a cell edge it gives no rule, so the start is floored too
    and the numbers stay the same wherever the box sits. It is not what any kernel computes:
    Caffe and torchvision round and cut floor/ceil bins (``roi_pool_cells``).
    """
    _check_stride(stride)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    box_cells = _rois(box)[0, 1:] / stride  # [4] x1 y1 x2 y2
    start = torch.floor(box_cells[:2]).long()  # [2] x1, y1
    size = torch.floor(box_cells[2:] - box_cells[:2]).clamp(min=0).long()  # [2] w, h
    bins = torch.div(size, torch.tensor([pw, ph]), rounding_mode="floor")  # [2] bin w, h
    ey, ex = torch.arange(ph + 1) * bins[1] + start[1], torch.arange(pw + 1) * bins[0] + start[0]
    return {"box_cells": box_cells, "floored_cells": torch.cat([start, start + size]),
            "bin_cells": bins.flip(0), "y_bins": torch.stack([ey[:-1], ey[1:]], 1),
            "x_bins": torch.stack([ex[:-1], ex[1:]], 1)}


def roi_pool_cells(box, stride: float, output_size: int | tuple[int, int] = 7,
                   feature_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """RoIPool's two quantizations for one box, in cells.

    Returns ``box_cells`` ``[4]`` (x1, y1, x2, y2 before rounding), ``rounded_cells`` int64
    ``[4]`` (quantization 1; the end cell is included), and ``y_bins [PH, 2]``, ``x_bins [PW, 2]``
    int64 (start, end) per bin, end excluded (quantization 2, clipped to ``feature_size``).
    """
    _check_stride(stride)
    size = roi_ops._pair(output_size)
    feature_size = feature_size or (_BIG, _BIG)
    y0, y1, x0, x1 = roi_ops.roi_pool_bins(_rois(box), size, 1.0 / stride, feature_size)
    box_cells = _rois(box)[0, 1:] / stride  # [4]
    return {"box_cells": box_cells, "rounded_cells": roi_ops._round_half_away(box_cells).long(),
            "y_bins": torch.stack([y0[0], y1[0]], 1), "x_bins": torch.stack([x0[0], x1[0]], 1)}


def roi_align_points(box, stride: float, output_size: int | tuple[int, int] = 7,
                     sampling_ratio: int = 2, aligned: bool = True) -> dict[str, Tensor]:
    """RoIAlign's bins and sampling points for one box, in image pixels.

    Returns ``y_edges_px [PH + 1]``, ``x_edges_px [PW + 1]`` (bin edges), ``ys_px [PH, GH]``,
    ``xs_px [PW, GW]`` (sample coordinates; every (y, x) pair of a bin is one sample) and
    ``bin_cells [2]`` (bin height, width in cells). A feature coordinate ``u`` (cell centres at
    integers) lies at pixel ``(u + 0.5) * stride``: with ``aligned=False`` everything lands half a
    cell down-right of the box.
    """
    _check_stride(stride)
    ph, pw = roi_ops._pair(output_size)
    s = roi_ops.roi_align_samples(_rois(box), (ph, pw), 1.0 / stride, sampling_ratio, aligned)
    gh, gw = (int(g) for g in s["grid"][0].clamp(min=0))
    to_px = lambda u: (u + 0.5) * stride  # noqa: E731
    y_edges = s["start"][0, 0] + torch.arange(ph + 1, dtype=torch.float64) * s["bin_size"][0, 0]
    x_edges = s["start"][0, 1] + torch.arange(pw + 1, dtype=torch.float64) * s["bin_size"][0, 1]
    return {"y_edges_px": to_px(y_edges), "x_edges_px": to_px(x_edges),
            "ys_px": to_px(s["ys"][0, :, :gh]), "xs_px": to_px(s["xs"][0, :, :gw]),
            "bin_cells": s["bin_size"][0]}


def bin_edge_offsets(boxes: Tensor, stride: float, output_size: int = 7, pooler: str = "roi_pool",
                     aligned: bool = True) -> Tensor:
    """How far each bin edge of each box sits from where it should, in input pixels.

    Args:
        boxes: ``Tensor[K, 4]`` xyxy in pixels.  pooler: ``"roi_pool"`` or ``"roi_align"``.
    Returns:
        Absolute offsets (float64): RoIPool ``Tensor[K, 4P]``, every bin's start and end on
        both axes (its bins may overlap); RoIAlign ``Tensor[K, 2(P + 1)]``, its shared bin
        edges. The exact edges split the box into ``P`` equal parts: ``x1 + i * (x2 - x1) / P``.
    """
    _check_stride(stride)
    if pooler not in ("roi_pool", "roi_align"):
        raise ValueError(f"pooler must be 'roi_pool' or 'roi_align', got {pooler!r}")
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)  # [K, 5]
    p = output_size
    i = torch.arange(p + 1, dtype=torch.float64)
    exact_y = boxes[:, 1:2] + i * (boxes[:, 3:4] - boxes[:, 1:2]) / p  # [K, P + 1] px
    exact_x = boxes[:, 0:1] + i * (boxes[:, 2:3] - boxes[:, 0:1]) / p
    if pooler == "roi_pool":
        y0, y1, x0, x1 = roi_ops.roi_pool_bins(rois, (p, p), 1.0 / stride, (_BIG, _BIG))
        got = torch.cat([y0, y1, x0, x1], 1) * stride  # [K, 4P] cell edges in px
        want = torch.cat([exact_y[:, :-1], exact_y[:, 1:], exact_x[:, :-1], exact_x[:, 1:]], 1)
        return (got - want).abs()
    s = roi_ops.roi_align_samples(rois, (p, p), 1.0 / stride, 1, aligned)
    edges = s["start"][:, :, None] + i * s["bin_size"][:, :, None]  # [K, 2, P + 1] cells
    got = (edges + 0.5) * stride  # [K, 2, P + 1] px
    off = (got - torch.stack([exact_y, exact_x], 1)).abs()
    return off.reshape(len(boxes), 2 * (p + 1))  # [K, 2(P + 1)]


def quantization_error(boxes: Tensor, stride: float, output_size: int = 7, pooler: str = "roi_pool",
                       aligned: bool = True) -> dict[str, float]:
    """``max_px`` and ``mean_px`` of ``bin_edge_offsets`` over all boxes and edges."""
    off = bin_edge_offsets(boxes, stride, output_size, pooler, aligned)
    return {"max_px": float(off.max()), "mean_px": float(off.mean())}


def roi_readout(x: float, y: float, w: float, h: float, stride: float = 16, output_size: int = 7,
                sampling_ratio: int = 2, aligned: bool = True) -> dict[str, float]:
    """The widget's numbers for a box at (x, y) of size w x h px (any values, even w = 0).

    Returns the box in cells, RoIPool's cells after rounding and its bin size, RoIAlign's bin
    size and samples per bin, and each pooler's bin-edge error (max and mean, in pixels).
    """
    if w < 0 or h < 0:
        raise ValueError(f"w and h must be >= 0 pixels, got w={w}, h={h}")
    if not (isinstance(output_size, int) and output_size > 0):
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")
    box = [x, y, x + w, y + h]
    cells = roi_pool_cells(box, stride, output_size)
    points = roi_align_points(box, stride, output_size, sampling_ratio, aligned)
    boxes = torch.tensor([box], dtype=torch.float64)  # [1, 4]
    pool_err = quantization_error(boxes, stride, output_size, "roi_pool")
    align_err = quantization_error(boxes, stride, output_size, "roi_align", aligned)
    pool_w = int(cells["x_bins"][-1, 1] - cells["x_bins"][0, 0])
    return {
        "box_w_cells": w / stride, "box_h_cells": h / stride,
        "roipool_w_cells": pool_w, "roipool_bin_cells": pool_w / output_size,
        "roipool_max_px": pool_err["max_px"], "roipool_mean_px": pool_err["mean_px"],
        "roialign_bin_cells": float(points["bin_cells"][1]),
        "samples_per_bin": points["ys_px"].shape[1] * points["xs_px"].shape[1],
        "roialign_max_px": align_err["max_px"], "roialign_mean_px": align_err["mean_px"],
    }


def readout_text(readout: dict[str, float]) -> str:
    """The widget's read-out line for a ``roi_readout`` dict (2 decimals)."""
    r = readout
    return (f"box {r['box_w_cells']:.2f} x {r['box_h_cells']:.2f} cells | "
            f"RoIPool: {r['roipool_w_cells']} cells wide, bins {r['roipool_bin_cells']:.2f} cells, "
            f"edge error max {r['roipool_max_px']:.2f} px, mean {r['roipool_mean_px']:.2f} px | "
            f"RoIAlign: bins {r['roialign_bin_cells']:.2f} cells, {r['samples_per_bin']} samples, "
            f"edge error max {r['roialign_max_px']:.2f} px, mean {r['roialign_mean_px']:.2f} px")


def mask_roundtrip(mask: Tensor, box, stride: int, output_size: int, pooler: str,
                   aligned: bool = True) -> tuple[Tensor, float]:
    """Pool a ground-truth mask through a stride-``stride`` feature map and paste it back.

    The mask ``[H, W]`` is average-pooled by ``stride`` (a feature map that carries the mask),
    the box pooled to ``output_size`` by ``pooler`` (RoIAlign: 2 x 2 samples), pasted back with
    ``mask_head.paste_masks_in_image`` and thresholded at 0.5. Returns the ``[H, W]`` uint8 mask
    and its IoU with ``mask``: what the pooler alone loses, with no network in between.
    """
    h, w = mask.shape
    feature = torch.nn.functional.avg_pool2d(mask.float()[None, None], stride, ceil_mode=True)
    rois = _rois(box, torch.float32)
    pooled = roi_ops.pool_rois(feature, rois, output_size, 1.0 / stride, pooler, 2, aligned)
    pasted = mask_head.paste_masks_in_image(pooled, rois[:, 1:], (h, w))[0, 0] >= 0.5  # [H, W]
    truth = mask.bool()
    iou = float((pasted & truth).sum()) / max(float((pasted | truth).sum()), 1.0)
    return pasted.to(torch.uint8), iou


def _fill_bins(ax, cells: dict[str, Tensor], stride: float) -> None:
    """Fill each bin's cells (``y_bins``, ``x_bins`` of a ``*_cells`` dict), alternating colours."""
    from matplotlib.patches import Rectangle

    for i, (ys, ye) in enumerate(cells["y_bins"].tolist()):
        for j, (xs, xe) in enumerate(cells["x_bins"].tolist()):
            colour = "tab:orange" if (i + j) % 2 else "tab:red"
            ax.add_patch(Rectangle((xs * stride, ys * stride), (xe - xs) * stride,
                                   (ye - ys) * stride, color=colour, alpha=0.25, lw=0))


def _draw_samples(ax, box, stride: float, output_size: int, sampling_ratio: int,
                  aligned: bool) -> None:
    """RoIAlign's bin edges (lines) and sampling points (dots)."""
    pts = roi_align_points(box, stride, output_size, sampling_ratio, aligned)
    for e in pts["y_edges_px"].tolist():
        ax.plot(pts["x_edges_px"][[0, -1]].tolist(), [e, e], color="tab:blue", lw=0.8)
    for e in pts["x_edges_px"].tolist():
        ax.plot([e, e], pts["y_edges_px"][[0, -1]].tolist(), color="tab:blue", lw=0.8)
    yy, xx = torch.meshgrid(pts["ys_px"].reshape(-1), pts["xs_px"].reshape(-1), indexing="ij")
    ax.scatter(xx.reshape(-1), yy.reshape(-1), s=6, color="tab:blue", zorder=3)


def draw_roi(ax, box, stride: int, output_size: int = 7, pooler: str = "roi_align",
             sampling_ratio: int = 2, aligned: bool = True, image_size: int = 128) -> None:
    """Draw the feature grid, the box, and one pooler's bins on a matplotlib axes (pixels).

    ``pooler``: ``"roi_pool"`` fills the bins torchvision's (and Caffe's) RoIPool really
    max-pools; ``"roi_pool_floor"`` fills the bins of the explanation's simplified floor/floor
    version (``floor_floor_cells``) and outlines its floored box (dotted); ``"roi_align"``
    draws RoIAlign's bin edges and sampling points. The true box is the thick dashed outline;
    the top axis counts feature cells.
    """
    from matplotlib.patches import Rectangle

    if pooler not in ("roi_pool", "roi_pool_floor", "roi_align"):
        raise ValueError("pooler must be 'roi_pool', 'roi_pool_floor' or 'roi_align', "
                         f"got {pooler!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    for g in range(0, image_size + 1, stride):
        ax.axhline(g, color="0.85", lw=0.6, zorder=0)
        ax.axvline(g, color="0.85", lw=0.6, zorder=0)
    if pooler == "roi_pool":
        _fill_bins(ax, roi_pool_cells(box, stride, output_size,
                                      (math.ceil(image_size / stride),) * 2), stride)
    elif pooler == "roi_pool_floor":
        cells = floor_floor_cells(box, stride, output_size)
        _fill_bins(ax, cells, stride)
        fx1, fy1, fx2, fy2 = (v * stride for v in cells["floored_cells"].tolist())
        ax.add_patch(Rectangle((fx1, fy1), fx2 - fx1, fy2 - fy1, fill=False, ls=":", lw=2,
                               color="tab:red"))
    else:
        _draw_samples(ax, box, stride, output_size, sampling_ratio, aligned)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ls="--", lw=2, color="black"))
    ax.set_xlim(0, image_size)
    ax.set_ylim(image_size, 0)
    ax.set_aspect("equal")
    ax.set(xlabel="x (input pixels)", ylabel="y (input pixels)")
    top = ax.secondary_xaxis("top", functions=(lambda px: px / stride, lambda c: c * stride))
    top.set_xlabel("x (feature cells)", fontsize=8)
