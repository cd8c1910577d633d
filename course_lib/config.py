"""Every configuration of the course in frozen dataclasses: the network, the refiner, a training run.

* ``ModelConfig``: every choice and size of the course's Faster/Mask R-CNN. The defaults are the
  paper's ResNet-C4 design scaled to the 128 px shapes images (light heads, few proposals), with
  the paper's value named in each comment where ours differs. It describes the whole network,
  the optional Mask Transfiner refiner included (``refiner``), so a checkpoint that stores it
  rebuilds the exact model (``checkpoints.load_model``).
* ``TransfinerConfig``: sizes and choices of chapter 09's refinement stage.
* ``TrainConfig``: one training run of ``train.fit`` (schedule, batch, checkpoints, speed switches).
* ``RunConfig``: what the command line trains: data, a ``ModelConfig`` and a ``TrainConfig``.

Configs are never mutated: an ablation makes a new one, ``dataclasses.replace(config,
pooler="roi_pool")``. The named presets (the CPU recipe, quick, GPU) live in ``presets``.
``course_lib.model`` re-exports ``ModelConfig`` as ``model.ModelConfig``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


POOLERS = ("roi_align", "roi_align_max", "roi_warp", "roi_pool")
MASK_LOSSES = ("sigmoid", "softmax", "sigmoid_agnostic")
SOFTMAX_RULES = ("probability", "argmax")
SCHEDULES = ("cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adam")   # the paper's SGD, or Adam (the refiner, as the released code)
BACKBONES = ("tiny", "resnet50", "bottleneck")


def _check_choices(obj, choices: dict[str, tuple]) -> None:
    for field, allowed in choices.items():
        if getattr(obj, field) not in allowed:
            raise ValueError(f"{type(obj).__name__}.{field}={getattr(obj, field)!r}; expected one of {allowed}")


@dataclass(frozen=True)
class TransfinerConfig:
    """Sizes and choices of the refinement stage (Mask Transfiner, Ke et al. 2022; chapter 09).

    Two defaults differ from the paper, both measured on the shapes data (tests and chapter 09):
    the detector learns the wide ``soft_incoherent_band`` (the strict regions depend on sub-cell
    detail the detector cannot see, so it misses many of them; the soft band is easy to predict
    and covers nearly all wrong pixels), and the node labels are learned with BCE (the paper's
    L1 on probabilities stalls for many steps at the start of training).
    """
    sizes: tuple[int, int, int] = (28, 56, 112)  # quadtree levels: RoI grid sides (paper: 28, 56, 112)
    d_model: int = 64               # node vector width, divisible by 4 for the sine encoding
    num_heads: int = 4              # attention heads of the sequence encoder
    num_layers: int = 2             # encoder layers (attention + feed-forward each)
    ffn_dim: int = 128              # hidden width of each feed-forward layer
    detector_channels: int = 64     # width of the detector's four 3x3 convs
    incoherent_factor: int = 2      # down/up-sampling factor defining incoherence (paper: 2)
    incoherent_target: str = "soft"  # detector target: "soft" band (released code) or "strict" (paper)
    detector_thresh: float = 0.25   # root if detector probability >= this; low: a missed root cannot be fixed
    max_roots: int = 160            # inference: at most this many roots per RoI (most confident first)
    node_loss: str = "bce"          # node label loss: "bce", or "l1" (paper; slow to start, see refine_loss)
    max_nodes: int = 256            # nodes per attention sequence (released code: 150 per level)
    score_thresh: float = 0.5       # refine detections scoring at least this (released code: top 10 per image)
    seed: int = 0                   # fixed generator for grouping nodes at inference: same input, same mask

    def __post_init__(self):
        _check_choices(self, {"incoherent_target": ("strict", "soft"), "node_loss": ("l1", "bce")})
        if self.d_model % 4 or self.d_model % self.num_heads:
            raise ValueError(f"TransfinerConfig.d_model={self.d_model} must be divisible by 4 "
                             f"and by num_heads={self.num_heads}")
        if any(b != 2 * a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"TransfinerConfig.sizes={self.sizes} must double level to level")


@dataclass(frozen=True)
class ModelConfig:
    # ---- data ----------------------------------------------------------------------------
    num_classes: int = 4            # 3 shapes + background (index 0); COCO: 81
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32        # pad each batch so every stride divides it

    # ---- backbone ------------------------------------------------------------------------
    backbone: str = "tiny"          # "tiny" (from scratch, CPU), "resnet50" (GPU chapter: exactly ResNet-50)
                                    # or "bottleneck" (ResNet-50's topology at `width` and `blocks`)
    stride: int = 16                # output stride without FPN: 16 = paper's C4, 32 = C5, 8 = C3 (CPU preset)
    width: int = 64                 # channels of the first stage: tiny's C2, a bottleneck's inner width (ResNet-50: 64)
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)  # "bottleneck": blocks per stage C2..C5 (ResNet-50's)
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
    pooler: str = "roi_align"       # "roi_align", "roi_align_max" (max of the samples), "roi_warp"
                                    # (bilinear on a rounded box, MNC) or "roi_pool" (Table 2c)
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
    box_batch_size_per_image: int = 64   # paper: 64 RoIs per image with C4, 512 with FPN
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100

    # ---- mask branch (Mask R-CNN §3) -----------------------------------------------------
    with_mask: bool = True          # False gives Faster R-CNN
    mask_roi_size: int = 14         # RoIAlign output; the 2x transposed conv gives 28x28
    mask_conv_channels: int = 64    # paper: 256
    mask_num_convs: int = 4
    mask_loss: str = "sigmoid"      # "sigmoid" (per-class, decoupled), "softmax" (coupled) or
                                    # "sigmoid_agnostic" (one mask for every class; Table 2b)
    softmax_mask_rule: str = "probability"  # softmax masks: p >= 0.5, or "argmax" (FCN); mask_head.mask_probs

    # ---- Mask Transfiner refinement (chapter 09) -----------------------------------------
    refiner: TransfinerConfig | None = None  # a refinement stage on top (trained second: train_refiner)

    def __post_init__(self):
        _check_choices(self, {"backbone": BACKBONES, "stride": (8, 16, 32), "norm": ("bn", "gn"),
                              "pooler": POOLERS, "mask_loss": MASK_LOSSES,
                              "softmax_mask_rule": SOFTMAX_RULES})
        if self.fpn and self.pooler != "roi_align":
            raise ValueError(f"ModelConfig.pooler={self.pooler!r} with fpn=True: the pyramid pools with "
                             "RoIAlign only (fpn.multiscale_roi_align)")
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ValueError(f"ModelConfig.blocks={self.blocks}; expected 4 block counts >= 1 (C2..C5)")
        if self.num_classes < 2:
            raise ValueError(f"ModelConfig.num_classes={self.num_classes}: needs background + at least 1 class")
        if self.refiner is not None and (not self.with_mask or self.mask_loss != "sigmoid"):
            raise ValueError(f"ModelConfig.refiner needs the sigmoid mask branch (with_mask={self.with_mask}, "
                             f"mask_loss={self.mask_loss!r}): the refiner reads per-class sigmoid mask logits")

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelConfig":
        """The config ``dataclasses.asdict`` wrote (a checkpoint's), refiner included; unknown fields raise."""
        return _from_dict(cls, fields, refiner=TransfinerConfig)


@dataclass(frozen=True)
class TrainConfig:
    """One run of ``train.fit``: what to optimise, how long, and how fast.

    The recipe is Mask R-CNN's (§3.1: SGD, momentum 0.9, weight decay 1e-4, linear warm-up)
    shrunk to a CPU. ``stage="refiner"`` trains only a Mask Transfiner refiner on the frozen
    detector (chapter 09), with Adam as the released code. The speed switches (``amp``,
    ``channels_last``, ``workers``, ``compile``) and the logging intervals never change the
    numbers a run computes; a resume compares every other field.
    """
    steps: int = 800
    batch_size: int = 8             # images per step, over all processes
    lr: float = 0.02                # Mask R-CNN: 0.02 at batch 16
    warmup_steps: int = 50          # linear warm-up; a from-scratch detector diverges without it
    schedule: str = "onecycle"      # "cosine", "onecycle" or "constant" (train.lr_factor)
    grad_clip: float | None = 10.0  # max global gradient norm; guards early spikes
    seed: int = 0                   # data order (train.batch_indices) and sampling
    optimizer: str = "sgd"          # "sgd" (the paper) or "adam" (the refiner)
    stage: str = "detector"         # "detector": the whole model; "refiner": its refiner only
    eval_every: int = 0             # steps between pycocotools evaluations (and at the end); 0: never
    checkpoint_every: int = 0       # steps between checkpoints (and at the end); 0: at the end only
    amp: bool = False               # mixed precision (CUDA only: bf16, else fp16 + GradScaler)
    channels_last: bool = False     # NHWC layout (faster convolutions on tensor cores)
    workers: int = 0                # DataLoader worker processes
    compile: bool = False           # torch.compile the training forward

    SPEED_FIELDS = ("eval_every", "checkpoint_every", "amp", "channels_last", "workers", "compile")

    def __post_init__(self):
        _check_choices(self, {"schedule": SCHEDULES, "optimizer": OPTIMIZERS,
                              "stage": ("detector", "refiner")})
        for field in ("steps", "batch_size"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}; expected an int >= 1")
        for field in ("warmup_steps", "eval_every", "checkpoint_every", "workers"):
            if getattr(self, field) < 0:
                raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}; expected >= 0")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r}; expected a positive learning rate")

    def numeric_fields(self) -> dict:
        """The fields that change the numbers a run computes (compared on resume)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SPEED_FIELDS}


@dataclass(frozen=True)
class RunConfig:
    """What ``python -m course_lib.train`` trains: the data, the network and the training run."""
    name: str                       # the preset it came from
    model: ModelConfig
    train: TrainConfig
    data: str = "shapes"            # "shapes" (drawn by code) or "coco" (any COCO-format set on disk)
    image_size: int = 128           # shapes: image side; coco: longest side after resizing (px)
    train_images: int = 2000        # shapes only; a COCO set brings its own
    val_images: int = 200           # shapes only (a different seed from the training set)
    device: str = "auto"            # "auto", "cpu" or "cuda"
    coco_images: str | None = None
    coco_annotations: str | None = None
    val_coco_images: str | None = None       # coco: a separate validation set (--val-images) ...
    val_coco_annotations: str | None = None  # ... and its json (--val-annotations)
    val_fraction: float = 0.1       # coco without a validation set: share held out, seeded by train.seed
    eval_on_train: bool = False     # coco: evaluate on the training images (AP then measures memory)

    def __post_init__(self):
        _check_choices(self, {"data": ("shapes", "coco"), "device": ("auto", "cpu", "cuda")})
        if self.image_size < 32:
            raise ValueError(f"RunConfig.image_size={self.image_size}; expected >= 32 px")
        self._check_validation()

    def _check_validation(self) -> None:
        """One way to pick the evaluated images; training images only when asked for by name."""
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"RunConfig.val_fraction={self.val_fraction!r} (--val-fraction); "
                             "expected a fraction in [0, 1)")
        if (self.val_coco_images is None) != (self.val_coco_annotations is None):
            raise ValueError("a separate validation set needs both --val-images DIR and --val-annotations FILE "
                             "(RunConfig.val_coco_images, val_coco_annotations)")
        if self.eval_on_train and (self.val_fraction or self.val_coco_images is not None):
            raise ValueError("--eval-on-train (RunConfig.eval_on_train) evaluates on the training images: it takes "
                             f"--val-fraction 0 (got {self.val_fraction}) and no --val-images")
        if self.data == "coco" and self.val_fraction == 0 and not self.eval_on_train and self.val_coco_images is None:
            raise ValueError("--val-fraction 0 (RunConfig.val_fraction) holds out no images; to evaluate on the "
                             "training images say so with --eval-on-train (eval_on_train=True)")

    @classmethod
    def from_dict(cls, fields: dict) -> "RunConfig":
        """The run ``dataclasses.asdict`` wrote (``run.json``), nested configs included."""
        fields = {**fields, "model": ModelConfig.from_dict(fields["model"]),
                  "train": _from_dict(TrainConfig, fields["train"])}
        return _from_dict(cls, fields)


def _from_dict(cls, fields: dict, **nested):
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown} (written by another version of course_lib?)")
    values = {}
    for name, value in fields.items():
        if name in nested and isinstance(value, dict):
            value = _from_dict(nested[name], value)
        values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
