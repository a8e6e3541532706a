"""Activations by name, linked activations, the linkage check and the √2 width rule.

Configs name activations by string (like timm): a base name from :func:`available_activations`
(``"relu"``, ``"selu"``, ...) or the same name with the prefix ``"lk-"`` for its mirror-linked
version (``"lk-relu"``, ``"lk-prelu"``, ...). :func:`make_activation` turns a name into a module
and :func:`channel_factor` says how many channels it emits per input channel.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import functional as F_alive

__all__ = [
    "register_activation",
    "available_activations",
    "make_activation",
    "parse_activation",
    "channel_factor",
    "is_activation",
    "Linked",
    "LinkedReLU",
    "LinkedPReLU",
    "LinkedSELU",
    "LinkedSwish",
    "LinkageReport",
    "check_linkage",
    "linkage_table",
    "widen",
    "display_name",
    "LINKED_PREFIX",
    "POLICIES",
]

LINKED_PREFIX = "lk-"
POLICIES = ("mirror", "minmax")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}
_TYPES: set[type] = set()
_FAST_RELU: set[str] = set()  # names whose mirror linkage is linked_relu (the built-in ReLU)


def register_activation(name: str, factory: Callable[..., nn.Module], *, aliases: Iterable[str] = ()) -> None:
    """Register a base activation under ``name``; ``factory(**kwargs)`` returns an ``nn.Module``."""
    name = name.lower()
    if name.startswith(LINKED_PREFIX):
        raise ValueError(f"base activation names must not start with {LINKED_PREFIX!r}: {name!r}")
    try:
        module = factory()
    except Exception as e:  # registered only once it works
        raise ValueError(f"the factory of activation {name!r} cannot be called without arguments: {e}") from e
    if not isinstance(module, nn.Module):
        raise TypeError(f"the factory of activation {name!r} must return an nn.Module, got {type(module).__name__}")
    _REGISTRY[name] = factory
    _FAST_RELU.discard(name)  # a re-registered name means the user's factory, not the built-in fast path
    for alias in aliases:
        _ALIASES[alias.lower()] = name
    if type(module) is not nn.Identity:  # placeholders are not non-linearities
        _TYPES.add(type(module))


def _prelu(num_parameters: int = 1, init: float = 0.25) -> nn.PReLU:
    return nn.PReLU(num_parameters=num_parameters, init=init)


register_activation("relu", nn.ReLU)
_FAST_RELU.add("relu")
register_activation("leaky_relu", lambda negative_slope=0.01: nn.LeakyReLU(negative_slope), aliases=["lrelu"])
register_activation("prelu", _prelu)
register_activation("selu", nn.SELU)
register_activation("swish", nn.SiLU, aliases=["silu"])
register_activation("elu", lambda alpha=1.0: nn.ELU(alpha))
register_activation("gelu", nn.GELU)
register_activation("tanh", nn.Tanh)
register_activation("sigmoid", nn.Sigmoid)
register_activation("softplus", nn.Softplus)
register_activation("identity", nn.Identity, aliases=["linear"])


_DISPLAY = {
    "relu": "ReLU", "leaky_relu": "LeakyReLU", "prelu": "PReLU", "selu": "SELU", "swish": "Swish",
    "elu": "ELU", "gelu": "GELU", "tanh": "Tanh", "sigmoid": "Sigmoid", "softplus": "Softplus",
    "identity": "Identity",
}


def display_name(name: str) -> str:
    """The papers' spelling: ``"lk-relu"`` -> ``"LK-ReLU"``, ``"selu"`` -> ``"SELU"``."""
    base, is_linked = parse_activation(name)
    shown = _DISPLAY.get(base, base)
    return ("LK-" if is_linked else "") + shown


def available_activations(linked: bool = True) -> list[str]:
    """Every valid activation name: the base names, then (``linked=True``) their ``"lk-"`` forms."""
    names = sorted(_REGISTRY)
    if linked:
        names += [LINKED_PREFIX + n for n in names if n != "identity"]
    return names


