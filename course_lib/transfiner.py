"""Mask Transfiner, part 1: incoherent regions, the quadtree over them, and pasting refined labels back.

Mask R-CNN predicts each mask on a 28x28 grid, so boundaries come out blurred once the mask is
stretched over a large box. Mask Transfiner (Ke et al., CVPR 2022, §3) observes that the
information lost by a coarse grid sits in a thin band: *incoherent regions*, the pixels that
change when a mask is downsampled and upsampled again. Most wrong pixels lie there (the paper:
incoherent regions cover ~14% of a box and hold ~43% of its wrong pixels), so refining only
those pixels, on a quadtree that descends 28 -> 56 -> 112, buys most of the gain of a dense
112x112 head at a fraction of the cost.

This module holds the pure functions (no parameters); the learned parts (the incoherent-region
detector, the node encoder, the sequence encoder and pixel decoder) are in
``course_lib.transfiner_refiner``.

Dimensions: K RoIs; S the side of one level's grid (28, 56, 112); f the down-sampling factor;
P_l the number of quadtree nodes at level l. Grids are in RoI cells: cell (y, x) of an S x S
grid covers RoI-relative coordinates [x/S, (x+1)/S) x [y/S, (y+1)/S).

Public names: ``downsample_mask``, ``upsample_nearest``, ``incoherent_mask``,
``coarsen_incoherent``, ``soft_incoherent_band``, ``Quadtree``, ``build_quadtree``,
``error_cells``, ``paste_refined``, and the chapter's measurements ``error_statistics``,
``mask_boundary``, ``boundary_fscore``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The four children of a quadtree cell (y, x) are (2y + dy, 2x + dx), in this (dy, dx) order.
_CHILD_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _as_binary(mask: Tensor, name: str) -> Tensor:
    """Bool mask from bool / integer (nonzero = object) / float (>= 0.5 = object) input."""
    if mask.dim() < 2:
        raise ValueError(f"{name} must be [..., H, W]; got shape {tuple(mask.shape)}")
    if mask.dtype.is_floating_point:
        return mask >= 0.5
    return mask != 0


def _check_factor(mask: Tensor, factor: int, name: str) -> None:
    h, w = mask.shape[-2:]
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int; got factor={factor!r}")
    if h % factor or w % factor:
        raise ValueError(f"{name} of size {h}x{w} is not divisible by factor={factor}")


def downsample_mask(mask: Tensor, factor: int) -> Tensor:
    """Majority vote over each f x f block: a coarse cell is object when >= half its pixels are.

    Args:
        mask: ``Tensor[..., H, W]`` binary (bool, uint8, or float with 0.5 as the threshold).
        factor: f; H and W must be divisible by it.
    Returns:
        ``Tensor[..., H/f, W/f]`` bool.

    This is average pooling followed by ``>= 0.5``. Ties (exactly half the block) go to the
    object, so a one-pixel-wide object edge on a 2x2 block is kept, not erased.
    """
    _check_factor(mask, factor, "mask")
    binary = _as_binary(mask, "mask")
    h, w = binary.shape[-2:]
    blocks = binary.reshape(*binary.shape[:-2], h // factor, factor, w // factor, factor)
    return blocks.float().mean(dim=(-3, -1)) >= 0.5  # [..., H/f, W/f]


def upsample_nearest(mask: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling: every coarse cell becomes an f x f block of itself.

    ``Tensor[..., h, w] -> Tensor[..., h*f, w*f]`` (same dtype).
    """
    return mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def incoherent_mask(mask: Tensor, factor: int = 2) -> Tensor:
    """The paper's incoherent regions: pixels that change under downsample-then-upsample.

    Args:
        mask: ``Tensor[..., H, W]`` binary mask (bool, uint8, or float thresholded at 0.5).
        factor: f, the down-sampling factor (paper: 2); H and W must be divisible by it.
    Returns:
        ``Tensor[..., H, W]`` bool, ``upsample_nearest(downsample_mask(mask)) XOR mask``.

    This is the definition the chapter teaches (Mask Transfiner §3, information loss): exact,
    hand-checkable, and it is exactly the information a grid f times coarser cannot hold.
    Precisely: down = majority vote per f x f block (average pool, >= 0.5), up = nearest. So
    an f x f block that is all object or all background is never incoherent, and a block that
    is mixed always holds at least one incoherent pixel (whatever the vote, some pixel
    disagrees with it). A square whose edges lie on the coarse grid has no incoherent pixels;
    shift it by one pixel and its edges become incoherent. ``soft_incoherent_band`` is the
    wider band of the released code.
    """
    _check_factor(mask, factor, "mask")
    binary = _as_binary(mask, "mask")
    restored = upsample_nearest(downsample_mask(binary, factor), factor)  # [..., H, W]
    return restored ^ binary


