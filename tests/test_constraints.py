"""Separation constraints: hand-computed values (worked out on paper), gradients, hooks."""
import copy
import warnings
import pytest
import torch
from torch import nn

from alive import Linked, SeparationConstraint
from alive.functional import (
    _without_padded_units,
    aggregate,
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
        zr = z.detach().clone().requires_grad_(True)
        ref_u = _reference_penalty(zr, "u", 0.5, 1.0, "paper", "channel", m)
        ref_p = _reference_penalty(zr, "p", 0.5, 1.0, "paper", "channel", m)
        (ref_grad,) = torch.autograd.grad((ref_u + 2 * ref_p).sum(), zr)
        outs.append((ref_u.detach(), ref_p.detach(), ref_grad))
        for split, first, amax in zip(*outs):
            assert torch.allclose(split, first) and torch.allclose(split, amax)
        assert outs[0][2].abs().sum() > 0


def test_split_ties_share_the_gradient():
    z = torch.zeros(4, 2, requires_grad=True)  # every pre-activation ties (zero initialisation)
    separation_penalty(z, "u", rho=0.51).backward()
    # per unit: d/dmax = -0.51, d/dmin = +0.49, each shared by the 4 tied points
    assert torch.allclose(z.grad, torch.full((4, 2), (0.49 - 0.51) / 4))


@pytest.mark.parametrize("ties", ["split", "first"])
@pytest.mark.parametrize("masked", [False, True])
def test_tied_dense_extremes_equal_autograd_max(ties, masked):
    torch.manual_seed(5)
    z = torch.randint(-2, 3, (3, 8, 4)).double().requires_grad_(True)  # many ties, over points and units
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]).bool() if masked else None
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g_u, g_p = stacked_separation_penalty(z * 0.7, "up", rho=0.6, unit_mask=mask, ties=ties)
    (got,) = torch.autograd.grad(((g_u + 2 * g_p) * weights).sum(), z)
    # autograd's amax shares a tied extreme's gradient equally; max(dim) gives it to the index it returns
    zz = (z * 0.7).detach().requires_grad_(True)
    hi_p = zz if mask is None else zz.masked_fill(~mask.unsqueeze(1), -1e30)
    lo_p = zz if mask is None else zz.masked_fill(~mask.unsqueeze(1), 1e30)
    if ties == "split":
        ext = [zz.amax(1), zz.amin(1), hi_p.amax(2), lo_p.amin(2)]
    else:
        ext = [zz.max(1).values, zz.min(1).values, hi_p.max(2).values, lo_p.min(2).values]
    su = 0.6 * torch.relu(1 - ext[0]) + 0.4 * torch.relu(1 + ext[1])
    if mask is not None:
        su = su * mask
    sp = 0.6 * torch.relu(1 - ext[2]) + 0.4 * torch.relu(1 + ext[3])
    ref = su.sum(1) + 2 * sp.sum(1)
    assert torch.allclose(g_u + 2 * g_p, ref)
    (want,) = torch.autograd.grad((ref * weights).sum(), zz)
    assert torch.allclose(got, want * 0.7)


@pytest.mark.parametrize("ties", ["split", "first"])
@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("padding", [None, "mask", "fill"])
def test_hand_written_extremes_equal_the_built_ins_to_second_order(ties, width, padding, monkeypatch):
    from alive import functional as AF

    torch.manual_seed(6)
    w = (torch.randint(-3, 4, (3, 7, width)).double() / 3).requires_grad_(True)  # ties everywhere
    mask = torch.ones(3, width, dtype=torch.bool)
    mask[1:, width // 2 + 1:] = False  # nets 1 and 2 have padded units (when width > 1)
    padded = {None: None, "mask": ~mask.unsqueeze(1), "fill": (~mask).double().unsqueeze(1) * 1e30}[padding]

    def penalty():
        z = torch.tanh(w) * mask.unsqueeze(1)  # padded units are exactly 0, as in the grid engine
        hi, lo = AF._UnitPointExtremes.apply(ties, padded, z, None) if not AF._transforms_active() else \
            AF._composite_extremes(ties, padded, False, [z])
        return AF._combined_slacks(hi, lo, 1.0, 0.6).square().sum()  # squared: the upstream gradient depends on w

    def first_and_second():
        (g,) = torch.autograd.grad(penalty(), w, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), w)
        return penalty().detach(), g.detach(), h

    got = first_and_second()
    monkeypatch.setattr(AF, "_transforms_active", lambda: True)  # the built-in composite path
    want = first_and_second()
    for a, b in zip(got, want):
        assert torch.allclose(a, b), (ties, width, padding)


