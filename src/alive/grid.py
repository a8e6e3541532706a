"""Batched grid engine: train many small rectangular networks in one pass.

The separation paper's figures are grids of hundreds of small networks (MOONS: depths 1–120 ×
widths 1–25 × methods, 5000 full-batch epochs each). Training them one by one spends nearly
all the time in per-operation overhead. Here every network of a *group* (same data,
optimiser, epochs, activation, BatchNorm or not) lives in one stack of tensors:

* **widths** are padded to the widest network; padded units have zero weights, their
  pre-activations and activations are forced to zero and they are masked out of every
  separation term, so they change no output, gradient or penalty;
* **depths** are handled by sorting the networks by depth: layer ``l`` runs only for the
  first ``n_l`` networks (those at least ``l`` deep) and each network leaves the stack for its
  output layer after its last hidden layer, so no work is spent on absent layers;
* **methods and seeds** are just more networks: each has its own λ for Sep-U and Sep-P (0 for
  plain ReLU), its own initial weights (copied from the single-network model built with its
  seed, so initialisation is identical) and, for mini-batches, its own data order;
* optimisers are element-wise, so one optimiser over the stacked tensors equals one per
  network (they are views into one flat parameter: one fused update per step, however deep
  the stack); the loss is the sum of the networks' losses, so each gets its own gradient;
* per-operation cost is what a CPU pays for hundreds of small networks, so consecutive layers
  run by the same networks share one separation-penalty pass, dense BatchNorm is one fused
  kernel over (net, unit) channels (such stacks are held units-major, ``(nets, units,
  points)``, which that kernel reads without a copy), and small conv stacks run channels-last;
* on a CPU, a dense stack of ReLU networks (BatchNorm and the penalty included: the separation
  paper's MOONS grids) is trained by a native kernel instead
  (:class:`alive.native.DenseStack`): one call for the forward pass of every network and one
  for the backward, each network at its own width (no padding work). It gives the same
  results as the operations above to float rounding (``tests/test_native_stack.py``; the
  AVX2 + FMA copy rounds differently from the baseline one), one backward per pass (no
  ``retain_graph``); an evaluation pass under autograd keeps the operations, and so do
  ``ALIVE_NATIVE=0`` and :func:`alive.native.disabled`.

The result of each network is the same record :func:`alive.train.fit` would produce, up to
floating-point summation order (``tests/test_grid.py`` checks cells against single runs).
Two documented differences: annealed-dropout masks come from one random stream for the
whole stack (statistically the same, not bitwise), and a network whose loss becomes
non-finite is recorded as diverged at that epoch and then frozen while the others go on.
"""
from __future__ import annotations

import logging
import math
import operator
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .activations import make_activation, parse_activation
from .config import RunConfig
from .functional import (
    _BIG,
    _positions_innermost,
    _transforms_active,
    dense_separation_penalty,
    stacked_separation_penalty,
)
from .models import build_model, count_parameters
from .train import (
    _autocast,
    _environment,
    _fp32_matmuls,
    _progress,
    _thin,
    keep_freed_memory,
    load_data,
    lr_factor,
    make_optimizer,
    resolve_device,
    resolve_precision,
)
from .workers import check_workers, in_workers

__all__ = ["can_batch", "group_configs", "largest_first", "train_group", "train_groups", "GridStack"]

log = logging.getLogger("alive")

_PER_NET = ("experiment", "depth", "width", "constraint", "weight", "seed")


def can_batch(cfg: RunConfig) -> bool:
    """Whether ``cfg`` can be trained by the grid engine (rectangular MLP/CNN, parameter-free activation)."""
    if cfg.model not in ("mlp", "cnn") or cfg.augment:
        return False
    base, _ = parse_activation(cfg.activation)
    return base not in ("prelu", "identity")


def _group_key(cfg: RunConfig) -> tuple:
    d = cfg.to_dict()
    for k in _PER_NET:
        d.pop(k)
    if cfg.model == "cnn":
        d["seed"] = cfg.seed  # conv stacks share one data order (their first layer is one dense conv)
    return tuple(sorted(d.items()))


def _cost(cfg: RunConfig, batch: int) -> float:
    """Elements held for backward by one network in a stack (a memory estimate)."""
    spatial = 1 if cfg.model == "mlp" else 28 * 28 if cfg.dataset == "mnist" else 32 * 32
    # a dense stack with a penalty also holds the concatenated pre-activations of each penalty run
    # (GridStack.forward), for every net in it, constrained or not: counted for every dense net
    return cfg.depth * cfg.width * batch * spatial * (9.0 if cfg.model == "mlp" else 8.0)


def _layer_overhead(device) -> float:
    """The fixed cost of a layer step in :func:`_stack_cost`'s units (operation dispatch)."""
    # chosen by timing partitions of the paper MOONS grid on this project's 2-core CPU: widths
    # 1-5 | 10, 15 | 20, 25 without BN (316-318 ms per epoch, against 336-337 for 1-5 | 10-25 and
    # 337 for 1-3 | 4, 5 | 10, 15 | 20, 25) and 1-5 | 10-25 with BN (133 ms, against 137-139 for
    # one stack); launches dominate on a GPU
    return 2e6 if resolve_device(device).type == "cpu" else 1e8


def _stack_cost(nets: Sequence[RunConfig], overhead: float) -> float:
    """The cost of one epoch of a stack: ``overhead`` per layer plus, per network layer and
    point, ``w² + 25·w`` for its padded width ``w`` (the batched matmuls grow with ``w²``, the
    element-wise work with ``w``)."""
    points = nets[0].batch_size or (nets[0].moons_n if nets[0].dataset == "moons" else 60000)
    w = max(c.width for c in nets)
    return overhead * max(c.depth for c in nets) + (w * w + 25 * w) * points * sum(c.depth for c in nets)


