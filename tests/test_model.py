"""The whole model: torchvision's call contract, batching, and loud validation at the boundary."""
import dataclasses

import pytest
import torch

from course_lib import data, model, presets

TINY = presets.quick_config(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1,
                            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)


@pytest.fixture(scope="module")
def batch():
    ds = data.ShapesDataset(3, image_size=64, seed=5)
    return data.collate_fn([ds[i] for i in range(3)])


@pytest.mark.parametrize("fpn", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_train_returns_named_finite_losses_and_eval_returns_detections(batch, with_mask, fpn):
    torch.manual_seed(0)
    net = model.MaskRCNN(dataclasses.replace(TINY, with_mask=with_mask, fpn=fpn))
    images, targets = batch
    losses = net(images, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if with_mask else set())
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    net.eval()
    with torch.no_grad():
        out = net(images)
    assert len(out) == 3
    for det in out:
        d = len(det["boxes"])
        assert det["boxes"].shape == (d, 4) and det["labels"].shape == (d,) and det["scores"].shape == (d,)
        if with_mask:
            assert det["masks"].shape == (d, 1, 64, 64)
            assert 0 <= det["masks"].min() and det["masks"].max() <= 1
        else:
            assert "masks" not in det


def test_faster_rcnn_has_no_mask_branch():
    net = model.FasterRCNN(TINY)
    assert not net.config.with_mask and not hasattr(net.roi_heads, "mask_head")


def test_images_of_different_sizes_are_padded_to_size_divisible():
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 33)]
    batch = model.batch_images(images, mean, std, 32)
    assert batch.shape == (2, 3, 64, 96)
    assert torch.equal(batch[0, :, :50, :70], images[0]) and batch[0, :, 50:].abs().sum() == 0
    torch.manual_seed(1)
    net = model.FasterRCNN(TINY).eval()
    with torch.no_grad():
        out = net(images)
    for det, img in zip(out, images):  # detections are clipped to each image's own size
        assert (det["boxes"][:, 2] <= img.shape[2]).all() and (det["boxes"][:, 3] <= img.shape[1]).all()


def test_images_without_objects_train_without_nan():
    torch.manual_seed(2)
    net = model.MaskRCNN(TINY)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    losses = net([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [empty, dict(empty)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0


def _target(box):
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([1]),
            "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}


@pytest.mark.parametrize("images, targets, message", [
    (torch.rand(3, 64, 64), None, "images must be a non-empty list"),
    ([torch.rand(64, 64)], None, r"images\[0\] must be a float Tensor\[3, H, W\]"),
    ([torch.rand(3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.uint8)], None, r"images\[1\]"),
    ([torch.rand(3, 64, 64)], [{"labels": torch.tensor([1])}], r"targets\[0\] is missing key 'boxes'"),
    ([torch.rand(3, 64, 64)], [{"boxes": torch.zeros(4), "labels": torch.tensor([1])}], r"Tensor\[G, 4\]"),
    ([torch.rand(3, 64, 64)] * 2, [_target([1.0, 1.0, 9.0, 9.0]), _target([5.0, 5.0, 5.0, 9.0])],
     r"targets\[1\]\['boxes'\]\[0\] = \[5.0, 5.0, 5.0, 9.0\] is degenerate"),
    ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])}],
     "missing key 'masks'"),
])
def test_bad_inputs_raise_value_error_naming_the_image(images, targets, message):
    net = model.MaskRCNN(TINY)
    if targets is None:
        net.eval()
    with pytest.raises(ValueError, match=message):
        net(images, targets)


def test_train_mode_without_targets_says_so():
    with pytest.raises(ValueError, match="targets is None"):
        model.MaskRCNN(TINY)([torch.rand(3, 64, 64)])
