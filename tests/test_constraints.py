"""Separation constraints: hand-computed values (worked out on paper), gradients, hooks."""
import pytest
import torch
from torch import nn

from alive import Linked, SeparationConstraint
from alive.functional import (
    dense_separation_penalty,
    point_slacks,
    separation_extremes,
    separation_penalty,
    stacked_separation_penalty,
    unit_slacks,
)

# rows = points, columns = units
Z = torch.tensor([[2.0, -0.5, 0.0], [0.5, -2.0, 1.5], [-1.0, -1.0, 3.0]])
# Sep-U: unit 0 max 2 min -1 -> 0; unit 1 max -0.5 -> xi+ 1.5; unit 2 min 0 -> xi- 1
# Sep-P: point 0 min -0.5 -> xi- 0.5; points 1, 2 separate fine


def test_unit_and_point_slacks_by_hand():
    xp, xm = unit_slacks(Z)
    assert xp.tolist() == [0.0, 1.5, 0.0] and xm.tolist() == [0.0, 0.0, 1.0]
    xp, xm = point_slacks(Z)
    assert xp.tolist() == [0.0, 0.0, 0.0] and xm.tolist() == [0.5, 0.0, 0.0]


@pytest.mark.parametrize(
    "kind,aggregation,expected",
    [
        ("u", "paper", 1.25),
        ("p", "paper", 0.25),
        ("up", "paper", 1.5),
        ("up", "squared_sum", 0.8125 + 0.0625),
        ("up", "mean", 1.25 / 3 + 0.25 / 3),
        ("up", "norm", 0.8125 ** 0.5 + 0.25),
    ],
)
def test_penalty_by_hand(kind, aggregation, expected):
    assert separation_penalty(Z, kind=kind, aggregation=aggregation).item() == pytest.approx(expected)


def test_rho_convex_combination_and_margin():
    # rho = 0.51 is eq. 17 with the paper's rho' = 0.01: 0.51 xi+ + 0.49 xi-
    assert separation_penalty(Z, kind="u", rho=0.51).item() == pytest.approx(0.51 * 1.5 + 0.49 * 1.0)
    assert separation_penalty(Z, kind="p", rho=0.51).item() == pytest.approx(0.49 * 0.5)
    # margin 2: unit 0 xi- = 1, unit 1 xi+ = 2.5, unit 2 xi- = 2
    assert separation_penalty(Z, kind="u", margin=2.0).item() == pytest.approx(0.5 * (1 + 2.5 + 2))


def test_conv_reductions_by_hand():
    z = torch.tensor([[[[3.0, -2.0]]], [[[0.5, 0.2]]]])  # (2 samples, 1 channel, 1, 2 positions)
    assert separation_penalty(z, "u", conv_reduction="channel").item() == pytest.approx(0.0)
    assert separation_penalty(z, "p", conv_reduction="channel").item() == pytest.approx(0.85)
    assert separation_penalty(z, "u", conv_reduction="position").item() == pytest.approx(1.15)
    assert separation_penalty(z, "p", conv_reduction="position").item() == pytest.approx(5.5)
    assert unit_slacks(z, conv_reduction="position")[0].shape == (1, 1, 2)
    assert point_slacks(z, conv_reduction="position")[0].shape == (2, 1, 2)


def test_penalty_gradient_check():
    z = (torch.randn(6, 4, dtype=torch.float64) * 0.7).requires_grad_(True)
    for agg in ("paper", "squared_sum", "mean", "norm"):
        assert torch.autograd.gradcheck(lambda t: separation_penalty(t, "up", aggregation=agg), (z,))


def test_index_extremes_match_amax_for_unique_extremes():
    z = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    for m in (None, mask):
        outs = []
        for ties in ("split", "first"):
            g_u, g_p = stacked_separation_penalty(z, "up", unit_mask=m, ties=ties)
            (grad,) = torch.autograd.grad((g_u + 2 * g_p).sum(), z)
            outs.append((g_u.detach(), g_p.detach(), grad))
        for a, b in zip(*outs):
            assert torch.allclose(a, b)


