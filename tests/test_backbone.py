"""Backbone contract: output shapes, strides and channels for stride 8, 16, 32 and FPN mode; ResNet-50 is
torchvision's, weight for weight; narrower bottleneck ResNets; every residual block starts as the identity."""
import pytest
import torch
import torchvision

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
    (dict(stride=16, width=16), [256, 512, 1024]),  # "resnet50" ignores width: always ResNet-50
])
def test_resnet50_backbone_contract(kwargs, channels):
    model = backbone.BottleneckResNet(ModelConfig(backbone="resnet50", **kwargs)).eval()
    with torch.no_grad():
        features = model(torch.rand(1, 3, 64, 64))
    assert model.out_channels == channels
    assert model.strides == [4, 8, 16, 32][: len(channels)]
    assert [tuple(f.shape) for f in features] == [(1, c, 64 // s, 64 // s) for c, s in zip(channels, model.strides)]


def _torchvision_names(name: str) -> str:
    """Our ResNet's parameter name -> torchvision's (``stem.0`` is ``conv1``, ``stages.i`` is ``layer{i+1}``)."""
    name = name.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.")
    return f"layer{int(name[7]) + 1}{name[8:]}" if name.startswith("stages.") else name


def test_resnet50_is_torchvisions_weight_for_weight():
    """Width 64 with blocks (3, 4, 6, 3) is ResNet-50: torchvision's weights load name for name and
    give the same C2..C5."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    for m in reference.modules():  # non-trivial norm statistics, so a swapped layer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = backbone.BottleneckResNet(ModelConfig(backbone="resnet50", fpn=True)).eval()
    state = reference.state_dict()
    ours.load_state_dict({name: state[_torchvision_names(name)] for name in ours.state_dict()})
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            x = layer(x)
            expected.append(x)
        for got, want in zip(ours(images), expected):
            torch.testing.assert_close(got, want)
    assert len(ours.state_dict()) == len(state) - 2  # all but torchvision's classifier (fc.weight, fc.bias)


@pytest.mark.parametrize("width, blocks, norm", [(16, (3, 4, 6, 3), "bn"), (8, (1, 2, 1, 1), "gn")])
def test_narrow_bottleneck_resnet(width, blocks, norm):
    config = ModelConfig(backbone="bottleneck", width=width, blocks=blocks, fpn=True, norm=norm)
    model = backbone.BottleneckResNet(config).eval()
    with torch.no_grad():
        features = model(torch.rand(1, 3, 64, 64))
    assert model.out_channels == [4 * width * 2**i for i in range(4)]
    assert [len(stage) for stage in model.stages] == list(blocks)
    assert [tuple(f.shape) for f in features] == [(1, c, 64 // s, 64 // s) for c, s in zip(model.out_channels, model.strides)]


def test_bottleneck_is_identity_at_init():
    """Zero-initialised last norm scale (Goyal et al. 2017): a block with matching shapes starts as
    relu(x), so a 16-block trunk starts as its stem plus 4 strided projections."""
    block = backbone.Bottleneck(32, 8, 1, "bn").eval()
    backbone._init_weights(block)
    x = torch.randn(1, 32, 5, 5)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_bad_blocks_raise():
    with pytest.raises(ValueError, match="blocks"):
        ModelConfig(backbone="bottleneck", blocks=(3, 4, 6))
    with pytest.raises(ValueError, match="blocks"):
        ModelConfig(backbone="bottleneck", blocks=(3, 0, 6, 3))


def test_bad_norm_and_width_raise():
    with pytest.raises(ValueError, match="norm"):
        backbone.make_norm("ln", 8)
    with pytest.raises(ValueError, match="width"):
        backbone.TinyResNet(ModelConfig(width=4))
