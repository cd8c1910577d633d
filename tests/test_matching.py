"""course_lib.matching against torchvision's Matcher / BalancedPositiveNegativeSampler."""
import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from course_lib import boxes, matching


@pytest.mark.parametrize("allow_low", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_match_equals_torchvision_matcher(seed, allow_low):
    g = torch.Generator().manual_seed(seed)
    iou = torch.rand(6, 200, generator=g)
    iou = torch.round(iou * 20) / 20  # coarse values, so ties and exact thresholds occur
    tv = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=allow_low)
    assert torch.equal(matching.match(iou, 0.7, 0.3, allow_low), tv(iou))


def test_match_on_real_boxes_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 8 + torch.rand(400, 2, generator=g) * 30], dim=1)
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 20.0, 70.0, 90.0], [0.0, 0.0, 3.0, 3.0]])
    iou = boxes.box_iou(gt, anchors)
    for high, low in [(0.7, 0.3), (0.5, 0.5)]:
        tv = det_utils.Matcher(high, low, allow_low_quality_matches=True)
        assert torch.equal(matching.match(iou, high, low, True), tv(iou))


def test_match_hand_worked():
    # 2 gt x 5 anchors
    iou = torch.tensor([[0.80, 0.50, 0.10, 0.20, 0.00],
                        [0.00, 0.65, 0.20, 0.65, 0.29]])
    # anchor 0: >= 0.7 -> gt 0; 1: 0.65 between; 2: 0.2 neg; 3: between; 4: 0.29 neg
    assert matching.match(iou, 0.7, 0.3).tolist() == [0, -2, -1, -2, -1]
    # gt 1's best IoU is 0.65, tied by anchors 1 and 3: both become positives for gt 1
    assert matching.match(iou, 0.7, 0.3, True).tolist() == [0, 1, -1, 1, -1]
    assert matching.BELOW_LOW_THRESHOLD == -1 and matching.BETWEEN_THRESHOLDS == -2


def test_match_exact_thresholds():
    iou = torch.tensor([[0.7, 0.3, 0.2999]])
    assert matching.match(iou, 0.7, 0.3).tolist() == [0, -2, -1]  # >= high, >= low, < low


def test_match_empty_gt_and_empty_anchors():
    assert matching.match(torch.zeros(0, 7), 0.7, 0.3, True).tolist() == [-1] * 7
    assert matching.match(torch.zeros(3, 0), 0.7, 0.3).numel() == 0


def test_match_validates():
    with pytest.raises(ValueError, match="iou"):
        matching.match(torch.zeros(5), 0.7, 0.3)
    with pytest.raises(ValueError, match="low"):
        matching.match(torch.zeros(2, 5), 0.3, 0.7)


def test_sampler_equals_torchvision_with_same_seed():
    g = torch.Generator().manual_seed(1)
    labels = [torch.randint(-1, 2, (500,), generator=g), torch.randint(-1, 4, (300,), generator=g)]
    torch.manual_seed(123)
    ours = matching.sample_balanced(labels, 256, 0.5)
    torch.manual_seed(123)
    theirs = det_utils.BalancedPositiveNegativeSampler(256, 0.5)(labels)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert torch.equal(a, b.bool())


def test_sampler_counts_and_fractions():
    labels = torch.tensor([1] * 10 + [0] * 1000 + [-1] * 50)
    pos, neg = matching.sample_balanced([labels], 256, 0.5, generator=torch.Generator().manual_seed(0))
    assert pos[0].sum() == 10 and neg[0].sum() == 246  # few positives: negatives fill the batch
    assert not (pos[0] & neg[0]).any()
    assert (labels[pos[0]] == 1).all() and (labels[neg[0]] == 0).all()
    many = torch.tensor([1] * 500 + [0] * 500)
    pos, neg = matching.sample_balanced([many], 256, 0.25, generator=torch.Generator().manual_seed(0))
    assert pos[0].sum() == 64 and neg[0].sum() == 192
    few_neg = torch.tensor([2] * 5 + [0] * 3)
    pos, neg = matching.sample_balanced([few_neg], 256, 0.5)
    assert pos[0].sum() == 5 and neg[0].sum() == 3


def test_sampler_generator_is_reproducible_and_validates():
    labels = [torch.tensor([1] * 100 + [0] * 100)]
    a = matching.sample_balanced(labels, 32, 0.5, generator=torch.Generator().manual_seed(7))
    b = matching.sample_balanced(labels, 32, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0])
    with pytest.raises(ValueError, match="positive_fraction"):
        matching.sample_balanced(labels, 32, 1.5)
    with pytest.raises(ValueError, match="labels_list"):
        matching.sample_balanced([torch.zeros(2, 2)], 32, 0.5)