def test_split_ties_share_the_gradient():
    z = torch.zeros(4, 2, requires_grad=True)  # every pre-activation ties (zero initialisation)
    separation_penalty(z, "u", rho=0.51).backward()
    # per unit: d/dmax = -0.51, d/dmin = +0.49, each shared by the 4 tied points
    assert torch.allclose(z.grad, torch.full((4, 2), (0.49 - 0.51) / 4))


def test_dense_fast_path_equals_reference_with_padding():
    torch.manual_seed(1)
    z = torch.randn(3, 9, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    z = z * mask[:, None, :]  # padded units are exactly zero in the grid engine
    cu, cp = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    fill = (1 - mask).unsqueeze(1) * 1e30
    for agg in ("paper", "squared_sum", "mean"):
        zz = z.clone().requires_grad_(True)
        fast = dense_separation_penalty(zz, cu, cp, 0.5, 1.0, agg, point_fill=fill, unit_weight=mask)
        g_u, g_p = stacked_separation_penalty(z, "up", aggregation=agg, unit_mask=mask.bool())
        assert torch.allclose(fast, cu * g_u + cp * g_p)
        fast.sum().backward()
        assert torch.all(zz.grad[mask.unsqueeze(1).expand_as(z) == 0] == 0)  # no gradient to padding


def test_separation_extremes_shapes():
    z = torch.randn(2, 5, 3, 4, 4)  # (nets, points, units, H, W)
    u, p = separation_extremes(z, "up", "channel")
    assert u[0].shape == (2, 3) and p[0].shape == (2, 5)
    u, p = separation_extremes(z, "up", "position")
    assert u[0].shape == (2, 3, 4, 4) and p[0].shape == (2, 5, 4, 4)


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="kind"):
        separation_penalty(Z, kind="x")
    with pytest.raises(ValueError, match="aggregation"):
        separation_penalty(Z, aggregation="max")
    with pytest.raises(ValueError, match="conv_reduction"):
        separation_penalty(Z, conv_reduction="pixel")
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="rho"):
        SeparationConstraint(net, rho=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        SeparationConstraint(net, weight=-1)


def _dead_net(act):
    unit = nn.Linear(2, 1)
    with torch.no_grad():
        unit.bias.fill_(-50.0)
    return unit, nn.Sequential(unit, act, nn.Linear(2 if isinstance(act, Linked) else 1, 1))


def test_dead_unit_gets_gradient_from_sep_u_and_from_linking_only():
    x = torch.randn(16, 2)
    for act, sep, alive in ((nn.ReLU(), False, False), (nn.ReLU(), True, True), (Linked("relu"), False, True)):
        unit, net = _dead_net(act)
        loss = net(x).square().mean()
        if sep:
            c = SeparationConstraint(net, kind="u", weight=1e-3)
            loss = net(x).square().mean() + c.penalty()
        loss.backward()
        assert (unit.weight.grad.abs().sum() > 0) == alive


def test_hooks_capture_preactivations_and_remove_cleanly():
    net = nn.Sequential(nn.Linear(2, 3), Linked("relu"), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(10, 2)
    sep = SeparationConstraint(net, kind="up", weight=0.1)
    assert len(sep.layers) == 2  # the output layer is not constrained
    net(x)
    zs = sep.preactivations
    assert [z.shape for z in zs] == [(10, 3), (10, 3)]  # linked: the shared z, not the 6 outputs
    assert sep.penalty().item() == pytest.approx(0.1 * separation_penalty(zs, "up").item())
    net(x[:4])
    assert sep.preactivations[0].shape[0] == 4  # refers to the last forward only
    with torch.no_grad():
        v = sep.penalty()
    assert not v.requires_grad and v.item() > 0
    sep.remove()
    net(x)
    assert sep.preactivations == [] and not net._forward_pre_hooks and not net[0]._forward_hooks


def test_context_manager_options_and_conv():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with SeparationConstraint(net, kind="p", include_output=True, conv_reduction="position") as sep:
        net(torch.randn(3, 1, 5, 5))
        assert len(sep.layers) == 2
        assert sep.penalty() > 0
    assert not net[0]._forward_hooks
    only = SeparationConstraint(net, layers=[net[2]])
    assert only.layers == [net[2]]
    with pytest.raises(RuntimeError, match="no forward pass"):
        only.penalty()
