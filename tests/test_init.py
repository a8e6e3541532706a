import math

import pytest
import torch
from torch import nn

from alive import AnnealedDropout, init_, zero_init_
from alive.init import annealed_dropout_rate, set_epoch


def test_glorot_uniform_bounds_and_zero_bias():
    lin = nn.Linear(30, 20)
    init_(lin, "glorot_uniform")
    bound = math.sqrt(6 / (30 + 20))
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
    assert torch.all(lin.bias == 0)


def test_zero_init_and_unknown_scheme():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2))
    zero_init_(net)
    assert all(torch.all(p == 0) for n, p in net.named_parameters() if not n.startswith("1."))
    assert torch.all(net[1].weight == 1)  # normalisation layers left as built
    with pytest.raises(ValueError, match="glorot_uniform"):
        init_(net, "orthogonal")


@pytest.mark.parametrize("epoch,rate", [(0, 0.9), (500, 0.45), (1000, 0.0), (2000, 0.0)])
def test_annealed_rate(epoch, rate):
    assert annealed_dropout_rate(epoch) == pytest.approx(rate)


def test_annealed_dropout_module():
    drop = AnnealedDropout(0.5, 10)
    net = nn.Sequential(drop)
    x = torch.ones(10000)
    set_epoch(net, 0)
    y = net(x)
    assert 0.4 < (y == 0).float().mean() < 0.6 and y.max() == pytest.approx(2.0)
    set_epoch(net, 10)
    assert torch.equal(net(x), x)
    set_epoch(net, 0)
    net.eval()
    assert torch.equal(net(x), x)
    assert "p0=0.5" in repr(drop)
    with pytest.raises(ValueError):
        AnnealedDropout(1.0)


def test_negative_epochs_and_lazy_modules_are_refused_with_a_message():
    from alive.init import annealed_dropout_rate

    with pytest.raises(ValueError, match="counts from 0"):
        annealed_dropout_rate(-1)
    drop = AnnealedDropout()
    drop.epoch = -5
    with pytest.raises(ValueError, match="counts from 0"):
        drop.train()(torch.ones(3))
    lazy = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="forward pass before"):
        zero_init_(lazy)
    lazy(torch.randn(2, 4))
    zero_init_(lazy)
    assert lazy[0].weight.abs().sum() == 0 and lazy[0].weight.shape == (3, 4)
