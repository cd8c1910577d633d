"""The named configurations: the CPU recipe the chapters train, CI's quick one, and the GPU run.

``ModelConfig``'s defaults are the paper's ResNet-C4 design scaled to 128 px images. Trained from
scratch on the 6-50 px shapes, that design barely learns on a CPU (chapter 05 measures why), so
the chapters train ``cpu_config()``, which changes the fields in ``CPU_RECIPE``, each with its
reason. ``quick_config()`` shrinks it further for CI. The command line's runs (``RunConfig``)
come from ``PRESETS``: ``quick`` (CI, seconds), ``cpu`` (a laptop, minutes), ``gpu`` (chapter 10)
and ``gpu_proof`` (the GPU model's topology narrowed to a CPU: the proof that its recipe learns).

Public names: ``CPU_RECIPE``, ``cpu_config``, ``quick_config``, ``ablation_config``, ``gpu_config``,
``GPU_PROOF_SIZES``, ``GPU_PROOF_STEPS``, ``gpu_proof_config``, ``cpu_training``, ``refiner_training``,
``quick_run``, ``cpu_run``, ``gpu_run``, ``gpu_proof_run``, ``PRESETS``.
"""
from __future__ import annotations

import dataclasses

from course_lib import utils
from course_lib.config import ModelConfig, RunConfig, TrainConfig

GPU_PROOF_STEPS = 900  # gpu_proof_run: an estimated 11-13 min on 2 quiet cores (from 50 steps on a busy machine)

# The CPU recipe: where it departs from ModelConfig's defaults (the paper's ResNet-C4 design scaled
# to 128 px), and why. Each change was measured on 500 held-out shapes images (notes in chapter 05).
CPU_RECIPE = dict(
    stride=8,                       # C3: the shapes are 6-50 px, a stride-16 cell is bigger than the smallest
    width=32,                       # width 64 was 2x slower per step and no better after the same steps
    rpn_fg_iou=0.5,                 # paper 0.7: few small objects have any anchor at IoU 0.7
    rpn_batch_size_per_image=64,    # paper 256: ~2 objects per image give a handful of positives
    rpn_pre_nms_top_n_train=500,    # NMS over 1000 boxes per image was 13% of a step
    rpn_post_nms_top_n_train=200,
    box_positive_fraction=0.5,      # paper 0.25: more foreground RoIs per step teach the classes sooner
    sampling_ratio=1,               # paper 2: a bin is under one stride-8 cell here; 20% faster, same idea
    mask_conv_channels=32,          # paper 256: mask AP 0.68 at 32 channels, 0.70 at 64, 1.2x slower
    fast_ops=False,                 # our RoIAlign's backward is ~2.5x faster than torchvision's CPU kernel
)


def cpu_config(**changes) -> ModelConfig:
    """The model the CPU chapters train: stride 8, light heads, few proposals, 128 px images.

    ``changes`` override fields, e.g. ``cpu_config(with_mask=False)`` for Faster R-CNN.
    """
    return dataclasses.replace(ModelConfig(), **{**CPU_RECIPE, **changes})


def quick_config(**changes) -> ModelConfig:
    """The CPU recipe made smaller for quick (CI) runs: fewer proposals and RoIs, a narrower box head."""
    small = dict(rpn_post_nms_top_n_train=150, box_batch_size_per_image=32, representation_size=128)
    return cpu_config(**{**small, **changes})


def ablation_config(**changes) -> ModelConfig:
    """Chapter 08's base for Table 2 (``experiments.Settings``: 192 px images of larger shapes): the CPU
    recipe with a narrower trunk, anchors two per octave from 32 to 181 px (the objects span several
    cells at stride 32, and most have an anchor at IoU >= 0.5 at both strides), and the paper's
    2 x 2 sampling points per RoIAlign bin (max pooling needs more than one sample)."""
    table2 = dict(width=16, anchor_sizes=(32, 45, 64, 90, 128, 181), sampling_ratio=2)
    return cpu_config(**{**table2, **changes})


def gpu_config(image_size: int = 512, **changes) -> ModelConfig:
    """ResNet-50-FPN from scratch with the paper's head sizes, for ``image_size`` px images (chapter 10).

    FPN 256 channels, 1024-d box head, 256-channel mask convs, 512 RoIs per image; at 512 px,
    anchors 32..512 px on P2..P6 and the FPN level mapping's 224 px (at 800 px images) taken to 144 px.
    Both scale with ``image_size``, as the shapes do (``data.ShapesDataset``), so a smaller image
    keeps the same objects per anchor and per level. The backbone starts each residual block at
    the identity (``backbone.BottleneckResNet``) and the heads' last layers near zero, so every
    first loss is its chance value (tests/test_gpu_preset.py).
    """
    scale = image_size / 512
    gpu = dict(backbone="resnet50", fpn=True, fpn_channels=256, representation_size=1024,
               mask_conv_channels=256, anchor_sizes=tuple(round(s * scale) for s in (32, 64, 128, 256, 512)),
               canonical_size=round(144 * scale), rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000,
               rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512)
    return dataclasses.replace(ModelConfig(), **{**gpu, **changes})


