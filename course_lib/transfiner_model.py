"""Mask Transfiner, part 3: refining the masks of a trained Mask R-CNN.

Chapter 09 trains a Mask R-CNN with ``train.fit``, freezes it, and trains a
``transfiner_refiner.TransfinerRefiner`` on top, as a second stage: the refiner sees the frozen
model's RoI features at three resolutions and its coarse 28x28 mask, and learns to correct the
mask near the boundary. ``add_refiner`` gives the trained model its refinement stage
(``ModelConfig.refine``); in eval mode that model runs both (``refine_detections``), so
``evaluate.coco_evaluate`` scores the refined masks with the same code as the plain ones.

The RoI features per quadtree level (28, 56, 112) come from the backbone map whose stride is
finer by the same factor: stride s for 28 (s = ``config.stride``; P4 with FPN), s/2 for 56 and
s/4 for 112 (stride 4 = the finest stage, P2 with FPN), each concatenated with the normalised
image pooled at that level (3 channels). Mask Transfiner uses P2-P4 the same way; the image
channels are ours: a small CPU backbone's stride-4 features are weak, and the pixels themselves
say where a shape's edge is.

Public names: ``refiner_in_channels``, ``roi_features``, ``coarse_mask_logits``,
``refiner_batch``, ``fit_refiner``, ``roi_masks``, ``upsample_coarse``, ``build_refiner``,
``add_refiner``, ``refine_detections``.

Dimensions: N images, K RoIs (all images together), C_l channels and S_l side at level l.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from tqdm.auto import tqdm

from course_lib import data, mask_head, model as model_lib, roi_ops, train, transfiner, transfiner_refiner


def _level_strides(model: model_lib.MaskRCNN, num_levels: int) -> list[int]:
    """Stride of the map pooled at each level: the heads' stride, then halving (>= 4)."""
    return [max(model.config.stride // 2 ** level, 4) for level in range(num_levels)]


def refiner_in_channels(model: model_lib.MaskRCNN, num_levels: int = 3) -> list[int]:
    """Channels of ``roi_features`` per level: the chosen map's channels + 3 image channels."""
    if model.config.fpn:
        return [model.config.fpn_channels + 3] * num_levels
    by_stride = dict(zip(model.backbone.strides, model.backbone.out_channels))
    return [by_stride[s] + 3 for s in _level_strides(model, num_levels)]


def roi_features(model: model_lib.MaskRCNN, batch: Tensor, maps: dict[int, Tensor], rois: list[Tensor],
                 sizes: tuple[int, ...]) -> list[Tensor]:
    """RoIAlign every RoI at each level: per level ``Tensor[K, C_l, S_l, S_l]`` (map + image)."""
    features = []
    for size, stride in zip(sizes, _level_strides(model, len(sizes))):
        pooled = roi_ops.pool_rois(maps[stride], rois, size, 1.0 / stride)  # [K, C, S, S]
        pixels = roi_ops.pool_rois(batch, rois, size, 1.0)  # [K, 3, S, S]
        features.append(torch.cat([pooled, pixels], dim=1))
    return features


def coarse_mask_logits(model: model_lib.MaskRCNN, head_features: list[Tensor], rois: list[Tensor],
                       labels: Tensor) -> Tensor:
    """The mask head's 28x28 logits of each RoI's class ``labels: Tensor[K]`` -> ``Tensor[K, 28, 28]``."""
    pooled = model.roi_heads.pool(head_features, rois, model.config.mask_roi_size)  # [K, C, 14, 14]
    logits = model.roi_heads.mask_head(pooled)  # [K, L, 28, 28]
    return logits[torch.arange(len(labels), device=labels.device), labels]


def _jitter(gt_boxes: Tensor, image_size: tuple[int, int], scale: float, generator: torch.Generator) -> Tensor:
    """Move each box edge by up to ``scale`` of the box size, so training RoIs look like detections."""
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).repeat(1, 2)  # [G, 4]
    noise = (torch.rand(gt_boxes.shape, generator=generator) * 2 - 1) * scale * wh
    jittered = gt_boxes + noise
    jittered[:, 0::2] = jittered[:, 0::2].clamp(0, image_size[1])
    jittered[:, 1::2] = jittered[:, 1::2].clamp(0, image_size[0])
    ok = (jittered[:, 2] - jittered[:, 0] > 1) & (jittered[:, 3] - jittered[:, 1] > 1)
    return torch.where(ok[:, None], jittered, gt_boxes)


@torch.no_grad()
def refiner_batch(model: model_lib.MaskRCNN, images: list[Tensor], targets: list[dict],
                  sizes: tuple[int, ...] = (28, 56, 112), jitter: float = 0.1,
                  generator: torch.Generator | None = None) -> dict:
    """The frozen model's view of the ground-truth objects, ready for ``TransfinerRefiner``.

    Returns ``{"features": per level Tensor[K, C_l, S_l, S_l], "coarse_mask_logits": Tensor[K, 28, 28],
    "gt_masks": per level Tensor[K, S_l, S_l] in [0, 1], "rois": per image Tensor[G_i, 4],
    "labels": Tensor[K]}`` with one RoI per ground-truth object (its box, jittered).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batch = model_lib.batch_images(images, model.image_mean, model.image_std, model.config.size_divisible)
    head_features, maps = model.feature_maps(batch)
    rois = [_jitter(t["boxes"].float(), img.shape[-2:], jitter, generator) for t, img in zip(targets, images)]
    labels = torch.cat([t["labels"] for t in targets])  # [K]
    gt_masks = [torch.cat([mask_head.mask_targets(t["masks"], r, torch.arange(len(r)), size)
                           for t, r in zip(targets, rois)]) for size in sizes]
    return {"features": roi_features(model, batch, maps, rois, sizes),
            "coarse_mask_logits": coarse_mask_logits(model, head_features, rois, labels),
            "gt_masks": gt_masks, "rois": rois, "labels": labels}


def fit_refiner(model: model_lib.MaskRCNN, refiner: transfiner_refiner.TransfinerRefiner, dataset, steps: int,
                batch_size: int = 4, lr: float = 1e-3, seed: int = 0, progress: bool = True) -> dict[str, list]:
    """Train ``refiner`` on the frozen ``model`` with Adam; returns the loss history per step.

    Each step takes ``batch_size`` images (the order of ``train.batch_indices``), one RoI per
    object. The Mask R-CNN stays in eval mode (BatchNorm statistics frozen) and gets no gradient.
    """
    model.eval()
    refiner.train()
    optimizer = torch.optim.Adam(refiner.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list] = {"loss_incoherent": [], "loss_refine": []}
    for step in tqdm(range(steps), desc="refiner", disable=not progress):
        indices = train.batch_indices(step, len(dataset), batch_size, seed)
        images, targets = data.collate_fn([dataset[i] for i in indices])
        inputs = refiner_batch(model, images, targets, refiner.config.sizes, generator=generator)
        losses = refiner(inputs["features"], inputs["coarse_mask_logits"], inputs["gt_masks"])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        for name, value in losses.items():
            history[name].append(value.item())
    return history


@torch.no_grad()
def roi_masks(model: model_lib.MaskRCNN, refiner: transfiner_refiner.TransfinerRefiner | None, dataset,
              indices: list[int] | None = None, batch_size: int = 8) -> dict[str, Tensor]:
    """Coarse and refined masks of every ground-truth object, on its exact box (no detection).

    Returns ``{"coarse": Tensor[K, 28, 28]`` probabilities, ``"gt_28", "gt_56", "gt_112"``: ground
    truth per level in [0, 1], ``"labels": Tensor[K]``, and with a ``refiner``: ``"refined":
    Tensor[K, 112, 112]``, ``"incoherent_probs": Tensor[K, 28, 28]``, ``"nodes": Tensor[K]`` quadtree
    nodes per RoI}``. Isolates mask quality from detection quality: the chapter's error analysis runs on this.
    """
    model.eval()
    sizes = refiner.config.sizes if refiner is not None else (28, 56, 112)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(indices), batch_size):
        images, targets = data.collate_fn([dataset[i] for i in indices[start:start + batch_size]])
        inputs = refiner_batch(model, images, targets, sizes, jitter=0.0)
        found = {"coarse": inputs["coarse_mask_logits"].sigmoid(), "labels": inputs["labels"]}
        found.update({f"gt_{size}": gt for size, gt in zip(sizes, inputs["gt_masks"])})
        if refiner is not None:
            out = refiner.eval().refine(inputs["features"], inputs["coarse_mask_logits"])
            roi_index = torch.cat([nodes[:, 0] for nodes in out["quadtree"].nodes])
            found.update(refined=out["masks"], incoherent_probs=out["incoherent_probs"],
                         nodes=torch.bincount(roi_index, minlength=len(inputs["labels"])))
        for name, value in found.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def upsample_coarse(coarse_probs: Tensor, num_levels: int = 3) -> Tensor:
    """The unrefined baseline at the refiner's resolution: ``paste_refined`` with no nodes.

    ``Tensor[K, S, S] -> Tensor[K, S*2^(L-1), S*2^(L-1)]`` (bilinear x2, level by level).
    """
    empty = transfiner.build_quadtree(torch.zeros_like(coarse_probs, dtype=torch.bool), num_levels)
    return transfiner.paste_refined(coarse_probs, [coarse_probs.new_zeros(0)] * num_levels, empty)


def build_refiner(model: model_lib.MaskRCNN, config: transfiner_refiner.TransfinerConfig | None = None
                  ) -> transfiner_refiner.TransfinerRefiner:
    """A fresh refiner sized for ``model``'s feature maps (``MaskRCNN`` calls it when ``config.refine``)."""
    config = config or transfiner_refiner.TransfinerConfig()
    return transfiner_refiner.TransfinerRefiner(config, refiner_in_channels(model, len(config.sizes)))


def add_refiner(model: model_lib.MaskRCNN, config: transfiner_refiner.TransfinerConfig | None = None
                ) -> model_lib.MaskRCNN:
    """A copy of the trained ``model`` with ``config.refine=True``: same weights, a fresh ``refiner``.

    The chapter's route: train Mask R-CNN, add the refinement stage, train it with ``fit_refiner``.
    ``model`` itself is left as it was, so both can be evaluated side by side.
    """
    refined = model_lib.MaskRCNN(dataclasses.replace(model.config, refine=True))
    if config is not None:
        refined.refiner = build_refiner(refined, config)
    missing, unexpected = refined.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("refiner.") for name in missing):
        raise ValueError(f"model's weights do not fit its own config: missing {missing}, unexpected {unexpected}")
    return refined.to(next(model.parameters()).device)


