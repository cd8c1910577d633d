"""RoIPool and RoIAlign in plain PyTorch: turning a box of any size into a fixed grid of features.

The idea (Mask R-CNN §3, "RoIAlign"): Fast R-CNN's RoIPool snaps the box to whole feature cells,
then snaps each output bin to whole cells again, and max-pools. Those two quantizations shift the
pooled region by up to a cell (32 px at stride 32), harmless for classification, harmful for
pixel-accurate masks. RoIAlign keeps every coordinate continuous: each bin is sampled at a few
regular points, each point read by bilinear interpolation, and the samples averaged.

Both ops here match torchvision's C++/CUDA kernels number for number (including the corners:
boxes outside the map, tiny and inverted boxes, empty bins), and are differentiable through
autograd. They are vectorised over RoIs, bins and sampling points: every (bin, cell) or
(bin, sample, corner) pair becomes one entry of an index table, and ``F.embedding_bag`` reduces
the rows ``features[index]`` per bin (``max`` for RoIPool, weighted ``sum`` for RoIAlign) without
materialising the gathered ``[entries, C]`` tensor. RoIAlign builds its table in chunks of
bounded size, as an adaptive grid (one sample a cell) grows with the box (``_align_chunks``).

Dimension letters: N images, C channels, H x W the feature map, K RoIs (U in one chunk), PH x PW
output bins, GH x GW sampling points per bin (RoIAlign), MH x MW the largest bin in cells (RoIPool).
Boxes are xyxy in image pixels; ``spatial_scale`` (= 1 / stride) maps them to feature cells.

Public names: ``roi_pool``, ``roi_align``, the other poolers of Mask R-CNN's Table 2c ``roi_warp``
and ``roi_align_max``, ``pool_rois`` (the one switch between them and to torchvision's fast
kernels), and the geometry the two ops share with the teaching helpers: ``as_rois``,
``roi_pool_bins``, ``roi_align_samples``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from course_lib.config import POOLERS

# Chunks bound RoIAlign's index tables: an adaptive grid grows with the box (10 RoIs of 400-800
# cells took 650 MB in one table); 2^20 entries (8 B index, 4 B weight) keep a chunk near 12 MB.
_CHUNK_ENTRIES = 1 << 20


def _pair(output_size: int | tuple[int, int], name: str = "output_size") -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {output_size!r}")
    return size


def as_rois(boxes: Tensor | list[Tensor]) -> Tensor:
    """Boxes in either torchvision form as one ``Tensor[K, 5]`` of (image index, x1, y1, x2, y2).

    Args:
        boxes: ``Tensor[K, 5]`` (first column the image index) or a list with one ``Tensor[L, 4]``
            of xyxy boxes per image (image ``i``'s boxes get index ``i``).
    """
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got {shape}")
        if len(boxes) == 0:
            raise ValueError("boxes is an empty list: pass one Tensor[L, 4] per image")
        ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
        return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)  # [K, 5]
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 5:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {shape}")
    return boxes


def _check(input: Tensor, boxes, output_size, spatial_scale) -> tuple[Tensor, tuple[int, int]]:
    """Validate the public arguments; return rois ``Tensor[K, 5]`` (detached: as torchvision,
    no gradient flows to the box coordinates) and (PH, PW)."""
    if not (isinstance(spatial_scale, (int, float)) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive number (1 / stride), "
                         f"got {spatial_scale!r}")
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"input must be a Tensor[N, C, H, W], got {shape}")
    if not input.is_floating_point():
        raise ValueError(f"input must be a floating point tensor, got dtype {input.dtype}")
    rois = as_rois(boxes)
    if rois.dtype != input.dtype:
        raise ValueError(f"boxes dtype {rois.dtype} differs from input dtype {input.dtype}")
    if rois.device != input.device:
        raise ValueError(f"boxes are on {rois.device} but input is on {input.device}")
    if rois.numel() and not bool(torch.isfinite(rois).all()):
        raise ValueError("boxes contain NaN or infinite coordinates")
    batch_idx = rois[:, 0]
    if rois.numel() and bool(((batch_idx < 0) | (batch_idx >= input.shape[0])).any()):
        raise ValueError(f"boxes' image indices must lie in [0, {input.shape[0] - 1}], "
                         f"got {batch_idx.min().item()}..{batch_idx.max().item()}")
    return rois.detach(), _pair(output_size)


def _flat_features(input: Tensor, zero_rows: int = 0) -> Tensor:
    """``[N, C, H, W]`` -> ``[N*H*W + zero_rows, C]``: one row per feature cell with its channels
    contiguous (so one index fetches a whole feature vector), then ``zero_rows`` rows of zeros."""
    n, c, h, w = input.shape
    rows = input.permute(0, 2, 3, 1).reshape(n * h * w, c)  # [N*H*W, C]
    return torch.cat([rows, rows.new_zeros(zero_rows, c)]) if zero_rows else rows


def _round_half_away(x: Tensor) -> Tensor:
    """C++ ``std::round``: halves go away from zero (``torch.round`` sends them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def roi_pool_bins(rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                  feature_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RoIPool's bins in whole feature cells, after both quantizations.

    Args:
        rois: ``Tensor[K, 5]`` (image index, x1, y1, x2, y2) in image pixels.
        output_size: (PH, PW) bins.  spatial_scale: 1 / stride.
        feature_size: (H, W) of the feature map; bins are clipped to it.

    Returns:
        ``(y_start, y_end, x_start, x_end)``, int64 ``[K, PH]`` and ``[K, PW]``: bin ``(i, j)``
        is max-pooled over rows ``y_start[i] <= y < y_end[i]`` and the same for columns.

    Why: quantization 1 rounds the box to cells (``round(x * scale)``) and, as Fast R-CNN's Caffe
    code did, treats the end cell as included (``+ 1``); quantization 2 splits that many cells
    into bins with ``floor`` for the start and ``ceil`` for the end, so bins may overlap.
    """
    ph, pw = output_size
    cells = _round_half_away(rois[:, 1:].double() * spatial_scale).long()  # [K, 4] x1 y1 x2 y2

    def axis(start: Tensor, end: Tensor, bins: int, length: int) -> tuple[Tensor, Tensor]:
        roi_len = (end - start + 1).clamp(min=1).to(rois.dtype)  # malformed boxes become 1 cell
        bin_size = roi_len / bins  # [K] cells per bin, in the input's dtype as the kernel
        p = torch.arange(bins, device=rois.device, dtype=rois.dtype)
        lo = torch.floor(p * bin_size[:, None]).long() + start[:, None]  # [K, P]
        hi = torch.ceil((p + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, length), hi.clamp(0, length)

    y_start, y_end = axis(cells[:, 1], cells[:, 3], ph, feature_size[0])
    x_start, x_end = axis(cells[:, 0], cells[:, 2], pw, feature_size[1])
    return y_start, y_end, x_start, x_end


def _bin_max(index: Tensor, rows: Tensor, pad: int) -> Tensor:
    """Max of ``rows[index[b]]`` per bag ``b``, per channel: ``[B, L]``, ``[R, C]`` -> ``[B, C]``.

    ``embedding_bag`` finds the arg-max rows without gathering ``[B, L, C]`` (entries equal to
    ``pad`` are skipped); a ``gather`` of those rows then gives autograd RoIPool's gradient, which
    goes only to each bin's arg-max cell (the first of equal values, as torchvision's strict ``>``).
    """
    b, l = index.shape
    with torch.no_grad():
        offsets = torch.arange(0, b * l, l, device=index.device)  # bag b = index[b * l:(b + 1) * l]
        argmax = torch.embedding_bag(rows, index.reshape(-1), offsets, False, 2, False, None,
                                     False, pad)[3]  # mode 2 = max; [B, C] row of each max
    return rows.gather(0, argmax)  # [B, C]


def roi_pool(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
             spatial_scale: float = 1.0) -> Tensor:
    """Fast R-CNN's RoIPool: max over each quantized bin; torchvision.ops.roi_pool's numbers.

    Args:
        input: ``Tensor[N, C, H, W]`` feature maps.
        boxes: ``Tensor[K, 5]`` (image index, x1, y1, x2, y2) or a list of ``Tensor[L, 4]`` per
            image, xyxy in image pixels, same dtype as ``input``.
        output_size: PH = PW, or (PH, PW).  spatial_scale: 1 / stride (image px -> cells).

    Returns:
        ``Tensor[K, C, PH, PW]``; an empty bin (box off the map) gives 0. The gradient flows to
        each bin's arg-max cell only (the first one on ties, in row-major order).
    """
    rois, (ph, pw) = _check(input, boxes, output_size, spatial_scale)
    n, c, h, w = input.shape
    k = rois.shape[0]
    if k == 0:
        return input.new_zeros(0, c, ph, pw)
    y0, y1, x0, x1 = roi_pool_bins(rois, (ph, pw), spatial_scale, (h, w))  # [K, PH], [K, PW]
    mh = max(int((y1 - y0).max()), 1)  # tallest bin in cells; shorter bins are padded
    mw = max(int((x1 - x0).max()), 1)
    ys = y0[:, :, None] + torch.arange(mh, device=input.device)  # [K, PH, MH]
    xs = x0[:, :, None] + torch.arange(mw, device=input.device)  # [K, PW, MW]
    base = rois[:, 0].long() * (h * w)  # [K] first row of each RoI's image
    index = (base[:, None, None, None, None] + (ys * w)[:, :, None, :, None]
             + xs[:, None, :, None, :])  # [K, PH, PW, MH, MW]
    valid = (ys < y1[:, :, None])[:, :, None, :, None] & (xs < x1[:, :, None])[:, None, :, None, :]
    # bins are padded to MH x MW cells with the skipped row `pad`; an empty bin (box off the
    # map) holds one entry: the all-zero row after it, so its max is 0
    pad = n * h * w
    index = torch.where(valid, index, pad)
    index[..., 0, 0] = torch.where(valid[..., 0, 0], index[..., 0, 0], pad + 1)
    index = index.reshape(k * ph * pw, mh * mw)  # [K*PH*PW, MH*MW]
    pooled = _bin_max(index, _flat_features(input, zero_rows=2), pad)  # [K*PH*PW, C]
    return pooled.reshape(k, ph, pw, c).permute(0, 3, 1, 2).contiguous()  # [K, C, PH, PW]


def _align_grid(rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``roi_align_samples``' ``start``, ``bin_size`` and ``grid``, without the sample points."""
    offset = 0.5 if aligned else 0.0
    coords = (rois[:, 1:].double() * spatial_scale - offset).to(rois.dtype)  # [K, 4] in cells
    start = coords[:, [1, 0]]  # [K, 2] (y, x)
    size = coords[:, [3, 2]] - start  # [K, 2] roi height, width in cells
    if not aligned:
        size = size.clamp(min=1.0)  # legacy kernel: force malformed RoIs to 1x1 cell
    bin_size = size / torch.tensor(output_size, dtype=rois.dtype, device=rois.device)  # [K, 2]
    if sampling_ratio > 0:
        return start, bin_size, torch.full_like(start, sampling_ratio, dtype=torch.long)
    return start, bin_size, torch.ceil(bin_size).long()  # about one sample a cell; <= 0 inverted


def roi_align_samples(rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                      sampling_ratio: int, aligned: bool) -> dict[str, Tensor]:
    """RoIAlign's bins and sampling points, in continuous feature coordinates.

    In these coordinates cell ``j``'s centre is at ``j`` (where bilinear interpolation returns
    exactly that cell's value). Returns a dict of
    ``start`` and ``bin_size`` ``[K, 2]`` (y, x) in cells, ``grid`` int64 ``[K, 2]`` sampling
    points per bin side, ``ys`` ``[K, PH, GH]`` and ``xs`` ``[K, PW, GW]`` the sample coordinates
    (GH, GW = the largest grid; entries past a RoI's own grid are padding, see ``grid``).

    Why ``aligned``: a box edge at pixel x lies at ``x * scale`` in units of cells, but cell
    ``j`` spans ``[j, j + 1)`` there, its centre at ``j + 0.5``; subtracting 0.5 (Detectron2's
    ROIAlignV2) lines the box up with the cell centres the interpolation uses. Without it every
    sample sits half a cell (stride / 2 px) down-right of where it should, and boxes are made at
    least one cell wide, as the original kernel did.
    """
    ph, pw = output_size
    start, bin_size, grid = _align_grid(rois, output_size, spatial_scale, sampling_ratio, aligned)
    g = max(int(grid.max()), 1) if grid.numel() else 1

    def axis(s: Tensor, b: Tensor, n: Tensor, p: int) -> Tensor:
        i = torch.arange(g, device=rois.device, dtype=rois.dtype) + 0.5
        q = torch.arange(p, device=rois.device, dtype=rois.dtype)
        n = n.clamp(min=1).to(rois.dtype)
        # the kernel's order of operations: start + p * bin + (i + 0.5) * bin / n
        s, b, n = s[:, None, None], b[:, None, None], n[:, None, None]
        return s + q[:, None] * b + i * b / n  # [K, P, G]

    ys = axis(start[:, 0], bin_size[:, 0], grid[:, 0], ph)  # [K, PH, GH]
    xs = axis(start[:, 1], bin_size[:, 1], grid[:, 1], pw)  # [K, PW, GW]
    return {"start": start, "bin_size": bin_size, "grid": grid, "ys": ys, "xs": xs}


def _bilinear_axis(pos: Tensor, grid: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """One axis of bilinear interpolation, as torchvision's kernel does it.

    Args: pos ``[K, P, G]`` sample coordinates; grid ``[K]`` real samples per bin side.
    Returns: ``cells`` int64 ``[K, P, G, 2]`` (low, high neighbour) and their ``weights``
    ``[K, P, G, 2]``; padding samples and samples more than one cell off the map weigh 0.
    """
    inside = (pos >= -1.0) & (pos <= length)  # beyond that a sample reads 0 (still counted)
    real = torch.arange(pos.shape[2], device=pos.device) < grid[:, None, None]  # [K, 1, G]
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    at_end = low >= length - 1  # a sample past the last cell centre reads the last cell
    frac = torch.where(at_end, 0.0, pos - low)  # distance to the low neighbour, in [0, 1)
    low = low.clamp(max=length - 1).long()
    high = (low + 1).clamp(max=length - 1)
    keep = inside & real
    weights = torch.stack([torch.where(keep, 1 - frac, 0.0), torch.where(keep, frac, 0.0)], -1)
    return torch.stack([low, high], -1), weights  # [K, P, G, 2] each


def _align_chunks(grid: Tensor, output_size: tuple[int, int],
                  budget: int) -> list[tuple[list[int], slice]]:
    """Cut RoIAlign's work into chunks whose index tables hold at most ``budget`` entries.

    Args: grid int64 ``[K, 2]`` samples per bin side; output_size (PH, PW).
    Returns: ``(rois, band)`` pairs, the RoI indices of a chunk and the band of sample rows it
    takes in every bin; when all fits, one chunk of every RoI in order.

    Why: a table is ``[U, PH, PW, GH, GW, 2, 2]``, GH x GW the chunk's largest grid, so RoIs go
    sorted by grid (small ones do not pay for large ones) and packed up to the budget; a RoI over
    it alone is cut into bands of sample rows. Only a band of one row can exceed it (GW > 5,000
    at 7 x 7 and 2^20 entries).
    """
    per_sample = 4 * output_size[0] * output_size[1]  # entries of one sample, in every bin
    gh, gw = grid.clamp(min=1).T.tolist()
    if len(gh) * per_sample * max(gh) * max(gw) <= budget:
        return [(list(range(len(gh))), slice(0, None))]
    chunks, group, top_h, top_w = [], [], 0, 0
    for i in sorted(range(len(gh)), key=lambda i: (gh[i] * gw[i], gh[i])):
        if per_sample * gh[i] * gw[i] > budget:  # too large alone: bands of sample rows
            step = max(1, budget // (per_sample * gw[i]))
            chunks += [([i], slice(g, g + step)) for g in range(0, gh[i], step)]
            continue
        top_h, top_w = max(top_h, gh[i]), max(top_w, gw[i])
        if group and (len(group) + 1) * per_sample * top_h * top_w > budget:
            chunks.append((group, slice(0, None)))
            group, top_h, top_w = [], gh[i], gw[i]
        group.append(i)
    return chunks + [(group, slice(0, None))] if group else chunks


def _align_sum(rows: Tensor, rois: Tensor, band: slice, feature_size: tuple[int, int],
               args: tuple) -> Tensor:
    """One chunk of RoIAlign: ``rows`` ``[N*H*W, C]``, ``rois`` ``[U, 5]``, the ``band`` of
    sample rows taken in every bin, ``args`` = (output_size, spatial_scale, sampling_ratio,
    aligned) -> ``[U*PH*PW, C]``: per bin, the sum of weighted samples over its full count."""
    h, w = feature_size
    s = roi_align_samples(rois, *args)
    grid = s["grid"]  # [U, 2]
    gh, gw = (int(v) for v in grid.clamp(min=1).amax(0))  # padding past these weighs 0: cut it
    band = slice(band.start, min(band.stop or gh, gh))
    ry, wy = _bilinear_axis(s["ys"][:, :, band], grid[:, 0] - band.start, h)  # [U, PH, GH, 2]
    rx, wx = _bilinear_axis(s["xs"][:, :, :gw], grid[:, 1], w)  # [U, PW, GW, 2]
    count = (grid[:, 0] * grid[:, 1]).clamp(min=1).to(rows.dtype)  # [U]
    base = rois[:, 0].long() * (h * w)
    # every (bin, sample, corner) of the chunk: [U, PH, PW, GH, GW, 2, 2]
    index = (base[:, None, None, None, None, None, None] + (ry * w)[:, :, None, :, None, :, None]
             + rx[:, None, :, None, :, None, :])
    weight = (wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :]
              / count[:, None, None, None, None, None, None])
    bins = index.shape[0] * index.shape[1] * index.shape[2]
    return F.embedding_bag(index.reshape(bins, -1), rows,
                           per_sample_weights=weight.reshape(bins, -1), mode="sum")


def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """Mask R-CNN's RoIAlign: the average of bilinear samples per bin, as torchvision.ops.roi_align.

    Args:
        input: ``Tensor[N, C, H, W]`` feature maps.
        boxes: ``Tensor[K, 5]`` (image index, x1, y1, x2, y2) or a list of ``Tensor[L, 4]`` per
            image, xyxy in image pixels, same dtype as ``input``.
        output_size: PH = PW, or (PH, PW).  spatial_scale: 1 / stride (image px -> cells).
        sampling_ratio: samples per bin side; ``<= 0`` adapts per RoI, ``ceil(bin size)``.
        aligned: shift the box by half a cell so samples line up with cell centres (see
            ``roi_align_samples``); torchvision's default is the legacy False.

    Returns:
        ``Tensor[K, C, PH, PW]``. Each output is ``sum(w_s * features[cell_s]) / count``
        over the bin's samples ``s`` and their four neighbours, ``count = max(GH*GW, 1)``.
    """
    if not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    rois, (ph, pw) = _check(input, boxes, output_size, spatial_scale)
    n, c, h, w = input.shape
    k = rois.shape[0]
    if k == 0:
        return input.new_zeros(0, c, ph, pw)
    args = ((ph, pw), spatial_scale, sampling_ratio, aligned)
    grid = _align_grid(rois, *args)[2]  # [K, 2]
    # a table no larger than the output (torchvision's own size) is fine: fixed grids fit at once
    chunks = _align_chunks(grid, (ph, pw), max(_CHUNK_ENTRIES, k * c * ph * pw))
    rows = _flat_features(input)  # [N*H*W, C]
    if len(chunks) == 1:  # everything fits: one table, RoIs in order (the fixed-grid case)
        pooled = _align_sum(rows, rois, chunks[0][1], (h, w), args)  # [K*PH*PW, C]
    else:
        pooled = rows.new_zeros(k * ph * pw, c)
        for ids, band in chunks:
            ids = torch.tensor(ids, device=input.device)  # [U]
            # recomputed in backward, so autograd keeps one chunk's table at a time, not all
            part = checkpoint(_align_sum, rows, rois[ids], band, (h, w), args,
                              use_reentrant=False, preserve_rng_state=False)  # [U*PH*PW, C]
            bags = ids[:, None] * (ph * pw) + torch.arange(ph * pw, device=input.device)
            pooled.index_add_(0, bags.reshape(-1), part)  # a RoI cut in bands adds up its parts
    return pooled.reshape(k, ph, pw, c).permute(0, 3, 1, 2).contiguous()  # [K, C, PH, PW]


def roi_warp(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
             spatial_scale: float = 1.0, sampling_ratio: int = 2, fast: bool = True) -> Tensor:
    """RoIWarp (Dai et al. 2016, MNC): RoIPool's first quantization, then RoIAlign's bilinear sampling.

    Each box edge is rounded to the nearest feature-cell edge (a multiple of the stride; a box
    that rounds to nothing keeps one cell), then pooled by ``roi_align(aligned=True)``. Mask R-CNN's
    Table 2c puts it between RoIPool and RoIAlign: bilinear like RoIAlign, misaligned like
    RoIPool, which separates "bilinear" from "no rounding". Args and ``Tensor[K, C, PH, PW]`` as
    ``roi_align``.
    """
    rois = as_rois(boxes)
    cells = _round_half_away(rois[:, 1:].double() * spatial_scale)  # [K, 4] box edges in whole cells
    cells[:, 2:] = torch.maximum(cells[:, 2:], cells[:, :2] + 1)
    snapped = torch.cat([rois[:, :1], (cells / spatial_scale).to(rois.dtype)], dim=1)  # [K, 5] pixels
    align = torchvision.ops.roi_align if fast else roi_align
    return align(input, snapped, output_size, spatial_scale, sampling_ratio, True)


def roi_align_max(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
                  spatial_scale: float = 1.0, sampling_ratio: int = 2, aligned: bool = True,
                  fast: bool = True) -> Tensor:
    """RoIAlign that max-pools its bilinear samples instead of averaging them (Mask R-CNN §3 allows
    either; Table 2c: 30.2 max vs 30.3 average). Needs a fixed grid, ``sampling_ratio`` > 0.

    The G x G samples of a bin are exactly the centres of a G times finer RoIAlign grid with one
    sample per bin, so this is ``roi_align(G * PH x G * PW, sampling_ratio=1)`` then a G x G max
    pool (an average pool there gives back ``roi_align`` itself: tests/test_roi_ops.py checks both).
    """
    if not (isinstance(sampling_ratio, int) and sampling_ratio > 0):
        raise ValueError(f"roi_align_max needs a fixed sampling_ratio > 0, got {sampling_ratio!r}")
    ph, pw = _pair(output_size)
    fine = (ph * sampling_ratio, pw * sampling_ratio)
    align = torchvision.ops.roi_align if fast else roi_align
    samples = align(input, boxes, fine, spatial_scale, 1, aligned)  # [K, C, G*PH, G*PW]
    return F.max_pool2d(samples, sampling_ratio) if len(samples) else samples.new_zeros(0, input.shape[1], ph, pw)


def pool_rois(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float, pooler: str = "roi_align", sampling_ratio: int = 2,
              aligned: bool = True, fast: bool = True) -> Tensor:
    """The model's one switch between the poolers of Table 2c, and between torchvision's kernels
    (``fast``) and the hand-built ops.

    Args as ``roi_align``; ``pooler`` is one of ``POOLERS``: ``"roi_align"``, ``"roi_align_max"``,
    ``"roi_warp"`` (always ``aligned``) or ``"roi_pool"`` (ignores ``sampling_ratio`` and
    ``aligned``). Both paths return the same ``Tensor[K, C, PH, PW]`` (tests/test_roi_ops.py
    checks it); the fast one is several times quicker. fp16/bf16 features (mixed precision) are
    pooled in fp32 with fp32 boxes and returned in their own dtype.
    """
    if pooler not in POOLERS:
        raise ValueError(f"pooler must be one of {POOLERS}, got {pooler!r}")
    if input.dtype in (torch.float16, torch.bfloat16):  # mixed precision: pool in fp32, as torchvision's
        boxes = [b.float() for b in boxes] if isinstance(boxes, (list, tuple)) else boxes.float()
        pooled = pool_rois(input.float(), boxes, output_size, spatial_scale, pooler, sampling_ratio, aligned, fast)
        return pooled.to(input.dtype)  # autocast kernels do: the boxes stay fp32 (bf16 is 2 px off at 500 px)
    if pooler == "roi_pool":
        if fast:
            return torchvision.ops.roi_pool(input, boxes, output_size, spatial_scale)
        return roi_pool(input, boxes, output_size, spatial_scale)
    if pooler == "roi_warp":
        return roi_warp(input, boxes, output_size, spatial_scale, sampling_ratio, fast)
    if pooler == "roi_align_max":
        return roi_align_max(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, fast)
    if fast:
        return torchvision.ops.roi_align(input, boxes, output_size, spatial_scale,
                                         sampling_ratio, aligned)
    return roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
