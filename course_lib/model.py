"""The whole detector: Faster R-CNN, and Mask R-CNN = Faster R-CNN + a mask branch.

Mask R-CNN (He et al. 2017, §3): a backbone (+ FPN), a region proposal network, and RoI heads
whose box branch (Fast R-CNN) and mask branch run in parallel on RoIAligned features. The call
contract is torchvision's: ``model(images, targets)`` in train mode returns a dict of named
losses; ``model(images)`` in eval mode returns one dict per image with ``boxes``, ``labels``,
``scores`` and (Mask R-CNN) ``masks`` ``Tensor[D, 1, H, W]`` probabilities pasted into the image.

Unlike torchvision, images are not resized (the shapes images are already small): they are
normalised and zero-padded to a common size divisible by ``config.size_divisible``.

Public names: ``ModelConfig`` (re-exported), ``MaskRCNN``, ``FasterRCNN``, ``add_refiner``,
``validate_inputs``, ``batch_images``. The named configs (the CPU recipe) are in ``presets``.

Dimensions: N images, C channels, H x W image size, D detections.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from course_lib import backbone, fpn, mask_head, refinement, roi_heads, rpn
from course_lib.config import ModelConfig, TransfinerConfig

__all__ = ["ModelConfig", "MaskRCNN", "FasterRCNN", "add_refiner", "validate_inputs", "batch_images"]


PIXEL_TOLERANCE = 1e-3  # rounding a resize may leave past [0, 1]; 0..255 pixels miss it by 250


def validate_inputs(images: list[Tensor], targets: list[dict] | None, num_classes: int) -> None:
    """Raise ``ValueError`` naming the image index and the offending value for bad inputs.

    Images: a list of float ``Tensor[3, H, W]`` with H, W >= 1 and finite pixels in [0, 1].
    Targets (training): per image ``boxes`` ``Tensor[G, 4]``, finite, with x2 > x1 and y2 > y1,
    at least partly inside the image; integer ``labels`` ``Tensor[G]`` in 1..num_classes - 1.
    ``masks`` are checked by ``_check_masks`` when the model has a mask branch.

    Why: each of these trains without an error and silently wrong. 0..255 pixels are 255 times
    off the normalisation's mean and std; a NaN box turns the loss NaN steps later; a label 0 is
    background, so a 0-based label set teaches the first class to be nothing. The checks cost one
    min/max reduction per image and a few comparisons per box.
    """
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"images must be a non-empty list of Tensor[3, H, W], got {type(images).__name__}")
    for i, image in enumerate(images):
        _check_image(i, image)
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"targets has {len(targets)} entries for {len(images)} images")
    for i, (target, image) in enumerate(zip(targets, images)):
        _check_target(i, target, tuple(image.shape[-2:]), num_classes)


def _check_image(i: int, image: Tensor) -> None:
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        desc = f"{tuple(image.shape)} {image.dtype}" if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"images[{i}] must be a float Tensor[3, H, W], got {desc}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"images[{i}] is {image.shape[1]} x {image.shape[2]} px (H x W); an image needs "
                         "at least one pixel each way")
    low, high = torch.aminmax(image)
    if not ((low >= -PIXEL_TOLERANCE) & (high <= 1 + PIXEL_TOLERANCE)):  # NaN fails both
        bad = ~torch.isfinite(image)
        if bad.any():
            c, y, x = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"images[{i}][{c}, {y}, {x}] = {image[c, y, x].item()}; pixels must be finite")
        raise ValueError(f"images[{i}] has pixel values in [{low.item():.4g}, {high.item():.4g}]; expected "
                         "floats in [0, 1] (8-bit pixels: divide by 255)")


def _check_target(i: int, target: dict, size: tuple[int, int], num_classes: int) -> None:
    for key in ("boxes", "labels"):
        if key not in target:
            raise ValueError(f"targets[{i}] is missing key {key!r} (has {sorted(target)})")
    gt_boxes, labels = target["boxes"], target["labels"]
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"targets[{i}]['boxes'] must be Tensor[G, 4], got {tuple(gt_boxes.shape)}")
    if len(labels) != len(gt_boxes):
        raise ValueError(f"targets[{i}]: {len(gt_boxes)} boxes but {len(labels)} labels")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"targets[{i}]['labels'] must be an integer Tensor[G], got {labels.dtype}")
    if len(gt_boxes):
        _check_boxes(i, gt_boxes, size)
        _check_labels(i, labels, num_classes)


def _check_boxes(i: int, gt_boxes: Tensor, size: tuple[int, int]) -> None:
    """Non-finite, degenerate, or wholly outside the image (partly outside is fine: COCO clips)."""
    height, width = size
    x1, y1, x2, y2 = gt_boxes.unbind(1)
    problems = torch.stack([~torch.isfinite(gt_boxes).all(1), (x2 <= x1) | (y2 <= y1),
                            (x1 >= width) | (y1 >= height) | (x2 <= 0) | (y2 <= 0)])  # [3, G]
    if problems.any():
        kind, j = torch.nonzero(problems)[0].tolist()
        why = ("is not finite", "is degenerate (needs x2 > x1 and y2 > y1)",
               f"lies wholly outside the {height} x {width} px image (H x W)")[kind]
        raise ValueError(f"targets[{i}]['boxes'][{j}] = {gt_boxes[j].tolist()} {why}")


def _check_labels(i: int, labels: Tensor, num_classes: int) -> None:
    low, high = torch.aminmax(labels)
    if low < 1 or high >= num_classes:
        j = torch.nonzero((labels < 1) | (labels >= num_classes))[0].item()
        hint = " (0 is the background: 0-based labels need + 1)" if labels[j] == 0 else ""
        raise ValueError(f"targets[{i}]['labels'][{j}] = {labels[j].item()}; expected a class label in "
                         f"1..{num_classes - 1} (config.num_classes={num_classes} counts the background){hint}")


def batch_images(images: list[Tensor], mean: Tensor, std: Tensor, size_divisible: int) -> Tensor:
    """Normalise each image and zero-pad all to one ``Tensor[N, 3, H_pad, W_pad]``.

    ``H_pad``, ``W_pad``: the largest height and width rounded up to ``size_divisible``, so each
    backbone stride divides the padded size and feature cells align with image pixels. Padding is
    added right and bottom, so box coordinates are unchanged.
    """
    max_h = max(img.shape[-2] for img in images)
    max_w = max(img.shape[-1] for img in images)
    pad_h = -(-max_h // size_divisible) * size_divisible
    pad_w = -(-max_w // size_divisible) * size_divisible
    batch = images[0].new_zeros((len(images), 3, pad_h, pad_w))                    # [N, 3, H, W]
    for img, slot in zip(images, batch):
        slot[:, :img.shape[-2], :img.shape[-1]].copy_((img - mean) / std)
    return batch


class MaskRCNN(nn.Module):
    """Backbone (+ FPN) -> RPN -> RoI heads (box branch + mask branch when ``config.with_mask``).

    With ``config.refiner`` the model also holds ``refiner``, chapter 09's Mask Transfiner stage, and
    in eval mode refines the masks of confident detections. Training stays two-stage, as the chapter
    teaches it: ``train.fit`` trains the detector (the refiner gets no gradient from its losses), then
    ``train.fit`` with ``TrainConfig(stage="refiner")`` trains the refiner on the frozen detector.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        config = config or ModelConfig()
        self.config = config
        self.backbone = backbone.build(config)
        if config.fpn:
            self.fpn = fpn.FPN(self.backbone.out_channels[-4:], config.fpn_channels, extra_p6=True)
            channels = config.fpn_channels
        else:
            self.fpn = None
            channels = self.backbone.out_channels[-1]
        self.rpn = rpn.RegionProposalNetwork(config, channels)
        self.roi_heads = roi_heads.RoIHeads(config, channels)
        self.refiner = refinement.build_refiner(config, self.backbone) if config.refiner is not None else None
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(3, 1, 1), persistent=False)

    def batch(self, images: list[Tensor]) -> Tensor:
        """Normalise and pad ``images`` into one ``Tensor[N, 3, H_pad, W_pad]`` (``batch_images``)."""
        return batch_images(images, self.image_mean, self.image_std, self.config.size_divisible)

    def feature_maps(self, batch: Tensor) -> tuple[list[Tensor], dict[int, Tensor]]:
        """``(features the heads use, every map by its stride)``: the refiner (chapter 09) also pools finer maps.

        Heads: ``[C_last]`` at ``config.stride``, or P2..P6 with FPN. Maps: the backbone's stages, or P2..P6.
        """
        stages = self.backbone(batch)                                               # finest first
        if self.fpn is not None:
            pyramid = self.fpn(stages[-4:])
            return pyramid, {4 * 2 ** i: p for i, p in enumerate(pyramid)}
        return stages[-1:], dict(zip(self.backbone.strides, stages))

    def features(self, batch: Tensor) -> list[Tensor]:
        """Backbone features the heads use: ``[C_last]`` at ``config.stride``, or P2..P6 with FPN."""
        return self.feature_maps(batch)[0]

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("targets is None: a model in train mode needs targets (call model.eval() to predict)")
        validate_inputs(images, targets if self.training else None, self.config.num_classes)
        if self.training and self.config.with_mask:
            _check_masks(images, targets)
        image_sizes = [tuple(img.shape[-2:]) for img in images]
        batch = self.batch(images)
        features, maps = self.feature_maps(batch)
        proposals, rpn_losses = self.rpn(features, image_sizes, tuple(batch.shape[-2:]), targets)
        detections, head_losses = self.roi_heads(features, proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **head_losses}
        if self.config.with_mask:
            for det, size in zip(detections, image_sizes):
                det["masks"] = mask_head.paste_masks_in_image(det["masks"], det["boxes"], size)
        if self.refiner is not None:
            refinement.refine_detections(self, batch, features, maps, detections)
        return detections