def _width_buckets(members: Sequence[RunConfig], overhead: float) -> list[list[RunConfig]]:
    """Split one group by width so that padding waste and per-stack overhead balance: a
    dynamic programme over the sorted distinct widths picks the partition into contiguous width
    ranges of the least :func:`_stack_cost`."""
    widths = sorted({c.width for c in members})
    by_width = {w: [c for c in members if c.width == w] for w in widths}

    def cost(ws: list[int]) -> float:
        return _stack_cost([c for w in ws for c in by_width[w]], overhead)

    best = [0.0] + [math.inf] * len(widths)
    cut = [0] * (len(widths) + 1)
    for j in range(1, len(widths) + 1):
        for i in range(j):
            c = best[i] + cost(widths[i:j])
            if c < best[j]:
                best[j], cut[j] = c, i
    buckets, j = [], len(widths)
    while j > 0:
        buckets.append([c for w in widths[cut[j] : j] for c in by_width[w]])
        j = cut[j]
    return buckets[::-1]


def group_configs(configs: Sequence[RunConfig], memory_gb: float | None = None, device=None) -> list[list[RunConfig]]:
    """Split ``configs`` into stacks the engine trains together.

    Configurations that differ only in depth, width, constraint, λ, seed (and, for CNNs, not
    in seed) share a stack; widths are bucketed (:func:`_width_buckets`) and stacks are cut to
    stay within ``memory_gb`` (default ``$ALIVE_GRID_MEMORY_GB`` or 3) of activations.
    """
    if memory_gb is None:
        memory_gb = float(os.environ.get("ALIVE_GRID_MEMORY_GB", "3"))
    budget = memory_gb * 1e9 / 4
    overhead = _layer_overhead(device)
    groups: dict[tuple, list[RunConfig]] = defaultdict(list)
    for c in configs:
        if not can_batch(c):
            raise ValueError(f"{c.label} ({c.model}) cannot be trained by the grid engine")
        groups[_group_key(c)].append(c)
    out = []
    for members in groups.values():
        for bucket in _width_buckets(members, overhead):
            bucket = sorted(bucket, key=lambda c: (-c.depth, -c.width))
            chunk, used = [], 0.0
            for c in bucket:
                batch = c.batch_size or (c.moons_n if c.dataset == "moons" else 60000)
                cost = _cost(c, batch)
                if chunk and used + cost > budget:
                    out.append(chunk)
                    chunk, used = [], 0.0
                chunk.append(c)
                used += cost
            if chunk:
                out.append(chunk)
    return out


@dataclass
class _Layout:
    """Where the net, point and unit dimensions are in a layer's canonical tensor, and, for a
    dense stack, whether it is held units-major, ``(nets, units, points)``, in memory."""

    conv: bool
    points_last: bool = False

    def stacked(self, z: Tensor) -> Tensor:
        """View as ``(nets, points, units, *spatial)``."""
        return z.transpose(0, 1) if self.conv else z

    def unit_shape(self, n: int, width: int) -> tuple[int, ...]:
        return (1, n, width, 1, 1) if self.conv else (n, width, 1) if self.points_last else (n, 1, width)


