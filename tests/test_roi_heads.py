"""RoI heads: proposal targets by hand, Fast R-CNN loss and post-processing against torchvision."""
import dataclasses

import pytest
import torch
import torchvision
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection._utils import BoxCoder as TvBoxCoder

from course_lib import boxes, roi_heads
from course_lib.config import ModelConfig

CONFIG = ModelConfig(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1)


def _coder():
    return boxes.BoxCoder(weights=roi_heads.BOX_WEIGHTS)


def test_proposal_targets_hand_case():
    """One square gt: a close proposal is positive, a far one background, the gt itself appended."""
    gt = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([2])}
    proposals = [torch.tensor([[12.0, 10.0, 32.0, 30.0],    # IoU 18*20 / (2*400 - 360) = 0.818
                               [40.0, 40.0, 60.0, 60.0],    # IoU 0
                               [10.0, 10.0, 30.0, 50.0]])]  # IoU 400 / 800 = 0.5: positive (>=)
    rois, matched, labels, reg = roi_heads.select_training_samples(proposals, [gt], CONFIG, _coder())
    order = sorted(range(4), key=lambda i: rois[0][i].tolist())  # sampling shuffles: sort to compare
    by_box = {tuple(rois[0][i].tolist()): (labels[0][i].item(), reg[0][i]) for i in order}
    assert len(rois[0]) == 4                                    # 3 proposals + the gt box
    assert by_box[(12.0, 10.0, 32.0, 30.0)][0] == 2
    assert by_box[(40.0, 40.0, 60.0, 60.0)][0] == 0
    assert by_box[(10.0, 10.0, 30.0, 50.0)][0] == 2
    label_gt, reg_gt = by_box[(10.0, 10.0, 30.0, 30.0)]
    assert label_gt == 2 and torch.equal(reg_gt, torch.zeros(4))  # the gt box needs no correction
    dx = 10.0 * (20.0 - 22.0) / 20.0                              # weights 10, 10, 5, 5
    torch.testing.assert_close(by_box[(12.0, 10.0, 32.0, 30.0)][1], torch.tensor([dx, 0.0, 0.0, 0.0]))


def test_sampling_respects_batch_size_and_positive_fraction():
    torch.manual_seed(0)
    gt = {"boxes": torch.tensor([[20.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([1])}
    jitter = torch.randn(300, 4)
    close = gt["boxes"] + jitter                                  # 300 positives (IoU > 0.5)
    far = torch.tensor([[70.0, 70.0, 90.0, 90.0]]) + jitter       # 300 negatives
    rois, _, labels, _ = roi_heads.select_training_samples([torch.cat([close, far])], [gt], CONFIG, _coder())
    batch = CONFIG.box_batch_size_per_image
    assert len(rois[0]) == batch
    assert (labels[0] > 0).sum().item() == int(batch * CONFIG.box_positive_fraction)


def test_image_without_objects_gives_background_only_and_finite_targets():
    gt = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 30.0]])]
    rois, matched, labels, reg = roi_heads.select_training_samples(proposals, [gt], CONFIG, _coder())
    assert labels[0].tolist() == [0, 0] and torch.isfinite(reg[0]).all()


def test_fastrcnn_loss_equals_torchvision():
    torch.manual_seed(1)
    k, num_classes = 40, 4
    logits, regression = torch.randn(k, num_classes), torch.randn(k, 4 * num_classes)
    labels = [torch.randint(0, num_classes, (25,)), torch.randint(0, num_classes, (15,))]
    targets = [torch.randn(25, 4), torch.randn(15, 4)]
    ours = roi_heads.fastrcnn_loss(logits, regression, labels, targets)
    theirs = tv_roi_heads.fastrcnn_loss(logits, regression, labels, targets)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def _tv_heads(config):
    return tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 64, 0.25, roi_heads.BOX_WEIGHTS,
                                 config.box_score_thresh, config.box_nms_thresh, config.detections_per_img)


def test_postprocess_detections_equals_torchvision():
    torch.manual_seed(2)
    xy = torch.rand(60, 2) * 80
    proposals = [torch.cat([xy, xy + 10 + torch.rand(60, 2) * 40], 1)]
    proposals.append(proposals[0][:25] + 3.0)
    logits, regression = torch.randn(85, 4) * 3, torch.randn(85, 16) * 0.5
    sizes = [(100, 120), (90, 90)]
    c = dataclasses.replace(CONFIG, detections_per_img=30)
    ours = roi_heads.postprocess_detections(logits, regression, proposals, sizes, _coder(),
                                            c.box_score_thresh, c.box_nms_thresh, c.detections_per_img)
    tv_boxes, tv_scores, tv_labels = _tv_heads(c).postprocess_detections(logits, regression, proposals, sizes)
    for det, b, s, lab in zip(ours, tv_boxes, tv_scores, tv_labels):
        assert len(det["boxes"]) > 0
        torch.testing.assert_close(det["boxes"], b)
        torch.testing.assert_close(det["scores"], s)
        assert torch.equal(det["labels"], lab)


def test_hand_built_batched_nms_equals_fast_path():
    torch.manual_seed(3)
    xy = torch.rand(200, 2) * 50
    b = torch.cat([xy, xy + 5 + torch.rand(200, 2) * 30], 1)
    s, idxs = torch.rand(200), torch.randint(0, 3, (200,))
    slow = boxes.batched_nms(b, s, idxs, 0.5, fast=False)
    assert torch.equal(slow, boxes.batched_nms(b, s, idxs, 0.5, fast=True))
    assert torch.equal(slow, torchvision.ops.batched_nms(b, s, idxs, 0.5))


def test_single_level_pooling_uses_roi_align_at_one_over_stride():
    heads = roi_heads.RoIHeads(dataclasses.replace(CONFIG, with_mask=False), 8)
    features = [torch.randn(2, 8, 4, 4)]
    rois = [torch.tensor([[0.0, 0.0, 32.0, 40.0]]), torch.tensor([[10.0, 12.0, 50.0, 64.0]])]
    expected = torchvision.ops.roi_align(features[0], rois, 7, 1 / 16, 2, True)
    torch.testing.assert_close(heads.pool(features, rois, 7), expected)


@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_contract_train_and_eval(with_mask):
    torch.manual_seed(4)
    config = dataclasses.replace(CONFIG, with_mask=with_mask)
    heads = roi_heads.RoIHeads(config, 8)
    features = [torch.randn(2, 8, 4, 4)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([3]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]   # an image with no objects
    proposals = [torch.tensor([[10.0, 8.0, 41.0, 33.0], [0.0, 0.0, 20.0, 20.0]]), torch.zeros(0, 4)]
    _, losses = heads(features, proposals, [(64, 64), (64, 64)], targets)
    names = {"loss_classifier", "loss_box_reg"} | ({"loss_mask"} if with_mask else set())
    assert set(losses) == names and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    heads.eval()
    detections, losses = heads(features, proposals, [(64, 64), (64, 64)])
    assert losses == {} and len(detections) == 2
    assert set(detections[0]) == {"boxes", "labels", "scores"} | ({"masks"} if with_mask else set())
    if with_mask:
        assert detections[0]["masks"].shape[1:] == (1, 28, 28)
