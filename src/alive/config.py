"""The full configuration of one training run, validated early, hashable, and CLI-friendly."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, Union, get_args, get_origin, get_type_hints

from .activations import display_name, parse_activation
from .data import DATASETS, SCALINGS
from .functional import AGGREGATIONS, CONV_REDUCTIONS
from .init import INIT_SCHEMES

__all__ = ["RunConfig", "ConfigError", "check_fields", "OPTIMIZERS", "SCHEDULES", "CONSTRAINTS", "PRECISIONS", "MODEL_FIELDS", "RESULT_VERSION"]

# Bump when a change of the code changes what an existing configuration trains to; stored
# results of older versions are then no longer found (they stay on disk).
RESULT_VERSION = 1

OPTIMIZERS = ("adam", "rmsprop", "sgd", "nesterov")
SCHEDULES = ("constant", "allcnn")
CONSTRAINTS = ("none", "u", "p", "up")
PRECISIONS = ("auto", "fp32", "bf16")

# which of the architecture fields each model takes
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "mlp": ("depth", "width", "batchnorm", "annealed_dropout", "anneal_epochs"),
    "cnn": ("depth", "width", "batchnorm"),
    "width": ("width",),
    "depth": ("depth", "width", "batchnorm", "widen"),
    "params": ("widen",),
    "allcnn": ("width_mult", "batchnorm"),
    "resnet50": ("batchnorm",),
}


class ConfigError(ValueError):
    """An invalid configuration (reported before any training starts)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run; its hash keys the stored result.

    Data: ``dataset``, ``n_train`` / ``n_test`` (first N images; None = all), ``scaling``
    (``raw`` 0–255, ``unit`` /255, ``standardize``), ``augment`` (flips + 10 % shifts),
    ``require_full`` (refuse a subset), ``moons_n`` / ``moons_noise``.

    Model: ``model`` (see :data:`alive.models.MODELS`), ``activation`` (any registry name,
    ``"lk-"`` for linked), ``depth``, ``width``, ``width_mult``, ``batchnorm``, ``widen`` (the
    √2 baseline), ``init``, ``prelu_init``, ``annealed_dropout`` (p0; 0 = off) / ``anneal_epochs``.

    Optimisation: ``optimizer`` (``adam``, ``rmsprop``, ``sgd``, ``nesterov``), ``lr``,
    ``decay`` (Keras time decay ``lr / (1 + decay · iterations)``), ``momentum`` (sgd; nesterov: 0 means 0.9, Keras' value), ``schedule``
    (``constant`` or ``allcnn``, the step schedule of Table 4 scaled to ``epochs``), ``epochs``,
    ``batch_size`` (None = full batch), ``seed``, ``precision``.

    Separation constraint: ``constraint`` (``none``, ``u``, ``p``, ``up``), ``weight`` (λ),
    ``rho``, ``margin``, ``aggregation``, ``conv_reduction``.
    """

    experiment: str = "default"
    dataset: str = "moons"
    n_train: int | None = None
    n_test: int | None = None
    scaling: str = "unit"
    augment: bool = False
    require_full: bool = False
    moons_n: int = 100
    moons_noise: float = 0.0

    model: str = "mlp"
    activation: str = "relu"
    depth: int | None = None
    width: int | None = None
    width_mult: float = 1.0
    batchnorm: bool = False
    widen: bool = False
    init: str = "glorot_uniform"
    prelu_init: float = 0.0
    annealed_dropout: float = 0.0
    anneal_epochs: int = 1000

    optimizer: str = "adam"
    lr: float = 1e-3
    decay: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    epochs: int = 10
    batch_size: int | None = 32
    seed: int = 0
    precision: str = "auto"

    constraint: str = "none"
    weight: float = 0.0
    rho: float = 0.5
    margin: float = 1.0
    aggregation: str = "paper"
    conv_reduction: str = "channel"

    diagnostics: bool = True
    liveness_every: int = 0

    def __post_init__(self):
        # lr=1 and lr=1.0 are one configuration: one store key (JSON writes 1 and 1.0 apart)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", float) and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        check_fields(self)
        _choice("dataset", self.dataset, DATASETS)
        _choice("scaling", self.scaling, SCALINGS)
        from .models import MODELS  # late: models imports init, which imports constraints

        _choice("model", self.model, tuple(sorted(MODELS)))
        try:
            parse_activation(self.activation)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _choice("init", self.init, INIT_SCHEMES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("constraint", self.constraint, CONSTRAINTS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("conv_reduction", self.conv_reduction, CONV_REDUCTIONS)
        for name in ("n_train", "n_test", "depth", "width", "batch_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive (or None), got {v}")
        for name in ("epochs", "moons_n", "anneal_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "width_mult"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a positive number, got {v}")
        for name in ("decay", "momentum", "weight", "moons_noise", "liveness_every", "margin"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite non-negative number, got {v}")
        if not math.isfinite(self.prelu_init):
            raise ConfigError(f"prelu_init must be finite, got {self.prelu_init}")
        if not re.fullmatch(r"[\w-][\w.-]*", self.experiment):
            raise ConfigError(f"experiment must be a plain name (letters, digits, _ . -; it names a results folder), got {self.experiment!r}")
        if self.momentum and self.optimizer in ("adam", "rmsprop"):
            raise ConfigError(f"momentum applies to the sgd and nesterov optimizers, not {self.optimizer!r}")
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"rho must lie in [0, 1], got {self.rho}")
        if not 0.0 <= self.annealed_dropout < 1.0:
            raise ConfigError(f"annealed_dropout (p0) must lie in [0, 1), got {self.annealed_dropout}")
        if self.constraint != "none" and self.weight == 0.0:
            raise ConfigError(f"constraint={self.constraint!r} needs a positive weight (lambda)")
        if self.constraint == "none" and self.weight != 0.0:
            raise ConfigError("weight (lambda) is set but constraint is 'none'")
        if (self.model == "mlp") != (self.dataset == "moons"):
            raise ConfigError(f"model {self.model!r} does not fit data set {self.dataset!r} (mlp goes with moons)")
        taken = MODEL_FIELDS[self.model]
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("depth", "width", "width_mult", "batchnorm", "widen", "annealed_dropout", "anneal_epochs"):
            if name not in taken and getattr(self, name) != defaults[name]:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not a parameter of model {self.model!r} (it takes {', '.join(taken)})")
        if self.model in ("mlp", "cnn") and (self.depth is None or self.width is None):
            raise ConfigError(f"model {self.model!r} needs depth and width")
        if self.model == "width" and self.width is None:
            raise ConfigError("model 'width' needs width (the number of conv units, 50 or 400 in Table 1)")
        if self.dataset == "moons" and (self.augment or self.require_full or self.n_train or self.n_test):
            raise ConfigError("moons takes moons_n / moons_noise, not augment, require_full, n_train or n_test")

    # ------------------------------------------------------------------ conversions
    def replace(self, **changes) -> "RunConfig":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}; valid fields: {', '.join(f.name for f in fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}; valid fields: {', '.join(f.name for f in fields(cls))}")
        return cls(**dict(d))

    def key(self, precision: str) -> str:
        """The store key: a hash of every field, the resolved precision and :data:`RESULT_VERSION`."""
        d = self.to_dict()
        d["precision"] = precision
        d["_version"] = RESULT_VERSION
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`alive.models.build_model` for this configuration."""
        kw: dict[str, Any] = {"activation": self.activation, "init": self.init}
        if self.prelu_init != 0.0 or parse_activation(self.activation)[0] == "prelu":
            kw["prelu_init"] = self.prelu_init
        taken = MODEL_FIELDS[self.model]
        for name in ("depth", "width", "width_mult", "batchnorm", "widen"):
            if name in taken and getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.model == "width":
            kw["units"] = kw.pop("width")
        if self.model == "mlp" and self.annealed_dropout > 0:
            kw["dropout"] = (self.annealed_dropout, self.anneal_epochs)
        return kw

    def data_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`alive.data.load`."""
        if self.dataset == "moons":
            return {"n": self.moons_n, "noise": self.moons_noise}
        return {"scaling": self.scaling, "n_train": self.n_train, "n_test": self.n_test, "require_full": self.require_full}

    @property
    def label(self) -> str:
        """A short human name: activation, widening, BN, constraint."""
        parts = [display_name(self.activation)]
        if self.widen:
            parts.append("√2")
        if self.batchnorm:
            parts.append("+BN")
        if self.constraint != "none":
            parts.append(f"Sep-{self.constraint.upper()}")
        return " ".join(parts)


def _choice(name: str, value: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid choices: {', '.join(valid)}")


def _matches(value, t) -> bool:
    if t is type(None):
        return value is None
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t in (str, bool):
        return isinstance(value, t)
    if get_origin(t) in (list, tuple):
        (inner,) = get_args(t)[:1] or (object,)
        return isinstance(value, (list, tuple)) and all(_matches(v, inner) for v in value)
    return isinstance(value, t) if isinstance(t, type) else True


def _type_name(t) -> str:
    if t is type(None):
        return "None"
    if get_origin(t) in (list, tuple):
        return f"a list of {_type_name(get_args(t)[0])}"
    return getattr(t, "__name__", str(t))


def _check_type(name: str, value, hint) -> None:
    origin = get_origin(hint)
    allowed = get_args(hint) if origin in (Union, getattr(__import__("types"), "UnionType", Union)) else (hint,)
    if any(_matches(value, t) for t in allowed):
        return
    names = " or ".join(_type_name(t) for t in allowed)
    raise ConfigError(f"{name} must be {names}, got {type(value).__name__}: {value!r}")


def check_fields(obj) -> None:
    """Check every dataclass field of ``obj`` against its type annotation (one clear error)."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        _check_type(f.name, getattr(obj, f.name), hints[f.name])
