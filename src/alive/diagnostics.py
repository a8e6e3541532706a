"""Liveness diagnostics: dead and affine units, dead points, flat linked units, dead neurons.

Definitions (separation paper, Remarks 2.1–2.3; the papers' README):

* a unit is **dead** when its pre-activation -- what its activation function receives, after
  any normalisation -- is ``<= 0`` on every point of the data set, and **affine** (always on)
  when it is ``> 0`` on every point;
* a point is **dead at a layer** when every unit of that layer has pre-activation ``<= 0`` on
  it, and **dead** when it is dead at some layer;
* a linked unit is **flat** when no member of its linkage has a non-zero derivative on any
  point (the linkage condition forbids this);
* the linked-neurons paper counts a neuron as dead when its *output* is 0 for all samples
  (:func:`dead_neurons`).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from .activations import Linked, is_activation
from .constraints import WEIGHTED_TYPES, hidden_layers
from .functional import _positions_innermost

__all__ = ["LivenessReport", "liveness", "dead_neurons", "dead_unit_gradients"]


def _inputs(data) -> Tensor:
    if isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return data[0]
    if hasattr(data, "x_train"):
        return data.x_train
    raise TypeError(
        "data must be a tensor of inputs, an (inputs, targets) pair, or an alive.data.Dataset; "
        f"got {type(data).__name__}"
    )


@contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _stream(model: nn.Module, data, batch_size: int) -> Iterator[int]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = _inputs(data)
    if x.shape[0] == 0:
        raise ValueError("data holds no samples: liveness is measured by running the model over data")
    device = next((p.device for p in model.parameters()), x.device)
    with _eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            model(xb)
            yield xb.shape[0]


def _activation_modules(model: nn.Module) -> list[nn.Module]:
    """The activation modules of ``model`` (registered activations and :class:`Linked` ones),
    without the members inside a :class:`Linked`: those see ``z`` or ``-z`` and are part of
    their linked unit, not layers of their own."""
    inner = {id(m) for lk in model.modules() if isinstance(lk, Linked) for m in lk.modules() if m is not lk}
    return [m for m in model.modules() if is_activation(m) and id(m) not in inner]


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): name or type(m).__name__ for name, m in model.named_modules()}


def _call_name(seen: Counter, name: str) -> str:
    """A module called several times in a pass (a shared ``self.act``) is a layer per call:
    ``"act"``, ``"act (call 2)"``, ``"act (call 3)"``."""
    seen[name] += 1
    return name if seen[name] == 1 else f"{name} (call {seen[name]})"


def _check_unit_dim(unit_dim) -> None:
    if unit_dim == "auto" or (isinstance(unit_dim, int) and not isinstance(unit_dim, bool) and unit_dim != 0):
        return
    raise ValueError(f"unit_dim must be 'auto' or a non-zero dimension (0 holds the points), got {unit_dim!r}")


def _resolve_unit_dim(unit_dim, last: tuple | None, z: Tensor) -> int:
    """The unit dimension of ``z``: ``unit_dim`` itself, or for ``"auto"`` the last one when
    ``z`` is (still shaped as) the output of a ``Linear`` applied to ``(N, *, F)`` rows, the
    last Linear/Conv that ran (``last = (module, output)``): its ``F`` features are the
    units (the constraint's units too) and a token of a sequence is a position of its sample.
    Otherwise 1 (channels),
    also for a Linear output reshaped into a feature map. Tensors of fewer than 2
    dimensions have no unit dimension to move."""
    if z.dim() < 2:
        return 1
    if unit_dim == "auto":
        module, out = last if last is not None else (None, None)
        return -1 if isinstance(module, nn.Linear) and z.dim() > 2 and z.shape == out.shape else 1
    if not -z.dim() <= unit_dim < z.dim() or unit_dim % z.dim() == 0:
        raise ValueError(f"unit_dim {unit_dim} does not name a unit dimension of a tensor of shape {tuple(z.shape)}")
    return unit_dim


def _units_at_1(z: Tensor, dim: int) -> Tensor:
    """``z`` as ``(points, units, *positions)``; one value per point (``(N,)``) is one unit."""
    if z.dim() < 2:
        return z.reshape(-1, 1)
    return z if dim % z.dim() == 1 else z.movedim(dim, 1)


@contextmanager
def _last_weighted_layer(model: nn.Module) -> Iterator[list]:
    """A one-item list holding ``(module, output)`` of the ``Linear``/``Conv`` that ran last in
    the current forward pass of ``model`` (``None`` before the first)."""
    last: list[tuple | None] = [None]

    def new_pass(module, args):
        last[0] = None

    def hook(module, args, out):
        last[0] = (module, out) if isinstance(out, Tensor) else None

    handles = [model.register_forward_pre_hook(new_pass)]
    handles += [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, WEIGHTED_TYPES)]
    try:
        yield last
    finally:
        for h in handles:
            h.remove()


@dataclass
class LivenessReport:
    """Per-layer liveness table plus a one-line summary (see :func:`liveness`)."""

    layers: pd.DataFrame
    linked: pd.DataFrame
    points: int
    dead_points: int
    summary: dict = field(default_factory=dict)

    @property
    def dead_point_fraction(self) -> float:
        return self.dead_points / self.points if self.points else 0.0

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"LivenessReport({s['layers']} layers, {s['units']} units: {s['dead_units']} dead, "
            f"{s['affine_units']} affine; {self.points} points: {self.dead_points} dead"
            + (f"; {s['flat_linked_units']} flat linked units" if "flat_linked_units" in s else "")
            + ")"
        )


def liveness(
    model: nn.Module,
    data,
    batch_size: int = 1024,
    layers: Sequence[nn.Module] | None = None,
    conv_reduction: str = "channel",
    include_output: bool = False,
    unit_dim: int | str = "auto",
) -> LivenessReport:
    """Stream ``data`` through ``model`` once (eval mode, no gradients) and count the living.

    Args:
        model: any network. By default every call of an activation module (a registered
            activation or :class:`~alive.activations.Linked`) is a layer, and its *input* is
            the pre-activation: after a BatchNorm, the normalised values the nonlinearity sees
            (a batch-normalised unit whose raw layer output is negative may well be alive).
            An activation applied straight to the output of the last ``Linear``/``Conv`` (an
            output sigmoid) is not a hidden layer unless ``include_output``. A model whose
            activation modules are never called (functional activations) falls back to its
            hidden ``Linear``/``Conv`` outputs; one that mixes functional activations with
            modules is seen through its modules only (pass ``layers=`` then).
        layers: inspect the *outputs* of these modules instead.
        data: a tensor of inputs, an ``(inputs, targets)`` pair or an :class:`alive.data.Dataset`
            (its training inputs).
        conv_reduction: ``"channel"`` (a unit is a channel, extremes over positions too) or
            ``"position"`` (every position of a feature map its own unit).
        unit_dim: the dimension of the units. ``"auto"``: the features of a ``Linear`` layer
            applied to ``(N, *, F)`` rows (sequences, tokens: the ``F`` features are the units,
            the same units the separation constraint uses, and every other dimension a
            position), the channels (dimension 1) otherwise. Dimension 0 always holds the
            points, the samples: a sample is dead at a layer when every unit is ``<= 0`` at
            every token. (The constraint instead makes every token row a point of its own, so
            its Sep-P terms see dead tokens that liveness counts only when their whole sample is
            dead.)

    Returns:
        a :class:`LivenessReport`: ``layers`` (one row per layer: units, dead units, affine
        units, points dead at that layer), ``linked`` (one row per linked activation: units
        and flat units) and the number of points dead at some layer. ``summary["measured_at"]``
        says which tensors were inspected (``"activation input"`` or ``"layer output"``).
    """
    if conv_reduction not in ("channel", "position"):
        raise ValueError(f"unknown conv_reduction {conv_reduction!r}; choose 'channel' or 'position'")
    _check_unit_dim(unit_dim)
    if layers is not None:
        layers = list(layers)
        if not layers:
            raise ValueError("layers= is empty: give at least one module, or None for every activation's input")
        return _liveness(model, data, batch_size, layers, [], conv_reduction, include_output, unit_dim)
    acts = _activation_modules(model)
    if acts:
        report = _liveness(model, data, batch_size, None, acts, conv_reduction, include_output, unit_dim)
        if report.summary["layers"]:
            return report
    # no activation module, or none of them called: the hidden layers' outputs
    return _liveness(model, data, batch_size, hidden_layers(model, include_output), [], conv_reduction, include_output, unit_dim)


def _liveness(model, data, batch_size, layers, acts, conv_reduction, include_output, unit_dim) -> LivenessReport:
    names = _names(model)
    hi: dict[int, Tensor] = {}
    lo: dict[int, Tensor] = {}
    dead_at: dict[int, list[Tensor]] = defaultdict(list)
    called: list[str] = []  # layer names in call order (an activation module may be called twice)
    seen: Counter = Counter()
    linked_mods = [m for m in model.modules() if isinstance(m, Linked)]
    alive_linked: dict[int, Tensor] = {}

    def record(i: int, z: Tensor, dim: int) -> None:
        z = _units_at_1(z, dim)
        z = _positions_innermost(z, 2)  # channels-last maps reduce ~14x slower on a CPU
        sp = tuple(range(2, z.dim()))
        red = (0,) + (sp if conv_reduction == "channel" else ())
        zmax, zmin = z.amax(red), z.amin(red)
        hi[i] = zmax if i not in hi else torch.maximum(hi[i], zmax)
        lo[i] = zmin if i not in lo else torch.minimum(lo[i], zmin)
        dead_at[i].append((z.flatten(1).amax(1) <= 0).cpu())

    def unit_hook(i):
        def hook(module, args, z):
            last = (module, z) if isinstance(module, WEIGHTED_TYPES) else last_weighted[0]
            record(i, z, _resolve_unit_dim(unit_dim, last, z))

        return hook

    calls = [0]
    per_pass: set[int] = set()
    weighted = [m for m in model.modules() if isinstance(m, WEIGHTED_TYPES)]
    output_layer = weighted[-1] if weighted else None

    def new_pass(module, args):
        calls[0] = 0

    def end_pass(module, args, out):
        per_pass.add(calls[0])
        if len(per_pass) > 1:
            raise RuntimeError(f"the model called its activation modules {sorted(per_pass)} times in different "
                               "forward passes; liveness needs the same layers in every pass (pass layers=)")

    def activation_hook(module, args, kwargs):
        z = args[0] if args else next(iter(kwargs.values()))
        last = last_weighted[0]
        if not include_output and last is not None and last[0] is output_layer and z is last[1]:
            return  # an output nonlinearity, not a hidden layer
        i = calls[0]
        calls[0] += 1
        if len(called) <= i:
            name = names.get(id(module), str(i))
            called.append(_call_name(seen, name))
        # a linked activation's units lie along its own dim (its members' outputs are concatenated there)
        record(i, z, module.dim if isinstance(module, Linked) else _resolve_unit_dim(unit_dim, last, z))

    def linked_hook(i, mod: Linked):
        def hook(module, args):
            z = _positions_innermost(_units_at_1(args[0], mod.dim), 2)  # the linked channels' dimension
            red = (0,) + tuple(range(2, z.dim()))
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                any_slope = torch.zeros(z.shape[1], dtype=torch.bool, device=z.device)
                for g in mod.members:
                    (d,) = torch.autograd.grad(g(zz).sum(), zz, allow_unused=True)
                    if d is not None:
                        any_slope |= (d != 0).any(dim=red)
            alive_linked[i] = any_slope if i not in alive_linked else alive_linked[i] | any_slope

        return hook

    if acts:
        handles = [model.register_forward_pre_hook(new_pass), model.register_forward_hook(end_pass)]
        handles += [m.register_forward_pre_hook(activation_hook, with_kwargs=True) for m in acts]
    else:
        called += [names.get(id(layer), str(i)) for i, layer in enumerate(layers)]
        handles = [layer.register_forward_hook(unit_hook(i)) for i, layer in enumerate(layers)]
    handles += [m.register_forward_pre_hook(linked_hook(i, m)) for i, m in enumerate(linked_mods)]
    points = 0
    try:
        with _last_weighted_layer(model) as last_weighted:
            for n in _stream(model, data, batch_size):
                points += n
    finally:
        for h in handles:
            h.remove()

    rows = []
    any_dead = torch.zeros(points, dtype=torch.bool)
    for i, name in enumerate(called):
        if i not in hi:
            raise RuntimeError(f"layer {name} was not called by the forward pass")
        dead_pts = torch.cat(dead_at[i])
        any_dead |= dead_pts
        rows.append(
            {
                "layer": name,
                "index": i + 1,
                "units": hi[i].numel(),
                "dead_units": int((hi[i] <= 0).sum()),
                "affine_units": int((lo[i] > 0).sum()),
                "dead_points": int(dead_pts.sum()),
            }
        )
    table = pd.DataFrame(rows, columns=["layer", "index", "units", "dead_units", "affine_units", "dead_points"])
    linked_rows = [
        {
            "activation": names.get(id(m), str(i)),
            "units": int(alive_linked[i].numel()),
            "flat_units": int((~alive_linked[i]).sum()),
        }
        for i, m in enumerate(linked_mods)
        if i in alive_linked
    ]
    linked_table = pd.DataFrame(linked_rows, columns=["activation", "units", "flat_units"])
    summary = {
        "measured_at": "activation input" if acts else "layer output",
        "layers": len(called),
        "units": int(table["units"].sum()),
        "dead_units": int(table["dead_units"].sum()),
        "affine_units": int(table["affine_units"].sum()),
        "points": points,
        "dead_points": int(any_dead.sum()),
        "dead_point_fraction": float(any_dead.float().mean()) if points else 0.0,
    }
    if linked_rows:
        summary["flat_linked_units"] = int(linked_table["flat_units"].sum())
    return LivenessReport(table, linked_table, points, int(any_dead.sum()), summary)


def dead_neurons(model: nn.Module, data, batch_size: int = 1024, atol: float = 0.0, unit_dim: int | str = "auto") -> pd.DataFrame:
    """Dead neurons per activation layer as the linked-neurons paper counts them.

    A neuron is dead when its output is 0 (``|a| <= atol``) for every sample and every
    position. For a linked activation the neuron is the linked unit: it is dead only when
    *every* member's output is 0 everywhere; ``dead_members`` counts the member channels
    that are (for mirror-linked ReLU, the ``relu(z)`` half of a unit that is always negative).
    ``unit_dim``: as in :func:`liveness` (a linked activation's units lie along its own ``dim``).

    Returns:
        a DataFrame with one row per call of an activation module in a forward pass (a module
        called twice, e.g. a shared ``self.act``, gives two rows, ``"act"`` and ``"act (call 2)"``),
        in call order: ``layer`` (1-based), ``name``, ``neurons`` (units), ``dead``, ``dead_members``.
    """
    _check_unit_dim(unit_dim)
    names = _names(model)
    acts = _activation_modules(model)
    if not acts:
        raise ValueError(f"{type(model).__name__} has no activation module to inspect")
    alive: dict[int, Tensor] = {}  # per call of an activation module in a forward pass
    called: list[nn.Module] = []
    calls = [0]

    def new_pass(module, args):
        calls[0] = 0

    def hook(module, args, out):
        i = calls[0]
        calls[0] += 1
        dim = module.dim if isinstance(module, Linked) else _resolve_unit_dim(unit_dim, last_weighted[0], out)
        out = _units_at_1(out, dim)
        red = (0,) + tuple(range(2, out.dim()))
        nonzero = (out.abs() > atol).any(dim=red)
        if i == len(called):
            called.append(module)
            alive[i] = nonzero
        elif called[i] is not module or alive[i].shape != nonzero.shape:
            raise RuntimeError("the model called different activation modules in different forward passes; "
                               "dead_neurons needs the same layers in every pass")
        else:
            alive[i] = alive[i] | nonzero

    handles = [model.register_forward_pre_hook(new_pass)] + [m.register_forward_hook(hook) for m in acts]
    try:
        with _last_weighted_layer(model) as last_weighted:
            for _ in _stream(model, data, batch_size):
                pass
    finally:
        for h in handles:
            h.remove()
    rows, seen = [], Counter()
    for i, module in enumerate(called):
        members = module.num_members if isinstance(module, Linked) else 1
        channel_alive = alive[i]
        unit_alive = channel_alive.view(members, -1).any(0)
        rows.append(
            {
                "layer": i + 1,
                "name": _call_name(seen, names[id(module)]),
                "neurons": int(unit_alive.numel()),
                "dead": int((~unit_alive).sum()),
                "dead_members": int((~channel_alive).sum()),
            }
        )
    return pd.DataFrame(rows, columns=["layer", "name", "neurons", "dead", "dead_members"])


def dead_unit_gradients(bias: float = -100.0, points: int = 64, weight: float = 1e-4, seed: int = 0) -> pd.DataFrame:
    """The gradient a unit with a hugely negative bias receives, three ways.

    One hidden unit ``z = w·x + b`` (``b = bias``) feeds a linear output trained to a random
    target. With ReLU the unit is dead: ``relu(z) = 0`` on every point, and its weights get
    exactly zero gradient. Linking (``(relu(z), relu(-z))``) or adding Sep-U (λ = ``weight``)
    gives it a non-zero gradient, so it can come back.
    """
    from .activations import make_activation
    from .constraints import SeparationConstraint

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(points, 2, generator=g)
    target = torch.randn(points, 1, generator=g)
    rows = []
    for label, act, sep in (("ReLU", "relu", False), ("LK-ReLU", "lk-relu", False), ("ReLU + Sep-U", "relu", True)):
        torch.manual_seed(seed)
        unit = nn.Linear(2, 1)
        with torch.no_grad():
            unit.bias.fill_(bias)
        a = make_activation(act)
        out = nn.Linear(2 if act.startswith("lk-") else 1, 1)
        net = nn.Sequential(unit, a, out)
        constraint = SeparationConstraint(net, kind="u", weight=weight, layers=[unit]) if sep else None
        loss = nn.functional.mse_loss(net(x), target)
        if constraint is not None:
            loss = loss + constraint.penalty()
            constraint.remove()
        loss.backward()
        with torch.no_grad():
            zmax = float(unit(x).max())
        rows.append(
            {
                "unit": label,
                "max pre-activation": zmax,
                "|dL/dw|": float(unit.weight.grad.norm()),
                "|dL/db|": float(unit.bias.grad.abs().sum()),
                "receives gradient": bool(unit.weight.grad.abs().sum() + unit.bias.grad.abs().sum() > 0),
            }
        )
    return pd.DataFrame(rows).set_index("unit")