# The CPU proof of the GPU recipe: what changes from gpu_config, all sizes or speed; the topology (bottleneck
# stages 3-4-6-3, FPN P2-P6, 2-fc box head, 4-conv mask head), the losses and the schedule's shape stay.
GPU_PROOF_SIZES = dict(
    backbone="bottleneck", width=16,  # ResNet-50's blocks at a quarter of its width (C2..C5: 64..512 channels)
    fpn_channels=64, representation_size=256, mask_conv_channels=64,  # paper: 256, 1024, 256
    rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=300,  # a 128 px image holds at most 4 objects
    rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_batch_size_per_image=128,
    fast_ops=False,                   # same numbers; our RoIAlign's backward is faster on a CPU (CPU_RECIPE)
)


def gpu_proof_config(**changes) -> ModelConfig:
    """``gpu_config`` at 128 px with ``GPU_PROOF_SIZES``: the GPU model's topology, sized for 2 CPU cores."""
    return gpu_config(128, **{**GPU_PROOF_SIZES, **changes})


def cpu_training(steps: int, **changes) -> TrainConfig:
    """The chapters' schedule: batch 8, lr 0.06, one-cycle decay, warm-up of min(100, steps / 5)."""
    recipe = dict(steps=steps, batch_size=8, lr=0.06, warmup_steps=min(100, steps // 5), schedule="onecycle")
    return TrainConfig(**{**recipe, **changes})


def refiner_training(steps: int, **changes) -> TrainConfig:
    """Chapter 09's second stage: only the refiner learns, with Adam at a constant 1e-3, 4 images a step."""
    recipe = dict(steps=steps, batch_size=4, lr=1e-3, warmup_steps=0, schedule="constant", grad_clip=None,
                  optimizer="adam", stage="refiner")
    return TrainConfig(**{**recipe, **changes})


def quick_run() -> RunConfig:
    """CI and the notebook's quick mode: a narrow model, 6 steps of 2 images of 64 px, on the CPU."""
    small = quick_config(width=16, representation_size=64, mask_conv_channels=16, mask_num_convs=2,
                         rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                         rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50)
    train = TrainConfig(steps=6, batch_size=2, lr=0.01, warmup_steps=2, eval_every=6, checkpoint_every=3)
    return RunConfig("quick", small, train, image_size=64, train_images=24, val_images=8, device="cpu")


def cpu_run() -> RunConfig:
    """A learner's laptop: chapter 06's model and schedule on 128 px shapes, about 8 minutes on 2 cores.
    DataLoader workers from the cores (``utils.workers_and_threads``): none on 2 cores."""
    train = cpu_training(2400, eval_every=600, checkpoint_every=200, workers=utils.workers_and_threads()[0])
    return RunConfig("cpu", cpu_config(), train, image_size=128, train_images=19200, val_images=100)


def gpu_run(steps: int = 6000) -> RunConfig:
    """The real run: ``gpu_config()`` on 512 px shapes, mixed precision, ``channels_last``, and half
    the cores (at most 8) as DataLoader workers. Batch 8 at lr 0.02, a linear warm-up over the first
    twelfth of the steps (500 of 6000; Goyal et al. 2017), then a one-cycle decay; 6 evaluations.
    ``benchmarks/gpu_session.sh`` runs it shortened to the steps a session has time for."""
    train = TrainConfig(steps=steps, batch_size=8, lr=0.02, warmup_steps=steps // 12, eval_every=max(1, steps // 6),
                        checkpoint_every=max(1, steps // 12), workers=utils.workers_and_threads(gpu=True)[0],
                        amp=True, channels_last=True)
    return RunConfig("gpu", gpu_config(), train, image_size=512, train_images=20000, val_images=500,
                     device="cuda")


def gpu_proof_run(steps: int = GPU_PROOF_STEPS) -> RunConfig:
    """The CPU proof that the GPU recipe learns: ``gpu_proof_config()`` on 128 px shapes in fp32 (a
    CPU has no fast 16-bit convolutions), ``gpu_run``'s schedule shape (warm-up over the first twelfth,
    one-cycle decay) at the CPU recipe's lr 0.06 (chapter 05), 3 evaluations on 200 held-out images.
    Not the GPU result: a check, on any machine, that the recipe's model starts sane and learns."""
    train = TrainConfig(steps=steps, batch_size=8, lr=0.06, warmup_steps=steps // 12, eval_every=max(1, steps // 3),
                        checkpoint_every=max(1, steps // 3), workers=utils.workers_and_threads()[0])
    return RunConfig("gpu_proof", gpu_proof_config(), train, image_size=128, train_images=8 * steps,
                     val_images=200, device="cpu")


PRESETS = {"quick": quick_run, "cpu": cpu_run, "gpu": gpu_run, "gpu_proof": gpu_proof_run}
