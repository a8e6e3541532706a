"""The native separation kernel (alive.native): the same values and gradients as the PyTorch
path, its use by the constraint and the grid engine, and its build, cache and fallback."""
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import alive
from alive import native
from alive.functional import _BIG, dense_separation_penalty, native_separation_penalty, stacked_separation_penalty
from alive.models import MLP, RectCNN

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernel")
pytestmark = needs_native


def pytorch_total(z, kind, rho, margin, aggregation, ties, conv_reduction="channel"):
    g_u, g_p = stacked_separation_penalty(z, kind, rho, margin, aggregation, conv_reduction, ties=ties)
    return sum(g.sum() for g in (g_u, g_p) if g is not None)


def flags(kind, n, dtype):
    return [torch.full((n,), float(k in kind), dtype=dtype) for k in "up"]


def tolerances(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 9, 4), (3, 7, 3, 5, 4)], ids=["dense", "maps"])
@pytest.mark.parametrize("ties", ["split", "first"])
@pytest.mark.parametrize("aggregation", ["paper", "squared_sum", "mean"])
@pytest.mark.parametrize("kind", ["up", "u", "p"])
def test_native_penalty_equals_the_pytorch_path(dtype, shape, ties, aggregation, kind):
    # integer values: many tied extremes, which split or first must treat as PyTorch does
    z = torch.randn(shape, dtype=dtype) * (1.5 if len(shape) == 3 else 0.3)  # maps: extremes over positions too
    z[:, :, 0] *= 0.2  # a unit whose hinges are active
    z = z.round().requires_grad_()
    ref = pytorch_total(z, kind, 0.3, 1.0, aggregation, ties)
    (g_ref,) = torch.autograd.grad(ref, z)
    out = native_separation_penalty(z, *flags(kind, shape[0], dtype), 0.3, 1.0, aggregation, ties, total=True)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_NativePenaltyBackward"
    (g,) = torch.autograd.grad(out, z)
    torch.testing.assert_close(out, ref, **tolerances(dtype))
    torch.testing.assert_close(g, g_ref, **tolerances(dtype))
    assert g.abs().sum() > 0


@pytest.mark.parametrize("width", range(1, 10))
@pytest.mark.parametrize("ties", ["split", "first"])
def test_every_layer_width_and_a_scaled_total_equal_the_pytorch_path(width, ties):
    # 1 to 8 units: the kernel's constant-width transposes; 9: its general ones
    z = (torch.randn(3, 21, width) * 1.5).round().requires_grad_()
    ones = torch.ones(3)
    out = native_separation_penalty(z, ones, ones, 0.3, 1.0, "paper", ties, total=True, scale=0.7)
    ref = 0.7 * pytorch_total(z, "up", 0.3, 1.0, "paper", ties)
    assert out.dim() == 0
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, z)[0], torch.autograd.grad(ref, z)[0])
    per_net = native_separation_penalty(z, ones, ones, 0.3, 1.0, "paper", ties)
    torch.testing.assert_close(out, 0.7 * per_net.sum())


@pytest.mark.parametrize("total", [True, False])
def test_the_gradient_made_with_the_value_serves_a_retained_graph_twice_and_any_upstream_gradient(total):
    z = (torch.randn(4, 15, 3) * 1.5).round().requires_grad_()
    ones = torch.ones(4)
    out = native_separation_penalty(z, ones, ones, 0.3, 1.0, "paper", "split", total=total, scale=0.5)
    ref = stacked_separation_penalty(z, "up", 0.3, 1.0, "paper")
    ref = 0.5 * sum(r.sum() for r in ref) if total else ref[0] + ref[1]
    upstream = torch.tensor(2.5) if total else torch.randn(4)
    (first,) = torch.autograd.grad(out, z, upstream, retain_graph=True)
    (again,) = torch.autograd.grad(out, z, upstream)
    (want,) = torch.autograd.grad(ref, z, upstream)
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(again, want)
    assert want.abs().sum() > 0
    asked = []
    kernel = native.separation_penalty
    try:
        native.separation_penalty = lambda *a: asked.append(a[-1]) or kernel(*a)
        with torch.no_grad():  # gradient mode off where it is called: no gradient is made
            assert native_separation_penalty(z, ones, ones, total=True).grad_fn is None
        native_separation_penalty(z.detach(), ones, ones, total=True)  # nothing requires one
        native_separation_penalty(z, ones, ones, total=True)
    finally:
        native.separation_penalty = kernel
    assert asked == [False, False, True]


