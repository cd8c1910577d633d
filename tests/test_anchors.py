"""course_lib.anchors against torchvision's AnchorGenerator and hand-worked anchors."""
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from course_lib import anchors, matching


def torchvision_anchors(sizes, ratios, image_hw, feature_hws):
    gen = TVAnchorGenerator(sizes, ratios)
    images = ImageList(torch.zeros(1, 3, *image_hw), [tuple(image_hw)])
    feats = [torch.zeros(1, 8, h, w) for h, w in feature_hws]
    per_level = [h * w * a for (h, w), a in zip(feature_hws, gen.num_anchors_per_location())]
    return gen(images, feats)[0].split(per_level), gen.num_anchors_per_location()


def test_one_level_equals_torchvision():
    sizes, ratios = ((16, 32, 64),), ((0.5, 1.0, 2.0),)
    gen = anchors.AnchorGenerator(sizes, ratios)
    ours = gen((128, 128), [(8, 8)])
    theirs, num = torchvision_anchors(sizes, ratios, (128, 128), [(8, 8)])
    assert gen.num_anchors_per_location() == num == [9]
    assert len(ours) == 1 and ours[0].shape == (8 * 8 * 9, 4)
    assert torch.equal(ours[0], theirs[0])


def test_several_levels_non_square_equals_torchvision():
    sizes = ((8,), (16,), (32,), (64,))
    ratios = ((0.5, 1.0, 2.0),) * 4
    image_hw, feature_hws = (96, 160), [(24, 40), (12, 20), (6, 10), (3, 5)]
    ours = anchors.AnchorGenerator(sizes, ratios)(image_hw, feature_hws)
    theirs, _ = torchvision_anchors(sizes, ratios, image_hw, feature_hws)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_odd_sizes_round_like_torchvision():
    sizes, ratios = ((13, 45.5),), ((0.3, 1.0, 3.7),)
    ours = anchors.AnchorGenerator(sizes, ratios)((100, 100), [(7, 7)])
    theirs, _ = torchvision_anchors(sizes, ratios, (100, 100), [(7, 7)])
    assert torch.equal(ours[0], theirs[0])  # stride 100 // 7 = 14


def test_hand_worked_cell_anchors_and_order():
    base = anchors.cell_anchors((16, 32), (0.5, 1.0, 2.0))
    # ratio 0.5 (h/w): w = 16 / sqrt(0.5) = 22.6, h = 11.3 -> halves 11.3, 5.7 rounded to 11, 6
    assert base[0].tolist() == [-11.0, -6.0, 11.0, 6.0]
    assert base[2].tolist() == [-8.0, -8.0, 8.0, 8.0]     # ratio 1, size 16
    assert base[3].tolist() == [-16.0, -16.0, 16.0, 16.0]  # ratio 1, size 32
    out = anchors.AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),))((64, 64), [(4, 4)])[0]
    # location (row 0, col 1) is anchors 6..11, shifted by 16 px in x
    assert out[6 + 2].tolist() == [8.0, -8.0, 24.0, 8.0]
    assert out[4 * 6 + 2].tolist() == [-8.0, 8.0, 8.0, 24.0]  # row 1, col 0


def test_dtype_device_and_validation():
    gen = anchors.AnchorGenerator(((16,),), ((1.0,),))
    assert gen((32, 32), [(2, 2)], dtype=torch.float64)[0].dtype == torch.float64
    with pytest.raises(ValueError, match="sizes"):
        anchors.AnchorGenerator((16, 32), ((1.0,),))
    with pytest.raises(ValueError, match="aspect_ratios"):
        anchors.AnchorGenerator(((16,),), ((0.0,),))
    with pytest.raises(ValueError, match="levels"):
        anchors.AnchorGenerator(((16,), (32,)), ((1.0,),))
    with pytest.raises(ValueError, match="feature_shapes_hw"):
        gen((32, 32), [(2, 2), (1, 1)])