@torch.no_grad()
def refine_detections(model: model_lib.MaskRCNN, batch: Tensor, head_features: list[Tensor],
                      maps: dict[int, Tensor], detections: list[dict[str, Tensor]]) -> None:
    """``MaskRCNN.forward``'s last step when ``config.refine``: refine the confident detections' masks.

    ``detections`` (eval mode, masks already pasted) are changed in place: the masks of detections
    scoring at least ``config.refine_score_thresh`` are replaced by the refiner's 112x112 masks pasted
    at the same boxes; boxes, labels, scores and the other masks stay the plain model's. Like the
    released code (which refines at most 10 RoIs per image), this keeps inference cheap: the many
    low-score detections barely move mask AP.
    """
    refiner = model.refiner.eval()
    keep = [det["scores"] >= model.config.refine_score_thresh for det in detections]
    kept_rois = [det["boxes"][k] for det, k in zip(detections, keep)]
    if not any(len(r) for r in kept_rois):
        return
    labels = torch.cat([det["labels"][k] for det, k in zip(detections, keep)])
    coarse = coarse_mask_logits(model, head_features, kept_rois, labels)  # [K', 28, 28]
    refined = refiner(roi_features(model, batch, maps, kept_rois, refiner.config.sizes), coarse)  # [K', 112, 112]
    # padded by one coarse cell (4 cells of 112), as the plain 28x28 masks are padded by one: the same
    # grown box. One 112-cell of padding would stretch each mask by most of a pixel: a lot on a 10 px shape.
    padding = refiner.config.sizes[-1] // refiner.config.sizes[0]
    for det, fine, k in zip(detections, refined.split([len(r) for r in kept_rois]), keep):
        if k.any():
            size = tuple(det["masks"].shape[-2:])
            det["masks"][k] = mask_head.paste_masks_in_image(fine[:, None], det["boxes"][k], size, padding=padding)