def test_a_layer_too_large_for_the_kept_work_buffer_is_computed_alike():
    z = (torch.randn(2, 700, 300) * 3).requires_grad_()  # a work buffer of several MB: allocated per call
    ones = torch.ones(2)
    out = native_separation_penalty(z, ones, ones, total=True)
    ref = pytorch_total(z, "up", 0.5, 1.0, "paper", "split")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, z)[0], torch.autograd.grad(ref, z)[0])


def test_layers_as_a_sequence_and_per_net_values():
    zs = [torch.randn(11, 5, requires_grad=True) for _ in range(4)]
    ones = torch.ones(4)
    per_net = native_separation_penalty(zs, ones, ones)
    g_u, g_p = stacked_separation_penalty(torch.stack(zs), "up")
    torch.testing.assert_close(per_net, g_u + g_p)
    per_net.sum().backward()
    assert all(z.grad is not None and z.grad.shape == (11, 5) for z in zs)


def test_a_zero_coefficient_leaves_a_non_finite_term_out():
    z = torch.randn(2, 6, 3)
    z[0, :, 0] = -torch.inf  # unit 0's max is -inf: its Sep-U slack is inf
    out = native_separation_penalty(z, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(out[0])
    assert torch.isinf(native_separation_penalty(z, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))[0])
    # a net with both coefficients 0 (the grid's plain ReLU nets share stacks with Sep-* nets) is skipped
    z = torch.randn(2, 6, 3)
    z[0, 2, 1] = torch.nan
    z.requires_grad_()
    out = native_separation_penalty(z, torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    out.sum().backward()
    assert out[0] == 0 and torch.isfinite(out[1]) and not z.grad[0].any() and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("ties", ["split", "first"])
def test_nan_pre_activations_give_the_pytorch_path_nan_penalty_and_gradient(ties):
    z = torch.randn(3, 8, 4) * 0.5
    z[1, 5, 2] = torch.nan
    z.requires_grad_()
    ones = torch.ones(3)
    out = native_separation_penalty(z, ones, ones, ties=ties)
    (g,) = torch.autograd.grad(out.sum(), z)
    ref_u, ref_p = stacked_separation_penalty(z, "up", ties=ties)
    (g_ref,) = torch.autograd.grad((ref_u + ref_p).sum(), z)
    assert torch.isnan(out[1]) and torch.isnan(ref_u[1] + ref_p[1])
    torch.testing.assert_close(out[[0, 2]], (ref_u + ref_p)[[0, 2]])
    torch.testing.assert_close(g, g_ref, equal_nan=True)
    assert torch.isnan(g[1]).any() == (ties == "split")  # "first" gives the NaN's own position the gradient


@pytest.mark.parametrize("aggregation", ["paper", "squared_sum", "mean"])
def test_padded_grid_stacks_equal_the_pytorch_fast_path(aggregation):
    n, points, width = 7, 13, 5
    real = torch.tensor([1, 2, 5, 3, 5, 4, 1], dtype=torch.int32)
    mask = (torch.arange(width) < real[:, None]).float()
    z = ((torch.randn(n, points, width) * 1.5).round() * mask[:, None]).requires_grad_()  # padded units are 0
    cu, cp = torch.rand(n), torch.rand(n)
    kw = dict(padded=(1 - mask).unsqueeze(1) * _BIG, unit_weight=mask, real_units=real)
    out = dense_separation_penalty(z, cu, cp, 0.4, 1.0, aggregation, **kw)
    assert type(out.grad_fn).__name__ == "_NativePenaltyBackward"
    grad = torch.randn(n)
    (g,) = torch.autograd.grad(out, z, grad)
    with native.disabled():
        ref = dense_separation_penalty(z, cu, cp, 0.4, 1.0, aggregation, **kw)
        assert type(ref.grad_fn).__name__ != "_NativePenaltyBackward"
        (g_ref,) = torch.autograd.grad(ref, z, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    assert (g * (1 - mask[:, None])).abs().sum() == 0  # padded units get nothing


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed view"])
def test_second_order_gradients_equal_the_pytorch_path(strided):
    z = torch.randn(4, 3, 9, dtype=torch.float64, requires_grad=True)
    ones = torch.ones(4, dtype=torch.float64)

    def second(f):
        t = z.transpose(1, 2) if strided else z.reshape(4, 9, 3)  # the kernel reads a copy of a strided view
        (g,) = torch.autograd.grad(f(t), z, create_graph=True)
        return torch.autograd.grad(g.square().sum(), z)[0]

    native_h = second(lambda t: native_separation_penalty(t, ones, ones, aggregation="squared_sum", total=True))
    torch_h = second(lambda t: pytorch_total(t, "up", 0.5, 1.0, "squared_sum", "split"))
    torch.testing.assert_close(native_h, torch_h)
    assert native_h.abs().sum() > 0


def test_the_constraint_uses_the_kernel_once_per_group_of_layers(monkeypatch):
    monkeypatch.setattr(native, "dense_penalty", lambda: None)  # the Python node (the C++ one: below)
    calls = []
    forward = native.separation_penalty
    monkeypatch.setattr(native, "separation_penalty", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k))
    torch.manual_seed(0)
    net = MLP(2, 2, depth=6, width=3)
    x = torch.randn(32, 2)
    sep = alive.SeparationConstraint(net, kind="up", weight=0.1)
    net(x)
    value = sep.penalty()
    assert calls == [(6, 32, 3)]  # every hidden layer has the shape (points, width)
    with native.disabled():
        net(x)
        torch.testing.assert_close(sep.penalty(), value)
    assert len(calls) == 1
    # layers of several widths: one call per width, and again one for all once they agree
    wide = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                         nn.Linear(4, 2))
    sep = alive.SeparationConstraint(wide, kind="up", weight=0.1)
    for _ in range(2):
        calls.clear()
        wide(x)
        value = sep.penalty()
        assert sorted(calls) == [(1, 32, 3), (2, 32, 4)]
        with native.disabled():
            torch.testing.assert_close(sep.penalty(), value)
    sep.remove()
    wide[0], wide[2] = nn.Linear(2, 4), nn.Linear(4, 4)
    sep = alive.SeparationConstraint(wide, kind="up", weight=0.1)
    calls.clear()
    wide(x)
    sep.penalty()
    assert calls == [(3, 32, 4)]


