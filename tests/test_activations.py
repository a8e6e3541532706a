import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import alive
from alive import functional as AF
from alive import native
from alive.activations import (
    Linked,
    LinkedPReLU,
    LinkedReLU,
    available_activations,
    channel_factor,
    check_linkage,
    display_name,
    is_activation,
    linkage_table,
    make_activation,
    parse_activation,
    widen,
)


def test_mirror_relu_values_and_layout():
    z = torch.tensor([[-2.0, 3.0, 0.0]])
    out = Linked("relu")(z)
    assert out.tolist() == [[0.0, 3.0, 0.0, 2.0, 0.0, 0.0]]  # all relu(z) channels first


def test_minmax_relu_is_max_and_min():
    z = torch.tensor([[-2.0, 3.0]])
    out = Linked("relu", policy="minmax")(z)
    assert out.tolist() == [[0.0, 3.0, -2.0, 0.0]]


@pytest.mark.parametrize("shape,dim,channels_last", [
    ((5, 7, 4, 4), 1, False), ((5, 7, 4, 4), 1, True), ((6, 9), 1, False), ((3, 4, 5), -1, False)])
def test_fast_linked_relu_matches_naive_cat_in_value_and_gradient(shape, dim, channels_last):
    z = torch.randn(shape, dtype=torch.float64)
    z.view(-1)[::3] = 0.0  # both members have derivative 0 at z == 0
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    z.requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    naive = torch.cat((torch.relu(z2), torch.relu(-z2)), dim)
    g = torch.randn(naive.shape, dtype=torch.float64)
    fast = AF._LinkedReLU.apply(z, dim)  # the large-tensor path, forced on a small tensor
    assert torch.equal(fast, naive)
    fast.backward(g)
    naive.backward(g)
    assert torch.equal(z.grad, z2.grad)
    assert torch.autograd.gradcheck(lambda t: AF._LinkedReLU.apply(t, dim), (torch.randn(shape, dtype=torch.float64, requires_grad=True),))


@pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim,channels_last", [
    ((4, 6, 5, 3), 1, False), ((4, 6, 5, 3), 1, True), ((4, 6, 5, 3), 2, True), ((4, 6, 5, 3), 0, False),
    ((7, 9), -1, False), ((3, 17, 2), 1, False)])
def test_the_native_linked_relu_equals_the_pytorch_passes_exactly(dtype, shape, dim, channels_last):
    z = torch.randn(shape, dtype=dtype)
    z.view(-1)[::5] = 0.0
    z.view(-1)[1] = float("nan")
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    out_shape = list(shape)
    out_shape[dim] *= 2
    g = torch.randn(out_shape[::-1], dtype=dtype).permute(*reversed(range(len(shape))))  # a strided gradient
    runs = []
    for kernel in (True, False):
        t = z.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        with contextlib.nullcontext() if kernel else native.disabled():
            out = AF._LinkedReLU.apply(t, dim)
            out.backward(g)
        runs.append((out, t.grad))
    (a, ga), (b, gb) = runs
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.isnan(a).sum() == 2
    assert a.is_contiguous(memory_format=_fmt(z)) and ga.is_contiguous(memory_format=_fmt(z))
    assert torch.equal(ga.nan_to_num(7.0), gb.nan_to_num(7.0)) and ga.abs().sum() > 0


def _fmt(z):
    return torch.contiguous_format if z.is_contiguous() else torch.channels_last


def test_a_compiled_linked_relu_equals_eager():
    # (its out= halves are not traceable whole: the function runs eagerly between graphs)
    z = torch.randn(3, 4, 5, requires_grad=True)
    compiled = torch.compile(lambda t: AF._LinkedReLU.apply(t, 1).sin(), backend="aot_eager")
    out = compiled(z)
    want = torch.cat((torch.relu(z), torch.relu(-z)), 1).sin()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), z)[0], torch.autograd.grad(want.sum(), z)[0])


def test_the_linked_relu_kernel_leaves_double_backward_to_the_built_ins():
    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, 5, dtype=torch.float64)

    def gradient_norm(f):
        (g,) = torch.autograd.grad((f(z) * w).square().sum(), z, create_graph=True)
        return torch.autograd.grad(g.square().sum(), z)[0]

    fused = gradient_norm(lambda t: AF._LinkedReLU.apply(t, 1))
    naive = gradient_norm(lambda t: torch.cat((torch.relu(t), torch.relu(-t)), 1))
    torch.testing.assert_close(fused, naive)
    assert fused.abs().sum() > 0


