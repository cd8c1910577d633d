"""Backbone contract: output shapes, strides and channels for stride 8, 16, 32 and FPN mode."""
import pytest
import torch

from course_lib import backbone
from course_lib.config import ModelConfig

torch.set_num_threads(2)


@pytest.mark.parametrize("kwargs, strides", [
    (dict(stride=8), [4, 8]),
    (dict(stride=16), [4, 8, 16]),
    (dict(stride=32), [4, 8, 16, 32]),
    (dict(stride=16, fpn=True), [4, 8, 16, 32]),
    (dict(stride=32, fpn=True, norm="gn"), [4, 8, 16, 32]),
])
def test_tiny_resnet_shapes_and_strides(kwargs, strides):
    config = ModelConfig(width=16, **kwargs)
    model = backbone.TinyResNet(config).eval()
    images = torch.rand(2, 3, 128, 96)
    features = model(images)
    assert model.strides == strides
    assert model.out_channels == [16 * 2**i for i in range(len(strides))]
    assert len(features) == len(strides)
    for f, s, c in zip(features, model.strides, model.out_channels):
        assert f.shape == (2, c, 128 // s, 96 // s)


def test_tiny_resnet_trains():
    """Gradients reach the stem (the residual shortcuts carry them even with zero-init blocks)."""
    model = backbone.TinyResNet(ModelConfig(width=8))
    model(torch.rand(2, 3, 64, 64))[-1].square().mean().backward()
    grad = model.stem[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_residual_block_is_identity_at_init():
    """Zero-initialised last norm scale: a block with matching shapes starts as relu(x)."""
    block = backbone.ResidualBlock(8, 8, 1, "bn").eval()
    backbone._init_weights(block)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(block(x), torch.relu(x))


@pytest.mark.parametrize("kwargs, channels", [
    (dict(stride=16), [256, 512, 1024]),
    (dict(stride=32), [256, 512, 1024, 2048]),
    (dict(stride=16, fpn=True, norm="gn"), [256, 512, 1024, 2048]),
])
def test_resnet50_backbone_contract(kwargs, channels):
    model = backbone.ResNet50Backbone(ModelConfig(**kwargs)).eval()
    with torch.no_grad():
        features = model(torch.rand(1, 3, 64, 64))
    assert model.out_channels == channels
    assert model.strides == [4, 8, 16, 32][: len(channels)]
    assert [tuple(f.shape) for f in features] == [(1, c, 64 // s, 64 // s) for c, s in zip(channels, model.strides)]


def test_bad_norm_and_width_raise():
    with pytest.raises(ValueError, match="norm"):
        backbone.make_norm("ln", 8)
    with pytest.raises(ValueError, match="width"):
        backbone.TinyResNet(ModelConfig(width=4))