@pytest.mark.parametrize("kind", ["up", "u", "p"])
@pytest.mark.parametrize("ties", ["split", "first"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_constrained_models_get_the_same_gradients_with_and_without_the_kernel(kind, ties, model):
    def gradients():
        torch.manual_seed(3)
        net = (MLP(2, 2, depth=5, width=3) if model == "mlp" else RectCNN(1, 3, 8, depth=2, width=3)).double()
        x = torch.randn((24, 2) if model == "mlp" else (5, 1, 8, 8), dtype=torch.float64).round()
        sep = alive.SeparationConstraint(net, kind=kind, weight=0.5, ties=ties, rho=0.3)
        net(x)
        sep.penalty().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in net.parameters()]

    fast = gradients()
    with native.disabled():
        slow = gradients()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in fast) > 0


def test_it_does_not_apply_where_it_cannot_and_the_caller_falls_back():
    ones = torch.ones(2)
    assert native_separation_penalty(torch.randn(2, 5, 3).half(), ones, ones) is None
    assert native_separation_penalty(torch.randn(2, 5, 3), ones, ones, aggregation="norm") is None
    assert native_separation_penalty(torch.randn(2, 5, 3, 4, 4), ones, ones, conv_reduction="position") is None
    assert native_separation_penalty(torch.randn(2, 0, 3), ones, ones) is None
    assert native_separation_penalty(torch.randn(2, 5), ones, ones) is None  # not a stack
    assert native_separation_penalty([torch.randn(5, 3), torch.randn(4, 3)], ones, ones) is None
    with native.disabled():
        assert native_separation_penalty(torch.randn(2, 5, 3), ones, ones) is None
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).half()
    sep = alive.SeparationConstraint(net, kind="up")
    net(torch.randn(4, 2).half())
    assert sep.penalty().dtype == torch.float16


def test_unit_weights_without_real_units_and_differentiable_coefficients_take_the_pytorch_path():
    z = torch.randn(2, 6, 3)
    weight = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    cu = torch.tensor([1.0, 0.5], requires_grad=True)
    out = dense_separation_penalty(z, cu, torch.ones(2), unit_weight=weight)
    with native.disabled():
        torch.testing.assert_close(out, dense_separation_penalty(z, cu, torch.ones(2), unit_weight=weight))
    assert native_separation_penalty(z, cu, torch.ones(2)) is None
    (g,) = torch.autograd.grad(out.sum(), cu)
    assert g.abs().sum() > 0


