"""Functional forms of the package's operations (the modules are thin shells over these).

* :func:`linked` / :func:`linked_relu`: the linked activations of Riera & Pujol,
  ``f(z) = (g_1(z), ..., g_d(z))`` concatenated along a channel dimension.
* :func:`unit_slacks`, :func:`point_slacks`, :func:`separation_penalty`: the slack
  variables and the penalty of the separation constraints (Sep-U, Sep-P, Sep-UP).

Both the single-network hooks of :class:`alive.constraints.SeparationConstraint` and the
batched grid engine (:mod:`alive.grid`) call :func:`stacked_separation_penalty`, so the
formulas live in exactly one place.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "linked",
    "linked_relu",
    "unit_slacks",
    "point_slacks",
    "combine_slacks",
    "aggregate",
    "separation_extremes",
    "dense_separation_penalty",
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
    """``cat(relu(z), relu(-z))`` written straight into its output, one pass per half.

    Backward reads only the output (which the next layer keeps for its own backward anyway,
    so linking costs no extra activation memory): ``dz = g_pos·[out_pos > 0] - g_neg·[out_neg > 0]``.
    At ``z == 0`` both members have PyTorch's ReLU derivative 0, exactly as the naive composition.
    """

    @staticmethod
    def forward(ctx, z: Tensor, dim: int) -> Tensor:
        dim = dim % z.dim()
        c = z.shape[dim]
        shape = list(z.shape)
        shape[dim] = 2 * c
        out = torch.empty(shape, dtype=z.dtype, device=z.device, memory_format=_memory_format(z))
        torch.clamp_min(z, 0, out=out.narrow(dim, 0, c))
        torch.clamp_max(z, 0, out=out.narrow(dim, c, c)).neg_()
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, out, 0)
        g_pos, g_neg = g.chunk(2, ctx.dim)
        return g_pos - g_neg, None


def _memory_format(z: Tensor):
    if z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def linked_relu(z: Tensor, dim: int = 1) -> Tensor:
    r"""Mirror-linked ReLU, :math:`f(z) = (\max(z, 0), \max(-z, 0))`, concatenated along ``dim``.

    Equal to ``torch.cat((relu(z), relu(-z)), dim)`` (CReLU) in value and gradient, about
    twice as fast on a CPU, and it keeps no tensor the next layer does not keep already.
    """
    return _LinkedReLU.apply(z, dim)


def linked(z: Tensor, members: Sequence[Callable[[Tensor], Tensor]], dim: int = 1) -> Tensor:
    r"""Apply every member of a linkage to the same pre-activation and concatenate.

    :math:`f(z) = (g_1(z), \dots, g_d(z))`; all channels of :math:`g_1` come first, as in the
    authors' code. ``members`` has at least two callables.
    """
    if len(members) < 2:
        raise ValueError(f"a linkage needs at least 2 members, got {len(members)}")
    return torch.cat([g(z) for g in members], dim)


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


def _spatial(z: Tensor, conv_reduction: str) -> tuple[int, ...]:
    return tuple(range(3, z.dim())) if conv_reduction == "channel" else ()


TIES = ("split", "first")


class _DenseExtremes(torch.autograd.Function):
    """Per-unit (over points) and per-point (over real units) max and min of a dense stack
    ``(nets, points, units)``, returned concatenated as ``hi = [hi_u | hi_p]`` and
    ``lo = [lo_u | lo_p]`` of shape ``(nets, units + points)``; the gradient of each extreme
    goes to one arg-extreme.

    One function for all four so that the backward is a single zero tensor and four small
    scatters instead of dense comparisons per extreme (the grid engine's hot path on a CPU).
    ``point_fill`` is ``(nets, 1, units)``: 0 for real units, a huge value for padded ones.
    """

    @staticmethod
    def forward(ctx, z: Tensor, point_fill: Tensor | None):
        (hu, iu), (lu, ju) = z.max(1), z.min(1)
        zh = z if point_fill is None else z - point_fill
        zl = z if point_fill is None else z + point_fill
        (hp, ip), (lp, jp) = zh.max(2), zl.min(2)
        ctx.save_for_backward(iu, ju, ip, jp)
        ctx.shape, ctx.units = z.shape, z.shape[2]
        return torch.cat((hu, hp), 1), torch.cat((lu, lp), 1)

    @staticmethod
    def backward(ctx, ghi: Tensor, glo: Tensor):
        iu, ju, ip, jp = ctx.saved_tensors
        w = ctx.units
        g = ghi.new_zeros(ctx.shape)
        g.scatter_add_(1, iu.unsqueeze(1), ghi[:, :w].unsqueeze(1))
        g.scatter_add_(1, ju.unsqueeze(1), glo[:, :w].unsqueeze(1))
        g.scatter_add_(2, ip.unsqueeze(2), ghi[:, w:].unsqueeze(2))
        g.scatter_add_(2, jp.unsqueeze(2), glo[:, w:].unsqueeze(2))
        return g, None


def dense_separation_penalty(
    z: Tensor,
    coef_u: Tensor,
    coef_p: Tensor,
    rho: float = 0.5,
    margin: float = 1.0,
    aggregation: str = "paper",
    point_fill: Tensor | None = None,
    unit_weight: Tensor | None = None,
) -> Tensor:
    """λ_U·g_U + λ_P·g_P of one dense layer for each net of a stack ``(nets, points, units)``.

    A fast path of :func:`stacked_separation_penalty` (``ties="first"``) for the grid engine:
    every slack of the layer is formed and weighted in one pass over a ``(nets, units +
    points)`` tensor. ``coef_u`` / ``coef_p`` (``(nets,)``) are the per-net λ (0 switches a
    term off); ``point_fill`` masks padded units out of the points' extremes and
    ``unit_weight`` (``(nets, units)``, 0 for padded units) out of the unit terms.
    Aggregations: ``"paper"``, ``"squared_sum"``, ``"mean"`` (``"norm"`` is not separable:
    use :func:`stacked_separation_penalty`).
    """
    if aggregation not in ("paper", "squared_sum", "mean"):
        raise ValueError(f"dense_separation_penalty supports paper, squared_sum and mean, not {aggregation!r}")
    n, b, w = z.shape
    hi, lo = _DenseExtremes.apply(z, point_fill)
    s = rho * torch.relu(margin - hi) + (1.0 - rho) * torch.relu(margin + lo)
    if aggregation == "squared_sum":
        s = s * s
    cu = coef_u[:, None] if unit_weight is None else coef_u[:, None] * unit_weight
    cp = coef_p[:, None].expand(n, b)
    if aggregation == "mean":
        units = w if unit_weight is None else unit_weight.sum(1, keepdim=True)
        cu, cp = cu / units, cp / b
    return (s * torch.cat((cu.expand(n, w), cp), 1)).sum(1)


def separation_extremes(
    z: Tensor,
    kind: str = "up",
    conv_reduction: str = "channel",
    unit_mask: Tensor | None = None,
    ties: str = "split",
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """The max and min behind every slack of one layer: ``((hi_u, lo_u), (hi_p, lo_p))``.

    ``z`` is stacked ``(nets, points, units, *spatial)``. Sep-U extremes run over the points
    (and, for ``conv_reduction="channel"``, the positions): shape ``(nets, units[, *spatial])``;
    Sep-P extremes over the units (and positions): ``(nets, points[, *spatial])``. Padded units
    (``unit_mask`` false) never take part in a point's extremes. ``None`` for a kind not asked.

    ``ties="split"`` shares the gradient equally among tied extremes (``amax``/``amin``, like
    TensorFlow's ``reduce_max`` that the authors used; this matters for zero initialisation,
    where every pre-activation ties). With ``"channel"`` reduction the positions are reduced
    first, so ties are shared among points, then among each point's tied positions. ``"first"`` gives it to one of them: identical whenever
    extremes are unique, and about twice as fast on a CPU (dense layers only; conv layers
    with ``"channel"`` reduction always split).
    """
    if ties not in TIES:
        raise ValueError(f"unknown ties {ties!r}; choose one of {TIES}")
    want_u, want_p = "u" in kind, "p" in kind
    mask = None
    if unit_mask is not None:
        mask = unit_mask.bool().reshape(unit_mask.shape[0], 1, unit_mask.shape[1], *([1] * (z.dim() - 3)))
    if ties == "first" and z.dim() == 3:
        fill = None if mask is None else (~mask).to(z.dtype) * _BIG
        hi, lo = _DenseExtremes.apply(z, fill)
        w = z.shape[2]
        u = (hi[:, :w], lo[:, :w]) if want_u else None
        p = (hi[:, w:], lo[:, w:]) if want_p else None
        return u, p
    u = p = None
    sp = _spatial(z, conv_reduction)
    if sp:
        # reduce the positions once, then points or units on the small (nets, points, units)
        # tensors: two passes over the feature maps instead of four (ties split level by level)
        zhi, zlo = z.amax(sp), z.amin(sp)
    else:
        zhi = zlo = z
    if want_u:
        u = (zhi.amax(1), zlo.amin(1))
    if want_p:
        if mask is None:
            p = (zhi.amax(2), zlo.amin(2))
        else:
            m = mask.reshape(mask.shape[:3]) if sp else mask
            p = (zhi.masked_fill(~m, -_BIG).amax(2), zlo.masked_fill(~m, _BIG).amin(2))
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
    return torch.linalg.vector_norm(s, dim=dims)  # subgradient 0 at 0 (sqrt would give NaN)


def stacked_separation_penalty(
    z: Tensor,
    kind: str = "up",
    rho: float = 0.5,
    margin: float = 1.0,
    aggregation: str = "paper",
    conv_reduction: str = "channel",
    unit_mask: Tensor | None = None,
    reduce_extremes: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    gather_points: Callable[[Tensor], Tensor] | None = None,
    ties: str = "split",
) -> tuple[Tensor | None, Tensor | None]:
    """``(g_U, g_P)`` of one layer for each stacked net, shape ``(nets,)`` each (``None`` if not in ``kind``).

    ``reduce_extremes`` and ``gather_points`` let data-parallel training see the global batch:
    the first merges per-unit extremes across processes, the second concatenates per-point
    terms along dimension 1. See :func:`separation_extremes` for ``unit_mask`` and ``ties``.
    """
    u, p = separation_extremes(z, kind, conv_reduction, unit_mask, ties)
    g_u = g_p = None
    if u is not None:
        hi, lo = u if reduce_extremes is None else reduce_extremes(*u)
        s = combine_slacks(*_slacks(hi, lo, margin), rho)
        count = None
        if unit_mask is not None:
            m = unit_mask.reshape(unit_mask.shape + (1,) * (s.dim() - unit_mask.dim())).to(s.dtype)
            s = s * m
            count = m.expand_as(s).sum(tuple(range(1, s.dim())))
        g_u = aggregate(s, aggregation, count)
    if p is not None:
        s = combine_slacks(*_slacks(*p, margin), rho)
        if gather_points is not None:
            s = gather_points(s)
        g_p = aggregate(s, aggregation)
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
