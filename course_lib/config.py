"""``ModelConfig``: every choice and size of the course's Faster/Mask R-CNN in one frozen dataclass.

The defaults are the paper's ResNet-C4 design scaled to the 128 px shapes images (light heads, few
proposals), with the paper's value named in each comment where ours differs. The chapters train
``model.cpu_config()``, which changes a few of them for small objects and a 2-core CPU (see
``model.CPU_RECIPE``). Ablations never mutate a
config: they make a new one with ``dataclasses.replace(config, pooler="roi_pool")``.
``course_lib.model`` re-exports it as ``model.ModelConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    # ---- data ----------------------------------------------------------------------------
    num_classes: int = 4            # 3 shapes + background (index 0); COCO: 81
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32        # pad each batch so every stride divides it

    # ---- backbone ------------------------------------------------------------------------
    backbone: str = "tiny"          # "tiny" (from scratch, CPU) or "resnet50" (GPU chapter)
    stride: int = 16                # output stride without FPN: 16 = paper's C4, 32 = C5, 8 = C3 (CPU preset)
    width: int = 64                 # channels of the tiny backbone's first stage
    norm: str = "bn"                # "bn" (BatchNorm) or "gn" (GroupNorm, small batches)
    fpn: bool = False               # feature pyramid P2-P5 (+P6 for the RPN), chapter 07
    fpn_channels: int = 128         # paper: 256

    # ---- anchors and RPN (Faster R-CNN §3.1) --------------------------------------------------
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64)     # px; paper: 32..512 for 800 px images
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width, as torchvision
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 1000   # paper: 12000 / 2000 (train), 6000 / 1000 (test)
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_test: int = 100
    rpn_nms_thresh: float = 0.7

    # ---- RoI pooling (Mask R-CNN §3, the course's centre) --------------------------------
    pooler: str = "roi_align"       # "roi_align" or "roi_pool"
    aligned: bool = True            # half-pixel offset (Detectron2's ROIAlignV2)
    sampling_ratio: int = 2         # sampling points per bin side (paper: 2, i.e. 4 per bin)
    fast_ops: bool = True           # torchvision's C++/CUDA kernels; False = hand-built ops
    canonical_size: int = 36        # FPN level mapping: 224 px at 800 px images -> ~36 at 128
    canonical_level: int = 4        # k0 in k = floor(k0 + log2(sqrt(wh) / canonical_size))

    # ---- box head (Fast R-CNN) -----------------------------------------------------------
    box_roi_size: int = 7
    representation_size: int = 256  # two FC layers; paper/torchvision: 1024
    box_fg_iou: float = 0.5
    box_bg_iou: float = 0.5
    box_batch_size_per_image: int = 64   # paper: 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100

    # ---- mask branch (Mask R-CNN §3) -----------------------------------------------------
    with_mask: bool = True          # False gives Faster R-CNN
    mask_roi_size: int = 14         # RoIAlign output; the 2x transposed conv gives 28x28
    mask_conv_channels: int = 64    # paper: 256
    mask_num_convs: int = 4
    mask_loss: str = "sigmoid"      # "sigmoid" (per-class, decoupled) or "softmax" (coupled)

    # ---- Mask Transfiner refinement (chapter 09) -----------------------------------------
    refine: bool = False            # add model.refiner; trained as a second stage (transfiner_model.fit_refiner)
    refine_score_thresh: float = 0.5  # refine detections scoring at least this (released code: top 10 per image)

    def __post_init__(self):
        choices = {"backbone": ("tiny", "resnet50"), "stride": (8, 16, 32), "norm": ("bn", "gn"),
                   "pooler": ("roi_align", "roi_pool"), "mask_loss": ("sigmoid", "softmax")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")
        if self.num_classes < 2:
            raise ValueError(f"ModelConfig.num_classes={self.num_classes}: needs background + at least 1 class")
        if self.refine and (not self.with_mask or self.mask_loss != "sigmoid"):
            raise ValueError(f"ModelConfig.refine=True needs the sigmoid mask branch (with_mask={self.with_mask}, "
                             f"mask_loss={self.mask_loss!r}): the refiner reads per-class sigmoid mask logits")