def coarsen_incoherent(incoherent: Tensor, factor: int) -> Tensor:
    """OR-pool an incoherence map to a grid f times coarser: a cell is incoherent if any pixel is.

    ``Tensor[..., H, W] bool -> Tensor[..., H/f, W/f] bool``. The quadtree needs this to go
    from pixels to the cells of a coarser level: ``coarsen_incoherent(incoherent_mask(m, f), f)``
    marks exactly the mixed f x f blocks of ``m``.
    """
    _check_factor(incoherent, factor, "incoherent")
    h, w = incoherent.shape[-2:]
    blocks = incoherent.bool().reshape(*incoherent.shape[:-2], h // factor, factor, w // factor, factor)
    return blocks.any(dim=-1).any(dim=-2)  # [..., H/f, W/f]


def soft_incoherent_band(mask: Tensor, factor: int = 2, thresh: float = 0.01) -> Tensor:
    """The released code's softer, wider band: bilinear down, bilinear up, |difference| > thresh.

    Args:
        mask: ``Tensor[..., H, W]`` binary (bool, uint8, or float thresholded at 0.5).
        factor: f (released code: 2). thresh: smallest change that counts (released code: 0.01).
    Returns:
        ``Tensor[..., H, W]`` bool.

    Bilinear downsampling by an integer f (``align_corners=False``) averages each block;
    bilinear upsampling then spreads every coarse value over its neighbours, so any pixel
    within about one coarse cell of an edge changes a little. The band is therefore 2-3
    pixels wide on both sides of every edge, even where the strict definition finds nothing
    (a grid-aligned square). That is more recall for the detector at the price of more nodes.
    The released code (SysCV/transfiner ``get_incoherent_mask``) also pools the signed
    difference to the coarse grid before thresholding; we keep the band at mask resolution and
    take the absolute value so both sides of an edge count. The chapter teaches
    ``incoherent_mask`` and shows this one next to it.
    """
    _check_factor(mask, factor, "mask")
    if not 0.0 <= thresh < 1.0:
        raise ValueError(f"thresh must be in [0, 1); got thresh={thresh}")
    values = _as_binary(mask, "mask").float()  # as the released code, which starts from bit masks
    flat = values.reshape(-1, 1, *values.shape[-2:])  # [B, 1, H, W]
    h, w = flat.shape[-2:]
    small = F.interpolate(flat, size=(h // factor, w // factor), mode="bilinear", align_corners=False)
    restored = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return ((restored - flat).abs() > thresh).reshape(values.shape)


@dataclass(frozen=True)
class Quadtree:
    """Nodes of a quadtree over K RoIs, level by level (coarsest first).

    Attributes:
        nodes: per level l, ``Tensor[P_l, 3]`` int64 rows ``(roi, y, x)`` on the level's grid.
        parents: per level l, ``Tensor[P_l]`` int64 index into level l-1's nodes (-1 at roots).
        sizes: grid side per level, e.g. ``(28, 56, 112)``.

    Nodes are sorted by RoI at every level (roots in (roi, y, x) order, children in their
    parent's order, then (dy, dx) = (0,0), (0,1), (1,0), (1,1)).
    """

    nodes: tuple[Tensor, ...]
    parents: tuple[Tensor, ...]
    sizes: tuple[int, ...]

    def num_nodes(self) -> list[int]:
        """Nodes per level, ``[P_0, P_1, ...]``."""
        return [len(n) for n in self.nodes]


def _children(parent_nodes: Tensor) -> tuple[Tensor, Tensor]:
    """The four children of each node: ``Tensor[P, 3] -> (Tensor[4P, 3], parent index Tensor[4P])``."""
    offsets = torch.tensor(_CHILD_OFFSETS, dtype=torch.int64, device=parent_nodes.device)  # [4, 2]
    roi = parent_nodes[:, None, 0].expand(-1, 4)  # [P, 4]
    y = 2 * parent_nodes[:, None, 1] + offsets[:, 0]  # [P, 4]
    x = 2 * parent_nodes[:, None, 2] + offsets[:, 1]  # [P, 4]
    children = torch.stack([roi, y, x], dim=-1).reshape(-1, 3)  # [4P, 3]
    parent_index = torch.arange(len(parent_nodes), device=parent_nodes.device).repeat_interleave(4)
    return children, parent_index


def build_quadtree(incoherent_roots: Tensor, num_levels: int = 3,
                   finer_incoherent: Sequence[Tensor] | None = None) -> Quadtree:
    """Quadtree whose roots are the incoherent cells of the coarsest grid.

    Args:
        incoherent_roots: ``Tensor[K, S, S]`` bool, incoherent cells at the coarsest level (S = 28).
        num_levels: levels including the roots' (paper: 3, i.e. 28, 56, 112).
        finer_incoherent: optional, one ``Tensor[K, S*2^l, S*2^l]`` bool per finer level l >= 1.
            When given, a child is kept only where it is incoherent at its own level (and only
            kept nodes get children); when ``None`` every root has all 4 children at 56 and all
            16 grandchildren at 112 (a full tree: 21 nodes per root).
    Returns:
        ``Quadtree`` with ``sizes = (S, 2S, 4S, ...)``.

    Mask Transfiner §3: a point of the 28x28 grid covers four points at 56 and sixteen at
    112, so refining along the tree keeps every finer node tied to the coarse cell it details.
    The full tree is what inference uses (the detector only predicts at 28); the filtered tree
    shows how much a finer incoherence map would prune.
    """
    if incoherent_roots.dim() != 3 or incoherent_roots.shape[-1] != incoherent_roots.shape[-2]:
        raise ValueError(f"incoherent_roots must be [K, S, S]; got shape {tuple(incoherent_roots.shape)}")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1; got num_levels={num_levels}")
    if finer_incoherent is not None and len(finer_incoherent) != num_levels - 1:
        raise ValueError(f"finer_incoherent needs {num_levels - 1} maps; got {len(finer_incoherent)}")
    size = incoherent_roots.shape[-1]
    roots = incoherent_roots.bool().nonzero()  # [P_0, 3]
    nodes, parents = [roots], [torch.full((len(roots),), -1, dtype=torch.int64, device=roots.device)]
    for level in range(1, num_levels):
        children, parent_index = _children(nodes[-1])  # [4 P_{l-1}, 3]
        if finer_incoherent is not None:
            keep = finer_incoherent[level - 1].bool()[children[:, 0], children[:, 1], children[:, 2]]
            children, parent_index = children[keep], parent_index[keep]
        nodes.append(children)
        parents.append(parent_index)
    sizes = tuple(size * 2 ** level for level in range(num_levels))
    return Quadtree(nodes=tuple(nodes), parents=tuple(parents), sizes=sizes)


def error_cells(coarse_probs: Tensor, gt_masks: Tensor) -> Tensor:
    """Coarse cells whose block of the finer ground truth holds a wrong pixel (the oracle's roots).

    Args:
        coarse_probs: ``Tensor[K, S, S]`` coarse mask probabilities (e.g. the 28x28 mask head).
        gt_masks: ``Tensor[K, S*f, S*f]`` ground truth on a finer grid (e.g. 112), binary.
    Returns:
        ``Tensor[K, S, S]`` bool: cells where the nearest-upsampled coarse mask (>= 0.5)
        disagrees with the ground truth somewhere in the cell's f x f block.

    With these roots and a full quadtree, pasting the ground truth at the nodes reproduces the
    ground truth exactly: the upper bound of refinement (``paste_refined`` with ``"nearest"``).
    """
    size, fine = coarse_probs.shape[-1], gt_masks.shape[-1]
    if coarse_probs.dim() != 3 or gt_masks.dim() != 3 or fine % size:
        raise ValueError(f"coarse_probs {tuple(coarse_probs.shape)} and gt_masks {tuple(gt_masks.shape)} "
                         "must be [K, S, S] and [K, S*f, S*f]")
    factor = fine // size
    wrong = upsample_nearest(coarse_probs >= 0.5, factor) ^ _as_binary(gt_masks, "gt_masks")
    return coarsen_incoherent(wrong, factor)  # [K, S, S]


def paste_refined(coarse_probs: Tensor, node_labels: Sequence[Tensor], quadtree: Quadtree,
                  mode: str = "bilinear") -> Tensor:
    """Upsample the coarse mask level by level, overwriting the quadtree nodes with refined labels.

    Args:
        coarse_probs: ``Tensor[K, S, S]`` coarse mask probabilities (S = ``quadtree.sizes[0]``).
        node_labels: per level l, ``Tensor[P_l]`` refined probabilities of that level's nodes.
        quadtree: the tree the labels belong to.
        mode: ``"bilinear"`` (smooth, as the released code) or ``"nearest"`` upsampling between levels.
    Returns:
        ``Tensor[K, S_L, S_L]`` probabilities at the finest level (112 for 28/56/112),
        differentiable with respect to ``coarse_probs`` and ``node_labels``.

    Level 0: write the roots' labels into the 28x28 mask; upsample x2; write the 56-level
    labels; upsample x2; write the 112-level labels. With ``"nearest"`` and a full tree, a
    cell's change reaches only its own descendants, so when the nodes carry the ground truth
    and cover every wrong pixel the result equals the ground truth exactly (the test of this
    function). ``"bilinear"`` also lets a refined cell soften its neighbours by up to one cell.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest'; got mode={mode!r}")
    if len(node_labels) != len(quadtree.nodes):
        raise ValueError(f"node_labels has {len(node_labels)} levels; the quadtree has {len(quadtree.nodes)}")
    if coarse_probs.dim() != 3 or coarse_probs.shape[-1] != quadtree.sizes[0]:
        raise ValueError(f"coarse_probs must be [K, {quadtree.sizes[0]}, {quadtree.sizes[0]}]; "
                         f"got {tuple(coarse_probs.shape)}")
    masks = coarse_probs
    for level, (nodes, labels) in enumerate(zip(quadtree.nodes, node_labels)):
        if level > 0:
            size = quadtree.sizes[level]
            align = False if mode == "bilinear" else None  # nearest takes no align_corners
            masks = F.interpolate(masks[:, None], size=(size, size), mode=mode,
                                  align_corners=align)[:, 0]  # [K, S_l, S_l]
        if len(labels) != len(nodes):
            raise ValueError(f"node_labels[{level}] has {len(labels)} values for {len(nodes)} nodes")
        masks = masks.index_put((nodes[:, 0], nodes[:, 1], nodes[:, 2]), labels.to(masks.dtype))
    return masks


def error_statistics(pred_probs: Tensor, gt_masks: Tensor, region: Tensor) -> dict[str, float]:
    """Where a mask's wrong pixels are, relative to a region (e.g. the incoherent regions).

    Args:
        pred_probs: ``Tensor[K, H, W]`` predicted probabilities (wrong = ``(p >= 0.5) != gt``).
        gt_masks: ``Tensor[K, H, W]`` binary ground truth. region: ``Tensor[K, H, W]`` bool.
    Returns:
        ``{"region_area"}``: fraction of all pixels inside the region; ``{"errors_in_region"}``:
        fraction of the wrong pixels that lie inside it; ``{"error_rate"}``: fraction wrong.
        The paper's figures for its incoherent regions on COCO: ~14% of the area, ~43% of errors.
    """
    wrong = (pred_probs >= 0.5) != _as_binary(gt_masks, "gt_masks")
    region = region.bool()
    return {"region_area": region.float().mean().item(),
            "errors_in_region": ((wrong & region).sum() / wrong.sum().clamp(min=1)).item(),
            "error_rate": wrong.float().mean().item()}


def mask_boundary(masks: Tensor) -> Tensor:
    """Object pixels with a background pixel among their 8 neighbours (outside the grid = background).

    ``Tensor[K, H, W]`` binary -> ``Tensor[K, H, W]`` bool: the mask minus its 3x3 erosion.
    """
    binary = _as_binary(masks, "masks")
    background = (~binary).float()[:, None]  # [K, 1, H, W]
    near_background = F.max_pool2d(F.pad(background, (1, 1, 1, 1), value=1.0), 3, stride=1)[:, 0]
    return binary & (near_background > 0)


def boundary_fscore(pred_masks: Tensor, gt_masks: Tensor, tolerance: int = 1) -> Tensor:
    """Boundary F-score per mask: how well the predicted outline matches the true one.

    Args:
        pred_masks, gt_masks: ``Tensor[K, H, W]`` binary (float thresholded at 0.5).
        tolerance: a boundary pixel counts as matched within this many pixels (Chebyshev).
    Returns:
        ``Tensor[K]`` F = 2PR / (P + R), with P the share of predicted boundary pixels near the
        true boundary and R the share of true boundary pixels near the predicted one (1 when
        both are empty). Mask AP hardly moves when a boundary is off by a pixel on a large
        object; this measure does, so it shows what refinement changes (as the boundary
        AP the Transfiner paper reports, built on Cheng et al.'s Boundary IoU).
    """
    pred, gt = mask_boundary(pred_masks), mask_boundary(gt_masks)
    size = 2 * tolerance + 1
    near_gt = F.max_pool2d(gt.float()[:, None], size, stride=1, padding=tolerance)[:, 0] > 0
    near_pred = F.max_pool2d(pred.float()[:, None], size, stride=1, padding=tolerance)[:, 0] > 0
    precision = (pred & near_gt).sum((1, 2)) / pred.sum((1, 2)).clamp(min=1)
    recall = (gt & near_pred).sum((1, 2)) / gt.sum((1, 2)).clamp(min=1)
    fscore = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    both_empty = (pred.sum((1, 2)) == 0) & (gt.sum((1, 2)) == 0)
    return torch.where(both_empty, torch.ones_like(fscore), fscore)