def _check_masks(images: list[Tensor], targets: list[dict]) -> None:
    """Training Mask R-CNN needs 0/1 ``masks`` ``Tensor[G, H, W]`` matching each image and its boxes
    (a 0/255 PNG mask would make the binary cross-entropy's targets 255)."""
    for i, (image, target) in enumerate(zip(images, targets)):
        masks = target.get("masks")
        if masks is None:
            raise ValueError(f"targets[{i}] is missing key 'masks' (needed when config.with_mask)")
        expected = (len(target["boxes"]), *image.shape[-2:])
        if tuple(masks.shape) != expected:
            raise ValueError(f"targets[{i}]['masks'] has shape {tuple(masks.shape)}, expected {expected}")
        bad = (masks != 0) & (masks != 1)                                           # [G, H, W]
        if bad.any():
            j, y, x = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"targets[{i}]['masks'][{j}] holds {masks[j, y, x].item()} at (row {y}, col {x}); "
                             "masks must be 0/1 (a 0/255 mask: divide by 255 or compare > 0)")


def FasterRCNN(config: ModelConfig | None = None) -> MaskRCNN:  # noqa: N802 (reads as a class)
    """Faster R-CNN: the same model without the mask branch (``with_mask=False``)."""
    config = config or ModelConfig()
    return MaskRCNN(dataclasses.replace(config, with_mask=False))


def add_refiner(net: MaskRCNN, refiner: TransfinerConfig | None = None) -> MaskRCNN:
    """A copy of the trained ``net`` with a fresh refinement stage: same weights, ``config.refiner`` set.

    The chapter's route: train Mask R-CNN, add the refinement stage, train it with
    ``TrainConfig(stage="refiner")``. ``net`` itself is left as it was, so both can be evaluated.
    """
    refined = MaskRCNN(dataclasses.replace(net.config, refiner=refiner or TransfinerConfig()))
    missing, unexpected = refined.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not name.startswith("refiner.") for name in missing):
        raise ValueError(f"net's weights do not fit its own config: missing {missing}, unexpected {unexpected}")
    return refined.to(next(net.parameters()).device)
