import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alive.models import (
    AllCNN,
    Conv2dSame,
    DeepThinNet,
    MLP,
    ParamNet,
    RectCNN,
    ResNet50CIFAR,
    WidthNet,
    build_model,
    count_parameters,
)


def test_shapes_of_every_model():
    x = torch.randn(2, 3, 32, 32)
    assert MLP(2, 2, depth=3, width=4)(torch.randn(5, 2)).shape == (5, 2)
    assert RectCNN(1, 10, 28, depth=3, width=2, activation="lk-relu")(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for m in (WidthNet(50), DeepThinNet(depth=5), ParamNet(), AllCNN(width_mult=0.25), ResNet50CIFAR(), ResNet50CIFAR(batchnorm=False)):
        assert m(x).shape == (2, 10)


def test_linked_layer_doubles_next_layer_inputs():
    m = MLP(2, 2, depth=2, width=4, activation="lk-relu")
    lin = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [l.in_features for l in lin] == [2, 8, 8]
    assert [l.out_features for l in lin] == [4, 4, 2]


def test_depth_net_architecture_and_sqrt2_parameter_match():
    net = DeepThinNet()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 51 and convs[0].kernel_size == (7, 7) and convs[0].stride == (2, 2)
    assert all(c.out_channels == 4 for c in convs)
    assert DeepThinNet(widen=True).width == 5
    lk, sq = count_parameters(DeepThinNet(activation="lk-relu")), count_parameters(DeepThinNet(widen=True))
    # the authors' rule int(4*sqrt2) = 5 rounds down: the "parameter-matched" baseline of Table 2
    # has 30 % fewer parameters than the linked net (the paper says "exactly the same")
    assert (lk, sq) == (35682, 25050)


def test_params_net_widths_and_parameter_match():
    assert ParamNet(widen=True).widths == (45, 45, 90, 90, 724)
    base, lk, sq = (count_parameters(ParamNet(**kw)) for kw in ({}, {"activation": "lk-relu"}, {"widen": True}))
    assert abs(lk - sq) / lk < 0.03 and lk > 1.9 * base


def test_conv_same_pads_like_tensorflow():
    conv = Conv2dSame(1, 1, 3, stride=2)
    x = torch.randn(1, 1, 32, 32)
    # TF "same", stride 2, k 3 on 32: total padding 1, all of it at the bottom/right
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    assert torch.equal(conv(x), ref) and ref.shape[-1] == 16
    c7 = Conv2dSame(1, 1, 7, stride=2)
    ref7 = F.conv2d(F.pad(x, (2, 3, 2, 3)), c7.weight, c7.bias, stride=2)
    assert torch.equal(c7(x), ref7)


def test_resnet_without_bn_and_linked_only_in_branches():
    from alive.activations import Linked

    assert not any(isinstance(m, nn.BatchNorm2d) for m in ResNet50CIFAR(batchnorm=False).modules())
    net = ResNet50CIFAR(activation="lk-selu")
    linked = [m for m in net.modules() if isinstance(m, Linked)]
    assert len(linked) == 2 * 16  # two inside each of the 16 bottleneck branches
    assert isinstance(net.stem[-1], nn.SELU)


def test_prelu_init_and_glorot_default():
    m = build_model("depth", (3, 32, 32), 10, activation="lk-prelu", depth=2, prelu_init=0.0)
    slopes = [p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 1]
    assert slopes and all(torch.all(s == 0) for s in slopes)
    conv = next(x for x in m.modules() if isinstance(x, nn.Conv2d))
    assert torch.all(conv.bias == 0)


def test_bad_inputs_fail_early():
    with pytest.raises(ValueError, match="positive"):
        MLP(2, 2, depth=3, width=-1)
    with pytest.raises(TypeError, match="int"):
        MLP(2, 2, depth=2.5, width=3)
    with pytest.raises(ValueError, match="valid names"):
        DeepThinNet(activation="relu6")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="images"):
        build_model("cnn", (2,), 2, depth=1, width=1)