def _canonical_base(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown activation {name!r}; valid names are {', '.join(available_activations())}"
        )
    return key


def parse_activation(name: str) -> tuple[str, bool]:
    """``"lk-selu"`` -> ``("selu", True)``; ``"swish"`` -> ``("swish", False)``. Raises on unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"an activation is named by a string, got {type(name).__name__}: {name!r}")
    lowered = name.lower()
    is_linked = lowered.startswith(LINKED_PREFIX)
    base = _canonical_base(lowered[len(LINKED_PREFIX):] if is_linked else lowered)
    if is_linked and base == "identity":
        raise ValueError("the identity has no flat region to link; 'lk-identity' is not an activation")
    return base, is_linked


def channel_factor(name: str) -> int:
    """How many output channels the activation ``name`` produces per input channel (2 if linked)."""
    return 2 if parse_activation(name)[1] else 1


def make_activation(name: str, *, dim: int = 1, **kwargs) -> nn.Module:
    """A fresh activation module for ``name``; ``"lk-<base>"`` gives ``Linked(<base>, "mirror", dim)``.

    ``kwargs`` go to the base factory, e.g. ``make_activation("lk-prelu", init=0.0)``.
    """
    base, is_linked = parse_activation(name)
    if is_linked:
        return Linked(base, "mirror", dim=dim, **kwargs)
    return _REGISTRY[base](**kwargs)


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is a registered activation (or a :class:`Linked` one)."""
    return isinstance(module, Linked) or type(module) in _TYPES


class _Fn(nn.Module):
    """A plain callable held as a module, so members can live in an ``nn.ModuleList``."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, z: Tensor) -> Tensor:
        return self.fn(z)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class _Mirror(nn.Module):
    """``g(-z)``: horizontal mirroring of a member."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, z: Tensor) -> Tensor:
        return self.g(-z)


