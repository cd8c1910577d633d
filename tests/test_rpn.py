"""The RPN against torchvision's ``models.detection.rpn`` (labels, losses, proposals) and
hand-worked anchor labels; images without objects give finite losses."""
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from course_lib import boxes, matching, rpn
from course_lib.config import ModelConfig

torch.set_num_threads(2)


def _random_gt(generator, num, size=128):
    xy = torch.rand(num, 2, generator=generator) * (size - 40)
    wh = 6 + torch.rand(num, 2, generator=generator) * 34
    return torch.cat([xy, xy + wh], dim=1)  # [G, 4]


def _torchvision_rpn(config: ModelConfig, ours: rpn.RegionProposalNetwork) -> tv_rpn.RegionProposalNetwork:
    """torchvision's RPN configured like ``config`` with our head's weights copied in."""
    sizes = rpn.level_anchor_sizes(config)
    anchor_generator = TVAnchorGenerator(sizes, (tuple(config.aspect_ratios),) * len(sizes))
    head = tv_rpn.RPNHead(ours.head.conv.in_channels, ours.head.cls_logits.out_channels)
    head.conv[0][0].load_state_dict(ours.head.conv.state_dict())
    head.cls_logits.load_state_dict(ours.head.cls_logits.state_dict())
    head.bbox_pred.load_state_dict(ours.head.bbox_pred.state_dict())
    return tv_rpn.RegionProposalNetwork(
        anchor_generator, head, config.rpn_fg_iou, config.rpn_bg_iou, config.rpn_batch_size_per_image,
        config.rpn_positive_fraction,
        dict(training=config.rpn_pre_nms_top_n_train, testing=config.rpn_pre_nms_top_n_test),
        dict(training=config.rpn_post_nms_top_n_train, testing=config.rpn_post_nms_top_n_test),
        config.rpn_nms_thresh)