def test_dense_layers_with_every_hinge_inactive_get_zero_gradients():
    zs = [torch.tensor([[3.0, -2.0], [-4.0, 5.0]], requires_grad=True) for _ in range(3)]
    g_u, g_p = stacked_separation_penalty(zs, "up")
    assert torch.equal(g_u, torch.zeros(3)) and torch.equal(g_p, torch.zeros(3))
    (g_u.sum() + g_p.sum()).backward()
    assert all(z.grad is not None and torch.equal(z.grad, torch.zeros(2, 2)) for z in zs)


def test_hinge_gradient_passes_nan_as_autograd_relu_does():
    from alive.functional import _combined_slacks

    hi = torch.tensor([[float("nan"), 0.5, 2.0]], requires_grad=True)
    lo = torch.tensor([[float("nan"), -0.5, -2.0]], requires_grad=True)
    _combined_slacks(hi, lo, 1.0, 0.6).sum().backward()
    assert torch.allclose(hi.grad, torch.tensor([[-0.6, -0.6, 0.0]])) and torch.allclose(lo.grad, torch.tensor([[0.4, 0.4, 0.0]]))


def test_dense_fast_path_equals_reference_with_padding():
    torch.manual_seed(1)
    z = torch.randn(3, 9, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    z = z * mask[:, None, :]  # padded units are exactly zero in the grid engine
    cu, cp = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    for agg in ("paper", "squared_sum", "mean"):
        zz = z.clone().requires_grad_(True)
        fast = dense_separation_penalty(zz, cu, cp, 0.5, 1.0, agg, padded=(mask == 0).unsqueeze(1), unit_weight=mask)
        g_u, g_p = stacked_separation_penalty(z, "up", aggregation=agg, unit_mask=mask.bool())
        assert torch.allclose(fast, cu * g_u + cp * g_p)
        zr = z.clone().requires_grad_(True)  # the formulas written out with autograd's amax (other code)
        ref = cu * _reference_penalty(zr, "u", 0.5, 1.0, agg, "channel", mask) + cp * _reference_penalty(zr, "p", 0.5, 1.0, agg, "channel", mask)
        assert torch.allclose(fast, ref) and bool((ref[:2] > 0).all())
        fast.sum().backward()
        ref.sum().backward()
        assert torch.allclose(zz.grad, zr.grad) and zr.grad.abs().sum() > 0
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
    with pytest.raises(ValueError, match="layers= is empty"):
        SeparationConstraint(net, layers=[])
    assert SeparationConstraint(net, layers=(m for m in net if isinstance(m, nn.Linear))).layers == [net[0], net[2]]


def test_the_stacked_functions_refuse_bad_options_and_shapes():
    z = Z.unsqueeze(0)  # one net, 3 points, 3 units
    for kw, match in (({"kind": "x"}, "kind"), ({"aggregation": "sum"}, "aggregation"),
                      ({"conv_reduction": "positions"}, "conv_reduction")):
        with pytest.raises(ValueError, match=match):
            stacked_separation_penalty(z, **kw)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(torch.ones(1, 4), "avg")
    with pytest.raises(ValueError, match=r"unit_mask must have shape \(nets, units\) = \(1, 3\)"):
        stacked_separation_penalty(z, unit_mask=torch.tensor([True, True, False]))
    with pytest.raises(ValueError, match="unit_mask"):
        separation_extremes(z, unit_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one point"):
        separation_penalty(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"\(nets, points, units\)"):
        dense_separation_penalty(Z, torch.ones(1), torch.ones(1))


def test_position_reduction_with_padded_units_works_in_float16():
    z = torch.randn(2, 5, 3, 4, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ref = stacked_separation_penalty(z, conv_reduction="position", unit_mask=mask)
    half = stacked_separation_penalty(z.half(), conv_reduction="position", unit_mask=mask)
    for a, b in zip(ref, half):
        assert b.dtype == torch.float16
        torch.testing.assert_close(b.float(), a, rtol=2e-3, atol=2e-2)


def test_a_float_padding_fill_keeps_the_maps_precision():
    hs = torch.randn(2, 4, 3, dtype=torch.bfloat16)
    fill = torch.tensor([[[0.0, 0.0, 1e30]], [[0.0, 0.0, 0.0]]])  # float32, as the grid engine's buffer
    ph, pl = _without_padded_units(hs, hs, fill)
    assert ph.dtype == pl.dtype == torch.bfloat16
    assert (ph[0, :, 2] < -1e29).all() and torch.equal(ph[1], hs[1])


def test_linear_layers_on_sequences_see_every_row_as_a_point():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 7, 3)  # (batch, tokens, features)
    with SeparationConstraint(net, kind="up") as sep:
        net(x)
        on_tokens = sep.penalty()
        assert sep.preactivations[0].shape == (5, 7, 4)  # the layer's own output, as it left the layer
        net(x.reshape(35, 3))
        flat = sep.penalty()
    torch.testing.assert_close(on_tokens, flat)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_an_unbatched_conv_input_is_one_point(conv):
    torch.manual_seed(0)
    net = nn.Sequential(conv(2, 3, 3, padding=1), nn.ReLU(), conv(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(0), nn.LazyLinear(2))
    x = torch.randn((2, 5) if conv is nn.Conv1d else (2, 5, 4))
    net(x)
    with SeparationConstraint(net, kind="up", weight=1.0) as sep:
        net(x)
        assert sep.preactivations[0].shape[0] == 3  # (channels, *positions), as the layer gave it
        single = sep.penalty()
        (g_single,) = torch.autograd.grad(single, net[0].weight)
        sep.clear()  # the body is called without the model: no new pass starts by itself
        net[:4](x.unsqueeze(0))  # the same point as a batch of one
        batched = sep.penalty()
        (g_batched,) = torch.autograd.grad(batched, net[0].weight)
    assert single > 0
    torch.testing.assert_close(single, batched)
    torch.testing.assert_close(g_single, g_batched)


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
    assert "forward" not in net[0].__dict__ and net[0].forward.__func__ is nn.Linear.forward


def test_constrained_layers_capture_through_their_forward_and_keep_the_fast_call_path():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    custom = lambda x: nn.functional.linear(x, net[2].weight, net[2].bias) + 1.0  # noqa: E731
    net[2].forward = custom  # a forward already set on the instance is kept, and wrapped
    x = torch.randn(7, 2)
    first = SeparationConstraint(net, kind="up")
    second = SeparationConstraint(net, kind="u", weight=2.0)
    assert not net[0]._forward_hooks and not net[2]._forward_hooks  # nn.Module.__call__ keeps its fast path
    out = net(x)
    z0 = net[0].__class__.forward(net[0], x)
    z2 = custom(torch.relu(z0))
    for sep in (first, second):
        assert [tuple(z.shape) for z in sep.preactivations] == [(7, 3), (7, 3)]
        torch.testing.assert_close(sep.preactivations[0], z0)
        torch.testing.assert_close(sep.preactivations[1], z2)
    torch.testing.assert_close(out, net[4](torch.relu(z2)))
    torch.testing.assert_close(second.penalty(), 2.0 * separation_penalty([z0, z2], "u"))
    first.remove()  # removed while the second one wraps it: a pass-through until that one goes too
    net(x)
    assert first.preactivations == [] and len(second.preactivations) == 2
    second.remove()
    assert "forward" not in net[0].__dict__ and net[2].forward is custom
    torch.testing.assert_close(net(x), out)


def test_the_forward_hooks_of_a_constraint_pickled_by_an_earlier_version_still_capture():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1))
    sep = SeparationConstraint(net, kind="up")
    del net[0].__dict__["forward"]  # as such a model comes back: a hook instead of the capturing forward
    net[0].register_forward_hook(sep._capture)
    net(torch.randn(1, 6, 6))  # an unbatched input: one point
    assert [tuple(z.shape) for z in sep._captured] == [(1, 2, 4, 4)]
    assert sep.penalty() > 0


def test_the_capturing_forward_follows_a_class_forward_changed_later():
    class Layer(nn.Linear):
        pass

    net = nn.Sequential(Layer(2, 3), nn.ReLU(), nn.Linear(3, 2))
    sep = SeparationConstraint(net)
    x = torch.randn(5, 2)
    Layer.forward = lambda self, t: 2 * nn.functional.linear(t, self.weight, self.bias)  # e.g. patched by a library
    net(x)
    torch.testing.assert_close(sep.preactivations[0], 2 * nn.functional.linear(x, net[0].weight, net[0].bias))


def test_a_pickled_constrained_model_loads_with_a_working_constraint():
    import io
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    sep = SeparationConstraint(net, kind="up", weight=0.5)
    x = torch.randn(9, 2)
    net(x)
    want = sep.penalty()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = loaded[0].forward.constraint
    assert copied is not sep and copied is loaded[2].forward.constraint and copied.preactivations == []
    loaded(x)
    torch.testing.assert_close(copied.penalty(), want)
    copied.remove()
    assert "forward" not in loaded[0].__dict__ and not loaded._forward_pre_hooks


def test_context_manager_options_and_conv():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with SeparationConstraint(net, kind="p", include_output=True, conv_reduction="position") as sep:
        net(torch.randn(3, 1, 5, 5))
        assert len(sep.layers) == 2
        want = sum(_reference_penalty(z.unsqueeze(0), "p", 0.5, 1.0, "paper", "position").sum() for z in sep.preactivations)
        assert sep.penalty().item() == pytest.approx(want.item()) and want.item() > 0
        assert want.item() != pytest.approx(sum(_reference_penalty(z.unsqueeze(0), "up", 0.5, 1.0, "paper", "channel").sum()
                                                for z in sep.preactivations).item())
    assert not net[0]._forward_hooks
    only = SeparationConstraint(net, layers=[net[2]])
    assert only.layers == [net[2]]
    with pytest.raises(RuntimeError, match="no forward pass"):
        only.penalty()


def _reference_penalty(z, kind, rho, margin, aggregation, conv_reduction, mask=None):
    """The formulas written out with autograd's amax/amin on one stacked tensor, per net."""
    if z.dim() > 3 and conv_reduction == "channel":
        zhi, zlo = z.amax((3, 4)), z.amin((3, 4))
    else:
        zhi = zlo = z
    out = []
    big = 1e30
    for k, (dim, part) in enumerate(((1, "u"), (2, "p"))):
        if part not in kind:
            continue
        hi_in, lo_in = zhi, zlo
        if mask is not None and part == "p":
            m = mask.bool().view(mask.shape[0], 1, mask.shape[1], *([1] * (zhi.dim() - 3)))
            hi_in, lo_in = zhi.masked_fill(~m, -big), zlo.masked_fill(~m, big)
        s = rho * torch.relu(margin - hi_in.amax(dim)) + (1 - rho) * torch.relu(margin + lo_in.amin(dim))
        if aggregation == "squared_sum":
            s = s.square()
        n = s[0].numel()
        if mask is not None and part == "u":
            mu = mask.view(mask.shape + (1,) * (s.dim() - 2)).to(s.dtype)
            s, n = s * mu, mu.expand_as(s).sum(tuple(range(1, s.dim())))
        dims = tuple(range(1, s.dim()))
        g = {"paper": s.sum(dims), "squared_sum": s.sum(dims), "mean": s.sum(dims) / n,
             "norm": torch.linalg.vector_norm(s, dim=dims)}[aggregation]
        out.append(g)
    return sum(out)


@pytest.mark.parametrize("kind", ["u", "p", "up"])
@pytest.mark.parametrize("aggregation", ["paper", "squared_sum", "mean", "norm"])
@pytest.mark.parametrize("conv_reduction", ["channel", "position"])
@pytest.mark.parametrize("masked", [False, True])
def test_penalty_and_gradient_equal_the_written_out_formulas(kind, aggregation, conv_reduction, masked):
    torch.manual_seed(3)
    for shape in ((3, 6, 4), (3, 5, 4, 3, 3)):  # dense and conv stacks of 3 nets
        z = (torch.randn(shape, dtype=torch.float64) * 0.8).requires_grad_(True)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool() if masked else None
        zr = z.detach().clone().requires_grad_(True)
        ref = _reference_penalty(zr, kind, 0.6, 1.0, aggregation, conv_reduction, mask)
        for ties in ("split", "first"):
            z.grad = None
            g_u, g_p = stacked_separation_penalty(z, kind, 0.6, 1.0, aggregation, conv_reduction, unit_mask=mask, ties=ties)
            got = sum(g for g in (g_u, g_p) if g is not None)
            assert torch.allclose(got, ref)
            weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
            (gz,) = torch.autograd.grad((got * weights).sum(), z)
            (gr,) = torch.autograd.grad((ref * weights).sum(), zr, retain_graph=True)
            assert torch.allclose(gz, gr), (shape, ties)


def test_layers_as_a_sequence_equal_the_stacked_tensor():
    torch.manual_seed(4)
    for shape in ((7, 3), (5, 4, 6, 6)):
        zs = [(torch.randn(shape, dtype=torch.float64) * 0.5).requires_grad_(True) for _ in range(4)]
        stacked = torch.stack(zs).detach().requires_grad_(True)
        a = stacked_separation_penalty(zs)
        b = stacked_separation_penalty(stacked)
        assert all(torch.allclose(x, y) for x, y in zip(a, b))
        (a[0].sum() + 2 * a[1].sum()).backward()
        (b[0].sum() + 2 * b[1].sum()).backward()
        for k, z in enumerate(zs):
            assert torch.allclose(z.grad, stacked.grad[k])


def test_conv_gradient_reaches_only_the_extreme_positions_and_splits_their_ties():
    z = torch.full((2, 1, 3, 3), 0.5, requires_grad=True)  # 9 tied positions per (point, channel)
    with torch.no_grad():
        z[0, 0, 1, 1] = 0.9  # the unique max of point 0 ...
        z[1, 0, 0, 0] = -0.2  # ... and the unique min of point 1
    separation_penalty(z, "u").backward()
    # unit max 0.9 (point 0, centre): d/dmax = -1/2; unit min -0.2 (point 1, corner): d/dmin = +1/2
    expected = torch.zeros(2, 1, 3, 3)
    expected[0, 0, 1, 1], expected[1, 0, 0, 0] = -0.5, 0.5
    assert torch.equal(z.grad, expected)
    z.grad = None
    separation_penalty(z, "p").backward()
    # point 0: max 0.9 unique (-1/2), min 0.5 shared by its 8 other positions (+1/2 / 8);
    # point 1: max 0.5 shared by 8 positions (-1/2 / 8), min -0.2 unique (+1/2)
    expected = torch.full((2, 1, 3, 3), 0.0)
    expected[0] = 0.5 / 8
    expected[0, 0, 1, 1] = -0.5
    expected[1] = -0.5 / 8
    expected[1, 0, 0, 0] = 0.5
    assert torch.allclose(z.grad, expected)


def test_no_active_hinge_gives_a_zero_gradient():
    z = torch.tensor([[3.0, -3.0], [-3.0, 3.0]]).view(2, 2, 1, 1).expand(2, 2, 2, 2).clone().requires_grad_(True)
    pen = separation_penalty(z, "up")
    assert pen.item() == 0.0
    pen.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_channels_last_feature_maps_give_the_same_penalty_and_gradient():
    torch.manual_seed(5)
    zs = [(torch.randn(6, 3, 5, 5) * 0.4) for _ in range(2)]
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        ts = [z.clone(memory_format=fmt).requires_grad_(True) for z in zs]
        g_u, g_p = stacked_separation_penalty(ts)
        (g_u.sum() + g_p.sum()).backward()
        grads.append(([t.grad for t in ts], g_u.detach(), g_p.detach()))
        assert all(t.grad.is_contiguous(memory_format=fmt) for t in ts)
    (ga, ua, pa), (gb, ub, pb) = grads
    assert torch.allclose(ua, ub) and torch.allclose(pa, pb)
    assert all(torch.allclose(a, b) for a, b in zip(ga, gb))
    assert any(torch.count_nonzero(a) > 0 for a in ga)


def test_cpu_reductions_see_positions_as_one_innermost_block():
    from alive.functional import _positions_innermost

    z = torch.randn(4, 6, 5, 5)
    assert _positions_innermost(z, 2) is z
    stacked = z.view(4, 2, 3, 5, 5).transpose(0, 1)  # the grid's (nets, points, units, H, W) view
    assert _positions_innermost(stacked, 3) is stacked
    cl = z.contiguous(memory_format=torch.channels_last)
    moved = _positions_innermost(cl, 2)
    assert moved is not cl and moved.is_contiguous() and torch.equal(moved, z)


def test_bfloat16_tie_counts_are_exact():
    z = torch.zeros(1, 257, 1, dtype=torch.bfloat16, requires_grad=True)  # 257 tied points
    (g_u, _) = stacked_separation_penalty(z, "u", rho=1.0, ties="split")
    g_u.sum().backward()
    assert z.grad.float().sum().item() == pytest.approx(-1.0, abs=1e-3)  # a rounded count of 256 gives -1.0039


def test_padded_units_never_leak_into_a_point_even_when_not_finite():
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[[0.3, -0.2, inf], [0.1, 0.5, nan]]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]]).bool()
    for ties in ("split", "first"):
        _, g_p = stacked_separation_penalty(z, "p", unit_mask=mask, ties=ties)
        # point 0: max 0.3, min -0.2 -> (0.7 + 0.8) / 2; point 1: max 0.5, min 0.1 -> (0.5 + 1.1) / 2
        assert g_p.item() == pytest.approx(0.75 + 0.8)


