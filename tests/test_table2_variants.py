"""The variants of Mask R-CNN's Table 2: RoIWarp and max-pooled RoIAlign (2c), the class-agnostic sigmoid
and the softmax mask losses (2b). Hand-worked values, agreement with torchvision's kernels, and the
sanity check before any ablation: every variant can overfit one fixed batch of RoIs."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from course_lib import data, mask_head, model, presets, roi_ops

# ---- the poolers -----------------------------------------------------------------------------


def test_roi_align_max_hand_worked():
    # a ramp whose value is the x coordinate of the cell centre: a bilinear sample reads its own x.
    # Box [0, 0, 8, 8] px at stride 2 (aligned): bins of 2 cells from -0.5, samples at x = 0, 1 | 2, 3
    ramp = torch.arange(4.0).repeat(4, 1)[None, None]                        # [1, 1, 4, 4]
    box = torch.tensor([[0.0, 0.0, 0.0, 8.0, 8.0]])
    got = roi_ops.roi_align_max(ramp, box, 2, 0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(got[0, 0], torch.tensor([[1.0, 3.0], [1.0, 3.0]]))
    average = roi_ops.roi_align(ramp, box, 2, 0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(average[0, 0], torch.tensor([[0.5, 2.5], [0.5, 2.5]]))


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_is_the_average_of_a_finer_grid_and_max_is_its_max(aligned):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 24, generator=gen)
    xy = torch.rand(6, 2, generator=gen) * 60
    rois = torch.cat([torch.tensor([[0.0]] * 3 + [[1.0]] * 3), xy, xy + 4 + torch.rand(6, 2, generator=gen) * 40], 1)
    fine = torchvision.ops.roi_align(x, rois, (14, 14), 0.25, 1, aligned)   # one sample per sub-bin
    torch.testing.assert_close(F.avg_pool2d(fine, 2), torchvision.ops.roi_align(x, rois, 7, 0.25, 2, aligned))
    torch.testing.assert_close(roi_ops.roi_align_max(x, rois, 7, 0.25, 2, aligned), F.max_pool2d(fine, 2))
    torch.testing.assert_close(roi_ops.roi_align_max(x, rois, 7, 0.25, 2, aligned, fast=False),
                               roi_ops.roi_align_max(x, rois, 7, 0.25, 2, aligned, fast=True))


def test_roi_warp_rounds_the_box_then_samples_bilinearly():
    x = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(1))
    # stride 4: x1 3.3 -> cell 0.825 -> 1 -> 4 px; y1 4.1 -> 1.025 -> 1 -> 4 px; 50.7 -> 12.675 -> 13 -> 52 px;
    # 60.2 -> 15.05 -> 15 -> 60 px. A box thinner than a cell keeps one: 5..5.5 px -> cells 1..1 -> 4..8 px
    boxes = torch.tensor([[0, 3.3, 4.1, 50.7, 60.2], [0, 5.0, 5.0, 5.5, 9.0]])
    rounded = torch.tensor([[0, 4.0, 4.0, 52.0, 60.0], [0, 4.0, 4.0, 8.0, 8.0]])
    expected = torchvision.ops.roi_align(x, rounded, 7, 0.25, 2, True)
    torch.testing.assert_close(roi_ops.roi_warp(x, boxes, 7, 0.25, 2), expected)
    torch.testing.assert_close(roi_ops.roi_warp(x, boxes, 7, 0.25, 2, fast=False), expected)
    assert not torch.allclose(expected, torchvision.ops.roi_align(x, boxes, 7, 0.25, 2, True))


@pytest.mark.parametrize("pooler", ["roi_pool", "roi_warp", "roi_align", "roi_align_max"])
def test_pool_rois_knows_every_pooler_of_table_2c(pooler):
    x = torch.randn(1, 2, 16, 16)
    out = roi_ops.pool_rois(x, [torch.tensor([[8.0, 8.0, 40.0, 48.0]])], 7, 0.25, pooler)
    assert out.shape == (1, 2, 7, 7) and torch.isfinite(out).all()


def test_fpn_takes_roi_align_only():
    with pytest.raises(ValueError, match="pools with RoIAlign only"):
        presets.cpu_config(fpn=True, pooler="roi_warp")


# ---- the mask losses -------------------------------------------------------------------------


def test_softmax_decision_rules_hand_worked():
    # one pixel, probabilities (background, 1, 2, 3) = (0.3, 0.4, 0.2, 0.1), the detection's label is 1:
    # p_1 = 0.4 < 0.5, but class 1 is the most probable channel: 0.4 / (0.4 + 0.3) = 0.571
    logits = torch.tensor([0.3, 0.4, 0.2, 0.1]).log().view(1, 4, 1, 1)
    label = torch.tensor([1])
    prob = mask_head.mask_probs(logits, label, "softmax", "probability")
    argmax = mask_head.mask_probs(logits, label, "softmax", "argmax")
    assert math.isclose(prob.item(), 0.4, rel_tol=1e-6) and prob.item() < 0.5
    assert math.isclose(argmax.item(), 0.4 / 0.7, rel_tol=1e-6) and argmax.item() >= 0.5


def test_class_agnostic_head_has_one_channel_and_its_loss_is_bce_on_it():
    config = presets.quick_config(mask_loss="sigmoid_agnostic")
    head = mask_head.MaskHead(config, 8)
    logits = head(torch.randn(3, 8, 14, 14))
    assert logits.shape == (3, 1, 28, 28)
    targets, labels = torch.rand(3, 28, 28), torch.tensor([1, 3, 2])
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], targets)
    torch.testing.assert_close(mask_head.mask_loss(logits, targets, labels, "sigmoid_agnostic"), expected)
    torch.testing.assert_close(mask_head.mask_probs(logits, labels, "sigmoid_agnostic"), logits.sigmoid())


@pytest.mark.parametrize("kind, expected", [("sigmoid", math.log(2)), ("sigmoid_agnostic", math.log(2)),
                                            ("softmax", math.log(4))])
def test_a_fresh_mask_head_starts_at_the_expected_loss(kind, expected):
    # the last layer starts at N(0, 0.001): every logit near 0, whatever the features' scale
    torch.manual_seed(0)
    head = mask_head.MaskHead(presets.cpu_config(mask_loss=kind), 16)
    features = 10 * torch.randn(6, 16, 14, 14)              # large features, as a from-scratch backbone's
    loss = mask_head.mask_loss(head(features), (torch.rand(6, 28, 28) > 0.5).float(), torch.tensor([1, 2, 3] * 2), kind)
    assert abs(loss.item() - expected) < 0.02


def test_a_model_with_each_variant_trains_and_predicts():
    images, targets = data.collate_fn([data.ShapesDataset(2, image_size=64, seed=0)[i] for i in range(2)])
    small = dict(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1)
    for changes in (dict(mask_loss="sigmoid_agnostic"), dict(mask_loss="softmax", softmax_mask_rule="argmax"),
                    dict(pooler="roi_warp", stride=16), dict(pooler="roi_align_max", stride=32)):
        torch.manual_seed(0)
        net = model.MaskRCNN(presets.quick_config(**small, **changes))
        losses = net(images, targets)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values()), changes
        out = net.eval()(images)
        assert all(0 <= d["masks"].min() and d["masks"].max() <= 1 for d in out if len(d["masks"])), changes


# ---- sanity before science: every variant overfits one fixed batch ----------------------------

@pytest.fixture(scope="module")
def fixed_batch():
    """12 objects of 8 shapes images: the image pixels at stride 1 and 2, their boxes and 28x28 targets."""
    images, targets = data.collate_fn([data.ShapesDataset(8, seed=3)[i] for i in range(8)])
    rois = [t["boxes"] for t in targets]
    masks = torch.cat([mask_head.mask_targets(t["masks"], t["boxes"], torch.arange(len(t["boxes"])), 28)
                       for t in targets])
    return torch.stack(images), rois, torch.cat([t["labels"] for t in targets]), masks


def _overfit(pooled, masks, labels, kind, steps):
    """Adam on one fixed batch; returns the last loss and the mean mask IoU at the 0.5 threshold."""
    torch.manual_seed(0)
    head = mask_head.MaskHead(presets.cpu_config(mask_loss=kind), pooled.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=0.005)
    for _ in range(steps):
        loss = mask_head.mask_loss(head(pooled), masks, labels, kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = mask_head.mask_probs(head(pooled), labels, kind)[:, 0] >= 0.5
    truth = masks >= 0.5
    return loss.item(), ((pred & truth).flatten(1).sum(1) / (pred | truth).flatten(1).sum(1)).mean().item()


@pytest.mark.parametrize("kind, steps", [("sigmoid", 150), ("sigmoid_agnostic", 150), ("softmax", 300)])
def test_each_mask_loss_overfits_one_batch(fixed_batch, kind, steps):
    # the softmax head needs more steps: it must also tell the classes apart (its loss couples them)
    images, rois, labels, masks = fixed_batch
    pooled = roi_ops.pool_rois(images, rois, 14, 1.0, "roi_align", 2, True)   # [K, 3, 14, 14] pixels
    loss, iou = _overfit(pooled, masks, labels, kind, steps)
    assert loss < 0.2 and iou > 0.9, (kind, loss, iou)


@pytest.mark.parametrize("pooler", ["roi_pool", "roi_warp", "roi_align", "roi_align_max"])
def test_each_pooler_overfits_one_batch(fixed_batch, pooler):
    images, rois, labels, masks = fixed_batch
    pooled = roi_ops.pool_rois(F.avg_pool2d(images, 2), rois, 14, 0.5, pooler, 2, True)  # a stride-2 map
    loss, iou = _overfit(pooled, masks, labels, "sigmoid", 150)
    assert loss < 0.2 and iou > 0.9, (pooler, loss, iou)