def _features(config, channels, padded, generator):
    strides = [4, 8, 16, 32, 64] if config.fpn else [config.stride]
    return [torch.randn(2, channels, padded[0] // s, padded[1] // s, generator=generator) for s in strides]


@pytest.mark.parametrize("fpn, stride", [(False, 16), (False, 32), (True, 16)])
@pytest.mark.parametrize("training", [False, True])
def test_forward_matches_torchvision(fpn, stride, training):
    """Same anchors, head weights, top-n, NMS and min size: identical proposals and (with the
    same seed for the sampler) identical losses."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    config = ModelConfig(fpn=fpn, stride=stride, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=120)
    ours = rpn.RegionProposalNetwork(config, 16)
    nn_init = torch.Generator().manual_seed(2)  # larger head weights: spread-out, decisive scores
    for p in ours.head.parameters():
        p.data = torch.randn(p.shape, generator=nn_init) * 0.3
    theirs = _torchvision_rpn(config, ours)
    ours.train(training), theirs.train(training)
    padded, image_sizes = (128, 160), [(128, 150), (101, 160)]
    features = _features(config, 16, padded, g)
    targets = [{"boxes": _random_gt(g, 3)}, {"boxes": _random_gt(g, 1)}]
    torch.manual_seed(3)
    our_boxes, our_losses = ours(features, image_sizes, padded, targets if training else None)
    images = ImageList(torch.zeros(2, 3, *padded), image_sizes)
    torch.manual_seed(3)
    their_boxes, their_losses = theirs(images, OrderedDict(enumerate(features)), targets if training else None)
    for a, b in zip(our_boxes, their_boxes):
        assert a.shape == b.shape and a.shape[0] > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert our_losses.keys() == their_losses.keys()
    for name in our_losses:
        torch.testing.assert_close(our_losses[name], their_losses[name])


def test_flatten_predictions_matches_torchvision():
    objectness = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 2, 3)]
    deltas = [torch.randn(2, 12, 4, 5), torch.randn(2, 12, 2, 3)]
    ours_obj, ours_deltas = rpn.flatten_predictions(objectness, deltas)
    tv_obj, tv_deltas = tv_rpn.concat_box_prediction_layers(objectness, deltas)
    assert ours_obj.shape == (2, 3 * (20 + 6)) and ours_deltas.shape == (2, 78, 4)
    torch.testing.assert_close(ours_obj.reshape(-1, 1), tv_obj, rtol=0, atol=0)
    torch.testing.assert_close(ours_deltas.reshape(-1, 4), tv_deltas, rtol=0, atol=0)


def test_labels_and_loss_match_torchvision_pieces():
    """label_anchors == assign_targets_to_anchors; rpn_loss == compute_loss given the same sample."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 8 + torch.rand(500, 2, generator=g) * 40], dim=1)  # [R, 4]
    targets = [{"boxes": _random_gt(g, 4)}, {"boxes": torch.zeros(0, 4)}]
    config = ModelConfig()
    theirs = _torchvision_rpn(config, rpn.RegionProposalNetwork(config, 8))
    tv_labels, tv_matched = theirs.assign_targets_to_anchors([anchors, anchors], targets)
    labels, regression_targets = [], []
    coder = boxes.BoxCoder()
    for t, tv_l, tv_m in zip(targets, tv_labels, tv_matched):
        lab, matched = matching.label_anchors(anchors, t["boxes"], 0.7, 0.3)
        torch.testing.assert_close(lab, tv_l, rtol=0, atol=0)
        torch.testing.assert_close(matched, tv_m, rtol=0, atol=0)
        labels.append(lab)
        regression_targets.append(coder.encode(matched, anchors))
    objectness, deltas = torch.randn(2, 500, generator=g), torch.randn(2, 500, 4, generator=g)
    pos, neg = matching.sample_balanced(labels, 64, 0.5)
    ours = rpn.rpn_loss(objectness, deltas, labels, regression_targets, pos, neg)
    theirs.fg_bg_sampler = lambda _labels: (pos, neg)  # the same mini-batch for both
    expected = theirs.compute_loss(objectness.reshape(-1, 1), deltas.reshape(-1, 4), labels, regression_targets)
    assert pos[0].any() and ours[1] > 0
    torch.testing.assert_close(ours, expected)


def test_label_anchors_hand_worked():
    """gt A = [0, 0, 10, 10], gt B = [50, 50, 60, 60]; the IoUs are worked out in the comments."""
    gt = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    anchors = torch.tensor([
        [0.0, 0, 10, 10],   # IoU 1 with A              -> positive (A)
        [0, 0, 10, 8],      # 80 / 100 = 0.8 with A      -> positive (A)
        [0, 0, 10, 7],      # 70 / 100 = 0.7 with A      -> positive (>= 0.7)
        [0, 0, 10, 5],      # 50 / 100 = 0.5             -> ignored
        [0, 0, 10, 3],      # 30 / 100 = 0.3             -> ignored (not < 0.3)
        [0, 0, 10, 2],      # 20 / 100 = 0.2             -> negative
        [53, 50, 63, 60],   # 70 / 130 = 0.54 with B, B's best anchor -> positive (B)
        [56, 50, 66, 60],   # 40 / 160 = 0.25 with B     -> negative
        [100, 100, 120, 120],  # no overlap              -> negative
    ])
    labels, matched = matching.label_anchors(anchors, gt, 0.7, 0.3)
    assert labels.tolist() == [1, 1, 1, -1, -1, 0, 1, 0, 0]
    torch.testing.assert_close(matched[[0, 1, 2, 6]], gt[[0, 0, 0, 1]])


def test_no_objects_gives_finite_losses():
    """An image of pure background: every anchor negative, objectness loss on negatives only
    (positive and finite), box loss exactly 0, finite gradients."""
    torch.manual_seed(0)
    config = ModelConfig(rpn_batch_size_per_image=32)
    model = rpn.RegionProposalNetwork(config, 8).train()
    features = [torch.randn(2, 8, 8, 8, requires_grad=True)]
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    proposals, losses = model(features, [(128, 128)] * 2, (128, 128), targets)
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
    sum(losses.values()).backward()
    assert torch.isfinite(features[0].grad).all()
    assert all(torch.isfinite(p).all() for p in proposals)
    labels, matched = matching.label_anchors(boxes.box_iou(torch.zeros(0, 4), torch.zeros(0, 4)).new_zeros(5, 4),
                                        torch.zeros(0, 4))
    assert labels.tolist() == [0.0] * 5 and matched.abs().sum() == 0


def test_rpn_loss_nothing_sampled_is_zero_not_nan():
    empty = [torch.zeros(4, dtype=torch.bool)]
    losses = rpn.rpn_loss(torch.randn(1, 4), torch.randn(1, 4, 4), [-torch.ones(4)], [torch.zeros(4, 4)], empty, empty)
    assert [loss.item() for loss in losses] == [0.0, 0.0]


def test_level_anchor_sizes():
    assert rpn.level_anchor_sizes(ModelConfig()) == ((8, 16, 32, 64),)
    assert rpn.level_anchor_sizes(ModelConfig(fpn=True)) == ((8,), (16,), (32,), (64,), (128,))
    five = (4, 8, 16, 32, 64)
    assert rpn.level_anchor_sizes(ModelConfig(fpn=True, anchor_sizes=five)) == tuple((s,) for s in five)
    with pytest.raises(ValueError, match="anchor_sizes"):
        rpn.level_anchor_sizes(ModelConfig(fpn=True, anchor_sizes=(8, 16)))
    assert rpn.RegionProposalNetwork(ModelConfig(fpn=True), 8).head.cls_logits.out_channels == 3
    assert rpn.RegionProposalNetwork(ModelConfig(), 8).head.cls_logits.out_channels == 12


def test_bad_inputs_raise():
    model = rpn.RegionProposalNetwork(ModelConfig(), 8).train()
    features = [torch.randn(1, 8, 8, 8)]
    with pytest.raises(ValueError, match="targets"):
        model(features, [(128, 128)], (128, 128))
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        model(features, [(128, 128)], (128, 128), [{"boxes": torch.zeros(3)}])
    with pytest.raises(ValueError, match="levels"):
        model(features * 2, [(128, 128)], (128, 128), [{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="image_sizes"):
        model.eval()(features, [(128, 128)] * 2, (128, 128))


def test_config_thresholds_are_used():
    """Eval keeps at most rpn_post_nms_top_n_test proposals, clipped to each image's own size."""
    config = replace(ModelConfig(), rpn_post_nms_top_n_test=7)
    model = rpn.RegionProposalNetwork(config, 8).eval()
    proposals, losses = model([torch.randn(2, 8, 8, 8)], [(128, 128), (60, 90)], (128, 128))
    assert losses == {} and [p.shape[0] for p in proposals] == [7, 7]
    assert proposals[1][:, 2].max() <= 90 and proposals[1][:, 3].max() <= 60