class GridStack(nn.Module):
    """The stacked parameters of a group of rectangular networks (see the module docstring)."""

    def __init__(self, configs: Sequence[RunConfig], input_shape: tuple[int, ...], num_classes: int, ties: str = "auto"):
        super().__init__()
        if not configs:
            raise ValueError("a grid stack needs at least one configuration")
        cfg0 = configs[0]
        self.configs = sorted(configs, key=lambda c: -c.depth)  # stable: keeps the given order within a depth
        self.conv = cfg0.model == "cnn"
        self.n = len(self.configs)
        self.depths = [c.depth for c in self.configs]
        self.widths = [c.width for c in self.configs]
        self.wm = max(self.widths)
        self.fac = 2 if parse_activation(cfg0.activation)[1] else 1
        self.batchnorm = cfg0.batchnorm
        self.dropout = (cfg0.annealed_dropout, cfg0.anneal_epochs) if cfg0.annealed_dropout > 0 else None
        # Dense BatchNorm stacks are held units-major, (nets, units, points): BatchNorm's fused
        # kernel then reads them as (1, net-unit channels, points) without a transposed copy each
        # way, and the activation and its backward run on one contiguous layout. Measured on this
        # project's 2-core CPU, 40 layers of 117 nets of width 25 (the paper MOONS grid's
        # ReLU + BN stack): forward and backward 61-68 ms against 102 ms points-major. Plain
        # dense stacks stay points-major, where the batched matmuls are ~10 % faster: held
        # units-major, the paper grid's ReLU and Sep-UP stacks took 1.03x and 1.16x as long
        # per epoch (medians of five paired rounds).
        self.points_last = cfg0.batchnorm and not self.conv
        self.layout = _Layout(self.conv, self.points_last)
        self.activation = make_activation(cfg0.activation, dim=1 if self.points_last else 2)
        self.active = [sum(d > l for d in self.depths) for l in range(max(self.depths))]  # n_l
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        mask = torch.zeros(self.n, self.wm)
        for i, w in enumerate(self.widths):
            mask[i, :w] = 1
        self.register_buffer("unit_mask", mask)
        self.register_buffer("unit_mask_bool", mask.bool())
        self.register_buffer("real_units", torch.tensor(self.widths, dtype=torch.int32))  # for the native penalty
        # Index-based extremes ("first") are about twice as fast on a CPU. They differ from the
        # single-network path ("split", TensorFlow's convention) only on exact ties, which dead
        # points create (points mapped to the same hidden vector) and zero initialisation makes
        # universal; "auto" splits for zero initialisation only.
        if ties not in ("auto", "split", "first"):
            raise ValueError(f"ties must be auto, split or first, got {ties!r}")
        self.ties = ("split" if cfg0.init == "zero" else "first") if ties == "auto" else ties
        self.padded = any(w < self.wm for w in self.widths)
        # Grouped convolutions (one group per net) on a CPU (oneDNN), measured on this project's
        # 2 cores with 2-16 nets: channels-last is 1.4-2.8x faster for 2, 4, 10 or 12 channels
        # per net, but not for 8 or 16, which oneDNN's blocked default-layout kernels suit (the
        # MNIST book grid at width 8: 1.2-1.5x slower channels-last). Not measured on a GPU,
        # which keeps the default layout.
        self.channels_last = self.conv and self.wm % 8 != 0
        with torch.no_grad():
            g0 = self.activation(torch.zeros(1, 1, 1))
        self.mask_output = self.padded and bool((g0 != 0).any())
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.gammas, self.betas = nn.ParameterList(), nn.ParameterList()
        self._build(self.configs)
        cu = torch.tensor([c.weight if "u" in c.constraint else 0.0 for c in self.configs])
        cp = torch.tensor([c.weight if "p" in c.constraint else 0.0 for c in self.configs])
        self.register_buffer("coef_u", cu)
        self.register_buffer("coef_p", cp)
        self.any_u, self.any_p = bool((cu > 0).any()), bool((cp > 0).any())
        self.kinds = ("u" if self.any_u else "") + ("p" if self.any_p else "")
        # the dense fast path (index extremes, one weighted pass per layer) unless ties must split
        self.fast = not self.conv and self.ties == "first" and cfg0.aggregation != "norm"
        self.register_buffer("padded_fill", (~mask.bool()).float().unsqueeze(1) * _BIG)  # see functional._UnitPointExtremes
        self.cfg0 = cfg0
        # the native kernel (alive.native.DenseStack) trains dense ReLU stacks whole; where it
        # cannot (other activations, masked outputs, dropout, split ties, "norm", BatchNorm's
        # cumulative average), the operations below do
        self.native_eligible = (
            not self.conv
            and parse_activation(cfg0.activation) == ("relu", False)
            and not self.dropout
            and not self.mask_output
            and (not self.kinds or (self.fast and cfg0.aggregation in native.AGGREGATIONS))
            and (not self.batchnorm or self.bn_momentum is not None)
        )
        self._dense: tuple | None = None  # (flat and buffers, native.DenseStack, flat's data pointer)

    def flatten_parameters(self) -> nn.Parameter:
        """Make every parameter a view into one flat parameter (see :func:`_flatten_parameters`)
        and return it, for the optimiser; from then on :meth:`zero_grad` zeroes in place."""
        flat = _flatten_parameters(self)
        object.__setattr__(self, "_flat", flat)  # not registered: the views are the parameters
        return flat

    def zero_grad(self, set_to_none: bool = True) -> None:
        """After :meth:`flatten_parameters`, gradients are zeroed in place: setting them to
        ``None`` would cut them off the flat gradient the optimiser reads."""
        flat = getattr(self, "_flat", None)
        if flat is None:
            return super().zero_grad(set_to_none)
        flat.grad.zero_()

    # ------------------------------------------------------------------ construction
    def _in_index(self, layer: int, width: int) -> list[int]:
        """Stacked input positions of a single network's input channels at ``layer``."""
        if layer == 0:
            return list(range(self.input_shape[0]))
        return [k * self.wm + u for k in range(self.fac) for u in range(width)]

    def _build(self, configs: Sequence[RunConfig]) -> None:
        singles = []
        for c in configs:
            # the CPU generator draws the initial weights, as in alive.train.fit (torch.manual_seed
            # would also queue a CUDA re-seed with a stack trace, ~2 ms per network)
            torch.default_generator.manual_seed(c.seed)
            singles.append(build_model(c.model, self.input_shape, self.num_classes, **c.model_kwargs()))
        self.single_parameters = [count_parameters(m) for m in singles]
        weighted = [[m for m in s.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] for s in singles]
        norms = [[m for m in s.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))] for s in singles]
        wm, fac = self.wm, self.fac
        for l, n in enumerate(self.active):
            cin = self.input_shape[0] if l == 0 else wm * fac
            if self.conv:
                k = weighted[0][0].kernel_size[0]
                w = torch.zeros(n * wm, cin, k, k)
            else:
                w = torch.zeros(n, cin, wm)
            b = torch.zeros(n * wm) if self.conv else torch.zeros(n, 1, wm)
            for i in range(n):
                src = weighted[i][l]
                width = self.widths[i]
                idx = torch.tensor(self._in_index(l, width))
                if self.conv:
                    w[i * wm : i * wm + width, idx] = src.weight.detach()
                    b[i * wm : i * wm + width] = src.bias.detach()
                else:
                    w[i, idx, :width] = src.weight.detach().t()
                    b[i, 0, :width] = src.bias.detach()
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
            if self.batchnorm:
                g, be = torch.zeros(n, wm), torch.zeros(n, wm)
                rm, rv = torch.zeros(n, wm), torch.ones(n, wm)
                for i in range(n):
                    bn, width = norms[i][l], self.widths[i]
                    g[i, :width], be[i, :width] = bn.weight.detach(), bn.bias.detach()
                    rm[i, :width], rv[i, :width] = bn.running_mean, bn.running_var
                self.gammas.append(nn.Parameter(g))
                self.betas.append(nn.Parameter(be))
                self.register_buffer(f"running_mean_{l}", rm)
                self.register_buffer(f"running_var_{l}", rv)
                self.bn_eps, self.bn_momentum = norms[0][l].eps, norms[0][l].momentum
        spatial = 1 if not self.conv else self.input_shape[1] * self.input_shape[2]
        head_w = torch.zeros(self.n, wm * fac * spatial, self.num_classes)
        head_b = torch.zeros(self.n, 1, self.num_classes)
        for i in range(self.n):
            src = weighted[i][-1]
            chans = torch.tensor(self._in_index(1, self.widths[i]))
            rows = (chans[:, None] * spatial + torch.arange(spatial)[None, :]).flatten()
            head_w[i, rows] = src.weight.detach().t()
            head_b[i, 0] = src.bias.detach()
        self.head_w, self.head_b = nn.Parameter(head_w), nn.Parameter(head_b)

    # ------------------------------------------------------------------ forward
    def _dropout(self, h: Tensor, p: float, gen: torch.Generator | None) -> Tensor:
        if p <= 0:
            return h
        keep = torch.rand(h.shape, generator=gen, device="cpu").to(h.device) >= p
        return h * keep / (1.0 - p)

    def _batchnorm(self, z: Tensor, l: int, n: int, train: bool) -> Tensor:
        """BatchNorm of a conv map, or of a dense stack held units-major ``(nets, units, points)``."""
        g, b = self.gammas[l], self.betas[l]
        rm, rv = getattr(self, f"running_mean_{l}"), getattr(self, f"running_var_{l}")
        if self.conv:
            return F.batch_norm(z, rm.view(-1), rv.view(-1), g.view(-1), b.view(-1), train, self.bn_momentum, self.bn_eps)
        # one fused kernel (forward and backward) instead of a dozen small ones: viewed as
        # (1, nets · units, points), every (net, unit) pair is a BatchNorm channel
        out = F.batch_norm(z.view(1, n * self.wm, -1), rm.view(-1), rv.view(-1), g.view(-1), b.view(-1), train,
                           self.bn_momentum, self.bn_eps)
        return out.view(z.shape)

    def _penalty(self, z: Tensor, n: int, layers: int = 1) -> Tensor:
        """Σ over these layers of λ_U·g_U + λ_P·g_P for the first ``n`` nets (canonical layout).

        ``layers > 1`` (dense only): ``z`` holds that many consecutive layers stacked
        layer-major, ``(layers · n, points, units)``; each layer is penalised as its own net
        and the terms are summed per net, so a run of layers costs one pass, not one each.
        """
        def per_layer(t: Tensor) -> Tensor:
            return t.repeat((layers,) + (1,) * (t.dim() - 1)) if layers > 1 else t

        if self.fast:
            g = dense_separation_penalty(
                z,
                per_layer(self.coef_u[:n]),
                per_layer(self.coef_p[:n]),
                self.cfg0.rho,
                self.cfg0.margin,
                self.cfg0.aggregation,
                padded=per_layer(self.padded_fill[:n]) if self.padded else None,
                unit_weight=per_layer(self.unit_mask[:n]) if self.padded else None,
                real_units=per_layer(self.real_units[:n]) if self.padded else None,
            )
        else:
            g_u, g_p = stacked_separation_penalty(
                self.layout.stacked(z),
                self.kinds,
                self.cfg0.rho,
                self.cfg0.margin,
                self.cfg0.aggregation,
                self.cfg0.conv_reduction,
                unit_mask=per_layer(self.unit_mask_bool[:n]) if self.padded else None,
                ties=self.ties,
            )
            g = 0
            if g_u is not None:
                g = g + per_layer(self.coef_u[:n]) * g_u
            if g_p is not None:
                g = g + per_layer(self.coef_p[:n]) * g_p
        return g.view(layers, n).sum(0) if layers > 1 else g

    def native_dense(self, x: Tensor, train: bool = True, on_layer=None) -> native.DenseStack | None:
        """The native kernel's view of this stack when it computes the forward pass of ``x``,
        else ``None``: a dense ReLU stack (:attr:`native_eligible`) after
        :meth:`flatten_parameters`, float32 on a CPU, no ``on_layer``, ``x`` not requiring a
        gradient, no autocast, ``torch.func`` or ``torch.compile``, the kernels available, and
        a training pass or no gradient (an evaluation pass has no native backward)."""
        flat = getattr(self, "_flat", None)
        if (not self.native_eligible or flat is None or on_layer is not None or x.device.type != "cpu"
                or x.dtype != torch.float32 or flat.dtype != torch.float32 or x.requires_grad
                or not (train or not torch.is_grad_enabled())
                or torch.is_autocast_enabled("cpu") or _transforms_active() or torch.compiler.is_compiling()
                or not native.available()):
            return None
        # the kernel holds pointers into these: a replaced buffer (load_state_dict(assign=True)) rebuilds it
        tensors = [flat, *self._buffers.values()]
        if self._dense is None or len(self._dense[0]) != len(tensors) or not all(map(operator.is_, self._dense[0], tensors)) \
                or self._dense[2] != flat.data_ptr():
            self._dense = (tensors, self._native_layout(flat), flat.data_ptr())
        return self._dense[1]

    def _native_layout(self, flat: nn.Parameter) -> native.DenseStack:
        def at(p: Tensor) -> int:
            if not p.is_contiguous() or p.data_ptr() < flat.data_ptr():
                raise RuntimeError("a stack parameter is not a contiguous view into the flat parameter")
            return (p.data_ptr() - flat.data_ptr()) // flat.element_size()

        offsets = {"weight": [at(w) for w in self.weights], "bias": [at(b) for b in self.biases],
                   "head_w": at(self.head_w), "head_b": at(self.head_b)}
        running = None
        if self.batchnorm:
            offsets["gamma"], offsets["beta"] = [at(g) for g in self.gammas], [at(b) for b in self.betas]
            running = [(getattr(self, f"running_mean_{l}"), getattr(self, f"running_var_{l}")) for l in range(len(self.active))]
        cfg = self.cfg0
        return native.DenseStack(
            self.depths, self.widths, self.wm, self.input_shape[0], self.num_classes, offsets, running,
            getattr(self, "bn_eps", 1e-5), getattr(self, "bn_momentum", 0.1),
            self.coef_u if self.kinds else None, self.coef_p if self.kinds else None, cfg.rho, cfg.margin,
            cfg.aggregation if cfg.aggregation in native.AGGREGATIONS else "paper",
        )

    def forward(self, x: Tensor, train: bool = True, dropout_p: float = 0.0, gen=None,
                on_layer: Callable[[int, Tensor, Tensor], None] | None = None):
        """Logits ``(nets, points, classes)`` and the per-net penalty ``(nets,)``. ``on_layer(l,
        z, a)`` sees each layer's pre-activations (the activation's input: after BatchNorm,
        if any) and activations (canonical layout) as they are made, so a diagnostic holds one
        layer at a time, not the whole network's."""
        dense = self.native_dense(x, train, on_layer)
        if dense is not None:
            return _NativeDense.apply(self._flat, x.contiguous(), dense, train)
        wm, fac = self.wm, self.fac
        finished: list[Tensor] = []
        pen = x.new_zeros(self.n)
        want_pen = train and (self.any_u or self.any_p)
        cl = self.conv and self.channels_last and x.device.type == "cpu"
        if self.conv:
            h = x.contiguous(memory_format=torch.channels_last) if cl else x  # (B, C, H, W), shared by every net
        else:
            h = x.unsqueeze(0).expand(self.n, *x.shape) if x.dim() == 2 else x  # (n, B, F)
            if self.points_last:
                h = h.transpose(1, 2)  # (n, F, B)
        depth = len(self.active)
        run: list[Tensor] = []  # dense pre-activations awaiting their (shared) penalty pass
        for l, n in enumerate(self.active):
            if self.conv:
                if l > 0:
                    h = h[:, : n * wm * fac]
                if self.dropout and train:
                    h = self._dropout(h, dropout_p, gen)
                w = self.weights[l]
                z = F.conv2d(h, w, self.biases[l], padding=w.shape[-1] // 2, groups=1 if l == 0 else n)
                zc = z.view(z.shape[0], n, wm, *z.shape[2:])  # (B, n, wm, H, W)
            else:
                if h.shape[0] != n:  # a full-size slice would still cost a zero-filled gradient copy
                    h = h[:n]
                if self.dropout and train:  # the mask is drawn in the canonical (n, B, F) shape
                    h = self._dropout(h.transpose(1, 2), dropout_p, gen).transpose(1, 2) if self.points_last \
                        else self._dropout(h, dropout_p, gen)
                if self.points_last:
                    z = torch.baddbmm(self.biases[l].transpose(1, 2), self.weights[l].transpose(1, 2), h)  # (n, wm, B)
                    zc = z.transpose(1, 2)
                else:
                    z = zc = torch.baddbmm(self.biases[l], h, self.weights[l])  # (n, B, wm)
            # padded units have zero weights that never receive a gradient, so z is exactly 0 there;
            # like the single-network constraint, the penalty sees the layer output (before any BN)
            z_pre = zc
            nxt = self.active[l + 1] if l + 1 < depth else 0
            if want_pen:
                if self.conv:
                    pen = pen + F.pad(self._penalty(z_pre, n), (0, self.n - n))
                else:  # consecutive layers run by the same nets share one penalty pass
                    run.append(z_pre)
                    if nxt != n:
                        stacked = run[0] if len(run) == 1 else torch.cat(run)
                        pen = pen + F.pad(self._penalty(stacked, n, len(run)), (0, self.n - n))
                        run = []
            if self.batchnorm:
                z = self._batchnorm(z, l, n, train)
                zc = z.view(z.shape[0], n, wm, *z.shape[2:]) if self.conv else z.transpose(1, 2)
            a = self.activation(z if self.points_last else zc)
            if self.mask_output:
                a = a * self.unit_mask[:n].repeat(1, fac).view(self.layout.unit_shape(n, wm * fac))
            if on_layer is not None:  # what the activation sees: after BN, if any
                on_layer(l, zc, a.transpose(1, 2) if self.points_last else a)
            if self.conv:
                a = a.reshape(a.shape[0], n * wm * fac, *a.shape[3:])
                if cl:  # a linked activation concatenates into the default layout
                    a = a.contiguous(memory_format=torch.channels_last)
                if nxt < n:
                    finished.append(a[:, nxt * wm * fac :])
            elif nxt < n:
                finished.append(a[nxt:])
            h = a
        finished.reverse()
        if self.conv:
            feats = torch.cat(finished, 1).contiguous()  # (B, N*wm*fac, H, W), flattened as the single nets do
            b = feats.shape[0]
            feats = feats.view(b, self.n, -1).transpose(0, 1)  # (N, B, wm*fac*H*W)
        else:
            feats = torch.cat(finished, 0)  # (N, B, wm*fac)
            if self.points_last:
                feats = feats.transpose(1, 2)
        if self.dropout and train:
            feats = self._dropout(feats, dropout_p, gen)
        logits = torch.baddbmm(self.head_b, feats, self.head_w)
        return logits, pen


class _NativeDense(torch.autograd.Function):
    """A dense ReLU stack's forward and backward pass by the native kernel (one node)."""

    @staticmethod
    def forward(ctx, flat: Tensor, x: Tensor, dense: native.DenseStack, train: bool):
        logits, pen, saved = dense.forward(flat.detach(), x, train)
        ctx.dense, ctx.saved = dense, saved
        ctx.save_for_backward(flat, x)
        if not dense.penalised or saved is None:
            ctx.mark_non_differentiable(pen)
        return logits, pen

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits: Tensor, grad_pen: Tensor | None):
        if ctx.saved is None or ctx.saved.buffers is None:  # the kernel reuses a finished pass's buffers
            raise RuntimeError("a native grid stack pass has one backward (retain_graph is not supported); "
                               "set ALIVE_NATIVE=0 or use alive.native.disabled() for more")
        flat, x = ctx.saved_tensors
        return ctx.dense.backward(flat.detach(), x, ctx.saved, grad_logits, grad_pen), None, None, None