# ---- the widget callback ------------------------------------------------------------------

def test_summary_hand_worked():
    # stride 16 on 64 px: 4x4 cells; one 32 px square anchor per cell at (16j, 16i) +- 16
    s = anchors.anchor_match_summary(64, 16, (32,), (1.0,), (0.0, 0.0, 32.0, 32.0))
    assert s["num_anchors"] == 16 and s["feature_hw"] == (4, 4) and s["stride"] == 16
    # anchor at cell (1, 1) is exactly [0, 0, 32, 32]
    assert s["labels"][5] == 1 and s["ious"][5] == 1.0 and s["best_iou"] == 1.0
    assert s["num_positive"] + s["num_negative"] + s["num_ignored"] == 16
    assert s["num_positive"] == 1 and s["num_low_quality"] == 0
    text = anchors.summary_text(s)
    assert "16 anchors" in text and "1 positive" in text and "best IoU 1.00" in text


@pytest.mark.parametrize("args", [
    (128, 1, (8,), (1.0,), (10, 10, 30, 30)),            # tiny stride: 16384 anchors
    (128, 128, (16,), (1.0,), (10, 10, 30, 30)),         # one cell
    (128, 16, (4096,), (0.5, 1.0, 2.0), (0, 0, 20, 20)),  # anchors far larger than the image
    (128, 64, (8,), (1.0,), (120, 120, 128, 128)),        # box at the border touching no anchor
    (128, 8, (16, 32), (0.25, 4.0), (0, 60, 128, 68)),     # thin box spanning the image
])
def test_summary_extreme_values_are_consistent(args):
    s = anchors.anchor_match_summary(*args)
    n = s["num_anchors"]
    assert s["anchors"].shape == (n, 4) and s["ious"].shape == (n,) and s["labels"].shape == (n,)
    assert s["num_positive"] + s["num_negative"] + s["num_ignored"] == n
    assert 0.0 <= s["best_iou"] <= 1.0
    assert ((s["labels"] == 1) == ((s["ious"] >= 0.7) | (s["ious"] == s["best_iou"]))).all()
    assert ((s["labels"] == 0) == ((s["ious"] < 0.3) & (s["labels"] != 1))).all()


def test_summary_border_box_with_no_overlap_shows_the_rpns_edge_case():
    # the RPN's rule (torchvision's): every anchor ties at IoU 0 as the box's best, so all are positive
    s = anchors.anchor_match_summary(128, 64, (8,), (1.0,), (120, 120, 128, 128))
    assert s["best_iou"] == 0.0 and s["no_overlap"] and s["num_positive"] == s["num_anchors"] == 4
    assert "touches no anchor" in anchors.summary_text(s)
    labels, _ = matching.label_anchors(s["anchors"], torch.tensor([[120.0, 120, 128, 128]]))
    assert torch.equal(s["labels"], labels.long())


def test_summary_low_quality_match():
    # a 20 px box's best 32 px anchor has IoU 400/1024 = 0.39 < 0.7: positive only as best match
    s = anchors.anchor_match_summary(64, 16, (32,), (1.0,), (6.0, 6.0, 26.0, 26.0))
    assert s["num_positive"] == s["num_low_quality"] >= 1
    assert abs(s["best_iou"] - 400 / 1024) < 1e-6
    off = anchors.anchor_match_summary(64, 16, (32,), (1.0,), (6.0, 6.0, 26.0, 26.0),
                                       allow_low_quality_matches=False)
    assert off["num_positive"] == 0


def test_summary_validates():
    with pytest.raises(ValueError, match="stride"):
        anchors.anchor_match_summary(64, 0, (32,), (1.0,), (0, 0, 10, 10))
    with pytest.raises(ValueError, match="gt_box"):
        anchors.anchor_match_summary(64, 16, (32,), (1.0,), (10, 10, 10, 20))