class _Reflect(nn.Module):
    """``-g(-z)``: point reflection through the origin (for ReLU: ``min(z, 0)``)."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, z: Tensor) -> Tensor:
        return -self.g(-z)


def _as_module(member) -> nn.Module:
    if isinstance(member, nn.Module):
        return member
    if isinstance(member, str):
        return make_activation(member)
    if callable(member):
        return _Fn(member)
    raise TypeError(f"a linkage member must be a name, an nn.Module or a callable, got {member!r}")


def _refuse_inplace(members: nn.ModuleList) -> None:
    for m in members.modules():
        if getattr(m, "inplace", False) is True:
            raise ValueError(f"linkage member {m} works in place: it would overwrite the pre-activation that the "
                             "other members share; use inplace=False")


class Linked(nn.Module):
    r"""A linked activation: every member sees the same pre-activation, outputs are concatenated.

    .. math::
        f(z) = (g_1(z), \dots, g_d(z)), \qquad
        \text{mirror: } (g(z),\, g(-z)), \qquad \text{minmax: } (g(z),\, -g(-z)).

    ``policy="mirror"`` is the linkage of the paper's experiments and the authors' code (for
    ReLU it is CReLU); ``"minmax"`` is Figure 1(a) (for ReLU, :math:`(\max(z,0), \min(z,0))`);
    a list of callables or modules gives a custom d-way linkage (d ≥ 2). All channels of
    :math:`g_1` come first, then those of :math:`g_2`, ... (the authors' layout).

    Members with parameters are independent copies: ``Linked("prelu")`` has two PReLUs, one
    on :math:`z` and one on :math:`-z`. The authors' Keras code initialises PReLU's slope to
    ``alpha = 0`` (Keras' default); PyTorch's default is ``0.25``. Pass ``init=0.0`` to match
    the paper (the package's paper models do).

    Args:
        base: a registered name, an ``nn.Module`` or a callable :math:`g`; or, for a custom
            linkage, a list of members (then ``policy`` is ignored).
        policy: ``"mirror"`` or ``"minmax"``.
        dim: the channel dimension to concatenate along (1 for ``(N, C, ...)``, -1 for tokens).
        **base_kwargs: passed to the registered factory of ``base``.

    Shape:
        - Input: :math:`(N, C, *)`.
        - Output: :math:`(N, d\,C, *)` (the size of ``dim`` is multiplied by the number of members).

    Example:
        >>> act = Linked("relu")
        >>> act(torch.tensor([[-2.0, 3.0]]))
        tensor([[0., 3., 2., 0.]])
        >>> Linked("relu", policy="minmax")(torch.tensor([[-2.0, 3.0]]))  # -relu(-3) is -0.
        tensor([[ 0.,  3., -2., -0.]])
    """

    def __init__(self, base="relu", policy: str = "mirror", dim: int = 1, **base_kwargs):
        super().__init__()
        self.dim = dim
        self._fast_relu = False
        if isinstance(base, (list, tuple)):
            if len(base) < 2:
                raise ValueError(f"a linkage needs at least 2 members, got {len(base)}")
            self.policy = "custom"
            self.base_name = "custom"
            self.members = nn.ModuleList(_as_module(m) for m in base)
            _refuse_inplace(self.members)
            return
        if policy not in POLICIES:
            raise ValueError(f"unknown linkage policy {policy!r}; choose one of {POLICIES} or pass a list of members")
        self.policy = policy
        if isinstance(base, str):
            name, is_linked = parse_activation(base)
            if is_linked:
                raise ValueError(f"Linked takes a base activation, got the linked name {base!r}")
            if name == "identity":
                raise ValueError("the identity has no flat region to link")
            self.base_name = name
            g1, g2 = _REGISTRY[name](**base_kwargs), _REGISTRY[name](**base_kwargs)
            self._fast_relu = name in _FAST_RELU and policy == "mirror" and not base_kwargs
        else:
            g1 = _as_module(base)
            g2 = copy.deepcopy(g1)
            self.base_name = type(g1).__name__ if not isinstance(g1, _Fn) else g1.extra_repr()
        second = _Mirror(g2) if policy == "mirror" else _Reflect(g2)
        self.members = nn.ModuleList([g1, second])
        _refuse_inplace(self.members)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward(self, z: Tensor) -> Tensor:
        if self._fast_relu:
            return F_alive.linked_relu(z, self.dim)
        return F_alive.linked(z, list(self.members), self.dim)

    def extra_repr(self) -> str:
        return f"base={self.base_name}, policy={self.policy}, members={self.num_members}, dim={self.dim}"


class LinkedReLU(Linked):
    """Mirror-linked ReLU (CReLU): ``(relu(z), relu(-z))``. See :class:`Linked`."""

    def __init__(self, policy: str = "mirror", dim: int = 1):
        super().__init__("relu", policy, dim)


class LinkedPReLU(Linked):
    """Linked PReLU with independent slopes per member; ``init=0.0`` matches the authors' Keras code."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, policy: str = "mirror", dim: int = 1):
        super().__init__("prelu", policy, dim, num_parameters=num_parameters, init=init)


class LinkedSELU(Linked):
    """Mirror-linked SELU, Figure 1(b) of the paper: ``(selu(z), selu(-z))``."""

    def __init__(self, policy: str = "mirror", dim: int = 1):
        super().__init__("selu", policy, dim)


class LinkedSwish(Linked):
    """Mirror-linked Swish (SiLU): ``(z·σ(z), -z·σ(-z))``."""

    def __init__(self, policy: str = "mirror", dim: int = 1):
        super().__init__("swish", policy, dim)


# --------------------------------------------------------------------------- linkage check
@dataclass
class LinkageReport:
    """Result of :func:`check_linkage`.

    ``ok`` is True when at every probed ``z`` at least one member has a non-zero derivative;
    ``failures`` holds the probed values where every member is flat.
    """

    ok: bool
    failures: Tensor
    probed: int
    members: int

    @property
    def flat_fraction(self) -> float:
        return self.failures.numel() / self.probed

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        if self.ok:
            return f"LinkageReport(ok=True, members={self.members}, probed={self.probed})"
        lo, hi = self.failures.min().item(), self.failures.max().item()
        return (
            f"LinkageReport(ok=False, members={self.members}, flat at {self.failures.numel()}/{self.probed} "
            f"probed z in [{lo:.3g}, {hi:.3g}])"
        )


def _members_of(members) -> list[nn.Module]:
    if isinstance(members, str):
        base, is_linked = parse_activation(members)
        module = make_activation(members)
        return list(module.members) if is_linked else [module]
    if isinstance(members, Linked):
        return list(members.members)
    if isinstance(members, (list, tuple)):
        return [_as_module(m) for m in members]
    return [_as_module(members)]


def check_linkage(members, z: Tensor | None = None, atol: float = 0.0) -> LinkageReport:
    r"""Numerically verify the linkage condition: for every :math:`z`, some member has :math:`g_i'(z) \ne 0`.

    Args:
        members: a :class:`Linked` module, an activation name (``"lk-relu"``; a plain name checks
            the single activation), or a list of members (callables or modules).
        z: the probe points; default 20,000 points in :math:`[-10, 10]` in float64, an even
            count so that no probe sits exactly on ReLU's kink at 0 (where PyTorch's convention
            gives every ReLU member derivative 0).
        atol: a derivative of absolute value ``<= atol`` counts as zero (flat).

    Example:
        >>> check_linkage("lk-relu").ok, check_linkage(["relu", "relu"]).ok
        (True, False)
    """
    mods = _members_of(members)
    if z is None:
        z = torch.linspace(-10.0, 10.0, 20000, dtype=torch.float64)
    z = z.detach().reshape(-1).to(torch.float64)
    # members with per-channel parameters (PReLU(num_parameters=C)) are probed in every channel
    channels = max((getattr(m, "num_parameters", 1) for g in mods for m in g.modules()), default=1)
    zz = z.unsqueeze(1).repeat(1, channels).requires_grad_(True)  # (probes, channels)
    alive = torch.zeros_like(zz, dtype=torch.bool)
    for g in mods:
        g = copy.deepcopy(g).to(torch.float64)
        (d,) = torch.autograd.grad(g(zz).sum(), zz, allow_unused=True)
        if d is not None:
            alive |= d.abs() > atol
    linked = alive.all(1)
    return LinkageReport(ok=bool(linked.all()), failures=z[~linked], probed=z.numel(), members=len(mods))


def linkage_table(names: Sequence[str] | None = None):
    """The linkage check of every registered activation, plain and mirror-linked, as a DataFrame."""
    import pandas as pd

    names = list(names) if names is not None else available_activations(linked=True)
    rows = []
    for name in names:
        rep = check_linkage(name)
        rows.append(
            {
                "activation": name,
                "members": rep.members,
                "linked": rep.ok,
                "flat fraction of z in [-10, 10]": round(rep.flat_fraction, 4),
                "flat for z in": "-" if rep.ok else f"[{rep.failures.min():.2f}, {rep.failures.max():.2f}]",
            }
        )
    return pd.DataFrame(rows).set_index("activation")


def widen(width: int, factor: float = math.sqrt(2)) -> int:
    """The parameter-matched baseline width ``int(width * factor)`` (the authors' rule: 4 -> 5, 32 -> 45).

    A linked layer of ``w`` units feeds ``2w`` channels to the next layer, so a plain layer of
    ``√2·w`` units has about the same number of weights.
    """
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"width must be an int, got {type(width).__name__}: {width!r}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return int(width * factor)