def test_a_changed_kind_changes_the_penalty():
    net = MLP(2, 2, depth=3, width=3)
    x = torch.randn(16, 2)
    sep = alive.SeparationConstraint(net, kind="up")
    net(x)
    both = sep.penalty()
    sep.kind = "u"
    with native.disabled():
        only_u = sep.penalty()
    torch.testing.assert_close(sep.penalty(), only_u)
    assert not torch.isclose(only_u, both)


def test_a_backward_inside_disabled_finishes_what_the_kernel_started():
    z = torch.randn(3, 7, 4, requires_grad=True)
    out = native_separation_penalty(z, torch.ones(3), torch.ones(3), total=True)
    with native.disabled():
        assert not native.available()
        out.backward()
    assert native.available() and z.grad.abs().sum() > 0


def test_sizes_that_the_kernel_would_read_out_of_bounds_are_refused():
    z = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match=r"coef_u and coef_p must have shape \(nets,\) = \(3,\)"):
        native_separation_penalty(z, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match=r"real_units must lie in \[1, 4\]"):
        native_separation_penalty(z, torch.ones(3), torch.ones(3), real_units=torch.tensor([1, 5, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="real_units must be an int32 tensor"):
        native_separation_penalty(z, torch.ones(3), torch.ones(3), real_units=torch.tensor([1, 2, 3]))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    # (CXX=false: the C library's builds, without the C++ node's, which a test below builds)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CXX": "false", **env})


PROBE = """
import torch, alive
from alive import native
net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
sep = alive.SeparationConstraint(net, kind="up")
net(torch.randn(8, 2))
sep.penalty().backward()
print("available", native.available())
"""


def test_without_a_compiler_a_warning_says_so_once_and_training_goes_on(tmp_path):
    done = run_python(PROBE + "net(torch.randn(8, 2)); sep.penalty()\n", CC="false", ALIVE_CACHE=str(tmp_path), ALIVE_NATIVE="1")
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout
    assert done.stderr.count("the native kernels are not available") == 1
    assert "Set CC to a C compiler" in done.stderr and "ALIVE_CACHE" in done.stderr


def test_alive_native_0_turns_it_off_quietly_and_a_bad_value_is_refused(tmp_path):
    done = run_python(PROBE, ALIVE_NATIVE="0", ALIVE_CACHE=str(tmp_path))
    assert done.returncode == 0 and "available False" in done.stdout and "not available" not in done.stderr
    assert not any(tmp_path.iterdir())
    done = run_python(PROBE, ALIVE_NATIVE="maybe", ALIVE_CACHE=str(tmp_path))
    assert done.returncode != 0 and "ALIVE_NATIVE must be 0 or 1, got 'maybe'" in done.stderr


def test_a_damaged_cached_library_is_built_again_and_an_empty_build_is_refused(tmp_path):
    done = run_python(PROBE, ALIVE_CACHE=str(tmp_path), ALIVE_NATIVE="1")
    (built,) = (tmp_path / "native").glob("separation-*")
    built.write_bytes(b"cut short")
    done = run_python(PROBE, ALIVE_CACHE=str(tmp_path), ALIVE_NATIVE="1")
    assert "available True" in done.stdout and "not available" not in done.stderr, done.stderr
    assert built.stat().st_size > 1000
    done = run_python(PROBE, CC="true", ALIVE_CACHE=str(tmp_path / "other"), ALIVE_NATIVE="1")  # exits 0, writes nothing
    assert "available False" in done.stdout and "true wrote no library" in done.stderr
    assert not list((tmp_path / "other" / "native").glob("separation-*"))


def test_the_build_is_cached_per_source_and_reused(tmp_path):
    done = run_python(PROBE, ALIVE_CACHE=str(tmp_path), ALIVE_NATIVE="1")
    assert done.returncode == 0 and "available True" in done.stdout, done.stderr
    built = list((tmp_path / "native").glob("separation-*"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    done = run_python(PROBE, ALIVE_CACHE=str(tmp_path), ALIVE_NATIVE="1")
    assert "available True" in done.stdout
    assert list((tmp_path / "native").glob("separation-*")) == built and built[0].stat().st_mtime_ns == stamp


@pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,length", [(3, 12347), (20011, 5), (1, 70001)])
def test_the_linked_relu_kernel_gives_the_same_bits_in_any_number_of_parts(dtype, rows, length):
    # parts of a whole number of 64-byte lines, cut across rows: every element once, in its place
    z = torch.randn(rows, length, dtype=dtype)
    z.view(-1)[::7] = 0.0
    want = torch.cat((torch.relu(z), torch.relu(-z)), 1)
    g = torch.randn(rows, 2 * length, dtype=dtype)
    want_dz = torch.ops.aten.threshold_backward(g[:, :length], want[:, :length], 0) - \
        torch.ops.aten.threshold_backward(g[:, length:], want[:, length:], 0)
    forward, backward = native._kernel("linked_relu_forward", dtype), native._kernel("linked_relu_backward", dtype)
    for threads in (1, 2, 3, 5):
        out, dz = torch.full_like(want, 9.0), torch.full_like(z, 9.0)
        forward(z.data_ptr(), rows, length, out.data_ptr(), threads)
        backward(g.data_ptr(), out.data_ptr(), rows, length, dz.data_ptr(), threads)
        assert torch.equal(out, want) and torch.equal(dz, want_dz), threads


SHARED_POOL = PROBE + """
maps = {line.rsplit("/", 1)[-1].strip() for line in open("/proc/self/maps") if "/libgomp" in line}
print("gomp", sorted(maps), "openmp", native._shares_pytorch_openmp())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_kernels_share_pytorchs_openmp_runtime_and_build_serially_where_openmp_fails(tmp_path):
    done = run_python(SHARED_POOL, ALIVE_CACHE=str(tmp_path / "a"), ALIVE_NATIVE="1")
    assert "available True" in done.stdout, done.stderr
    if "openmp True" not in done.stdout:
        pytest.skip("PyTorch does not run on a libgomp.so.1 here: the kernels are serial")
    assert "gomp ['libgomp.so.1']" in done.stdout  # one runtime, one pool: PyTorch's
    (built,) = (tmp_path / "a" / "native").glob("separation-*")
    assert b"GOMP_parallel" in built.read_bytes()
    # a compiler without OpenMP: the serial library, and the next process does not try again
    log = tmp_path / "calls"
    cc = tmp_path / "cc-without-openmp"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *-fopenmp*) echo "no openmp" >&2; exit 1;; esac\n'
                  f'exec cc "$@"\n')
    cc.chmod(0o755)
    for _ in range(2):
        done = run_python(SHARED_POOL, CC=str(cc), ALIVE_CACHE=str(tmp_path / "b"), ALIVE_NATIVE="1")
        assert "available True" in done.stdout and "not available" not in done.stderr, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "-fopenmp" in calls[0] and "-fopenmp" not in calls[1]
    (failed,), (serial,) = ([p for p in (tmp_path / "b" / "native").glob("separation-*") if p.suffix == s] for s in (".failed", ".so"))
    assert "no openmp" in failed.read_text() and b"GOMP_parallel" not in serial.read_bytes()


def _maps(kind, dtype):
    torch.manual_seed(11)
    if kind == "conv1d":
        z = torch.randn(6, 5, 9, dtype=dtype)
    elif kind == "stacked":  # (nets, points, units, H, W)
        return (torch.randn(2, 6, 3, 4, 5, dtype=dtype) * 2).round()
    elif kind == "stacked view":  # the same from (points, nets·units, H, W): nets and points make no one stride
        return (torch.randn(6, 2 * 3, 4, 5, dtype=dtype) * 2).round().view(6, 2, 3, 4, 5).transpose(0, 1)
    elif kind.startswith("large"):  # split among threads (rows and gradients above the grain)
        z = (torch.randn(64, 8, 16, 16, dtype=dtype) * 2).round()
        z[5, 3, 7, 7] = float("nan")
        return z.contiguous(memory_format=torch.channels_last) if kind == "large channels-last" else z
    else:
        z = (torch.randn(7, 3, 5, 4, dtype=dtype) * 2).round()  # ties over positions
        z[1, 2] = 0.0  # a whole row tied
        z[3, 1, 2, 2] = float("nan")
        if kind == "channels-last":
            z = z.contiguous(memory_format=torch.channels_last)
        elif kind == "strided":  # positions one stride of 2 apart
            z = torch.cat((z, z), 3)[..., ::2]
        elif kind == "cropped":  # positions that make no single stride: the PyTorch path
            z = torch.cat((z, z), 3)[..., :4]
    return z


@pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["contiguous", "channels-last", "conv1d", "stacked", "stacked view", "strided", "cropped",
                                  "large", "large channels-last"])
@pytest.mark.parametrize("sparse", [False, True])
def test_position_extremes_and_their_gradient_equal_the_pytorch_path_bit_for_bit(dtype, kind, sparse):
    from alive.functional import _PositionExtremes, _native_maps

    z = _maps(kind, dtype)
    if kind.startswith("large"):
        assert native._threads(z.numel()) == torch.get_num_threads()
    layers = not kind.startswith("stacked")
    zs = [z, z * -0.5] if layers else [z]
    nan_row = (5, 3) if kind.startswith("large") else (3, 1) if kind in ("contiguous", "channels-last", "strided", "cropped") else None
    assert (_native_maps(z, 2 if layers else 3) is None) == (kind in ("cropped", "stacked view"))
    runs = []
    for kernel in (True, False):
        ts = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for t in zs]
        with contextlib.nullcontext() if kernel else native.disabled():
            hi, lo = _PositionExtremes.apply(layers, sparse, *ts)
            gh, gl = torch.zeros_like(hi), torch.zeros_like(lo)
            gh.view(-1)[::3], gl.view(-1)[1::4] = 0.5, -1.5  # a gradient at some rows, as active hinges give
            if nan_row is not None:  # the row holding a NaN: its gradient is NaN throughout
                gh[(0, *nan_row)], gl[(0, *nan_row)] = 1.0, -1.0
            grads = torch.autograd.grad((hi, lo), ts, (gh, gl))
        runs.append((hi, lo, [g.to_dense() if g.is_sparse else g for g in grads], [g.is_sparse for g in grads]))
    (ha, la, ga, sa), (hb, lb, gb, sb) = runs
    same = lambda a, b: torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan())  # noqa: E731
    assert same(ha, hb) and same(la, lb) and sa == sb == [sparse] * len(zs)
    assert all(same(a, b) for a, b in zip(ga, gb)) and all(a.abs().nan_to_num(0).sum() > 0 for a in ga)
    if nan_row is not None:
        assert ha.isnan().sum() == 2 and ga[0][nan_row].isnan().all() and not ga[0][0, 0].isnan().any()


@pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernel")
def test_position_extremes_of_layers_of_two_dtypes_take_the_pytorch_path():
    from alive.functional import _PositionExtremes

    z = torch.randn(4, 3, 5, 5)
    hi, lo = _PositionExtremes.apply(True, False, z, z.double() * 2)  # (the kernel would write doubles into floats)
    assert hi.dtype == torch.float64
    torch.testing.assert_close(hi, torch.stack((z.amax((2, 3)), 2 * z.amax((2, 3)))).double())
    with pytest.raises(ValueError, match="hi and lo must be contiguous torch.float32 tensors of 12 elements"):
        native.position_extremes(z.view(4, 3, 25), torch.empty(12, dtype=torch.float64), torch.empty(12))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_an_openmp_build_that_brings_another_runtime_is_set_aside_for_the_serial_one(tmp_path, monkeypatch):
    # (as clang's -fopenmp would, linking libomp beside PyTorch's libgomp: simulated)
    monkeypatch.setenv("ALIVE_CACHE", str(tmp_path))
    seen = iter([{"libgomp.so.1", "libomp.so"}])  # after loading the OpenMP build
    monkeypatch.setattr(native, "_shares_pytorch_openmp", lambda: True)
    monkeypatch.setattr(native, "_openmp_runtimes", lambda: next(seen))
    lib = native._load(["cc"])
    (failed,) = (tmp_path / "native").glob("*.failed")
    assert "not PyTorch's: ['libgomp.so.1', 'libomp.so']" in failed.read_text()
    assert lib._name == str(native._target(["cc"])) and b"GOMP_parallel" not in Path(lib._name).read_bytes()


# the C++ autograd node of deep rectangular MLPs (native.dense_penalty)
CXX = os.environ.get("CXX") or "c++"
needs_node = pytest.mark.skipif(native.dense_penalty() is None, reason="no C++ compiler for the dense-penalty node")


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which(CXX) is None, reason="no C++ compiler")
def test_the_dense_node_is_built_where_a_cpp_compiler_exists():
    assert native.dense_penalty() is not None


def _counting_node(monkeypatch) -> list:
    """Count the C++ node's calls (and the errors it raised) from here on."""
    node, calls = native.dense_penalty(), []

    def counted(*args):
        try:
            out = node(*args)
        except Exception as err:
            calls.append(type(err).__name__)
            raise
        calls.append("ok")
        return out

    monkeypatch.setattr(native, "_cpp_op", counted)
    return calls


def _penalty_and_gradients(net, sep, x, node: bool, monkeypatch, upstream=3.0):
    """The penalty, the gradients of ``upstream`` × it, and those of a second backward through the
    retained graph, with the C++ node or the Python one."""
    with monkeypatch.context() as m:
        if not node:
            m.setattr(native, "dense_penalty", lambda: None)
        net.zero_grad(set_to_none=True)
        net(x)
        p = sep.penalty()
    (upstream * p).backward(retain_graph=True)
    first = [q.grad.clone() for q in net.parameters() if q.grad is not None]
    net.zero_grad(set_to_none=True)
    p.backward()
    again = [q.grad.clone() for q in net.parameters() if q.grad is not None]
    return p.detach(), p.grad_fn.name(), first, again


@needs_node
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", ["split", "first"])
@pytest.mark.parametrize("aggregation", ["paper", "squared_sum", "mean"])
@pytest.mark.parametrize("kind", ["up", "u", "p"])
def test_the_dense_node_gives_the_python_nodes_values_and_gradients_bit_for_bit(kind, aggregation, ties, dtype, monkeypatch):
    torch.manual_seed(0)
    net = MLP(2, 2, depth=6, width=4).to(dtype)
    x = torch.randn(40, 2, dtype=dtype)
    x[5:9] = x[0]  # tied extremes
    sep = alive.SeparationConstraint(net, kind=kind, weight=0.3, aggregation=aggregation, ties=ties, rho=0.4)
    got = _penalty_and_gradients(net, sep, x, True, monkeypatch)
    want = _penalty_and_gradients(net, sep, x, False, monkeypatch)
    assert "DensePenalty" in got[1] and want[1] == "_NativePenaltyBackward"
    assert torch.equal(got[0], want[0]) and got[0] > 0
    for a, b in zip(got[2:], want[2:]):
        assert len(a) == len(b) == 12 and all(torch.equal(g, h) for g, h in zip(a, b))
    assert any(g.abs().sum() > 0 for g in got[2])


class _StridedLinear(nn.Linear):
    """A dense layer whose output is a transposed (non-contiguous) view."""

    def forward(self, x):
        return super().forward(x).t().contiguous().t()


@needs_node
def test_the_dense_node_with_strided_outputs_frozen_layers_no_grad_and_inference(monkeypatch):
    torch.manual_seed(1)
    net = nn.Sequential(_StridedLinear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), _StridedLinear(4, 4), nn.ReLU(),
                        nn.Linear(4, 2))
    net[0].requires_grad_(False)  # its output needs no gradient (autograd drops the one the node computes)
    x = torch.randn(30, 2)
    sep = alive.SeparationConstraint(net, kind="up", weight=0.5)
    calls = _counting_node(monkeypatch)
    got = _penalty_and_gradients(net, sep, x, True, monkeypatch)
    want = _penalty_and_gradients(net, sep, x, False, monkeypatch)
    assert "DensePenalty" in got[1] and torch.equal(got[0], want[0])
    assert all(torch.equal(g, h) for g, h in zip(got[2], want[2])) and len(got[2]) == 4
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            net(x)
            value = sep.penalty()
        assert value.grad_fn is None and torch.equal(value, got[0])
    assert calls == ["ok"] * 3


@needs_node
def test_the_dense_node_under_a_double_backward_and_with_layers_of_several_widths(monkeypatch):
    """A gradient-norm regulariser (create_graph) differentiates the node's gradient, through the
    Python reference; layers of unequal widths take the grouped path."""
    torch.manual_seed(2)
    x, y = torch.randn(24, 2, dtype=torch.float64), torch.randint(0, 2, (24,))
    calls = _counting_node(monkeypatch)
    results = []
    for node in (True, False):
        net = MLP(2, 2, depth=4, width=3).double()
        torch.manual_seed(3)
        for q in net.parameters():
            q.data.normal_(0, 0.5)
        with alive.SeparationConstraint(net, kind="up", weight=0.5) as sep, monkeypatch.context() as m:
            if not node:
                m.setattr(native, "dense_penalty", lambda: None)
            loss = nn.functional.cross_entropy(net(x), y) + sep.penalty()
            grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
            sum(g.square().sum() for g in grads).backward()
        results.append([q.grad for q in net.parameters()])
    assert all(torch.allclose(g, h, rtol=1e-10, atol=1e-12) for g, h in zip(*results))
    assert results[0][0].abs().sum() > 0 and calls == ["ok"]
    # unequal widths: the node refuses them, and the penalty is the grouped path's, as without it
    wide = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    values = []
    for node in (True, False):
        with monkeypatch.context() as m:
            if not node:
                m.setattr(native, "dense_penalty", lambda: None)
            sep = alive.SeparationConstraint(wide, kind="up", weight=0.1)
            wide(x.float())
            values.append(sep.penalty())
            sep.remove()
    assert calls == ["ok", "ValueError"]
    assert torch.equal(*values) and values[0].grad_fn.name() == values[1].grad_fn.name()


@needs_node
def test_the_dense_node_refuses_what_it_cannot_compute_and_reads_negated_views():
    node = native.dense_penalty()
    zs = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    ones = torch.ones(3)
    with pytest.raises(ValueError, match="the first one's shape"):
        node([zs[0], torch.randn(5, 4)], torch.ones(2), torch.ones(2), 0.5, 1.0, 0, False, 1.0)
    with pytest.raises(RuntimeError, match="coefficients that require a gradient"):
        node(zs, ones.requires_grad_(), torch.ones(3), 0.5, 1.0, 0, False, 1.0)
    with pytest.raises(RuntimeError, match="no native aggregation of code 3"):
        node(zs, torch.ones(3), torch.ones(3), 0.5, 1.0, 3, False, 1.0)
    with pytest.raises(RuntimeError, match="coef_u and coef_p must be contiguous"):
        node(zs, torch.ones(2), torch.ones(3), 0.5, 1.0, 0, False, 1.0)
    negated = [torch._neg_view(z) for z in zs]
    resolved = [z.neg() for z in zs]
    got = node(negated, torch.ones(3), torch.ones(3), 0.5, 1.0, 0, False, 1.0)
    want = node(resolved, torch.ones(3), torch.ones(3), 0.5, 1.0, 0, False, 1.0)
    assert torch.equal(got, want)
    assert all(torch.equal(g, h) for g, h in zip(torch.autograd.grad(got, zs), torch.autograd.grad(want, zs)))


RELOAD = """
import importlib, torch, alive
from alive import native
from alive.models import MLP
first = native.dense_penalty()
importlib.reload(native)  # (a second load of the node's library would abort the process)
net = MLP(2, 2, depth=3, width=4)
sep = alive.SeparationConstraint(net)
net(torch.randn(8, 2))
p = sep.penalty()
p.backward()
print("node", first is not None, native.dense_penalty() is not None, p.grad_fn.name())
"""


@needs_node
def test_a_reloaded_module_uses_the_loaded_node():
    done = run_python(RELOAD, CXX=CXX, ALIVE_NATIVE="1")
    assert done.returncode == 0 and "node True True" in done.stdout and "DensePenalty" in done.stdout, done.stderr


@needs_node
def test_processes_starting_together_build_the_node_once_and_a_stale_failure_does_not_hide_it(tmp_path):
    log = tmp_path / "calls"
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {CXX} "$@"\n')
    cxx.chmod(0o755)
    code = PROBE + "print('node', native.dense_penalty() is not None)\n"
    env = {**os.environ, "CXX": str(cxx), "ALIVE_CACHE": str(tmp_path / "cache"), "ALIVE_NATIVE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 and "node True" in out for p, (out, _) in zip(procs, outs)), outs
    assert len(log.read_text().splitlines()) == 1
    (built,) = (tmp_path / "cache" / "native").glob("dense-penalty-*.so")
    built.with_suffix(".failed").write_text("a build that failed in some other process\n")
    done = run_python(code, CXX=str(cxx), ALIVE_CACHE=str(tmp_path / "cache"), ALIVE_NATIVE="1")
    assert "node True" in done.stdout and len(log.read_text().splitlines()) == 1, done.stderr


def test_without_a_cpp_compiler_the_python_node_serves_and_the_failure_is_remembered(tmp_path):
    code = PROBE + "print('node', native.dense_penalty())\n"
    for _ in range(2):
        done = run_python(code, CXX="false", ALIVE_CACHE=str(tmp_path), ALIVE_NATIVE="1")
        assert done.returncode == 0 and "available True" in done.stdout and "node None" in done.stdout, done.stderr
        (failed,) = (tmp_path / "native").glob("dense-penalty-*.failed")
        if _ == 0:
            stamp = failed.stat().st_mtime_ns
        # said once, when the build fails; the next process does not try again
        assert done.stderr.count("could not be built") == (1 if _ == 0 else 0), done.stderr
    assert "false failed" in failed.read_text() and failed.stat().st_mtime_ns == stamp
