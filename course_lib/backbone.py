"""Backbones: the convolutional trunk that turns an image into feature maps (Mask R-CNN §3, "backbone").

Public names: ``TinyResNet`` (from scratch, sized for a 2-core CPU), ``BottleneckResNet`` (ResNet-50
for the GPU chapter, or the same topology narrowed for a CPU), ``build`` (the one a config names),
``ResidualBlock``, ``Bottleneck``, ``make_norm``, ``RESNET50_BLOCKS``.

Both follow one contract, so ``build`` picks one with a plain ``if``:

* ``forward(x: Tensor[N, 3, H, W]) -> list[Tensor]``: the stage outputs C2, C3, ... finest first,
  C_l of shape ``[N, out_channels[l], H / strides[l], W / strides[l]]``;
* ``out_channels: list[int]`` and ``strides: list[int]`` (pixels per feature cell) per output.

Without FPN the model uses the last output only: C4 (stride 16, the paper's "ResNet-C4" backbone),
C5 (stride 32), or C3 (stride 8: the CPU preset's choice, because the shapes are 6-50 px and a
stride-16 cell is already larger than the smallest of them). With FPN all four stages C2..C5
(strides 4, 8, 16, 32) go to the pyramid.
A stride-s feature cell covers s x s image pixels, so box coordinates in pixels map to feature
cells by ``spatial_scale = 1 / s``: the number chapter 04's RoIPool quantizes and RoIAlign keeps.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from course_lib.config import ModelConfig

# Residual blocks per stage (C2..C5). ResNet-18 uses (2, 2, 2, 2); one block per stage keeps a
# training step on 2 CPU cores well under a second and is plenty for the synthetic shapes.
TINY_BLOCKS = (1, 1, 1, 1)
RESNET50_BLOCKS = (3, 4, 6, 3)  # bottleneck blocks per stage of ResNet-50 (He et al. 2016, Table 1)
STAGE_STRIDES = (4, 8, 16, 32)  # C2..C5: the stem divides by 4, each later stage by 2 more


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer named by ``ModelConfig.norm``: ``"bn"`` or ``"gn"``.

    BatchNorm estimates statistics over the batch, which is noisy with the few images per batch
    detection uses; GroupNorm (Wu & He 2018) normalises groups of channels within each image, so
    it does not care about batch size. 32 groups is the paper's value; small layers use fewer so
    each group keeps at least 4 channels.
    """
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels // 4), channels)
    raise ValueError(f"norm={kind!r}; expected 'bn' or 'gn'")


class ResidualBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): two 3x3 convs and an identity shortcut,
    ``relu(x + F(x))``. The shortcut is a strided 1x1 conv when shape changes.

    Why residual: the block only has to learn a correction to its input, so gradients reach the
    early layers through the shortcut, and even a from-scratch trunk trains in a few hundred steps.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                make_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C_in, H, W] -> [N, C_out, H / stride, W / stride]``."""
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _num_stages(config: ModelConfig) -> int:
    """Stages to build: up to ``config.stride`` (C3 for 8, C4 for 16, C5 for 32), all four with FPN."""
    return 4 if config.fpn else STAGE_STRIDES.index(config.stride) + 1


class TinyResNet(nn.Module):
    """A small ResNet trained from scratch: stem (7x7 conv stride 2 + 3x3 max-pool stride 2, as
    ResNet) then stages C2..C5 of ``TINY_BLOCKS`` residual blocks with ``width * 2**i`` channels.

    Args:
        config: reads ``width`` (channels of C2), ``norm``, ``stride`` and ``fpn``.

    ``forward(images: Tensor[N, 3, H, W]) -> list[Tensor[N, C_l, H / s_l, W / s_l]]``, finest
    first; H and W should be divisible by the last stride (the model pads batches to
    ``config.size_divisible``) so that every map is exactly ``H / s_l`` cells tall.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.width < 8:
            raise ValueError(f"ModelConfig.width={config.width}: the tiny backbone needs at least 8")
        width, norm = config.width, config.norm
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            make_norm(norm, width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1))
        num_stages = _num_stages(config)
        self.out_channels = [width * 2**i for i in range(num_stages)]
        self.strides = list(STAGE_STRIDES[:num_stages])
        self.stages = nn.ModuleList()
        in_channels = width
        for i, out_channels in enumerate(self.out_channels):
            first_stride = 1 if i == 0 else 2  # C2 stays at the stem's stride 4
            blocks = [ResidualBlock(in_channels, out_channels, first_stride, norm)]
            blocks += [ResidualBlock(out_channels, out_channels, 1, norm) for _ in range(TINY_BLOCKS[i] - 1)]
            self.stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        _init_weights(self)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)  # [N, width, H/4, W/4]
        features = []
        for stage in self.stages:
            x = stage(x)  # [N, C_l, H/s_l, W/s_l]
            features.append(x)
        return features


