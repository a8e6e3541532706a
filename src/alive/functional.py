"""Functional forms of the package's operations (the modules are thin shells over these).

* :func:`linked` / :func:`linked_relu`: the linked activations of Riera & Pujol,
  ``f(z) = (g_1(z), ..., g_d(z))`` concatenated along a channel dimension.
* :func:`unit_slacks`, :func:`point_slacks`, :func:`separation_penalty`: the slack
  variables and the penalty of the separation constraints (Sep-U, Sep-P, Sep-UP).

Both the single-network constraint (:class:`alive.constraints.SeparationConstraint`) and the
batched grid engine (:mod:`alive.grid`) call :func:`stacked_separation_penalty`, so the
formulas live in one place. On a CPU both first try :func:`native_separation_penalty`, the
same formulas in C (:mod:`alive.native`), which the tests hold to this module's values and
gradients.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import native

__all__ = [
    "linked",
    "linked_relu",
    "unit_slacks",
    "point_slacks",
    "combine_slacks",
    "aggregate",
    "separation_extremes",
    "dense_separation_penalty",
    "native_separation_penalty",
    "stacked_unit_slacks",
    "stacked_point_slacks",
    "stacked_separation_penalty",
    "separation_penalty",
    "AGGREGATIONS",
    "CONV_REDUCTIONS",
    "KINDS",
]

AGGREGATIONS = ("paper", "squared_sum", "mean", "norm")
CONV_REDUCTIONS = ("channel", "position")
KINDS = ("u", "p", "up")


# --------------------------------------------------------------------------- linked
class _LinkedReLU(torch.autograd.Function):
    """``cat(relu(z), relu(-z))`` written straight into its output.

    Backward reads only the output (which the next layer keeps for its own backward anyway,
    so linking costs no extra activation memory): ``dz = g_pos·[out_pos > 0] - g_neg·[out_neg > 0]``.
    On a CPU (float32/float64, contiguous or channels-last) the native kernel of
    :mod:`alive.native` does each way in one pass (on PyTorch's threads); elsewhere one pass
    per half (each half thresholded on its own, so that no ``2·C`` intermediate is allocated)
    and a subtraction.
    At ``z == 0`` both members have PyTorch's ReLU derivative 0, exactly as the naive composition.
    """

    @staticmethod
    def forward(ctx, z: Tensor, dim: int) -> Tensor:
        dim = dim % z.dim()
        c = z.shape[dim]
        shape = list(z.shape)
        shape[dim] = 2 * c
        out = torch.empty(shape, dtype=z.dtype, device=z.device, memory_format=_memory_format(z))
        rows = _linked_rows(z, dim)
        if rows is not None:
            native.linked_relu_rows(z, *rows, out)
        else:
            torch.clamp_min(z, 0, out=out.narrow(dim, 0, c))
            torch.clamp_max(z, 0, out=out.narrow(dim, c, c)).neg_()
        ctx.save_for_backward(out)
        ctx.dim, ctx.rows = dim, rows
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        if ctx.rows is not None and not torch.is_grad_enabled():  # (a double backward differentiates the built-ins)
            fmt = _memory_format(out)
            shape = list(out.shape)
            shape[ctx.dim] //= 2
            dz = torch.empty(shape, dtype=out.dtype, memory_format=fmt)
            native.linked_relu_rows_grad(grad.contiguous(memory_format=fmt), out, *ctx.rows, dz)
            return dz, None
        g_pos, g_neg = grad.chunk(2, ctx.dim)
        out_pos, out_neg = out.chunk(2, ctx.dim)
        dz = torch.ops.aten.threshold_backward(g_pos, out_pos, 0)
        return dz.sub_(torch.ops.aten.threshold_backward(g_neg, out_neg, 0)), None


def _linked_rows(z: Tensor, dim: int) -> tuple[int, int] | None:
    """``(rows, length)`` of ``z`` as the native linked-ReLU kernel reads it (each row one
    stretch of memory: ``dim`` and the dimensions after it, or a channels-last pixel's channels
    for ``dim`` 1), or ``None`` where it does not apply."""
    if not _native_cpu(z):
        return None
    if z.is_contiguous():
        rows = math.prod(z.shape[:dim])
        return rows, z.numel() // rows
    if dim == 1 and _memory_format(z) is torch.channels_last:
        return z.numel() // z.shape[1], z.shape[1]
    return None


def _native_cpu(z: Tensor) -> bool:
    """Whether the native kernels of :mod:`alive.native` can read ``z``: a plain, non-empty CPU
    float32/float64 tensor outside a compiled graph, the kernels built (fake tensors of a compiled
    graph and subclasses take the built-ins, which trace and dispatch)."""
    return (type(z) is Tensor and z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64)
            and z.numel() > 0 and not torch.compiler.is_compiling() and native.available())


def _memory_format(z: Tensor):
    if z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# Below this many input elements a Python autograd.Function costs more than the two extra
# passes it saves on a CPU (measured on 2 cores: the crossover lies between 65k and 524k).
_SMALL_LINKED = 1 << 17


def linked_relu(z: Tensor, dim: int = 1) -> Tensor:
    r"""Mirror-linked ReLU, :math:`f(z) = (\max(z, 0), \max(-z, 0))`, concatenated along ``dim``.

    Equal to ``torch.cat((relu(z), relu(-z)), dim)`` (CReLU) in value and gradient. On large
    tensors a single autograd function writes both halves straight into the output and keeps no
    tensor the next layer does not keep already (on a CPU 2.3-3x faster than the composition
    with the native kernel of :mod:`alive.native` on PyTorch's threads, 1.3x without); small
    tensors, where per-call overhead dominates, take the plain composition.
    """
    _check_dim(z, dim)
    # torch.func transforms cannot run the autograd function (it has no setup_context)
    if (z.numel() < _SMALL_LINKED and z.device.type == "cpu") or _transforms_active():
        return torch.cat((torch.relu(z), torch.relu(-z)), dim)
    return _LinkedReLU.apply(z, dim)


def linked(z: Tensor, members: Sequence[Callable[[Tensor], Tensor]], dim: int = 1) -> Tensor:
    r"""Apply every member of a linkage to the same pre-activation and concatenate.

    :math:`f(z) = (g_1(z), \dots, g_d(z))`; all channels of :math:`g_1` come first, as in the
    authors' code. ``members`` has at least two callables.
    """
    if len(members) < 2:
        raise ValueError(f"a linkage needs at least 2 members, got {len(members)}")
    _check_dim(z, dim)
    return torch.cat([g(z) for g in members], dim)


def _check_dim(z: Tensor, dim: int) -> None:
    if not -z.dim() <= dim < z.dim():
        raise IndexError(f"dim {dim} is out of range for a linked activation's input of shape {tuple(z.shape)}")


# --------------------------------------------------------------------------- separation
def _check_options(aggregation: str, conv_reduction: str, kind: str = "up") -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown separation kind {kind!r}; choose one of {KINDS}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if conv_reduction not in CONV_REDUCTIONS:
        raise ValueError(f"unknown conv_reduction {conv_reduction!r}; choose one of {CONV_REDUCTIONS}")


# All separation formulas work on a *stacked* layout ``(nets, points, units, *spatial)`` so
# that the grid engine (many networks at once) and a single network (``nets == 1``) share them.
def _stack(z: Tensor) -> Tensor:
    if z.dim() < 2:
        raise ValueError(f"pre-activations need a point and a unit dimension, got shape {tuple(z.shape)}")
    return z.unsqueeze(0)


TIES = ("split", "first")


class _PositionExtremes(torch.autograd.Function):
    """The max and min over the spatial positions of feature maps: ``(hs, ls)``, each
    ``(nets, points, units)`` (a unit is a channel: the first reduction of the ``"channel"``
    separation terms).

    Input: one stacked map ``(nets, points, units, *spatial)`` or (``layers=True``) several
    same-shaped ``(points, units, *spatial)`` maps, one per net (the layers of one network that
    share a shape: each map is reduced where it is, only the small results are stacked).

    Why a function of its own: autograd's ``amax`` backward makes several dense passes over
    the feature maps per extreme, which cost more than the network's own backward on a CPU.
    Here the gradient of an extreme is non-zero only where a hinge is active (with unique
    extremes, at most units + points rows of a layer), and on a CPU only those rows are
    computed; tied positions share it equally. With ``sparse`` (CPU maps only) that gradient
    leaves as a sparse tensor, so no dense zero map is made and added: only for maps whose
    consumer turns a lone sparse gradient dense (:class:`alive.constraints.SeparationConstraint`
    passes its maps through such an identity), since a convolution's backward cannot take one.
    """

    @staticmethod
    def forward(ctx, layers: bool, sparse: bool, *zs: Tensor):
        lead = 2 if layers else 3
        ctx.save_for_backward(*zs)
        ctx.layers = layers
        ctx.sparse = sparse and zs[0].device.type == "cpu"
        views = [_native_maps(z, lead) for z in zs]
        if all(v is not None and z.shape == zs[0].shape and z.dtype == zs[0].dtype for v, z in zip(views, zs)):
            shape = ((len(zs),) if layers else ()) + zs[0].shape[:lead]
            hi, lo = zs[0].new_empty(shape), zs[0].new_empty(shape)
            units = zs[0].shape[lead - 1]
            for v, h, l in zip(views, hi.view(len(zs), -1, units), lo.view(len(zs), -1, units)):
                native.position_extremes(v, h, l)
            return hi, lo
        his, los = [], []
        for z in zs:  # any memory layout (channels_last too)
            src = _positions_innermost(z, lead)
            positions = tuple(range(lead, z.dim()))
            his.append(src.amax(positions))  # (torch.aminmax is ~10x slower on a CPU)
            los.append(src.amin(positions))
        return (torch.stack(his), torch.stack(los)) if layers else (his[0], los[0])

    @staticmethod
    def backward(ctx, gh: Tensor, gl: Tensor):
        # a double backward (create_graph) differentiates this gradient: it must be dense
        spread = _sparse_spread if ctx.sparse and not torch.is_grad_enabled() else _spread
        maps = ctx.saved_tensors
        rows = zip(gh.unbind(0), gl.unbind(0)) if ctx.layers else [(gh, gl)]
        return (None, None, *(spread(z, h, l) for z, (h, l) in zip(maps, rows)))


class _UnitPointExtremes(torch.autograd.Function):
    """Every extreme behind the slacks of one layer for a stack of nets, in one function.

    Input: ``hs`` (and ``ls``, or ``None`` for the same tensor), ``(nets, points, units)``:
    the per-unit (over points) and per-point (over the real units) max of ``hs`` and min of
    ``ls`` come out concatenated as ``hi = [hi_u | hi_p]`` and ``lo = [lo_u | lo_p]``, shape
    ``(nets, units + points)``. ``padded`` (``(nets, 1, units)``) keeps padded units out of the
    points' extremes: a bool mask (any values), or a float fill, 0 for real units and a huge
    value for padded ones, subtracted (for the max) and added (for the min): exact whenever
    the padded values are finite, as in the grid engine (they are exactly 0).

    Ties: the gradient of an extreme is shared equally among tied entries (``"split"``, like
    TensorFlow's ``reduce_max``) or given to the first of them (``"first"``, ``torch.max``).

    Why a function of its own (autograd's ``amax`` backward makes several passes per extreme):
    ``"first"`` keeps the arg-extremes of the forward and scatters the gradient to them.
    ``"split"`` must find every tied entry again; thin layers have few units, and a CPU
    compares and broadcasts over an innermost dimension of 4 at a fifth of its speed over a
    long one, so that work happens on one transposed copy, ``(nets, units, points)``, with the
    masks written as float comparisons straight into float tensors (a bool mask and its
    conversion cost ~5x more on a CPU).
    """

    @staticmethod
    def forward(ctx, ties: str, padded: Tensor | None, hs: Tensor, ls: Tensor | None):
        ctx.ties, ctx.units, ctx.joint = ties, hs.shape[2], ls is None
        if ties == "first":
            ls = hs if ls is None else ls
            ph, pl = _without_padded_units(hs, ls, padded)
            (hu, iu), (lu, ju), (hp, ip), (lp, jp) = hs.max(1), ls.min(1), ph.max(2), pl.min(2)
            ctx.save_for_backward(iu, ju, ip, jp)
            ctx.shapes = hs.shape, ls.shape
        else:
            xh = hs.transpose(1, 2).contiguous()  # (nets, units, points)
            xl = xh if ls is None else ls.transpose(1, 2).contiguous()
            ph, pl = _without_padded_units(xh, xl, None if padded is None else padded.transpose(1, 2))
            hu, lu, hp, lp = xh.amax(2), xl.amin(2), ph.amax(1), pl.amin(1)
            ctx.save_for_backward(xh, xl, ph, pl, hu, lu, hp, lp)
        return torch.cat((hu, hp), 1), torch.cat((lu, lp), 1)

    @staticmethod
    def backward(ctx, ghi: Tensor, glo: Tensor):
        w = ctx.units
        ghu, ghp, glu, glp = ghi[:, :w], ghi[:, w:], glo[:, :w], glo[:, w:]
        if ctx.ties == "first":
            iu, ju, ip, jp = ctx.saved_tensors
            gh = ghi.new_zeros(ctx.shapes[0])
            gl = gh if ctx.joint else ghi.new_zeros(ctx.shapes[1])
            gh.scatter_add_(1, iu.unsqueeze(1), ghu.unsqueeze(1))
            gl.scatter_add_(1, ju.unsqueeze(1), glu.unsqueeze(1))
            gh.scatter_add_(2, ip.unsqueeze(2), ghp.unsqueeze(2))
            gl.scatter_add_(2, jp.unsqueeze(2), glp.unsqueeze(2))
            return None, None, gh, None if ctx.joint else gl
        xh, xl, ph, pl, hu, lu, hp, lp = ctx.saved_tensors
        gh = _add_tied(_add_tied(None, xh, hu, ghu, 2), ph, hp, ghp, 1)
        gl = _add_tied(_add_tied(gh if ctx.joint else None, xl, lu, glu, 2), pl, lp, glp, 1)
        if ctx.joint:
            g = gl if gl is not None else torch.zeros_like(xh)
            return None, None, g.transpose(1, 2).contiguous(), None
        gh = torch.zeros_like(xh) if gh is None else gh
        gl = torch.zeros_like(xl) if gl is None else gl
        return None, None, gh.transpose(1, 2).contiguous(), gl.transpose(1, 2).contiguous()


def _add_tied(acc: Tensor | None, x: Tensor, ext: Tensor, g: Tensor, dim: int) -> Tensor | None:
    """Add to ``acc`` the gradient ``g`` of ``ext = x.amax(dim)`` (or amin) shared equally
    among the tied entries. Inactive hinges give ``g == 0``: on a CPU that costs no pass."""
    if g.device.type == "cpu" and not torch.count_nonzero(g):
        return acc
    tied = torch.eq(x, ext.unsqueeze(dim), out=torch.empty_like(x))
    # float32 counts: exact up to 2**24 tied entries, also for bfloat16 maps
    share = (g.unsqueeze(dim) / tied.sum(dim, keepdim=True, dtype=torch.float32)).to(x.dtype)
    return tied.mul_(share) if acc is None else acc.addcmul_(tied, share)


def _positions_innermost(z: Tensor, lead: int) -> Tensor:
    """``z`` with its spatial positions (dims ``lead:``) as one contiguous innermost block.

    A CPU reduces over such a block ~15x faster than over positions strided by the channels
    (channels-last maps: 5.8 ms vs 0.4 ms for the max and min of a 128x16x28x28 map), so
    there one copy pays for itself. Accelerators reduce either layout well: no copy.
    """
    if z.device.type != "cpu":
        return z
    step = 1
    for d in range(z.dim() - 1, lead - 1, -1):
        if z.shape[d] != 1 and z.stride(d) != step:
            return z.contiguous()
        step *= z.shape[d]
    return z


def _without_padded_units(hs: Tensor, ls: Tensor, padded: Tensor | None) -> tuple[Tensor, Tensor]:
    """The inputs of the points' max and min, padded units kept out (see :class:`_UnitPointExtremes`)."""
    if padded is None:
        return hs, ls
    if padded.dtype == torch.bool:
        return hs.masked_fill(padded, -math.inf), ls.masked_fill(padded, math.inf)
    padded = padded.to(hs.dtype)  # a float32 fill would promote bfloat16 maps (and their hinges)
    return hs - padded, ls + padded


def _native_maps(z: Tensor, lead: int) -> Tensor | None:
    """``z`` (``(*lead dims, *positions)``) as the ``(rows, channels, positions)`` view that the
    native position kernels of :mod:`alive.native` read, or ``None`` where they do not apply."""
    if z.dim() <= lead or not _native_cpu(z):
        return None
    try:  # (contiguous and channels-last maps: any layout whose positions make one stride)
        return z.view(-1, z.shape[lead - 1], math.prod(z.shape[lead:]))
    except RuntimeError:
        return None


def _native_spread_rows(z: Tensor, g_hi: Tensor, g_lo: Tensor):
    """``(index, values)`` of the gradient of the extremes over positions at the (point, unit)
    rows where ``g_hi`` or ``g_lo`` is non-zero, maxima's rows first (``index``: ``(lead, rows)``,
    the rows' indices in the lead dimensions; ``values``: ``(rows, *positions)``), by the native
    kernel; ``None`` where it does not apply (a double backward differentiates the built-ins)."""
    lead = g_hi.dim()
    v = None if torch.is_grad_enabled() else _native_maps(z, lead)
    if v is None:
        return None
    index, values = native.position_spread(v, g_hi.to(z.dtype).contiguous(), g_lo.to(z.dtype).contiguous())
    if lead > 2:  # (rows of several lead dimensions: nets and points)
        index = torch.stack((*torch.unravel_index(index[0], g_hi.shape[:-1]), index[1]))
    return index, values.view(-1, *z.shape[lead:])


def _spread(z: Tensor, g_hi: Tensor, g_lo: Tensor) -> Tensor:
    """Gradient of ``z.amax(positions)`` and ``z.amin(positions)`` (``g_hi``, ``g_lo`` have the
    shape of the leading dimensions); ties among positions share it. On a CPU only the
    (point, unit) rows whose extremes have a non-zero gradient are computed."""
    lead = g_hi.dim()
    positions = tuple(range(lead, z.dim()))
    # same layout as z and not a view: autograd adds the activation's gradient into it in place
    out = torch.zeros_like(z)
    rows = _native_spread_rows(z, g_hi, g_lo)
    if rows is not None:
        index, values = rows
        return out.index_put_(tuple(index), values, accumulate=True) if len(values) else out
    for g, pick in ((g_hi, torch.amax), (g_lo, torch.amin)):
        if z.device.type == "cpu":
            rows = g.reshape(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            index = torch.unravel_index(rows, g.shape)
            sub, g = z[index], g[index]  # (rows, *positions)
            dims = tuple(range(1, sub.dim()))
        else:  # no host synchronisation on an accelerator, where a dense pass is cheap
            index, sub, dims = None, z, positions
        tied = sub == pick(sub, dims, keepdim=True)
        share = (g / tied.sum(dims, dtype=torch.int32)).view(g.shape + (1,) * len(dims))
        part = tied.to(share.dtype).mul_(share)  # (bool * float is ~5x slower on a CPU)
        if index is None:
            out.add_(part)
        else:
            out.index_put_(index, part, accumulate=True)
    return out


def _sparse_spread(z: Tensor, g_hi: Tensor, g_lo: Tensor) -> Tensor | None:
    """:func:`_spread` as a sparse COO tensor (CPU): sparse over the leading (point, unit)
    dimensions, dense over the positions; only the rows with a non-zero gradient are stored
    (duplicate rows add up, as ``index_put_`` accumulates). A row keeps all its positions, the
    tied extremes holding their share and the rest 0: listing the tied positions one by one
    (``nonzero``) cost 3x more than the whole row."""
    lead = g_hi.dim()
    rows = _native_spread_rows(z, g_hi, g_lo)
    if rows is not None:
        index, values = rows
        return torch.sparse_coo_tensor(index, values, z.shape, is_coalesced=False,
                                       check_invariants=False) if len(values) else None
    indices, values = [], []
    for g, pick in ((g_hi, torch.amax), (g_lo, torch.amin)):
        rows = g.reshape(-1).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        index = torch.unravel_index(rows, g.shape)
        sub = z[index].flatten(1)  # (rows, positions), any memory layout of z
        tied = torch.eq(sub, pick(sub, 1, keepdim=True), out=torch.empty_like(sub))
        # float32 counts: exact up to 2**24 tied positions, also for bfloat16 maps
        share = g.reshape(-1)[rows] / tied.sum(1, dtype=torch.float32)
        values.append(tied.mul_(share.unsqueeze(1).to(z.dtype)))
        indices.append(torch.stack(index))
    if not indices:
        return None
    return torch.sparse_coo_tensor(torch.cat(indices, 1), torch.cat(values).view(-1, *z.shape[lead:]), z.shape,
                                   is_coalesced=False, check_invariants=False)


class _NativePenalty(torch.autograd.Function):
    """``coef_u·g_U + coef_p·g_P`` of each layer of a stack by the native kernel
    (:mod:`alive.native`), or ``scale`` × their sum: one autograd node and one pass over each
    layer, which computes the gradient along with the value (where an input requires one) while
    the layer is at hand; the backward pass only scales it (see
    :func:`native_separation_penalty`). ``zh`` / ``zl`` contiguous; ``options`` =
    ``(rho, margin, aggregation, ties, scale, grad)``, ``scale`` ``None`` for the per-layer
    values, ``grad`` whether gradient mode was on where it was called (inside ``forward`` it is
    off, and ``needs_input_grad`` does not say)."""

    @staticmethod
    def forward(ctx, zh: Tensor, zl: Tensor | None, coef_u: Tensor, coef_p: Tensor, real_units: Tensor | None,
                options: tuple) -> Tensor:
        rho, margin, aggregation, ties, scale, grad = options
        grad = grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        out, dzh, dzl = native.separation_penalty(zh, zh if zl is None else zl, coef_u, coef_p, real_units, rho,
                                                  margin, aggregation, ties == "first", scale, grad)
        ctx.save_for_backward(zh, zl)
        # the kernel's own results and the caller's constants: no autograd bookkeeping needed
        ctx.kernel = coef_u, coef_p, real_units, options
        ctx.grads = (dzh, dzl) if grad else None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        zh, zl = ctx.saved_tensors
        coef_u, coef_p, real_units, (rho, margin, aggregation, ties, scale, _) = ctx.kernel
        if grad.dtype != zh.dtype:
            grad = grad.to(zh.dtype)
        if torch.is_grad_enabled():  # a double backward (create_graph): differentiate the built-ins
            inputs = (zh,) if zl is None else (zh, zl)
            out = _reference_penalty(zh, zl, coef_u, coef_p, real_units, rho, margin, aggregation, ties)
            if scale is not None:
                out = scale * out.sum()
            grads = torch.autograd.grad(out, inputs, grad, create_graph=True, allow_unused=True)
            grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))
            return grads[0], (grads[1] if zl is not None else None), None, None, None, None
        # handed over (and scaled in place): a retained graph's next backward computes them again
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            _, *grads = native.separation_penalty(zh, zh if zl is None else zl, coef_u, coef_p, real_units, rho,
                                                  margin, aggregation, ties == "first", scale, True)
        dzh, dzl = grads
        # the kernel's gradient is that of an upstream gradient 1 (for each layer, without scale)
        if scale is None:
            grad = grad.view(-1, *[1] * (dzh.dim() - 1))
        if scale is None or float(grad) != 1.0:
            dzh.mul_(grad)
            if dzl is not dzh:
                dzl.mul_(grad)
        return dzh, (dzl if zl is not None else None), None, None, None, None


def _reference_penalty(zh: Tensor, zl: Tensor | None, coef_u: Tensor, coef_p: Tensor, real_units: Tensor | None,
                       rho: float, margin: float, aggregation: str, ties: str) -> Tensor:
    """What :class:`_NativePenalty` computes, from differentiable built-ins."""
    ls = zh if zl is None else zl
    n, _, w = zh.shape
    padded = None if real_units is None else (torch.arange(w, device=zh.device) >= real_units[:, None]).unsqueeze(1)
    hu, lu, hp, lp = _builtin_unit_point_extremes(ties, padded, zh, ls)
    s_u, s_p = combine_slacks(*_slacks(hu, lu, margin), rho), combine_slacks(*_slacks(hp, lp, margin), rho)
    count = None
    if padded is not None:
        real = (~padded[:, 0]).to(zh.dtype)
        s_u, count = s_u * real, real.sum(1)
    a_u, a_p = aggregate(s_u, aggregation, count), aggregate(s_p, aggregation)
    return torch.where(coef_u != 0, coef_u * a_u, 0.0) + torch.where(coef_p != 0, coef_p * a_p, 0.0)


def _native_applies(z: Tensor, aggregation: str) -> bool:
    """Whether :func:`native_separation_penalty` computes the penalty of ``z`` (cheap checks first)."""
    return aggregation in native.AGGREGATIONS and z.dim() >= 2 and not _transforms_active() and _native_cpu(z)


def native_separation_penalty(
    z: Tensor | Sequence[Tensor],
    coef_u: Tensor,
    coef_p: Tensor,
    rho: float = 0.5,
    margin: float = 1.0,
    aggregation: str = "paper",
    ties: str = "split",
    conv_reduction: str = "channel",
    real_units: Tensor | None = None,
    sparse_grad: bool = False,
    total: bool = False,
    scale: float = 1.0,
) -> Tensor | None:
    """``coef_u·g_U + coef_p·g_P`` of each stacked net, ``(nets,)`` (``scale`` × their sum with
    ``total``), by the native CPU kernel of :mod:`alive.native`; ``None`` where it does not apply (another
    device or dtype, the ``"norm"`` aggregation, ``"position"`` reduction of feature maps,
    ``torch.func`` transforms, ``torch.compile``, no C compiler), and the caller falls back to
    :func:`stacked_separation_penalty`.

    The same values as the PyTorch path (to float rounding: sums run in double) and the same
    gradients, tied and NaN extremes included, with respect to ``z`` (coefficients that
    require a gradient take the PyTorch path). A zero coefficient leaves its term out (the
    PyTorch path multiplies it by 0, NaN for a non-finite term: a net whose loss is not finite
    either). ``z`` as in :func:`stacked_separation_penalty`; ``coef_u`` / ``coef_p`` ``(nets,)``;
    ``real_units`` (int32 ``(nets,)``): each net's first units are real, the rest padding
    (the grid engine), kept out of every term. Feature maps (``"channel"``) lose their
    positions first, as in :class:`_PositionExtremes`.
    """
    layers = not isinstance(z, Tensor)
    head = z[0] if layers else z
    if not _native_applies(head, aggregation) or ties not in TIES or coef_u.requires_grad or coef_p.requires_grad:
        return None
    if not layers and head.dim() < 3:
        return None  # not a stack: the PyTorch path says what is wrong
    maps = head.dim() > (2 if layers else 3)
    if maps and conv_reduction == "position":
        return None
    try:  # unequal layers fail to stack (rare: no check of each shape on every call)
        if maps:
            zh, zl = _PositionExtremes.apply(layers, sparse_grad, *(z if layers else [z]))
        else:
            zh, zl = torch.stack(z if isinstance(z, (list, tuple)) else list(z)) if layers else z, None
    except RuntimeError:
        return None  # the PyTorch path says what is wrong
    n, _, w = zh.shape
    # the kernel reads these through raw pointers: wrong sizes must not reach it
    if coef_u.shape != (n,) or coef_p.shape != (n,):
        raise ValueError(f"coef_u and coef_p must have shape (nets,) = ({n},), got {tuple(coef_u.shape)} and {tuple(coef_p.shape)}")
    if real_units is not None:
        if real_units.shape != (n,) or real_units.dtype != torch.int32 or real_units.device != zh.device:
            raise ValueError(f"real_units must be an int32 tensor of shape (nets,) = ({n},) on {zh.device}, "
                             f"got {real_units.dtype} {tuple(real_units.shape)} on {real_units.device}")
        low, high = real_units.aminmax()
        if int(low) < 1 or int(high) > w:
            raise ValueError(f"real_units must lie in [1, {w}] (the stack's units), got [{int(low)}, {int(high)}]")
        real_units = real_units.contiguous()
    if coef_u.dtype != zh.dtype or coef_p.dtype != zh.dtype or coef_u.device != zh.device or coef_p.device != zh.device:
        coef_u, coef_p = coef_u.to(zh), coef_p.to(zh)
    options = (rho, margin, aggregation, ties, float(scale) if total else None, torch.is_grad_enabled())
    # (contiguous: a differentiable copy of a strided view, which the kernel then reads)
    return _NativePenalty.apply(zh.contiguous(), None if zl is None else zl.contiguous(), coef_u.contiguous(), coef_p.contiguous(),
                                real_units, options)


def dense_separation_penalty(
    z: Tensor,
    coef_u: Tensor,
    coef_p: Tensor,
    rho: float = 0.5,
    margin: float = 1.0,
    aggregation: str = "paper",
    padded: Tensor | None = None,
    unit_weight: Tensor | None = None,
    real_units: Tensor | None = None,
) -> Tensor:
    """λ_U·g_U + λ_P·g_P of one dense layer for each net of a stack ``(nets, points, units)``.

    A fast path of :func:`stacked_separation_penalty` (``ties="first"``) for the grid engine:
    every slack of the layer is formed and weighted in one pass over a ``(nets, units +
    points)`` tensor. ``coef_u`` / ``coef_p`` (``(nets,)``) are the per-net λ (0 switches a
    term off); ``padded`` (see :class:`_UnitPointExtremes`) masks padded units out of the points' extremes and
    ``unit_weight`` (``(nets, units)``, 0 for padded units) out of the unit terms. The native
    kernel of :func:`native_separation_penalty` computes it where it applies, when nothing is
    padded or when ``real_units`` (int32 ``(nets,)``, trailing padding) says the same as
    ``padded`` and ``unit_weight`` do.
    Aggregations: ``"paper"``, ``"squared_sum"``, ``"mean"`` (``"norm"`` is not separable:
    use :func:`stacked_separation_penalty`).
    """
    if aggregation not in ("paper", "squared_sum", "mean"):
        raise ValueError(f"dense_separation_penalty supports paper, squared_sum and mean, not {aggregation!r}")
    if z.dim() != 3:
        raise ValueError(f"dense_separation_penalty takes stacked dense pre-activations (nets, points, units), got shape {tuple(z.shape)}")
    if real_units is not None or (padded is None and unit_weight is None):
        g = native_separation_penalty(z, coef_u, coef_p, rho, margin, aggregation, "first", real_units=real_units)
        if g is not None:
            return g
    n, b, w = z.shape
    hi, lo = _extremes("first", padded, False, False, [z])
    s = _combined_slacks(hi, lo, margin, rho)
    if aggregation == "squared_sum":
        s = s * s
    cu = coef_u[:, None] if unit_weight is None else coef_u[:, None] * unit_weight
    cp = coef_p[:, None].expand(n, b)
    if aggregation == "mean":
        units = w if unit_weight is None else unit_weight.sum(1, keepdim=True)
        cu, cp = cu / units, cp / b
    return (s * torch.cat((cu.expand(n, w), cp), 1)).sum(1)


def separation_extremes(
    z: Tensor | Sequence[Tensor],
    kind: str = "up",
    conv_reduction: str = "channel",
    unit_mask: Tensor | None = None,
    ties: str = "split",
    sparse_grad: bool = False,
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """The max and min behind every slack of one layer: ``((hi_u, lo_u), (hi_p, lo_p))``.

    ``z`` is stacked ``(nets, points, units, *spatial)``, or a sequence of same-shaped
    ``(points, units, *spatial)`` tensors taken as the nets of a stack (one network's layers of
    one shape; conv feature maps are reduced in place, not copied into a stack, except with
    ``"position"`` reduction). Sep-U extremes run over the points (and, for
    ``conv_reduction="channel"``, the positions): shape ``(nets, units[, *spatial])``; Sep-P
    extremes over the units (and positions): ``(nets, points[, *spatial])``. Padded units
    (``unit_mask`` false) never take part in a point's extremes. ``None`` for a kind not asked.

    ``ties="split"`` shares the gradient equally among tied extremes (like TensorFlow's
    ``reduce_max`` that the authors used; this matters for zero initialisation, where every
    pre-activation ties). With ``"channel"`` reduction the positions are reduced first, so
    ties are shared among points, then among each point's tied positions. ``"first"`` gives
    it to one of the tied points or units: identical whenever extremes are unique, and faster
    (the positions of a channel still split; ``"position"`` reduction always splits).
    ``sparse_grad``: see :class:`_PositionExtremes` (only for maps whose consumer densifies).
    """
    _check_options("paper", conv_reduction, kind)
    want_u, want_p = "u" in kind, "p" in kind
    joint = _joint_extremes(z, conv_reduction, unit_mask, ties, sparse_grad)
    if joint is None:
        return _position_extremes(z if isinstance(z, Tensor) else torch.stack(list(z)), want_u, want_p, unit_mask)
    hi, lo, units = joint
    u = (hi[:, :units], lo[:, :units]) if want_u else None
    p = (hi[:, units:], lo[:, units:]) if want_p else None
    return u, p


def _joint_extremes(z, conv_reduction: str, unit_mask: Tensor | None, ties: str,
                    sparse_grad: bool = False) -> tuple[Tensor, Tensor, int] | None:
    """``(hi, lo, units)`` with ``hi = [hi_u | hi_p]`` and ``lo = [lo_u | lo_p]`` of shape
    ``(nets, units + points)`` (see :class:`_UnitPointExtremes`, and :class:`_PositionExtremes`
    for ``sparse_grad``); ``None`` for ``"position"`` reduction."""
    if ties not in TIES:
        raise ValueError(f"unknown ties {ties!r}; choose one of {TIES}")
    layers = not isinstance(z, Tensor)
    zs = list(z) if layers else [z]
    if not zs or len({t.shape for t in zs}) != 1:
        raise ValueError("separation extremes need one stacked tensor or same-shaped layers")
    shape = (len(zs), *zs[0].shape) if layers else zs[0].shape
    if len(shape) < 3:
        raise ValueError(f"stacked pre-activations need (nets, points, units, *spatial), got shape {tuple(shape)}")
    if shape[1] == 0 or shape[2] == 0:
        raise ValueError(f"separation terms need at least one point and one unit, got shape {tuple(shape)}")
    if unit_mask is not None and tuple(unit_mask.shape) != (shape[0], shape[2]):
        raise ValueError(f"unit_mask must have shape (nets, units) = {(shape[0], shape[2])}, got {tuple(unit_mask.shape)}")
    if zs[0].dim() > (2 if layers else 3) and conv_reduction == "position":
        return None
    padded = None if unit_mask is None else ~unit_mask.bool().unsqueeze(1)
    hi, lo = _extremes(ties, padded, layers, sparse_grad, zs)
    return hi, lo, zs[0].shape[1 if layers else 2]


def _extremes(ties: str, padded: Tensor | None, layers: bool, sparse: bool, zs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` of :func:`_joint_extremes`: the hand-written functions, or the built-ins
    under ``torch.func``; feature maps lose their positions first, each where it is."""
    if _transforms_active():
        return _composite_extremes(ties, padded, layers, zs)
    if zs[0].dim() > (2 if layers else 3):
        return _UnitPointExtremes.apply(ties, padded, *_PositionExtremes.apply(layers, sparse, *zs))
    return _UnitPointExtremes.apply(ties, padded, torch.stack(zs) if layers else zs[0], None)


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ...) is running (a private check)."""
    return bool(_functorch_active()) if _functorch_active is not None else False


def _composite_extremes(ties: str, padded: Tensor | None, layers: bool, zs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """:class:`_PositionExtremes` and :class:`_UnitPointExtremes` from differentiable built-ins,
    for ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``), which their hand-written,
    data-dependent backwards cannot run under. Same values and gradients: ``amax`` shares ties
    equally, ``max(dim)`` gives them to one."""
    z = torch.stack(zs) if layers else zs[0]  # (nets, points, units, *spatial)
    if z.dim() > 3:
        positions = tuple(range(3, z.dim()))
        hs, ls = z.amax(positions), z.amin(positions)
    else:
        hs = ls = z
    hu, lu, hp, lp = _builtin_unit_point_extremes(ties, padded, hs, ls)
    return torch.cat((hu, hp), 1), torch.cat((lu, lp), 1)


def _builtin_unit_point_extremes(ties: str, padded: Tensor | None, hs: Tensor, ls: Tensor):
    """``(hu, lu, hp, lp)`` of :class:`_UnitPointExtremes` from differentiable built-ins."""
    hp_in, lp_in = _without_padded_units(hs, ls, padded)
    if ties == "first":
        return hs.max(1).values, ls.min(1).values, hp_in.max(2).values, lp_in.min(2).values
    return hs.amax(1), ls.amin(1), hp_in.amax(2), lp_in.amin(2)


def _position_extremes(z: Tensor, want_u: bool, want_p: bool, unit_mask: Tensor | None):
    """Every spatial position its own unit and point (the authors' Keras code); ties split."""
    u = (z.amax(1), z.amin(1)) if want_u else None
    p = None
    if want_p:
        if unit_mask is None:
            p = (z.amax(2), z.amin(2))
        else:
            m = unit_mask.bool().reshape(unit_mask.shape[0], 1, unit_mask.shape[1], *([1] * (z.dim() - 3)))
            p = (z.masked_fill(~m, -math.inf).amax(2), z.masked_fill(~m, math.inf).amin(2))
    return u, p


_BIG = 1e30  # larger than any pre-activation, finite in float32 and bfloat16


def _slacks(hi: Tensor, lo: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    return torch.relu(margin - hi), torch.relu(margin + lo)


def stacked_unit_slacks(z: Tensor, margin: float, conv_reduction: str, unit_mask: Tensor | None = None, ties: str = "split"):
    """Sep-U slacks ``(xi_plus, xi_minus)`` for stacked pre-activations; padded units get 0."""
    u, _ = separation_extremes(z, "u", conv_reduction, unit_mask, ties)
    xp, xm = _slacks(*u, margin)
    if unit_mask is not None:
        m = unit_mask.reshape(unit_mask.shape + (1,) * (xp.dim() - unit_mask.dim())).to(xp.dtype)
        xp, xm = xp * m, xm * m
    return xp, xm


def stacked_point_slacks(z: Tensor, margin: float, conv_reduction: str, unit_mask: Tensor | None = None, ties: str = "split"):
    """Sep-P slacks ``(xi_plus, xi_minus)`` for stacked pre-activations."""
    _, p = separation_extremes(z, "p", conv_reduction, unit_mask, ties)
    return _slacks(*p, margin)


def unit_slacks(z: Tensor, margin: float = 1.0, conv_reduction: str = "channel"):
    r"""Sep-U slacks of one layer (eq. 12 of the separation paper).

    :math:`\xi^+_j = \mathrm{relu}(m - \max_i z_{ij})`, :math:`\xi^-_j = \mathrm{relu}(m + \min_i z_{ij})`.

    Shape:
        ``z``: ``(N, C)`` or ``(N, C, *spatial)``. Output: two tensors of shape ``(C,)``
        (``conv_reduction="channel"``: a unit is a channel, the max runs over samples and
        positions) or ``(C, *spatial)`` (``"position"``: every position is its own unit, as in
        the authors' Keras code).
    """
    _check_options("paper", conv_reduction)
    xp, xm = stacked_unit_slacks(_stack(z), margin, conv_reduction)
    return xp[0], xm[0]


def point_slacks(z: Tensor, margin: float = 1.0, conv_reduction: str = "channel"):
    r"""Sep-P slacks of one layer (eq. 14): per point, over the layer's units.

    :math:`\xi^+_i = \mathrm{relu}(m - \max_j z_{ij})`, :math:`\xi^-_i = \mathrm{relu}(m + \min_j z_{ij})`.

    Shape:
        ``z``: ``(N, C)`` or ``(N, C, *spatial)``. Output: ``(N,)`` (``"channel"``) or
        ``(N, *spatial)`` (``"position"``).
    """
    _check_options("paper", conv_reduction)
    xp, xm = stacked_point_slacks(_stack(z), margin, conv_reduction)
    return xp[0], xm[0]


class _Hinges(torch.autograd.Function):
    """``ρ·relu(m − hi) + (1 − ρ)·relu(m + lo)`` (:func:`combine_slacks` of the slacks) as one
    autograd node: the penalty of a thin deep net is a few small tensors, where the graph's
    per-node cost is more than the arithmetic."""

    @staticmethod
    def forward(ctx, hi: Tensor, lo: Tensor, margin: float, rho: float) -> Tensor:
        ctx.save_for_backward(hi, lo)
        ctx.margin, ctx.rho = margin, rho
        s = torch.rsub(hi, margin).clamp_min_(0).mul_(rho)
        return s.add_(torch.add(lo, margin).clamp_min_(0), alpha=1.0 - rho)

    @staticmethod
    def backward(ctx, g: Tensor):
        hi, lo = ctx.saved_tensors
        m, rho = ctx.margin, ctx.rho
        # relu's derivative as autograd takes it: 1 unless the hinge's input is <= 0 (so a NaN passes)
        g_hi = (g * -rho).masked_fill_(hi.detach() >= m, 0)
        g_lo = (g * (1.0 - rho)).masked_fill_(lo.detach() <= -m, 0)
        return g_hi, g_lo, None, None


def _combined_slacks(hi: Tensor, lo: Tensor, margin: float, rho: float) -> Tensor:
    """``combine_slacks(*_slacks(hi, lo, margin), rho)``, one node outside ``torch.func``."""
    if _transforms_active():
        return combine_slacks(*_slacks(hi, lo, margin), rho)
    return _Hinges.apply(hi, lo, margin, rho)


def combine_slacks(xi_plus: Tensor, xi_minus: Tensor, rho: float) -> Tensor:
    r"""The ρ-convex combination :math:`\rho\,\xi^+ + (1-\rho)\,\xi^-`.

    ``rho = 0.5`` gives the paper's :math:`\tfrac12(\xi^+ + \xi^-)` (eqs. 13 and 15); the zero
    initialisation of §4.2 (eq. 17, :math:`(\tfrac12+\rho')\xi^+ + (\tfrac12-\rho')\xi^-` with
    :math:`\rho' = 0.01`) is ``rho = 0.51``, the authors' code convention.
    """
    return rho * xi_plus + (1.0 - rho) * xi_minus


def aggregate(s: Tensor, aggregation: str, count: Tensor | float | None = None) -> Tensor:
    """Reduce stacked per-unit or per-point terms ``s`` (``(nets, ...)``) to one value per net.

    ``count`` is the number of real (unpadded) terms per net, used by ``"mean"``.
    """
    dims = tuple(range(1, s.dim()))
    if aggregation == "paper":
        return s.sum(dims)
    if aggregation == "squared_sum":
        return s.square().sum(dims)
    if aggregation == "mean":
        n = s[0].numel() if count is None else count
        return s.sum(dims) / n
    if aggregation == "norm":
        return torch.linalg.vector_norm(s, dim=dims)  # subgradient 0 at 0 (sqrt would give NaN)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def stacked_separation_penalty(
    z: Tensor | Sequence[Tensor],
    kind: str = "up",
    rho: float = 0.5,
    margin: float = 1.0,
    aggregation: str = "paper",
    conv_reduction: str = "channel",
    unit_mask: Tensor | None = None,
    reduce_extremes: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    gather_points: Callable[[Tensor], Tensor] | None = None,
    ties: str = "split",
    sparse_grad: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """``(g_U, g_P)`` of one layer for each stacked net, shape ``(nets,)`` each (``None`` if not in ``kind``).

    ``z``: stacked ``(nets, points, units, *spatial)`` or a sequence of same-shaped layers
    (see :func:`separation_extremes`).

    ``reduce_extremes`` and ``gather_points`` let data-parallel training see the global batch:
    the first merges per-unit extremes across processes, the second concatenates per-point
    terms along dimension 1. See :func:`separation_extremes` for ``unit_mask``, ``ties`` and
    ``sparse_grad``.
    """
    _check_options(aggregation, conv_reduction, kind)
    joint = None
    if reduce_extremes is None and gather_points is None:
        joint = _joint_extremes(z, conv_reduction, unit_mask, ties, sparse_grad)
    if joint is not None:  # every slack of the layer from one (nets, units + points) tensor
        hi, lo, units = joint
        s = _combined_slacks(hi, lo, margin, rho)
        s_u = s[:, :units] if "u" in kind else None
        s_p = s[:, units:] if "p" in kind else None
    else:
        u, p = separation_extremes(z, kind, conv_reduction, unit_mask, ties, sparse_grad)
        s_u = s_p = None
        if u is not None:
            s_u = combine_slacks(*_slacks(*(u if reduce_extremes is None else reduce_extremes(*u)), margin), rho)
        if p is not None:
            s_p = combine_slacks(*_slacks(*p, margin), rho)
            if gather_points is not None:
                s_p = gather_points(s_p)
    g_u = g_p = None
    if s_u is not None:
        count = None
        if unit_mask is not None:
            m = unit_mask.reshape(unit_mask.shape + (1,) * (s_u.dim() - unit_mask.dim())).to(s_u.dtype)
            s_u = s_u * m
            count = m.expand_as(s_u).sum(tuple(range(1, s_u.dim())))
        g_u = aggregate(s_u, aggregation, count)
    if s_p is not None:
        g_p = aggregate(s_p, aggregation)
    return g_u, g_p


def separation_penalty(
    zs: Tensor | Sequence[Tensor],
    kind: str = "up",
    rho: float = 0.5,
    margin: float = 1.0,
    aggregation: str = "paper",
    conv_reduction: str = "channel",
) -> Tensor:
    r"""Separation penalty :math:`g_U + g_P` summed over the layers' pre-activations ``zs``.

    With the defaults (``aggregation="paper"``, ``rho=0.5``) this is exactly eqs. 13 + 15:
    :math:`\tfrac12\sum_k\sum_j(\xi^+_{jk}+\xi^-_{jk}) + \tfrac12\sum_k\sum_i(\xi^+_{ik}+\xi^-_{ik})`.
    Other aggregations of each layer's per-unit / per-point terms ``s``:
    ``"squared_sum"`` :math:`\sum s^2` (the authors' Keras code), ``"mean"``, and ``"norm"``
    :math:`\lVert s\rVert_2` (their PyTorch code). Multiply by λ yourself (eq. 16).

    Shape:
        each ``z``: ``(N, C)`` (dense) or ``(N, C, *spatial)`` (conv). Output: a scalar.

    Example:
        >>> z = torch.tensor([[2.0, -3.0], [0.5, -0.5]])
        >>> # unit 0 never goes below -1 (xi- = 1.5), unit 1 never above +1 (xi+ = 1.5)
        >>> separation_penalty(z, kind="u")
        tensor(1.5000)
        >>> separation_penalty(z, kind="p")  # point 1 reaches neither +1 nor -1
        tensor(0.5000)
    """
    _check_options(aggregation, conv_reduction, kind)
    if isinstance(zs, Tensor):
        zs = [zs]
    if len(zs) == 0:
        raise ValueError("separation_penalty needs at least one pre-activation tensor")
    total = zs[0].new_zeros(())
    for z in zs:
        for g in stacked_separation_penalty(_stack(z), kind, rho, margin, aggregation, conv_reduction):
            if g is not None:
                total = total + g[0]
    return total
