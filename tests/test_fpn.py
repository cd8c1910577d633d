"""The feature pyramid and multi-level RoIAlign against torchvision's FPN, LevelMapper and MultiScaleRoIAlign."""
import math
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper

from course_lib import fpn


def test_fpn_shapes_and_p6():
    pyramid = fpn.FPN([16, 32, 64, 128], out_channels=24)
    features = [torch.randn(2, c, 64 // 2**i, 80 // 2**i) for i, c in enumerate([16, 32, 64, 128])]
    outputs = pyramid(features)
    assert [tuple(p.shape) for p in outputs] == [(2, 24, 64, 80), (2, 24, 32, 40), (2, 24, 16, 20),
                                                 (2, 24, 8, 10), (2, 24, 4, 5)]
    torch.testing.assert_close(outputs[4], outputs[3][:, :, ::2, ::2])   # P6: every other cell of P5
    assert len(fpn.FPN([16, 32], 8, extra_p6=False)(features[:2])) == 2
    odd = [torch.randn(1, 16, 33, 17), torch.randn(1, 32, 17, 9)]        # odd sizes: upsample to fit
    assert [tuple(p.shape[-2:]) for p in fpn.FPN([16, 32], 8)(odd)] == [(33, 17), (17, 9), (9, 5)]


def test_fpn_equals_torchvision_with_same_weights():
    channels = [8, 16, 32]
    ours = fpn.FPN(channels, 12)
    theirs = FeaturePyramidNetwork(channels, 12, extra_blocks=LastLevelMaxPool())
    for i in range(len(channels)):
        theirs.inner_blocks[i][0].load_state_dict(ours.lateral[i].state_dict())
        theirs.layer_blocks[i][0].load_state_dict(ours.output[i].state_dict())
    features = [torch.randn(2, c, 32 // 2**i, 24 // 2**i) for i, c in enumerate(channels)]
    expected = theirs(OrderedDict((str(i), f) for i, f in enumerate(features)))
    for p_ours, p_theirs in zip(ours(features), expected.values(), strict=True):
        torch.testing.assert_close(p_ours, p_theirs)


def test_assign_levels_equals_level_mapper():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=gen) * 100
    wh = torch.exp(torch.rand(500, 2, generator=gen) * 7 - 1)            # 0.4 px to 400 px sides
    boxes = torch.cat([xy, xy + wh], dim=1)
    exact = torch.tensor([[0.0, 0.0, 36.0, 36.0], [0.0, 0.0, 72.0, 72.0], [0.0, 0.0, 18.0, 18.0]])
    boxes = torch.cat([boxes, exact])
    for canonical_size, canonical_level in [(224, 4), (36, 4), (50, 3)]:
        mapper = LevelMapper(2, 5, canonical_size, canonical_level)
        ours = fpn.assign_levels(boxes, 2, 5, canonical_size, canonical_level)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, mapper([boxes]))
    # hand-worked, canonical 36 at P4: a 36 px box -> P4 (index 2), 72 px -> P5, 18 px -> P3
    assert fpn.assign_levels(exact, 2, 5, 36, 4).tolist() == [2, 3, 1]


def test_level_for_box_size_extremes():
    assert fpn.level_for_box_size(0.0) == 2
    assert fpn.level_for_box_size(1e-9) == 2
    assert fpn.level_for_box_size(36.0) == 4
    assert fpn.level_for_box_size(35.9) == 3
    assert fpn.level_for_box_size(1e9) == 5
    assert fpn.level_for_box_size(224, canonical_size=224) == 4
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="box_size"):
            fpn.level_for_box_size(bad)


def test_level_summary_extremes():
    tiny, huge = fpn.level_summary(0.0), fpn.level_summary(1e6)
    assert (tiny["level"], tiny["stride"], tiny["cells"]) == (2, 4, 0.0)
    assert (huge["level"], huge["stride"], huge["cells"]) == (5, 32, 1e6 / 32)
    middle = fpn.level_summary(36.0)
    assert middle["level"] == 4 and middle["cells"] == 2.25 and "P4" in middle["text"]
    for size in (10.0, 20.0, 50.0, 100.0):                   # between the clamps: 2.25 to 4.5 cells
        assert 2.25 <= fpn.level_summary(size)["cells"] < 4.5
    with pytest.raises(ValueError, match="box_size"):
        fpn.level_summary(-3.0)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_multiscale_roi_align_equals_torchvision(sampling_ratio):
    gen = torch.Generator().manual_seed(1)
    image_size = (128, 160)
    features = [torch.randn(2, 5, 128 // s, 160 // s, generator=gen) for s in (4, 8, 16, 32)]
    boxes = []
    for n in (30, 17):
        xy = torch.rand(n, 2, generator=gen) * 100
        wh = torch.rand(n, 2, generator=gen) * 120 + 1
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, sampling_ratio, canonical_scale=36, canonical_level=4)
    expected = pooler(OrderedDict(zip(["p2", "p3", "p4", "p5"], features)), boxes, [image_size] * 2)
    ours = fpn.multiscale_roi_align(features, boxes, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio,
                                    canonical_size=36, canonical_level=4)
    assert ours.shape == (47, 5, 7, 7)
    torch.testing.assert_close(ours, expected)
    levels = fpn.assign_levels(torch.cat(boxes), 2, 5, 36, 4)
    assert len(set(levels.tolist())) == 4           # the boxes really exercise every level


def test_multiscale_roi_align_hand_built_path_and_grad():
    gen = torch.Generator().manual_seed(2)
    features = [torch.randn(1, 3, 64 // s, 64 // s, generator=gen, requires_grad=True) for s in (4, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 12.0], [5.0, 5.0, 60.0, 50.0]])]
    args = (features, boxes, 4, [1 / 4, 1 / 8], 2, 36, 4)
    fast = fpn.multiscale_roi_align(*args, aligned=True, fast=True)
    slow = fpn.multiscale_roi_align(*args, aligned=True, fast=False)
    torch.testing.assert_close(fast, slow)
    fast.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)   # one box per level
    with pytest.raises(ValueError, match="scale"):
        fpn.multiscale_roi_align(features, boxes, 4, [1 / 4], 2, 36, 4)
    assert math.isclose(fpn.level_for_box_size(10.95), 2)
