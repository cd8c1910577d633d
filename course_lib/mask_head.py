"""The mask branch of Mask R-CNN (He et al. 2017, §3): a small FCN per RoI, its targets, its loss,
and pasting its 28x28 masks back into the image.

Public names: ``MaskHead``, ``mask_targets``, ``mask_loss``, ``mask_probs``,
``paste_masks_in_image``.

Dimensions: K RoIs, C feature channels, S the pooled size (14), M = 2S the mask size (28),
G ground-truth objects in one image, N detections, H x W the image in pixels.
``num_classes`` counts the background (index 0) everywhere, as torchvision does: the shapes data
set has 3 classes, so the head has 4 output channels and channel 0 is never a sigmoid target.

The paper's central claim about this branch is *decoupling*: it predicts one binary mask per class
and trains only the ground-truth class's mask with a per-pixel sigmoid, so classes never compete
for a pixel; the box head's classifier alone decides the class. ``mask_loss(kind="softmax")`` is
the coupled alternative the paper compares against (Table 2b: 30.3 -> 24.8 mask AP on COCO), and
``kind="sigmoid_agnostic"`` the class-agnostic one (one mask for every class: 29.7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib import roi_ops
from course_lib.config import MASK_LOSSES as LOSS_KINDS
from course_lib.config import SOFTMAX_RULES, ModelConfig


class MaskHead(nn.Module):
    """The mask FCN: ``mask_num_convs`` 3x3 convs + ReLU, a 2x transposed conv + ReLU, a 1x1 conv.

    ``forward(x: Tensor[K, C, S, S]) -> mask_logits: Tensor[K, num_classes, 2S, 2S]`` (logits,
    not probabilities; one channel when ``config.mask_loss == "sigmoid_agnostic"``). The paper's head
    on C4/FPN features is 4 convs of 256 channels, a deconv to 28x28 and one output mask per class
    (Mask R-CNN Fig. 4); our widths come from ``ModelConfig`` (64 channels by default, for the CPU).
    Init: Kaiming normal with ``fan_out`` (He et al. 2015) and zero biases for the hidden layers, as
    torchvision; the last 1x1 conv N(0, 0.001) as Detectron2, so every logit starts near 0 and the
    loss at log 2 (sigmoid) or log L (softmax) whatever the features' scale (with Kaiming there the
    first logits grow with the features, and so does the first loss).
    """

    def __init__(self, config: ModelConfig, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(config.mask_num_convs):
            layers += [nn.Conv2d(channels, config.mask_conv_channels, 3, padding=1), nn.ReLU(inplace=True)]
            channels = config.mask_conv_channels
        self.fcn = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(channels, config.mask_conv_channels, 2, stride=2)
        outputs = 1 if config.mask_loss == "sigmoid_agnostic" else config.num_classes
        self.mask_fcn_logits = nn.Conv2d(config.mask_conv_channels, outputs, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_fcn_logits.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fcn(x)                      # [K, D, S, S]
        x = F.relu(self.deconv(x))           # [K, D, 2S, 2S]
        return self.mask_fcn_logits(x)       # [K, num_classes, 2S, 2S]


def mask_targets(gt_masks: Tensor, proposals: Tensor, matched_idxs: Tensor, resolution: int,
                 aligned: bool = True) -> Tensor:
    """The ground-truth mask of each positive RoI, cropped to the RoI and resampled to M x M.

    Args:
        gt_masks: ``Tensor[G, H, W]`` uint8 (or float) instance masks of one image, in pixels.
        proposals: ``Tensor[K, 4]`` float xyxy, the positive RoIs in image pixels.
        matched_idxs: ``Tensor[K]`` int64, the index in ``gt_masks`` each RoI was matched to.
        resolution: M, the mask head's output size (28).
        aligned: half-pixel offset of RoIAlign. ``True`` (default) samples gt pixel ``i`` at its
            centre ``i + 0.5``, so a box that exactly covers a mask gives all ones; torchvision's
            ``project_masks_on_boxes`` uses ``False`` and so shifts every target by half a pixel
            (its right and bottom rows come out 0.5 on that same exact box).

    Returns:
        ``Tensor[K, M, M]`` float in [0, 1]: *soft* targets (the fraction of each bin the object
        covers, from RoIAlign's bilinear samples with the adaptive ``ceil(box / M)`` samples per bin).

    Why soft: torchvision keeps these fractions and BCE accepts them; matterport's Keras version
    rounds them to 0/1. Rounding throws away where inside a bin the boundary lies, which is
    exactly the sub-pixel information RoIAlign was introduced to keep (§3, "RoIAlign"), and it
    moves thin parts (a triangle's tip) to all-or-nothing. Chapter 06 draws both.
    """
    if proposals.ndim != 2 or proposals.shape[-1] != 4:
        raise ValueError(f"proposals must be Tensor[K, 4], got shape {tuple(proposals.shape)}")
    if matched_idxs.shape != proposals.shape[:1]:
        raise ValueError(f"matched_idxs must be Tensor[{proposals.shape[0]}], got {tuple(matched_idxs.shape)}")
    if gt_masks.ndim != 3:
        raise ValueError(f"gt_masks must be Tensor[G, H, W], got shape {tuple(gt_masks.shape)}")
    rois = torch.cat([matched_idxs[:, None].to(proposals), proposals], dim=1)  # [K, 5]: (gt index, box)
    masks = gt_masks[:, None].to(proposals)                                    # [G, 1, H, W]
    # Each gt mask plays the role of one "image" of a one-channel feature map at stride 1.
    sampled = roi_ops.pool_rois(masks, rois, (resolution, resolution), 1.0, pooler="roi_align",
                                sampling_ratio=-1, aligned=aligned, fast=True)  # [K, 1, M, M]
    return sampled[:, 0]                                                        # [K, M, M]


def _check_loss_inputs(mask_logits: Tensor, targets: Tensor, labels: Tensor, kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {LOSS_KINDS}")
    if mask_logits.ndim != 4:
        raise ValueError(f"mask_logits must be Tensor[K, num_classes, M, M], got {tuple(mask_logits.shape)}")
    k, c, m = mask_logits.shape[0], mask_logits.shape[1], mask_logits.shape[-1]
    if targets.shape != (k, m, m):
        raise ValueError(f"mask_targets must be Tensor[{k}, {m}, {m}], got {tuple(targets.shape)}")
    if labels.shape != (k,):
        raise ValueError(f"labels must be Tensor[{k}], got {tuple(labels.shape)}")
    if kind != "sigmoid_agnostic" and k and (labels.min() < 1 or labels.max() >= c):
        raise ValueError(f"labels must lie in 1..{c - 1} (0 is background), got {labels.tolist()}")


def mask_loss(mask_logits: Tensor, mask_targets: Tensor, labels: Tensor, kind: str = "sigmoid") -> Tensor:
    """The mask loss L_mask, averaged over RoIs and pixels.

    Args:
        mask_logits: ``Tensor[K, num_classes, M, M]`` logits from ``MaskHead`` (channel 0 = background).
        mask_targets: ``Tensor[K, M, M]`` float soft targets from ``mask_targets``.
        labels: ``Tensor[K]`` int64 in 1..num_classes-1, the gt class of each positive RoI.
        kind: ``"sigmoid"`` (the paper), ``"softmax"`` (the coupled baseline of Table 2b) or
            ``"sigmoid_agnostic"`` (``mask_logits`` has one channel, every class's mask).

    Returns:
        a scalar; 0 (still attached to the graph) when K = 0.

    ``"sigmoid"``: binary cross-entropy with logits on channel ``labels[k]`` of RoI k only,
    ``mean_{k,i,j} BCE(sigmoid(z[k, labels[k], i, j]), t[k, i, j])``. The other channels are not
    in the loss at all, so their gradient is exactly zero (Mask R-CNN §3: "L_mask is only defined
    on the k-th mask (other mask outputs do not contribute to the loss)"). Equal to torchvision's
    ``maskrcnn_loss``.

    ``"softmax"``: a per-pixel softmax across *all* channels (background 0 and every class),
    and cross-entropy against the target distribution that puts ``t`` on the gt class and
    ``1 - t`` on background: ``mean_{k,i,j} -[t log p_label + (1 - t) log p_0]``. For a 0/1 target
    this is the usual multinomial loss (gt class inside the mask, background outside). Every
    channel gets gradient ``p_c - target_c``, so classes compete for every pixel: to put its mass
    on the right channel the mask head must itself tell the classes apart.

    ``"sigmoid_agnostic"``: the same BCE on the one channel every RoI shares.
    """
    _check_loss_inputs(mask_logits, mask_targets, labels, kind)
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    index = torch.arange(labels.shape[0], device=labels.device)
    if kind != "softmax":
        channel = labels if kind == "sigmoid" else torch.zeros_like(labels)
        return F.binary_cross_entropy_with_logits(mask_logits[index, channel], mask_targets)
    target_dist = torch.zeros_like(mask_logits)                # [K, num_classes, M, M]
    target_dist[index, labels] = mask_targets
    target_dist[:, 0] += 1 - mask_targets                      # background takes the rest
    return F.cross_entropy(mask_logits, target_dist)


def mask_probs(mask_logits: Tensor, labels: Tensor, kind: str = "sigmoid", rule: str = "probability") -> Tensor:
    """Inference: the probability mask of each detection's predicted class (threshold it at 0.5).

    Args:
        mask_logits: ``Tensor[N, num_classes, M, M]`` (one channel for ``"sigmoid_agnostic"``).
        labels: ``Tensor[N]`` int64, the class the box head predicted for each detection.
        kind: the loss the head was trained with; ``"sigmoid"`` takes ``sigmoid`` of channel
            ``labels[n]`` (as torchvision's ``maskrcnn_inference``), ``"sigmoid_agnostic"`` of the
            one channel, ``"softmax"`` that channel after a softmax across channels.
        rule: for ``"softmax"``, which pixels form the mask: ``"probability"``, where ``p_label >=
            0.5`` (the sigmoid's rule), or ``"argmax"``, where the label is the most probable
            channel (FCN's rule); it returns ``p_label / (p_label + max_other)``, which is
            ``>= 0.5`` exactly there. With 4 channels the two differ: 0.4 can be the largest.

    Returns:
        ``Tensor[N, 1, M, M]`` in [0, 1], still in the RoI's frame (paste with ``paste_masks_in_image``).
    """
    if kind not in LOSS_KINDS or rule not in SOFTMAX_RULES:
        raise ValueError(f"kind={kind!r}, rule={rule!r}; expected one of {LOSS_KINDS} and of {SOFTMAX_RULES}")
    if mask_logits.ndim != 4 or labels.shape != mask_logits.shape[:1]:
        raise ValueError(f"mask_logits {tuple(mask_logits.shape)} and labels {tuple(labels.shape)} "
                         "must be [N, num_classes, M, M] and [N]")
    index = torch.arange(labels.shape[0], device=labels.device)
    if kind != "softmax":
        channel = labels if kind == "sigmoid" else torch.zeros_like(labels)
        return mask_logits[index, channel].sigmoid()[:, None]  # [N, 1, M, M]
    probs = mask_logits.softmax(dim=1)                         # [N, L, M, M]
    own = probs[index, labels]                                 # [N, M, M]
    if rule == "argmax":
        others = probs.clone()
        others[index, labels] = -1.0
        own = own / (own + others.amax(dim=1)).clamp(min=1e-12)
    return own[:, None]                                        # [N, 1, M, M]


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale xyxy boxes about their centres: ``Tensor[N, 4] -> Tensor[N, 4]``."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2                # [N, 2]
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale           # [N, 2]
    return torch.cat([centres - half, centres + half], dim=1)


def _paste_one(mask: Tensor, box: list[int], im_h: int, im_w: int) -> Tensor:
    """Resize one ``[M, M]`` mask to its integer box (inclusive corners) and place it in an image."""
    x1, y1, x2, y2 = box
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)            # +1: the box's corners are pixel indices
    resized = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    image = mask.new_zeros((im_h, im_w))
    x_lo, x_hi, y_lo, y_hi = max(x1, 0), min(x2 + 1, im_w), max(y1, 0), min(y2 + 1, im_h)
    if x_hi > x_lo and y_hi > y_lo:                            # the box may lie wholly outside
        image[y_lo:y_hi, x_lo:x_hi] = resized[y_lo - y1:y_hi - y1, x_lo - x1:x_hi - x1]
    return image


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size_hw: tuple[int, int],
                         padding: int = 1) -> Tensor:
    """Paste each RoI-frame mask into a full image at its box (zero elsewhere).

    Args:
        masks: ``Tensor[N, 1, M, M]`` mask probabilities (from ``mask_probs``).
        boxes: ``Tensor[N, 4]`` float xyxy detections in image pixels.
        image_size_hw: ``(H, W)`` of the output.
        padding: zero cells added around each mask before resizing (torchvision: 1).

    Returns:
        ``Tensor[N, 1, H, W]`` probabilities; threshold at 0.5 for binary masks (§3).

    The same numbers as torchvision's ``roi_heads.paste_masks_in_image``. Why the padding: a mask
    resized by bilinear interpolation cannot fall to zero at its own border, so it would end in a
    hard step at the box edge. Padding the M x M mask by one zero cell on each side and growing the
    box by the same factor ``(M + 2) / M`` lets the mask fade out across the box edge instead. The
    grown box is then truncated to integer pixel indices and treated as inclusive (``x2 - x1 + 1``
    pixels wide, the Detectron legacy); the part outside the image is cut off.
    """
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"masks must be Tensor[N, 1, M, M], got shape {tuple(masks.shape)}")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be Tensor[{masks.shape[0]}, 4], got shape {tuple(boxes.shape)}")
    im_h, im_w = image_size_hw
    m = masks.shape[-1]
    padded = F.pad(masks, (padding,) * 4)                      # [N, 1, M+2p, M+2p]
    int_boxes = _expand_boxes(boxes, (m + 2 * padding) / m).to(torch.int64).tolist()
    pasted = [_paste_one(mask[0], box, im_h, im_w) for mask, box in zip(padded, int_boxes)]
    if not pasted:
        return masks.new_zeros((0, 1, im_h, im_w))
    return torch.stack(pasted)[:, None]                        # [N, 1, H, W]