def test_linked_relu_takes_the_fused_path_only_on_large_tensors():
    big = torch.randn(AF._SMALL_LINKED + 1, 2, requires_grad=True)
    small = torch.randn(4, 3, requires_grad=True)
    assert type(AF.linked_relu(big, 1).grad_fn).__name__ == "_LinkedReLUBackward"
    assert type(AF.linked_relu(small, 1).grad_fn).__name__ == "CatBackward0"
    out = AF.linked_relu(big, 1)
    assert torch.equal(out, torch.cat((torch.relu(big), torch.relu(-big)), 1))


def test_linked_dim_and_shape():
    x = torch.randn(2, 5, 3)
    assert Linked("selu", dim=-1)(x).shape == (2, 5, 6)
    assert Linked("selu", dim=1)(x).shape == (2, 10, 3)


def test_custom_three_way_linkage():
    act = Linked([torch.relu, lambda z: torch.relu(-z), torch.tanh])
    assert act.num_members == 3 and act.policy == "custom"
    z = torch.randn(2, 4)
    assert torch.equal(act(z), torch.cat((torch.relu(z), torch.relu(-z), torch.tanh(z)), 1))  # members in order


def test_linkage_needs_two_members():
    with pytest.raises(ValueError, match="at least 2 members"):
        Linked([torch.relu])
    with pytest.raises(ValueError, match="at least 2 members"):
        AF.linked(torch.zeros(1, 1), [torch.relu])


def test_unknown_names_and_policy_fail_early_with_choices():
    with pytest.raises(ValueError, match="valid names are .*relu"):
        make_activation("relux")
    with pytest.raises(ValueError, match="unknown linkage policy"):
        Linked("relu", policy="diagonal")
    with pytest.raises(TypeError):
        parse_activation(3)
    with pytest.raises(ValueError):
        Linked("lk-relu")


def test_linked_prelu_has_independent_parameters_and_init():
    act = LinkedPReLU(num_parameters=3, init=0.0)
    params = list(act.parameters())
    assert len(params) == 2 and all(p.shape == (3,) and torch.all(p == 0) for p in params)
    assert params[0] is not params[1]
    assert torch.all(make_activation("prelu").weight == 0.25)  # PyTorch default
    assert torch.all(make_activation("lk-prelu", init=0.0).members[0].weight == 0.0)


def test_registry_names_aliases_and_factor():
    names = available_activations()
    for base in ["relu", "leaky_relu", "prelu", "selu", "swish", "elu", "gelu", "tanh", "sigmoid", "softplus"]:
        assert base in names and "lk-" + base in names
    assert parse_activation("SiLU") == ("swish", False)
    assert parse_activation("lk-selu") == ("selu", True)
    assert channel_factor("lk-relu") == 2 and channel_factor("relu") == 1
    assert display_name("lk-prelu") == "LK-PReLU"
    assert is_activation(nn.ReLU()) and is_activation(Linked("relu")) and not is_activation(nn.Identity())


def test_aliases_and_repr():
    act = LinkedReLU()
    assert "base=relu" in repr(act) and "policy=mirror" in repr(act) and "members=2" in repr(act)
    z = torch.randn(2, 3)
    torch.testing.assert_close(alive.LinkedSwish()(z), torch.cat((F.silu(z), F.silu(-z)), 1))


def test_check_linkage_cases():
    assert check_linkage("lk-relu").ok
    bad = check_linkage(["relu", "relu"])
    assert not bad.ok
    assert bad.failures.max() < 0 and bad.failures.min() == pytest.approx(-10.0)
    assert 0.45 < bad.flat_fraction < 0.55
    assert check_linkage("lk-sigmoid").ok
    assert not check_linkage("relu").ok
    assert check_linkage(Linked("selu", "mirror")).ok
    assert check_linkage(Linked("relu", "minmax")).ok


def test_linkage_table_has_every_activation():
    t = linkage_table()
    assert set(available_activations()) == set(t.index)
    assert t.loc["lk-relu", "linked"] and not t.loc["relu", "linked"]