@pytest.mark.parametrize("sparse", [False, True])
def test_bfloat16_position_tie_counts_are_exact_on_both_gradient_paths(sparse):
    z = torch.zeros(1, 1, 17, 17, dtype=torch.bfloat16, requires_grad=True)  # 289 tied positions, one point
    (g_u, _) = stacked_separation_penalty([z], "u", rho=1.0, sparse_grad=sparse)
    (grad,) = torch.autograd.grad(g_u.sum(), [z])
    assert grad.is_sparse == sparse
    grad = grad.to_dense().float()
    assert torch.all(grad == grad[0, 0, 0, 0]) and grad.sum().item() == pytest.approx(-1.0, abs=2e-3)


def test_sparse_gradient_of_feature_maps_equals_the_dense_one_with_ties():
    torch.manual_seed(7)
    zs = [(torch.randn(5, 3, 4, 4) * 0.1).round(decimals=1) for _ in range(2)]  # every hinge active; ties
    zs[0][1, 2], zs[0][2, 1] = 0.9, -0.9  # extremes tied over all 16 positions of their (point, unit)
    grads = {}
    for sparse in (False, True):
        ts = [z.clone().requires_grad_(True) for z in zs]
        g_u, g_p = stacked_separation_penalty(ts, sparse_grad=sparse)
        parts = torch.autograd.grad((g_u * torch.tensor([1.0, 2.0])).sum() + g_p.sum(), ts)
        assert all(p.is_sparse == sparse for p in parts)
        grads[sparse] = [p.to_dense() for p in parts]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[False], grads[True]))
    assert all(torch.count_nonzero(a) > 0 for a in grads[False])


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("ties", ["split", "first"])
def test_conv_models_take_the_sparse_penalty_gradient_and_match_the_dense_path(fmt, ties, monkeypatch):
    import alive.functional as AF
    from alive.models import RectCNN

    torch.manual_seed(3)
    a, b = (RectCNN(1, 10, 12, depth=3, width=4).to(memory_format=fmt) for _ in range(2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 1, 12, 12).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (8,))
    calls = []
    original = AF._sparse_spread
    monkeypatch.setattr(AF, "_sparse_spread", lambda *args: calls.append(1) or original(*args))
    grads = []
    for net, sparse in ((a, False), (b, True)):
        sep = SeparationConstraint(net, kind="up", weight=0.5, ties=ties)
        loss = nn.functional.cross_entropy(net(x), y)
        if not sparse:
            sep._captured[:], sep._densified[:] = sep._raw, [False] * len(sep._raw)  # the dense path, as accelerators take it
        (loss + sep.penalty()).backward()
        grads.append([p.grad for p in net.parameters()])
        sep.remove()
    assert len(calls) == 3  # one per constrained conv layer, on the sparse side only
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(*grads))
    # the penalty alone: its sparse gradient reaches the convolutions dense (no other gradient to add to)
    b.zero_grad()
    with SeparationConstraint(b, kind="up", ties=ties) as sep:
        b(x)
        sep.penalty().backward()
    first = b.features[0][0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("conv", [False, True])
def test_outputs_modified_in_place_are_refused_with_a_clear_error(conv):
    layer, head = (nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 3)) if conv else (nn.Linear(3, 4), nn.Linear(4, 2))
    net = nn.Sequential(layer, nn.ReLU(inplace=True), head)
    x = torch.randn(4, 1, 8, 8) if conv else torch.randn(4, 3)
    with SeparationConstraint(net, kind="up") as sep:
        net(x)
        with pytest.raises(RuntimeError, match="modified in place"):
            sep.penalty()
    net[1] = nn.ReLU()
    with SeparationConstraint(net, kind="up") as sep:
        net(x)
        (z,) = sep.preactivations
        conv = "channel" if conv else "position"
        assert sep.penalty().item() == pytest.approx(_reference_penalty(z.unsqueeze(0), "up", 0.5, 1.0, "paper", conv).item())