def _ce_acc(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-net mean cross-entropy and accuracy; ``logits (N, B, C)``, ``y (B,)`` or ``(N, B)``."""
    n, b, c = logits.shape
    yy = y.expand(n, b) if y.dim() == 1 else y
    ce = F.cross_entropy(logits.reshape(n * b, c).float(), yy.reshape(-1), reduction="none").view(n, b).mean(1)
    correct = (logits.argmax(2) == yy).sum(1)
    return ce, correct


@torch.no_grad()
def _evaluate(stack: GridStack, x: Tensor, y: Tensor, batch: int, precision: str) -> tuple[Tensor, Tensor]:
    loss = torch.zeros(stack.n, device=x.device, dtype=torch.float64)
    correct = torch.zeros(stack.n, device=x.device, dtype=torch.float64)
    for s in range(0, x.shape[0], batch):
        xb, yb = x[s : s + batch], y[s : s + batch]
        with _autocast(x.device, precision):
            logits, _ = stack(xb, train=False)
        ce, right = _ce_acc(logits, yb)
        loss += ce.double() * len(yb)
        correct += right.double()
    return loss / x.shape[0], correct / x.shape[0]


@torch.no_grad()
def _diagnostics(stack: GridStack, x: Tensor, batch: int) -> list[dict]:
    """Per-net liveness and dead-neuron diagnostics, as :func:`alive.train.fit` records them."""
    n, wm, fac = stack.n, stack.wm, stack.fac
    hi: dict[int, Tensor] = {}
    lo: dict[int, Tensor] = {}
    out_alive: dict[int, Tensor] = {}
    slope_alive: dict[int, Tensor] = {}
    dead_pts: dict[int, list[Tensor]] = defaultdict(list)
    members = list(stack.activation.members) if stack.fac == 2 else []

    def reduce(l: int, z: Tensor, a: Tensor) -> None:
        zs = _positions_innermost(stack.layout.stacked(z), 3)  # (n_l, B, wm, *sp)
        az = _positions_innermost(stack.layout.stacked(a), 3)
        red = (1,) + tuple(range(3, zs.dim()))
        zmax, zmin = zs.amax(red), zs.amin(red)
        hi[l] = zmax if l not in hi else torch.maximum(hi[l], zmax)
        lo[l] = zmin if l not in lo else torch.minimum(lo[l], zmin)
        nz = (az != 0).any(dim=red)
        out_alive[l] = nz if l not in out_alive else out_alive[l] | nz
        m = stack.unit_mask[: zs.shape[0]].bool().view(zs.shape[0], 1, wm, *([1] * (zs.dim() - 3)))
        pmax = zs.masked_fill(~m, -math.inf).flatten(2).amax(2)  # (n_l, B)
        dead_pts[l].append(pmax <= 0)
        if members:
            with torch.enable_grad():
                zz = zs.detach().requires_grad_(True)
                slope = torch.zeros_like(zmax, dtype=torch.bool)
                for g in members:
                    (d,) = torch.autograd.grad(g(zz).sum(), zz, allow_unused=True)
                    if d is not None:
                        slope |= (d != 0).any(dim=red)
            slope_alive[l] = slope if l not in slope_alive else slope_alive[l] | slope

    for s in range(0, x.shape[0], batch):
        stack(x[s : s + batch], train=False, on_layer=reduce)
    results = []
    for i in range(n):
        width, depth = stack.widths[i], stack.depths[i]
        dn, dm, neurons, du, dp, flat = [], [], [], [], [], []
        affine, any_dead = 0, None
        for l in range(depth):
            du.append(int((hi[l][i, :width] <= 0).sum()))
            affine += int((lo[l][i, :width] > 0).sum())
            member_alive = torch.stack([out_alive[l][i, k * wm : k * wm + width] for k in range(fac)])
            dn.append(int((~member_alive.any(0)).sum()))
            dm.append(int((~member_alive).sum()))
            neurons.append(width)
            pts = torch.cat([t[i] for t in dead_pts[l]])
            dp.append(int(pts.sum()))
            any_dead = pts if any_dead is None else any_dead | pts
            if members:
                flat.append(int((~slope_alive[l][i, :width]).sum()))
        points = int(any_dead.numel())
        diag = {
            "dead_neurons": dn,
            "dead_members": dm,
            "neurons": neurons,
            "liveness": {
                "measured_at": "activation input",
                "layers": depth,
                "units": depth * width,
                "dead_units": sum(du),
                "affine_units": affine,
                "points": points,
                "dead_points": int(any_dead.sum()),
                "dead_point_fraction": float(any_dead.float().mean()),
            },
            "dead_units_per_layer": du,
            "dead_points_per_layer": dp,
        }
        if members:
            diag["flat_linked_units"] = flat
            diag["liveness"]["flat_linked_units"] = sum(flat)
        results.append(diag)
    return results


def train_group(
    configs: Sequence[RunConfig],
    device=None,
    progress: str = "auto",
    eval_batch_size: int = 2048,
    ties: str = "auto",
) -> list[dict]:
    """Train a group of compatible configurations together; one record per configuration.

    The configurations must agree on everything but ``depth``, ``width``, ``constraint``,
    ``weight``, ``seed`` and ``experiment`` (:func:`group_configs` forms such groups).
    ``ties="split"`` reproduces single-network training to float precision; the default
    (``"auto"``) uses the faster index extremes except under zero initialisation, which can
    differ at the 1e-6 level where dead points make pre-activations tie exactly.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("train_group needs at least one configuration")
    keys = {_group_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("train_group needs configurations that differ only in depth, width, constraint, weight, seed")
    dev = resolve_device(device)
    keep_freed_memory(dev)
    cfg0 = configs[0]
    precision = resolve_precision(cfg0.precision, dev)
    _fp32_matmuls(dev, precision)
    ds = load_data(cfg0).to(dev)
    stack = GridStack(configs, ds.input_shape, ds.num_classes, ties=ties).to(dev)
    configs = stack.configs  # sorted by depth
    n = stack.n
    opt = make_optimizer(cfg0, [stack.flatten_parameters()])
    n_train = ds.x_train.shape[0]
    steps = 1 if cfg0.batch_size is None else math.ceil(n_train / cfg0.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg0, steps))
    seeds = sorted({c.seed for c in configs})
    gens = {s: torch.Generator().manual_seed(s + 1) for s in seeds}
    seed_index = torch.tensor([seeds.index(c.seed) for c in configs], device=dev)
    drop_gen = torch.Generator().manual_seed(min(seeds) + 2)
    hist = {k: torch.zeros(cfg0.epochs, n, dtype=torch.float64) for k in ("train_loss", "train_acc", "val_loss", "val_acc", "penalty")}
    times = []
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    diverged_at = [None] * n
    log_every = max(1, cfg0.epochs // 10)
    bar = _progress(progress, cfg0.epochs, f"grid {cfg0.label} x{n}")
    t_start = time.perf_counter()
    epochs_run = 0
    for epoch in range(cfg0.epochs):
        t0 = time.perf_counter()
        stack.train()
        p = 0.0
        if stack.dropout:
            from .init import annealed_dropout_rate

            p = annealed_dropout_rate(epoch, *stack.dropout)
        sums = {k: torch.zeros(n, device=dev, dtype=torch.float64) for k in ("loss", "acc", "pen")}
        orders = {s: list(_epoch_batches(n_train, cfg0.batch_size, gens[s])) for s in seeds}
        for b in range(len(orders[seeds[0]])):
            if stack.conv:
                idx = orders[seeds[0]][b].to(dev)
                xb, yb = ds.x_train[idx], ds.y_train[idx]
            else:
                idx = torch.stack([orders[s][b] for s in seeds]).to(dev)  # (S, B)
                per_net = idx[seed_index]  # (N, B)
                xb, yb = ds.x_train[per_net], ds.y_train[per_net]
            with _autocast(dev, precision):
                logits, pen = stack(xb, train=True, dropout_p=p, gen=drop_gen)
            ce, right = _ce_acc(logits.float(), yb)
            total = torch.where(alive, ce + pen.float(), torch.zeros_like(ce)).sum()
            stack.zero_grad()
            total.backward()
            opt.step()
            sched.step()
            bs = yb.shape[-1]
            sums["loss"] += ce.detach().double() * bs
            sums["acc"] += right.double()
            sums["pen"] += pen.detach().double() * bs
        val_loss, val_acc = _evaluate(stack, ds.x_test, ds.y_test, eval_batch_size, precision)
        tr_loss, tr_acc, tr_pen = (sums[k] / n_train for k in ("loss", "acc", "pen"))
        for k, v in (("train_loss", tr_loss), ("train_acc", tr_acc), ("val_loss", val_loss), ("val_acc", val_acc), ("penalty", tr_pen)):
            hist[k][epoch] = v.cpu()
        times.append(time.perf_counter() - t0)
        epochs_run = epoch + 1
        bad = alive & ~(torch.isfinite(tr_loss + tr_pen) & torch.isfinite(val_loss))
        if bad.any():
            for i in bad.nonzero().flatten().tolist():
                diverged_at[i] = epoch + 1
                log.warning("grid: %s depth %d width %d diverged at epoch %d", configs[i].label, configs[i].depth, configs[i].width, epoch + 1)
            alive &= ~bad
            _freeze(stack, opt, ~alive)
            if not alive.any():
                break
        if bar is not None:
            bar.update(1)
        elif progress != "quiet" and ((epoch + 1) % log_every == 0 or epoch + 1 == cfg0.epochs):
            log.info("grid %s x%d: epoch %d/%d, median val_acc %.3f (%.2fs/epoch)", cfg0.label, n, epoch + 1, cfg0.epochs, val_acc.median().item(), times[-1])
    if bar is not None:
        bar.close()
    total_time = time.perf_counter() - t_start
    diags = _diagnostics(stack, ds.x_train, eval_batch_size) if cfg0.diagnostics else [{}] * n
    env = _environment(dev, 1)
    env["grid_group_size"] = n
    env["native_dense_stack"] = stack._dense is not None  # trained by alive.native.DenseStack
    records = []
    for i, c in enumerate(configs):
        last = diverged_at[i] or epochs_run
        h = {k: [_f(v) for v in hist[k][:last, i].tolist()] for k in hist}
        h["epoch"] = list(range(1, last + 1))
        h["lr"] = [cfg0.lr * lr_factor(cfg0, steps)(e * steps) for e in range(1, last + 1)]
        h["time"] = times[:last]
        val = h["val_acc"]
        best = max(range(len(val)), key=lambda j: val[j])
        records.append(
            {
                "key": c.key(precision),
                "config": c.to_dict(),
                "precision": precision,
                "status": "diverged" if diverged_at[i] else "ok",
                "diverged_epoch": diverged_at[i],
                "metrics": {
                    "best_val_acc": val[best],
                    "best_epoch": best + 1,
                    "final_val_acc": val[-1],
                    "final_train_acc": h["train_acc"][-1],
                    "final_train_loss": h["train_loss"][-1],
                    "final_val_loss": h["val_loss"][-1],
                    "epochs_run": last,
                    "parameters": stack.single_parameters[i],
                },
                "history": _thin(h),
                "timing": {"total_s": total_time, "mean_epoch_s": total_time / max(1, epochs_run), "batched_with": n},
                "diagnostics": diags[i] if not diverged_at[i] else {},
                "environment": env,
                "data_source": ds.source,
            }
        )
    return records


def train_groups(groups: Sequence[Sequence[RunConfig]], device=None, progress: str = "auto",
                 workers: int = 1, store=None) -> Iterator[list[dict]]:
    """Train groups (:func:`group_configs`), yielding each group's records as it finishes;
    with a ``store`` (:class:`alive.results.Store`) each group's records are put there as soon
    as it finishes, by the process that trained it.

    ``workers > 1`` trains that many groups at once in worker processes that share the CPU
    threads (:mod:`alive.workers`: on this project's 2-core CPU two workers of one thread train
    the paper MOONS grid 1.18-1.20x faster than one process of two threads, ``bench/grid.py``).
    Groups then start largest first (by :func:`_stack_cost` × epochs), so the last to start
    are short, and each worker holds its own groups in memory (``ALIVE_GRID_MEMORY_GB`` per
    group).
    """
    check_workers(workers)
    groups = [list(g) for g in groups]
    if workers > 1:
        groups = largest_first(groups, device)
    return in_workers(_train_and_store, [(g, device, progress, store) for g in groups], workers, what="grid group")


def largest_first(groups: Sequence[Sequence[RunConfig]], device=None) -> list[list[RunConfig]]:
    """``groups`` in the order worker processes start them: the most work first (by
    :func:`_stack_cost` × epochs), so that the last to start are short."""
    overhead = _layer_overhead(device)
    return sorted((list(g) for g in groups), key=lambda g: g[0].epochs * _stack_cost(g, overhead), reverse=True)


def _train_and_store(group: list[RunConfig], device, progress: str, store) -> list[dict]:
    records = train_group(group, device=device, progress=progress)
    if store is not None:
        for rec in records:
            store.put(rec)
    return records


def _flatten_parameters(module: nn.Module) -> nn.Parameter:
    """One parameter holding every parameter of ``module``, which become views into it.

    Their gradients are views into the flat gradient too (autograd accumulates into an
    existing ``.grad`` in place), so the optimiser makes one update of one tensor per step
    instead of a few per layer: a stack of 120-layer networks has hundreds of parameters.
    Zero ``flat.grad`` in place between steps (``set_to_none`` would cut the views);
    :meth:`GridStack.zero_grad` does.
    """
    params = list(module.parameters())
    if len({(p.dtype, p.device) for p in params}) != 1:
        raise ValueError("flattening needs parameters of one dtype on one device")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    grad = torch.zeros_like(flat)
    start = 0
    for p in params:
        k = p.numel()
        p.data = flat[start : start + k].view_as(p)
        p.grad = grad[start : start + k].view_as(p)
        start += k
    flat = nn.Parameter(flat)
    flat.grad = grad
    return flat


def _f(v: float):
    return v if math.isfinite(v) else None


def _epoch_batches(n: int, batch_size: int | None, gen: torch.Generator):
    from .data import batches

    return batches(n, batch_size, gen)


@torch.no_grad()
def _freeze(stack: GridStack, opt: torch.optim.Optimizer, dead: Tensor) -> None:
    """Zero the parameters and the optimiser state (Adam's moments, momentum) of diverged
    networks: with zero moments and zero gradients an element-wise optimiser leaves them at
    zero, so they stay inert while the others go on."""
    idx = dead.nonzero().flatten()
    flat = stack._flat
    # every flat tensor of the optimiser state, seen through the parameters' own shapes
    tensors = [flat.data] + [v for st in opt.state.values() for v in st.values()
                             if torch.is_tensor(v) and v.shape == flat.shape]
    for t in tensors:
        t.nan_to_num_(0.0, 0.0, 0.0)
        for p, rows in _net_rows(stack):
            view = t[p.data.storage_offset() - flat.data.storage_offset():][: p.numel()].view(rows)
            sel = idx[idx < view.shape[0]]
            if len(sel):
                view[sel] = 0
    if stack.batchnorm:
        for l, n in enumerate(stack.active):
            sel = idx[idx < n]
            getattr(stack, f"running_mean_{l}")[sel] = 0
            getattr(stack, f"running_var_{l}")[sel] = 1


def _net_rows(stack: GridStack):
    """``(parameter, shape)`` with the networks along the first dimension of the shape."""
    wm = stack.wm
    for l, n in enumerate(stack.active):
        w, b = stack.weights[l], stack.biases[l]
        if stack.conv:
            yield w, (n, wm, *w.shape[1:])
            yield b, (n, wm)
        else:
            yield w, w.shape
            yield b, b.shape
        if stack.batchnorm:
            yield stack.gammas[l], stack.gammas[l].shape
            yield stack.betas[l], stack.betas[l].shape
    yield stack.head_w, stack.head_w.shape
    yield stack.head_b, stack.head_b.shape
