"""Separation constraints (Sep-U, Sep-P, Sep-UP) attached to any model: its layers' outputs are
captured on the way through the forward pass."""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import native
from .functional import (TIES, _check_options, _native_applies, _NativePenalty, _transforms_active,
                         native_separation_penalty, stacked_separation_penalty)

__all__ = ["SeparationConstraint", "hidden_layers", "WEIGHTED_TYPES"]

WEIGHTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hidden_layers(model: nn.Module, include_output: bool = False) -> list[nn.Module]:
    """Every ``Linear`` / ``Conv`` layer of ``model`` in registration order, without the last one
    (the output layer) unless ``include_output``."""
    layers = [m for m in model.modules() if isinstance(m, WEIGHTED_TYPES)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to constrain")
    return layers if include_output else layers[:-1]


def _check_layers(model: nn.Module, layers: list) -> None:
    if not layers:
        raise ValueError("layers= is empty: give at least one layer to constrain, or None for every hidden layer")
    inside = {id(m) for m in model.modules()}
    seen: set[int] = set()
    for layer in layers:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layers= takes the model's modules (e.g. model.fc1), got {type(layer).__name__}: {layer!r}")
        if id(layer) not in inside:
            raise ValueError(f"layers= names a module that is not part of the model: {layer}")
        if id(layer) in seen:
            raise ValueError(f"layers= names {layer} twice (its penalty would count twice)")
        seen.add(id(layer))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherCat(torch.autograd.Function):
    """Concatenate every process's tensor along ``dim`` (sizes may differ), differentiably.

    Every process then computes the same penalty from the gathered tensor; backward sums the
    processes' gradients of each piece (an all-reduce), and DDP's gradient averaging divides
    by the world size again, so the parameter gradient equals the single-process one.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        size = torch.tensor([x.shape[dim]], device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(t) for t in sizes]
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, max(sizes) - x.shape[dim]]
        padded = torch.nn.functional.pad(x, pad).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.dim, ctx.sizes, ctx.rank = dim, sizes, rank
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[ctx.rank]), None


class _Densify(torch.autograd.Function):
    """Identity on a constrained feature map whose backward makes a lone sparse gradient dense.

    The penalty sends its gradient to a CPU feature map as a sparse tensor (a handful of
    extreme positions; a dense zero map plus its addition cost about a tenth of a CNN's step),
    which autograd adds into the network's dense gradient. A convolution's backward cannot take
    a sparse gradient alone (when the loss is the penalty only); passing the map through this
    identity first guarantees that it never has to. The output shares the map's memory and
    version counter but is not an autograd view, so the model may still modify it in place
    (which :meth:`SeparationConstraint.penalty` then refuses, as for any captured output).

    The classic ``forward(ctx, ...)`` form: ``Function.apply`` binds the arguments of the split
    ``forward``/``setup_context`` form through ``inspect.signature`` on every call (14 µs
    against 2 µs alone, about 0.1 ms a layer between a small CNN's convolutions, a tenth of its
    Sep-UP overhead). ``torch.func`` transforms cannot run this form; under them the penalty
    takes the PyTorch path, which sends no sparse gradient, so the capture leaves the identity
    out.
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        return z.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.to_dense() if grad.is_sparse else grad


class _CapturingForward:
    """A constrained layer's forward, then the constraint's capture of its output.

    Set on the layer as its instance attribute ``forward``: ``nn.Module.__call__`` then keeps
    its fast path, where a forward hook would send every call of the layer through the hooks'
    slow one (on a 50-layer, 4-unit MLP that was about 5 % of a training step). ``inner``: a
    forward already set on the instance (another constraint's), else the class's is called.
    After :meth:`SeparationConstraint.remove` (``constraint`` ``None``) it only passes through,
    where it could not be taken out (something wrapped the forward again since). It runs its own
    layer: a shallow copy of the layer (``copy.copy``, ``nn.DataParallel``'s replicas) shares it
    and so runs the original's parameters; train data-parallel with DistributedDataParallel.
    """

    def __init__(self, constraint: "SeparationConstraint", layer: nn.Module):
        self.constraint, self.layer = constraint, layer
        # the forward it replaces: one already set on the instance, else the class's (looked up
        # at each call, as nn.Module does)
        self.inner = layer.__dict__.get("forward")
        # an unbatched input (C, *spatial) of a conv layer gives an output of this many dimensions
        self.unbatched = len(layer.kernel_size) + 1 if isinstance(layer, _ConvNd) else None

    def __call__(self, *args, **kwargs):
        layer = self.layer
        out = type(layer).forward(layer, *args, **kwargs) if self.inner is None else self.inner(*args, **kwargs)
        c = self.constraint
        if c is None:
            return out
        if type(out) is Tensor and out.dim() == 2 and self.unbatched != 2:
            # (points, units): the usual dense layer, taken as it is (here: a call less per layer)
            c._raw.append(out)
            c._captured.append(out)
            c._densified.append(False)
            c._versions.append(None if out.is_inference() or torch.compiler.is_compiling() else out._version)
            return out
        return c._capture(layer, self.unbatched, out)


def _global_extremes(hi: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
    return _GatherCat.apply(hi.unsqueeze(0), 0).amax(0), _GatherCat.apply(lo.unsqueeze(0), 0).amin(0)


def _global_points(s: Tensor) -> Tensor:
    return _GatherCat.apply(s, 1)


class SeparationConstraint:
    r"""Hinge penalties that keep every unit and every point of a ReLU network alive.

    For the pre-activations :math:`z_{ij}` of each constrained layer (point :math:`i` of the
    batch, unit :math:`j`), with margin :math:`m` (1 in the paper):

    .. math::
        \text{Sep-U: } \xi^+_j = [m - \max_i z_{ij}]_+,\ \xi^-_j = [m + \min_i z_{ij}]_+ \qquad
        \text{Sep-P: } \xi^+_i = [m - \max_j z_{ij}]_+,\ \xi^-_i = [m + \min_j z_{ij}]_+

    and each slack pair enters as :math:`s = \rho\,\xi^+ + (1-\rho)\,\xi^-`. The penalty is
    ``weight`` × the sum over layers of the aggregated terms (eq. 16 with λ = ``weight``):
    ``aggregation="paper"`` sums them (with ``rho=0.5`` exactly eqs. 13 and 15),
    ``"squared_sum"`` sums their squares (the authors' Keras code), ``"mean"`` averages and
    ``"norm"`` takes the L2 norm (their PyTorch code). ``rho=0.51`` is eq. 17 with the
    paper's ρ = 0.01 (zero initialisation).

    Conv feature maps: ``conv_reduction="channel"`` treats a channel as a unit and a sample as
    a point (extremes over the positions too, the authors' PyTorch code); ``"position"`` makes
    every spatial position its own unit and point (their Keras code).

    Each constrained layer gets a capturing ``forward`` (set on the instance, wrapping the one
    it had; :meth:`remove` puts that back), which keeps the layer's output, i.e. the
    pre-activation shared by all members of a linked activation. Forward hooks would do the
    same at a cost: a layer with one takes PyTorch's slow call path, a twentieth of a 50-layer
    thin MLP's training step; hooks of your own still run around the layer as before. A
    ``Linear`` layer applied to ``(N, *, F)`` inputs has ``F`` units and every one of its
    ``N·*`` input rows is a point; a conv layer's unbatched input ``(C, *spatial)`` is one
    point. By default every ``Linear`` and ``Conv`` layer except the output one (the last one
    registered in the model; a warning says when it runs before constrained layers) is
    constrained; pass ``layers=`` to choose. Those outputs must not be modified in place
    afterwards (``nn.ReLU(inplace=True)`` right after a constrained layer would turn them into
    activations): :meth:`penalty` refuses such a forward pass. On a CPU,
    feature maps pass through an identity (same values and memory) that lets the penalty's
    gradient arrive as a sparse tensor. On a CPU (float32/float64) :meth:`penalty` is computed
    by the native kernel of :mod:`alive.native` where it applies (a deep rectangular MLP's
    in a C++ autograd node, where one could be built). Under data-parallel
    training (``torch.distributed`` initialised) the extremes over points are taken over the
    global batch, so the penalty equals the single-process one (to float rounding).

    A forward pass starts when the *model* is called: a model used through another method
    (``model.encode(x)``) or through its submodules keeps adding captures until :meth:`clear`
    is called (or attach the constraint to the module you call). Gradient checkpointing must
    be non-reentrant (``use_reentrant=False``): the reentrant kind runs the forward under
    ``no_grad``, so the penalty would get no gradient. ``copy.deepcopy`` and pickling of the
    model take its capturing forwards, and so a copy of the constraint, along without the
    captured tensors. ``nn.DataParallel`` (one process, replicas made by shallow copies) is not
    supported; ``DistributedDataParallel`` is.

    Args:
        model: the network; the penalty refers to its last forward pass.
        kind: ``"u"``, ``"p"`` or ``"up"``.
        weight: λ.
        rho, margin, aggregation, conv_reduction, include_output, layers: see above.
        ties: how the gradient of an extreme reaches tied pre-activations (several points with
            the same maximum, as dead points or zero initialisation make): ``"split"`` shares
            it equally (TensorFlow's ``reduce_max``, the authors' Keras code; the default),
            ``"first"`` gives it to one of them (``torch.max``, their PyTorch code; faster).
            Identical whenever the extremes are unique; ``conv_reduction="position"`` always
            splits.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with SeparationConstraint(net, kind="up", weight=1e-4) as sep:
        ...     loss = net(torch.randn(8, 2)).square().mean() + sep.penalty()
        ...     loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "up",
        weight: float = 1.0,
        rho: float = 0.5,
        margin: float = 1.0,
        aggregation: str = "paper",
        conv_reduction: str = "channel",
        include_output: bool = False,
        layers: Sequence[nn.Module] | None = None,
        ties: str = "split",
    ):
        _check_options(aggregation, conv_reduction, kind)
        if ties not in TIES:
            raise ValueError(f"unknown ties {ties!r}; choose one of {TIES}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {rho}")
        if not weight >= 0 or not math.isfinite(weight):
            raise ValueError(f"weight (lambda) must be a non-negative finite number, got {weight}")
        if not math.isfinite(margin):
            raise ValueError(f"margin must be a finite number, got {margin}")
        self.kind, self.weight, self.rho, self.margin = kind, float(weight), float(rho), float(margin)
        self.aggregation, self.conv_reduction, self.ties = aggregation, conv_reduction, ties
        if layers is not None:
            layers = list(layers)  # any iterable, read once
            _check_layers(model, layers)
        self.layers = layers if layers is not None else hidden_layers(model, include_output)
        if not self.layers:
            raise ValueError("no layer to constrain (a model with one Linear/Conv layer has only its output)")
        self._raw: list[Tensor] = []  # the layers' outputs
        self._captured: list[Tensor] = []  # what the penalty reads: the output, or its densifying identity
        self._versions: list[int | None] = []
        self._densified: list[bool] = []  # captured through the identity that takes a sparse gradient
        self._output_at: int | None = None  # captures made before the presumed output layer last ran
        self._warned = False
        self._coefs: dict[tuple, tuple[Tensor, Tensor]] = {}  # (layers, dtype, kind) -> the native kernel's (λ_U, λ_P) flags
        self._stackable = True  # the last pass's layers stacked into one tensor (one shape)
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._forwards = []
        for layer in self.layers:
            wrapper = _CapturingForward(self, layer)
            layer.forward = wrapper
            self._forwards.append(wrapper)
        if layers is None and not include_output:
            self._output_layer = hidden_layers(model, include_output=True)[-1]
            self._handles.append(self._output_layer.register_forward_hook(self._output_ran))

    # captures
    def _reset(self, module, args) -> None:
        self.clear()

    def _output_ran(self, module, args, output) -> None:
        self._output_at = len(self._raw)

    def _capture(self, module: nn.Module, unbatched: int | None, output: Tensor) -> Tensor:
        if isinstance(unbatched, tuple):  # the forward hook (module, args, output) of a constraint pickled earlier
            unbatched = len(module.kernel_size) + 1 if isinstance(module, _ConvNd) else None
        if not isinstance(output, Tensor):
            raise TypeError(f"the constrained layer {type(module).__name__} returned a {type(output).__name__}, "
                            "not a tensor of pre-activations; constrain Linear/Conv-like layers (layers=)")
        # CPU feature maps take the penalty's gradient as a sparse tensor (see _Densify); the
        # model goes on with the identity's output (same values and memory). A compiled graph
        # cannot take a sparse gradient, so compiled forwards keep the dense path.
        compiling = torch.compiler.is_compiling()
        densify = (
            output.dim() > 2
            and output.device.type == "cpu"
            and output.requires_grad
            and torch.is_grad_enabled()
            and not compiling
            and not _transforms_active()
        )
        self._raw.append(output)
        captured = output
        if unbatched is not None and output.dim() == unbatched:
            # an unbatched input (C, *spatial) is one point, as the layer itself treats it
            captured = output.unsqueeze(0)
            densify = False
        elif isinstance(module, nn.Linear) and output.dim() > 2:
            # a Linear layer maps the last dimension: every leading index (a token, a position) is a point
            captured = output.reshape(-1, output.shape[-1])
            densify = False
        if densify:
            captured = _Densify.apply(output)
        self._captured.append(captured)
        self._densified.append(densify)
        # no in-place check where there is no counter to read: inference tensors have none, and
        # a compiled graph writes its outputs after its (traced) captures have run
        self._versions.append(None if compiling or captured.is_inference() else captured._version)
        return captured if densify else output

    # API
    @property
    def preactivations(self) -> list[Tensor]:
        """The pre-activations captured during the last forward pass, in call order.

        These are the layers' own outputs, so gradients taken with respect to them (``autograd.grad``,
        ``retain_grad``, tensor hooks) are ordinary dense tensors."""
        return list(self._raw)

    def _check_pass(self, stacklevel: int) -> None:
        """Refuse a pass without captures or whose captured outputs were modified in place;
        warn (once) when the presumed output layer ran before constrained layers."""
        captured = self._captured
        if not captured:
            raise RuntimeError("no forward pass has been recorded since the constraint was attached")
        # (per-layer Python is a real share of a thin deep net's step: one comprehension each)
        versions = [None if v is None else z._version for z, v in zip(captured, self._versions)]
        if versions != self._versions:
            i = next(i for i, (a, b) in enumerate(zip(versions, self._versions)) if a != b)
            raise RuntimeError(
                f"the output of a constrained layer (call {i} of the forward pass) "
                "was modified in place after it was captured (e.g. by nn.ReLU(inplace=True)), so the "
                "penalty would see post-activation values; use out-of-place activations after constrained layers")
        if not self._warned and self._output_at is not None and self._output_at < len(self._raw):
            self._warned = True
            warnings.warn(
                f"{type(self._output_layer).__name__} layer {self._output_layer}, left unconstrained as the output "
                "layer (the last Linear/Conv registered in the model), ran before constrained layers in this "
                "forward pass; if it is not the output layer, choose the layers with layers= (or include_output=True)",
                stacklevel=stacklevel)

    def _groups(self, stacklevel: int = 3, checked: bool = False) -> list[list[int]]:
        """The captured layers by shape (checked first, unless ``checked``): layers of one shape
        are penalised together in one pass (a deep thin net costs a handful of operations, not a
        handful per layer)."""
        if not checked:
            self._check_pass(stacklevel + 1)
        groups: dict[tuple, list[int]] = {}
        for i, z in enumerate(self._captured):
            groups.setdefault((z.shape, z.dtype, z.device), []).append(i)
        return list(groups.values())

    def _terms(self, idx: list[int], sync: bool) -> tuple[Tensor | None, Tensor | None]:
        """``(g_U, g_P)`` of the layers ``idx``, one of each per layer."""
        return stacked_separation_penalty(
            [self._captured[i] for i in idx],
            self.kind,
            self.rho,
            self.margin,
            self.aggregation,
            self.conv_reduction,
            reduce_extremes=_global_extremes if sync else None,
            gather_points=_global_points if sync else None,
            ties=self.ties,
            sparse_grad=all(self._densified[i] for i in idx),
        )

    def _stacked_terms(self) -> list[tuple[list[int], Tensor | None, Tensor | None]]:
        """``(layer indices, g_U, g_P)`` of each group of same-shaped layers."""
        sync = _distributed()
        return [(idx, *self._terms(idx, sync)) for idx in self._groups(stacklevel=4)]

    def _native_coefs(self, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The native kernel's per-layer (λ_U, λ_P) flags, made once: a new tensor per call is a
        real share of a thin net's step."""
        key = (n, dtype, self.kind)
        coefs = self._coefs.get(key)
        if coefs is None:
            coefs = self._coefs[key] = tuple(torch.full((n,), float(k in self.kind), dtype=dtype) for k in "up")
        return coefs

    def _native_total(self, idx: list[int]) -> Tensor | None:
        """g_U + g_P summed over the layers ``idx`` by the native kernel, or ``None`` where it
        does not apply (see :func:`alive.functional.native_separation_penalty`)."""
        zs = [self._captured[i] for i in idx]
        return native_separation_penalty(
            zs, *self._native_coefs(len(zs), zs[0].dtype), self.rho, self.margin, self.aggregation, self.ties,
            self.conv_reduction, sparse_grad=all(self._densified[i] for i in idx), total=True)

    def _dense_native_penalty(self) -> Tensor | None:
        """The penalty of a pass whose captures are all dense layers of one shape (a deep
        rectangular MLP), by the native kernel in one autograd node, λ included (the C++ node of
        :func:`alive.native.dense_penalty` where it could be built); ``None`` otherwise.
        The general path's grouping, and its operations, cost a tenth of a thin net's step."""
        zs = self._captured
        head = zs[0]
        if head.dim() != 2 or not self._stackable or not _native_applies(head, self.aggregation):
            return None
        node = native.dense_penalty()
        if node is not None:
            try:
                return node(zs, *self._native_coefs(len(zs), head.dtype), self.rho, self.margin,
                            native.AGGREGATIONS[self.aggregation], self.ties == "first", self.weight)
            except ValueError:  # several widths (or dtypes, devices): as below
                self._stackable = False
                return None
        try:
            zh = torch.stack(zs)
        except RuntimeError:  # several widths (or devices): groups of one shape, until one fits all again
            self._stackable = False
            return None
        # what native_separation_penalty would check holds here: the kernel's node directly
        return _NativePenalty.apply(zh, None, *self._native_coefs(len(zs), zh.dtype), None,
                                    (self.rho, self.margin, self.aggregation, self.ties, self.weight,
                                     torch.is_grad_enabled()))

    def layer_terms(self) -> list[tuple[Tensor | None, Tensor | None]]:
        """``(g_U, g_P)`` of each constrained layer (unweighted) for the last forward pass."""
        terms: dict[int, tuple] = {}
        for idx, g_u, g_p in self._stacked_terms():
            for k, i in enumerate(idx):
                terms[i] = (None if g_u is None else g_u[k], None if g_p is None else g_p[k])
        return [terms[i] for i in range(len(terms))]

    def penalty(self) -> Tensor:
        """λ · (g_U + g_P) for the last forward pass (differentiable; works under ``no_grad`` too)."""
        sync = _distributed()
        self._check_pass(stacklevel=3)
        if not sync:
            total = self._dense_native_penalty()
            if total is not None:
                return total
        total = None
        groups = self._groups(checked=True)
        self._stackable = len(groups) == 1
        for idx in groups:
            g = None if sync else self._native_total(idx)
            parts = [g] if g is not None else [t.sum() for t in self._terms(idx, sync) if t is not None]
            for part in parts:
                total = part if total is None else total + part
        return self.weight * total

    def clear(self) -> None:
        """Drop the captured pre-activations (frees their memory until the next forward)."""
        self._raw.clear()
        self._captured.clear()
        self._versions.clear()
        self._densified.clear()
        self._output_at = None

    def remove(self) -> None:
        """Detach every hook and capturing forward; the model is left exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for wrapper in self._forwards:
            wrapper.constraint = None
            layer = wrapper.layer
            if layer.__dict__.get("forward") is wrapper:
                # back to the first forward below that still does something (a constraint
                # removed while this one wrapped it left a pass-through)
                inner = wrapper.inner
                while isinstance(inner, _CapturingForward) and inner.constraint is None:
                    inner = inner.inner
                if inner is None:
                    del layer.__dict__["forward"]
                else:
                    layer.__dict__["forward"] = inner
        self._forwards = []
        self.clear()

    def __getstate__(self) -> dict:
        # deepcopy / pickle of a model with the constraint attached carry its capturing forwards,
        # hence the constraint: not the last pass's captured tensors (non-leaf tensors cannot be copied)
        state = self.__dict__.copy()
        state["_raw"], state["_captured"], state["_versions"], state["_densified"] = [], [], [], []
        state["_output_at"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        # a constraint pickled by an earlier version lacks the newer attributes
        self.__dict__.update({"_coefs": {}, "_stackable": True, "_forwards": [], **state})

    def __enter__(self) -> "SeparationConstraint":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"SeparationConstraint(kind={self.kind!r}, weight={self.weight:g}, rho={self.rho:g}, "
            f"margin={self.margin:g}, aggregation={self.aggregation!r}, "
            f"conv_reduction={self.conv_reduction!r}, ties={self.ties!r}, layers={len(self.layers)})"
        )