def _cnn_pair(fmt=torch.contiguous_format):
    from alive.models import RectCNN

    torch.manual_seed(5)
    a, b = (RectCNN(1, 10, 12, depth=3, width=4).to(memory_format=fmt) for _ in range(2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 1, 12, 12).contiguous(memory_format=fmt)
    return a, b, x, torch.randint(0, 10, (8,))


def _written_out_penalty(sep):
    """λ·(g_U + g_P) of a constraint's captured maps through the reference formulas (autograd's amax)."""
    return sep.weight * sum(
        _reference_penalty(z.unsqueeze(0), sep.kind, sep.rho, sep.margin, sep.aggregation, sep.conv_reduction).sum()
        for z in sep.preactivations)


def test_gradients_with_respect_to_the_captured_preactivations_are_dense_and_exact():
    net, _, x, _ = _cnn_pair()
    with SeparationConstraint(net, kind="up", weight=1.0) as sep:
        net(x)
        zs = sep.preactivations
        got = torch.autograd.grad(sep.penalty(), zs, retain_graph=True)
        want = torch.autograd.grad(_written_out_penalty(sep), zs)
    assert not any(g.is_sparse for g in got)
    assert all(torch.allclose(g, w, atol=1e-7) and w.abs().sum() > 0 for g, w in zip(got, want))


def test_second_order_gradients_through_the_penalty_of_conv_maps():
    """A gradient-norm regulariser (create_graph) differentiates the penalty's gradient itself."""
    a, b, x, y = _cnn_pair()
    results = []
    for net, penalty in ((a, SeparationConstraint.penalty), (b, _written_out_penalty)):
        with SeparationConstraint(net, kind="up", weight=0.5) as sep:
            loss = nn.functional.cross_entropy(net(x), y) + penalty(sep)
            grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
            sum(g.square().sum() for g in grads).backward()
        results.append([p.grad for p in net.parameters()])
    assert all(torch.allclose(g, h, atol=1e-5) for g, h in zip(*results))
    assert results[0][0].abs().sum() > 0


def test_torch_func_grad_and_vmap_over_models_with_a_constraint():
    from torch.func import functional_call, grad, stack_module_state, vmap

    a, b, x, y = _cnn_pair()
    torch.manual_seed(6)
    for p in b.parameters():
        p.data.normal_(0, 0.3)
    sep = SeparationConstraint(a, kind="up", weight=0.5)

    def loss(params, buffers):
        return nn.functional.cross_entropy(functional_call(a, (params, buffers), (x,)), y) + sep.penalty()

    params, buffers = stack_module_state([a, b])
    batched = vmap(grad(loss))(params, buffers)
    single = grad(loss)(dict(a.named_parameters()), dict(a.named_buffers()))
    for k, net in enumerate((a, b)):
        with SeparationConstraint(net, kind="up", weight=0.5) as eager:
            (nn.functional.cross_entropy(net(x), y) + eager.penalty()).backward()
        for name, p in net.named_parameters():
            assert torch.allclose(batched[name][k], p.grad, atol=1e-5), name
            if k == 0:
                assert torch.allclose(single[name], p.grad, atol=1e-5), name
    sep.remove()


def test_compiled_models_keep_the_dense_penalty_gradient():
    a, b, x, y = _cnn_pair()
    for model, net in ((torch.compile(a), a), (b, b)):
        with SeparationConstraint(net, kind="up", weight=0.5) as sep:
            (nn.functional.cross_entropy(model(x), y) + sep.penalty()).backward()
    assert all(torch.allclose(p.grad, q.grad, atol=1e-5) for p, q in zip(a.parameters(), b.parameters()))
    assert a.features[0][0].weight.grad.abs().sum() > 0


def test_compiled_dense_models_are_not_refused_as_modified_in_place():
    # a compiled graph writes the Linear outputs after its traced hooks read their version
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    b = copy.deepcopy(a)
    x = torch.randn(5, 3)
    for model, net in ((torch.compile(a), a), (b, b)):
        with SeparationConstraint(net, kind="up", weight=0.5) as sep:
            (model(x).square().mean() + sep.penalty()).backward()
    assert all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_inference_mode_forward_and_penalty():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    with SeparationConstraint(net, weight=0.5) as sep:
        with torch.no_grad():
            net(x)
            want = sep.penalty()
        with torch.inference_mode():  # e.g. Lightning's validation loop
            net(x)
            got = sep.penalty()
        assert torch.equal(got, want) and want > 0


def test_deepcopy_and_pickle_of_a_constrained_model_after_a_forward():
    import io
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    sep = SeparationConstraint(net, weight=0.5)
    net(x)
    want = sep.penalty().item()
    twin = copy.deepcopy(net)  # e.g. an EMA or best-so-far copy
    torch.save(net, io.BytesIO())
    assert torch.equal(twin(x), net(x))
    assert sep.penalty().item() == want and len(sep.preactivations) == 1  # the original is untouched
    copied = twin[0].forward.constraint
    assert twin[0].forward.layer is twin[0] and net[0].forward.layer is net[0]
    assert copied is not sep and len(copied.preactivations) == 1  # the copy's own constraint captured its own pass
    assert copied.preactivations[0] is not sep.preactivations[0]
    sep.remove()


def test_layers_weight_and_margin_are_checked_early():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="not part of the model"):
        SeparationConstraint(net, layers=[nn.Linear(3, 4)])
    with pytest.raises(TypeError, match="takes the model's modules"):
        SeparationConstraint(net, layers=["0"])
    with pytest.raises(ValueError, match="twice"):
        SeparationConstraint(net, layers=[net[0], net[0]])
    for kw in ({"weight": float("nan")}, {"weight": float("inf")}, {"margin": float("nan")}):
        with pytest.raises(ValueError, match="finite"):
            SeparationConstraint(net, **kw)
    rnn = nn.Sequential(nn.LSTM(3, 4))
    with SeparationConstraint(rnn, layers=[rnn[0]]):
        with pytest.raises(TypeError, match="returned a tuple"):
            rnn(torch.randn(2, 5, 3))


def test_warns_when_the_presumed_output_layer_runs_before_constrained_layers():
    class HeadFirst(nn.Module):  # the head is registered first, called last
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    net = HeadFirst()
    with SeparationConstraint(net) as sep:
        assert sep.layers == [net.head]
        net(torch.randn(5, 3))
        with pytest.warns(UserWarning, match="ran before constrained layers"):
            sep.penalty()
    ordinary = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with SeparationConstraint(ordinary) as sep, warnings.catch_warnings():
        warnings.simplefilter("error")
        ordinary(torch.randn(5, 3))
        sep.penalty()
