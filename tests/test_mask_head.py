"""The mask branch against torchvision's maskrcnn_loss / paste_masks_in_image and hand-worked cases."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads as tv_roi_heads

from course_lib import mask_head
from course_lib.config import ModelConfig


def _random_boxes(n, image_size, gen):
    xy = torch.rand(n, 2, generator=gen) * image_size * 0.8
    wh = torch.rand(n, 2, generator=gen) * image_size * 0.5 + 2
    return torch.cat([xy, xy + wh], dim=1)


def _square_masks(boxes, size):
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.round().long().tolist()):
        mask[y1:y2, x1:x2] = 1
    return masks


def test_head_shapes_and_init():
    config = ModelConfig(num_classes=5, mask_conv_channels=16, mask_num_convs=3)
    head = mask_head.MaskHead(config, in_channels=32)
    assert head(torch.randn(7, 32, 14, 14)).shape == (7, 5, 28, 28)
    assert head(torch.randn(0, 32, 14, 14)).shape == (0, 5, 28, 28)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 + 1  # the FCN convs and the 1x1 predictor
    assert all(not m.bias.detach().any() for m in convs)
    # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)) for a 3x3 conv of 16 outputs
    assert convs[0].weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.15)


def test_mask_targets_hand_made():
    gt_masks = torch.zeros(2, 10, 10, dtype=torch.uint8)
    gt_masks[1, 2:6, 2:6] = 1                  # pixels 2..5, i.e. the continuous box [2, 2, 6, 6]
    proposals = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 4.0, 4.0]])
    matched = torch.tensor([1, 1])
    targets = mask_head.mask_targets(gt_masks, proposals, matched, resolution=4)
    assert targets.shape == (2, 4, 4) and targets.dtype == torch.float32
    torch.testing.assert_close(targets[0], torch.ones(4, 4))    # exact box: all ones
    expected = torch.zeros(4, 4)
    expected[2:, 2:] = 1                                         # the mask fills the lower-right quarter
    torch.testing.assert_close(targets[1], expected)
    # torchvision's convention (aligned=False) samples half a pixel to the lower right: the last
    # row and column of the exact box fall between a 1 and a 0.
    shifted = mask_head.mask_targets(gt_masks, proposals[:1], matched[:1], 4, aligned=False)[0]
    assert shifted[0, 0] == 1 and shifted[3, 0] == 0.5 and shifted[3, 3] == 0.25


def test_mask_targets_equal_torchvision_with_aligned_false():
    gen = torch.Generator().manual_seed(0)
    gt_masks = (torch.rand(3, 40, 50, generator=gen) > 0.5).to(torch.uint8)
    proposals = _random_boxes(9, 40, gen)
    matched = torch.randint(0, 3, (9,), generator=gen)
    ours = mask_head.mask_targets(gt_masks, proposals, matched, 28, aligned=False)
    torch.testing.assert_close(ours, tv_roi_heads.project_masks_on_boxes(gt_masks, proposals, matched, 28))


def test_sigmoid_loss_equals_torchvision_maskrcnn_loss():
    gen = torch.Generator().manual_seed(1)
    gt_boxes = _random_boxes(4, 64, gen)
    gt_masks, gt_labels = _square_masks(gt_boxes, 64), torch.tensor([1, 3, 2, 3])
    proposals = gt_boxes[torch.tensor([0, 1, 1, 2, 3, 3])] + torch.randn(6, 4, generator=gen)
    matched = torch.tensor([0, 1, 1, 2, 3, 3])
    logits = torch.randn(6, 4, 28, 28, generator=gen)
    targets = mask_head.mask_targets(gt_masks, proposals, matched, 28, aligned=False)
    ours = mask_head.mask_loss(logits, targets, gt_labels[matched], kind="sigmoid")
    theirs = tv_roi_heads.maskrcnn_loss(logits, [proposals], [gt_masks], [gt_labels], [matched])
    torch.testing.assert_close(ours, theirs)


def test_softmax_loss_hand_worked():
    # One RoI, 3 channels (background, class 1, class 2), a 2x2 mask of class 2.
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = 2.0        # pixel (0, 0): p = softmax(0, 0, 2)
    targets = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    loss = mask_head.mask_loss(logits, targets, torch.tensor([2]), kind="softmax")
    e2 = torch.exp(torch.tensor(2.0))
    pixel_00 = -torch.log(e2 / (2 + e2))             # target class 2, p_2 = e^2 / (1 + 1 + e^2)
    uniform = -torch.log(torch.tensor(1 / 3))          # other pixels: every p = 1/3
    expected = (pixel_00 + 3 * uniform) / 4          # soft pixel: -(0.5 log 1/3 + 0.5 log 1/3)
    torch.testing.assert_close(loss, expected)


def test_gradient_isolation():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 8, 8, generator=gen, requires_grad=True)
    targets = (torch.rand(3, 8, 8, generator=gen) > 0.5).float()
    labels = torch.tensor([1, 3, 2])
    mask_head.mask_loss(logits, targets, labels, kind="sigmoid").backward()
    nonzero = logits.grad.abs().sum(dim=(2, 3)) > 0                   # [K, num_classes]
    assert nonzero.tolist() == F.one_hot(labels, 4).bool().tolist()   # only the gt channel
    logits.grad = None
    mask_head.mask_loss(logits, targets, labels, kind="softmax").backward()
    assert bool((logits.grad.abs().sum(dim=(2, 3)) > 0).all())        # every channel, background too


def test_loss_empty_and_validation():
    logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    loss = mask_head.mask_loss(logits, torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0 and loss.requires_grad
    with pytest.raises(ValueError, match="kind"):
        mask_head.mask_loss(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2), torch.tensor([1]), kind="softplus")
    with pytest.raises(ValueError, match="labels"):
        mask_head.mask_loss(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="mask_targets"):
        mask_head.mask_loss(torch.randn(1, 4, 2, 2), torch.zeros(1, 3, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="proposals"):
        mask_head.mask_targets(torch.zeros(1, 5, 5), torch.zeros(3), torch.zeros(3, dtype=torch.int64), 4)


def test_mask_probs():
    logits = torch.randn(5, 4, 6, 6)
    labels = torch.tensor([1, 2, 3, 1, 2])
    probs = mask_head.mask_probs(logits, labels, "sigmoid")
    torch.testing.assert_close(probs, tv_roi_heads.maskrcnn_inference(logits, [labels])[0])
    soft = mask_head.mask_probs(logits, labels, "softmax")
    assert soft.shape == (5, 1, 6, 6)
    torch.testing.assert_close(soft[2, 0], logits[2].softmax(0)[3])


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_paste_equals_torchvision(padding):
    gen = torch.Generator().manual_seed(3)
    height, width = 48, 64
    boxes = torch.cat([_random_boxes(8, 48, gen),
                       torch.tensor([[0.0, 0.0, width, height],          # the whole image
                                     [-5.0, 30.0, 20.0, 60.0],           # over the left and bottom border
                                     [50.0, -3.5, 64.0, 10.0],           # touching the right border
                                     [10.2, 10.7, 10.9, 11.1]])])        # smaller than a pixel
    masks = torch.rand(len(boxes), 1, 28, 28, generator=gen)
    ours = mask_head.paste_masks_in_image(masks, boxes, (height, width), padding=padding)
    theirs = tv_roi_heads.paste_masks_in_image(masks, boxes, (height, width), padding=padding)
    assert ours.shape == (len(boxes), 1, height, width)
    torch.testing.assert_close(ours, theirs)


def test_paste_empty_and_outside():
    assert mask_head.paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (9, 7)).shape == (0, 1, 9, 7)
    outside = mask_head.paste_masks_in_image(torch.ones(1, 1, 28, 28), torch.tensor([[-40.0, -40.0, -20.0, -20.0]]), (16, 16))
    assert outside.sum() == 0
    with pytest.raises(ValueError, match="boxes"):
        mask_head.paste_masks_in_image(torch.ones(2, 1, 28, 28), torch.zeros(3, 4), (16, 16))