@pytest.mark.parametrize("width,expected", [(4, 5), (32, 45), (64, 90), (512, 724), (50, 70)])
def test_widen_is_int_of_sqrt2(width, expected):
    assert widen(width) == expected == int(width * math.sqrt(2))


@pytest.mark.parametrize("bad", [0, -3])
def test_widen_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        widen(bad)


def test_widen_rejects_non_int():
    with pytest.raises(TypeError):
        widen(4.0)


def test_linked_relu_under_torch_func_at_any_size_equals_the_eager_fused_gradient():
    for z in (torch.randn(4, 3), torch.randn(512, 300)):  # small, and the fused path's size
        g = torch.func.grad(lambda t: AF.linked_relu(t, 1).square().sum())(z)  # transforms take the composition
        ref = torch.func.grad(lambda t: torch.cat((torch.relu(t), torch.relu(-t)), 1).square().sum())(z)
        torch.testing.assert_close(g, ref)
        assert torch.equal(g, 2 * z)  # d/dz of relu(z)^2 + relu(-z)^2 = z^2
        eager = z.clone().requires_grad_(True)
        AF.linked_relu(eager, 1).square().sum().backward()  # the hand-written fused backward
        assert torch.equal(eager.grad, g)



def test_in_place_members_are_refused():
    # an in-place member would overwrite the pre-activation the other members read
    for make in (lambda: Linked(nn.ReLU(inplace=True)), lambda: Linked("selu", inplace=True),
                 lambda: Linked([nn.ReLU(inplace=True), nn.Tanh()]), lambda: Linked("relu", policy="minmax", inplace=True)):
        with pytest.raises(ValueError, match="in place"):
            make()
    z = torch.tensor([[-2.0, 3.0]])
    assert torch.equal(Linked(nn.ReLU())(z), torch.tensor([[0.0, 3.0, 2.0, 0.0]]))


@pytest.mark.parametrize("numel", [6, 1 << 18])  # the composed and the fused path
def test_linked_dim_out_of_range_is_refused_at_any_size(numel):
    z = torch.randn(numel // 2, 2)
    for dim in (2, -3):
        with pytest.raises(IndexError, match="out of range"):
            Linked("relu", dim=dim)(z)
        with pytest.raises(IndexError, match="out of range"):
            Linked("tanh", dim=dim)(z)


def test_registering_a_broken_factory_leaves_no_entry_and_reregistering_relu_is_honoured(monkeypatch):
    from alive import activations as A

    for table in ("_REGISTRY", "_ALIASES", "_TYPES", "_FAST_RELU"):
        monkeypatch.setattr(A, table, type(getattr(A, table))(getattr(A, table)))  # restored after the test
    with pytest.raises(ValueError, match="cannot be called without arguments"):
        alive.register_activation("needs_arg", lambda slope: nn.LeakyReLU(slope))
    assert "needs_arg" not in alive.available_activations()
    with pytest.raises(TypeError, match="must return an nn.Module"):
        alive.register_activation("not_a_module", lambda: torch.relu)
    assert "not_a_module" not in alive.available_activations()

    class Shifted(nn.Module):
        def forward(self, z):
            return torch.relu(z - 1)

    alive.register_activation("relu", Shifted)
    assert torch.equal(Linked("relu")(torch.tensor([[3.0, -3.0]])), torch.tensor([[2.0, 0.0, 0.0, 2.0]]))


def test_check_linkage_probes_every_channel_of_per_channel_members():
    lk = alive.LinkedPReLU(3, init=0.0)
    assert check_linkage(lk).ok  # mirror PReLU with slope 0 is mirror ReLU: linked
    with torch.no_grad():
        lk.members[0].weight.copy_(torch.tensor([0.0, 0.5, 0.0]))
    assert check_linkage(lk).ok
    flat = Linked([nn.PReLU(3, init=0.0), nn.PReLU(3, init=0.0)])  # both flat for z < 0 in every channel
    rep = check_linkage(flat)
    assert not rep.ok and rep.failures.max() < 0 and rep.flat_fraction == pytest.approx(0.5)


def test_docstring_examples_run():
    import doctest
    import importlib
    import pkgutil

    attempted = 0
    for info in pkgutil.iter_modules(alive.__path__):
        if info.name == "__main__":
            continue
        result = doctest.testmod(importlib.import_module(f"alive.{info.name}"), optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, info.name
        attempted += result.attempted
    assert attempted >= 13