def build(config: ModelConfig) -> nn.Module:
    """The trunk ``config.backbone`` names: ``TinyResNet`` for "tiny", else ``BottleneckResNet``
    ("resnet50", or its narrower "bottleneck" sibling)."""
    return TinyResNet(config) if config.backbone == "tiny" else BottleneckResNet(config)


def _init_weights(module: nn.Module) -> None:
    """He (kaiming) normal init for convs, as torchvision's ResNet; norm layers start at identity.
    Zeroing each block's last norm scale (Goyal et al. 2017) makes every block start as the
    identity, which steadies the first steps of from-scratch training."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, ResidualBlock):
            nn.init.zeros_(m.norm2.weight)
        elif isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block (He et al. 2016, §4.1 "Deeper Bottleneck Architectures"): a 1x1
    conv down to ``inner`` channels, a 3x3 conv (strided here, as torchvision's "ResNet v1.5"), a 1x1
    conv up to ``EXPANSION * inner``, then ``relu(x + F(x))``; the shortcut is a strided 1x1 conv +
    norm when the shape changes. Layer names are torchvision's (``conv1``..``bn3``, ``downsample``),
    so its ResNet-50 weights load into ``BottleneckResNet`` unchanged (tests/test_backbone.py).

    Why a bottleneck: the 3x3 conv runs at a quarter of the block's width, so a 50-layer trunk
    costs about what a 34-layer one of basic blocks does.
    """

    EXPANSION = 4

    def __init__(self, in_channels: int, inner: int, stride: int, norm: str) -> None:
        super().__init__()
        out_channels = self.EXPANSION * inner
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = make_norm(norm, inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm(norm, inner)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            make_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C_in, H, W] -> [N, 4 * inner, H / stride, W / stride]``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class BottleneckResNet(nn.Module):
    """A ResNet of bottleneck blocks trained from scratch; at width 64 with blocks (3, 4, 6, 3) it is
    ResNet-50 (``config.backbone == "resnet50"`` always builds exactly that).

    Stem as ``TinyResNet``'s, then stages C2..C5 of ``blocks[i]`` bottlenecks of inner width
    ``width * 2**i`` and output ``4 * width * 2**i`` channels (ResNet-50: 256, 512, 1024, 2048).
    ``config.backbone == "bottleneck"`` reads ``config.width`` and ``config.blocks`` instead: the
    same topology narrowed to what a CPU trains (chapter 10's CPU proof of the GPU recipe).

    Init (``_init_weights``): He normal convs, and each block's last norm scale at zero (Goyal et al.
    2017; torchvision's ``zero_init_residual=True``): a block that keeps its shape starts as the
    identity, so C2..C5 leave the trunk at one scale, that of each stage's first (projection) block.
    torchvision's default keeps that scale at 1, and each of the 16 blocks then adds its own
    unit-variance branch to the sum (chapter 10 measures both).
    Weights are never downloaded: the course trains from scratch, offline.

    ``forward(images: Tensor[N, 3, H, W]) -> list[Tensor]`` finest first, as ``TinyResNet``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        resnet50 = config.backbone == "resnet50"
        width, blocks = (64, RESNET50_BLOCKS) if resnet50 else (config.width, config.blocks)
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            make_norm(config.norm, width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1))
        num_stages = _num_stages(config)
        self.out_channels = [Bottleneck.EXPANSION * width * 2**i for i in range(num_stages)]
        self.strides = list(STAGE_STRIDES[:num_stages])
        self.stages = nn.ModuleList()
        in_channels = width
        for i in range(num_stages):
            first_stride = 1 if i == 0 else 2  # C2 stays at the stem's stride 4
            stage = [Bottleneck(in_channels, width * 2**i, first_stride, config.norm)]
            stage += [Bottleneck(self.out_channels[i], width * 2**i, 1, config.norm) for _ in range(blocks[i] - 1)]
            self.stages.append(nn.Sequential(*stage))
            in_channels = self.out_channels[i]
        _init_weights(self)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)  # [N, width, H/4, W/4]
        features = []
        for stage in self.stages:
            x = stage(x)  # [N, C_l, H/s_l, W/s_l]
            features.append(x)
        return features
