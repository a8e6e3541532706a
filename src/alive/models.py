"""The papers' architectures, each built from an activation name (plain or ``"lk-"`` linked).

A linked activation multiplies the channels the next layer receives by its number of members
(:func:`alive.activations.channel_factor`); ``widen=True`` builds the √2-wider plain baseline
with the authors' rule ``int(width·√2)``. Batch normalisation uses Keras' defaults (``eps=1e-3``,
running-average momentum 0.99, i.e. PyTorch ``momentum=0.01``), as the papers' code did.

=============  ==========================================================================
name           architecture
=============  ==========================================================================
``mlp``        rectangular MLP, ``depth`` hidden layers of ``width`` units (MOONS grids)
``cnn``        rectangular CNN, ``depth`` 3×3 "same" convs of ``width`` channels, dense head
``width``      Table 1: one 3×3 "valid" conv of 50 or 400 units, dense softmax
``depth``      Table 2: 7×7/2 "same" conv, 50 3×3 "same" convs of 4 units, dense softmax
``params``     Table 3: conv32 s, conv32 v, pool, conv64 s, conv64 v, pool, dense 512, dense 10
``allcnn``     Table 4: All-CNN-C (96, 96, 96/2, 192, 192, 192/2, 192, 192 1×1, 10 1×1, GAP)
``resnet50``   Tables 5–6: bottleneck ResNet-50 scaled for CIFAR-10 (conv1 8, [16,16,64]×3,
               [16,16,64]×4, [32,32,128]×6, [32,32,128]×3), with or without BatchNorm
=============  ==========================================================================
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import channel_factor, make_activation, parse_activation, widen as widen_width
from .init import AnnealedDropout, init_

__all__ = [
    "Conv2dSame",
    "MLP",
    "RectCNN",
    "WidthNet",
    "DeepThinNet",
    "ParamNet",
    "AllCNN",
    "ResNet50CIFAR",
    "MODELS",
    "build_model",
    "count_parameters",
]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _act(activation: str, channels: int, prelu_init: float) -> nn.Module:
    base, _ = parse_activation(activation)
    if base == "prelu":
        return make_activation(activation, num_parameters=channels, init=prelu_init)
    return make_activation(activation)


def _bn(kind: str, channels: int) -> nn.Module:
    cls = nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d
    return cls(channels, eps=1e-3, momentum=0.01)


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow/Keras ``padding="same"``: for strided convs the extra row and
    column of padding go at the bottom/right, so outputs align with the authors' Keras models."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv(cin: int, cout: int, k: int, padding: str = "same", stride: int = 1) -> nn.Conv2d:
    if padding == "valid":
        return nn.Conv2d(cin, cout, k, stride=stride)
    if stride == 1 and k % 2 == 1:
        return nn.Conv2d(cin, cout, k, padding=k // 2)
    return Conv2dSame(cin, cout, k, stride)


class _Network(nn.Module):
    """Common helpers: the activation's channel factor and the initialisation."""

    activation: str

    def _setup(self, activation: str, init: str) -> int:
        parse_activation(activation)  # fail early on unknown names
        self.activation = activation
        self.init_scheme = init
        return channel_factor(activation)

    def _finish(self) -> None:
        init_(self, self.init_scheme)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, init={self.init_scheme!r}"


class MLP(_Network):
    """Rectangular multilayer perceptron: ``depth`` hidden layers of ``width`` units.

    Each hidden layer is ``[AnnealedDropout] → Linear → [BatchNorm] → activation``; the output
    layer is ``[AnnealedDropout] → Linear``. ``dropout=(p0, epochs)`` puts annealed dropout on
    every layer's input (the zero-initialisation experiment).

    Shape:
        Input ``(N, in_features)``, output ``(N, num_classes)``.

    Example:
        >>> MLP(2, 2, depth=3, width=4, activation="lk-relu")(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        in_features: int = 2,
        num_classes: int = 2,
        depth: int = 1,
        width: int = 4,
        activation: str = "relu",
        batchnorm: bool = False,
        init: str = "glorot_uniform",
        dropout: tuple[float, int] | None = None,
        prelu_init: float = 0.0,
    ):
        super().__init__()
        fac = self._setup(activation, init)
        self.depth, self.width, self.batchnorm = _positive_int("depth", depth), _positive_int("width", width), batchnorm
        blocks = []
        fan_in = _positive_int("in_features", in_features)
        for _ in range(depth):
            layers: list[nn.Module] = [AnnealedDropout(*dropout)] if dropout else []
            layers.append(nn.Linear(fan_in, width))
            if batchnorm:
                layers.append(_bn("1d", width))
            layers.append(_act(activation, width, prelu_init))
            blocks.append(nn.Sequential(*layers))
            fan_in = width * fac
        self.hidden = nn.Sequential(*blocks)
        head: list[nn.Module] = [AnnealedDropout(*dropout)] if dropout else []
        self.head = nn.Sequential(*head, nn.Linear(fan_in, _positive_int("num_classes", num_classes)))
        self._finish()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, batchnorm={self.batchnorm}, " + super().extra_repr()


class RectCNN(_Network):
    """Rectangular CNN of the separation paper's MNIST/CIFAR grids: ``depth`` 3×3 "same" convs of
    ``width`` channels (``Conv → [BatchNorm] → activation``), flatten, dense softmax.

    Shape:
        Input ``(N, C, H, W)``, output ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        depth: int = 2,
        width: int = 4,
        activation: str = "relu",
        batchnorm: bool = False,
        init: str = "glorot_uniform",
        kernel_size: int = 3,
        prelu_init: float = 0.0,
    ):
        super().__init__()
        fac = self._setup(activation, init)
        self.depth, self.width, self.batchnorm = _positive_int("depth", depth), _positive_int("width", width), batchnorm
        blocks, cin = [], in_channels
        for _ in range(depth):
            layers = [_conv(cin, width, kernel_size)]
            if batchnorm:
                layers.append(_bn("2d", width))
            layers.append(_act(activation, width, prelu_init))
            blocks.append(nn.Sequential(*layers))
            cin = width * fac
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(cin * image_size * image_size, num_classes)
        self._finish()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, batchnorm={self.batchnorm}, " + super().extra_repr()


class WidthNet(_Network):
    """Table 1 (width experiment): one 3×3 "valid" conv of ``units`` units, activation, flatten, dense."""

    def __init__(self, units: int = 50, activation: str = "relu", in_channels: int = 3, image_size: int = 32,
                 num_classes: int = 10, init: str = "glorot_uniform", prelu_init: float = 0.0):
        super().__init__()
        fac = self._setup(activation, init)
        self.units = _positive_int("units", units)
        self.conv = nn.Conv2d(in_channels, units, 3)
        self.act = _act(activation, units, prelu_init)
        self.head = nn.Linear(units * fac * (image_size - 2) ** 2, num_classes)
        self._finish()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))

    def extra_repr(self) -> str:
        return f"units={self.units}, " + super().extra_repr()


class DeepThinNet(_Network):
    """Table 2 (depth experiment): a 7×7 stride-2 "same" conv, then ``depth`` 3×3 "same" convs,
    all of ``width`` units (5 for the √2 baseline), no pooling, flatten, dense softmax.

    The BatchNorm baseline is ``Conv → BatchNorm → ReLU`` in every layer (the authors' code).
    """

    def __init__(self, depth: int = 50, width: int = 4, activation: str = "relu", batchnorm: bool = False,
                 widen: bool = False, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 init: str = "glorot_uniform", prelu_init: float = 0.0):
        super().__init__()
        fac = self._setup(activation, init)
        _positive_int("depth", depth)
        w = widen_width(_positive_int("width", width)) if widen else width
        self.depth, self.width, self.batchnorm, self.widened = depth, w, batchnorm, widen

        def block(conv):
            return nn.Sequential(conv, *([_bn("2d", w)] if batchnorm else []), _act(activation, w, prelu_init))

        blocks = [block(_conv(in_channels, w, 7, stride=2))]
        blocks += [block(_conv(w * fac, w, 3)) for _ in range(depth)]
        self.features = nn.Sequential(*blocks)
        side = math.ceil(image_size / 2)
        self.head = nn.Linear(w * fac * side * side, num_classes)
        self._finish()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, batchnorm={self.batchnorm}, " + super().extra_repr()


class ParamNet(_Network):
    """Table 3 (number of parameters): conv32 same, conv32 valid, max-pool, conv64 same, conv64 valid,
    max-pool, dense 512, dense 10; ``widen=True`` gives the √2 version (45/45/90/90/724)."""

    def __init__(self, activation: str = "relu", widen: bool = False, in_channels: int = 3, image_size: int = 32,
                 num_classes: int = 10, init: str = "glorot_uniform", prelu_init: float = 0.0):
        super().__init__()
        fac = self._setup(activation, init)
        c1, c2, d = (32, 64, 512)
        if widen:
            c1, c2, d = widen_width(c1), widen_width(c2), widen_width(d)
        self.widths, self.widened = (c1, c1, c2, c2, d), widen
        a = lambda c: _act(activation, c, prelu_init)  # noqa: E731
        self.features = nn.Sequential(
            _conv(in_channels, c1, 3), a(c1),
            _conv(c1 * fac, c1, 3, "valid"), a(c1),
            nn.MaxPool2d(2),
            _conv(c1 * fac, c2, 3), a(c2),
            _conv(c2 * fac, c2, 3, "valid"), a(c2),
            nn.MaxPool2d(2),
        )
        side = ((image_size - 2) // 2 - 2) // 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * fac * side * side, d), a(d), nn.Linear(d * fac, num_classes))
        self._finish()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def extra_repr(self) -> str:
        return f"widths={self.widths}, " + super().extra_repr()


class AllCNN(_Network):
    """Table 4: All-CNN-C (Springenberg et al.) as in the authors' code.

    96, 96 (3×3), a 3×3 stride-2 conv without activation, dropout 0.5; 192, 192 (3×3), a 3×3
    stride-2 conv without activation, dropout 0.5; 192 3×3 "valid", 192 1×1, 10 1×1 (logits),
    global average pooling. ``width_mult`` scales every width but the last (book profile).
    """

    def __init__(self, activation: str = "relu", width_mult: float = 1.0, dropout: float = 0.5, batchnorm: bool = False,
                 in_channels: int = 3, num_classes: int = 10, init: str = "glorot_uniform", prelu_init: float = 0.0):
        super().__init__()
        fac = self._setup(activation, init)
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        c1, c2 = max(1, round(96 * width_mult)), max(1, round(192 * width_mult))
        self.width_mult, self.batchnorm = width_mult, batchnorm

        def unit(cin, cout, k, padding="same"):
            layers = [_conv(cin, cout, k, padding)]
            if batchnorm:
                layers.append(_bn("2d", cout))
            layers.append(_act(activation, cout, prelu_init))
            return layers

        self.features = nn.Sequential(
            *unit(in_channels, c1, 3), *unit(c1 * fac, c1, 3),
            _conv(c1 * fac, c1, 3, stride=2), nn.Dropout(dropout),
            *unit(c1, c2, 3), *unit(c2 * fac, c2, 3),
            _conv(c2 * fac, c2, 3, stride=2), nn.Dropout(dropout),
            *unit(c2, c2, 3, "valid"), *unit(c2 * fac, c2, 1),
            nn.Conv2d(c2 * fac, num_classes, 1),
        )
        self._finish()

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean((2, 3))

    def extra_repr(self) -> str:
        return f"width_mult={self.width_mult}, " + super().extra_repr()


class _Bottleneck(nn.Module):
    def __init__(self, cin, filters, stride, activation, base_activation, batchnorm, prelu_init):
        super().__init__()
        f1, f2, f3 = filters
        fac = channel_factor(activation)
        bn = (lambda c: _bn("2d", c)) if batchnorm else (lambda c: nn.Identity())
        self.branch = nn.Sequential(
            _conv(cin, f1, 1, stride=stride), bn(f1), _act(activation, f1, prelu_init),
            _conv(f1 * fac, f2, 3), bn(f2), _act(activation, f2, prelu_init),
            _conv(f2 * fac, f3, 1), bn(f3),
        )
        self.shortcut = (
            nn.Sequential(_conv(cin, f3, 1, stride=stride), bn(f3)) if stride != 1 or cin != f3 else nn.Identity()
        )
        self.out_act = _act(base_activation, f3, prelu_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_act(self.branch(x) + self.shortcut(x))


class ResNet50CIFAR(_Network):
    """Tables 5–6: the authors' bottleneck ResNet-50 scaled down for CIFAR-10.

    conv1 (8 filters, 3×3) + BN + activation; stages [16,16,64]×3 (stride 1), [16,16,64]×4,
    [32,32,128]×6, [32,32,128]×3 (stride 2 at each stage's first block, Keras' ``conv_block``);
    global average pooling; dense 10. A linked activation is used only inside the bottleneck
    branches; the stem and the post-addition activations use its base activation.
    ``batchnorm=False`` removes every BatchNorm (Table 6).
    """

    STAGES = (((16, 16, 64), 3, 1), ((16, 16, 64), 4, 2), ((32, 32, 128), 6, 2), ((32, 32, 128), 3, 2))

    def __init__(self, activation: str = "relu", batchnorm: bool = True, in_channels: int = 3, num_classes: int = 10,
                 init: str = "glorot_uniform", prelu_init: float = 0.0):
        super().__init__()
        self._setup(activation, init)
        base = parse_activation(activation)[0]
        self.batchnorm = batchnorm
        stem = [_conv(in_channels, 8, 3)] + ([_bn("2d", 8)] if batchnorm else []) + [_act(base, 8, prelu_init)]
        self.stem = nn.Sequential(*stem)
        blocks, cin = [], 8
        for filters, count, stride in self.STAGES:
            for i in range(count):
                blocks.append(_Bottleneck(cin, filters, stride if i == 0 else 1, activation, base, batchnorm, prelu_init))
                cin = filters[2]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        self._finish()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def extra_repr(self) -> str:
        return f"batchnorm={self.batchnorm}, " + super().extra_repr()


def _image_kwargs(input_shape):
    if len(input_shape) != 3:
        raise ValueError(f"this model takes images (C, H, W), got input shape {tuple(input_shape)}")
    return {"in_channels": input_shape[0], "image_size": input_shape[-1]}


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda input_shape, num_classes, **kw: MLP(input_shape[0], num_classes, **kw),
    "cnn": lambda input_shape, num_classes, **kw: RectCNN(num_classes=num_classes, **_image_kwargs(input_shape), **kw),
    "width": lambda input_shape, num_classes, **kw: WidthNet(num_classes=num_classes, **_image_kwargs(input_shape), **kw),
    "depth": lambda input_shape, num_classes, **kw: DeepThinNet(num_classes=num_classes, **_image_kwargs(input_shape), **kw),
    "params": lambda input_shape, num_classes, **kw: ParamNet(num_classes=num_classes, **_image_kwargs(input_shape), **kw),
    "allcnn": lambda input_shape, num_classes, **kw: AllCNN(in_channels=input_shape[0], num_classes=num_classes, **kw),
    "resnet50": lambda input_shape, num_classes, **kw: ResNet50CIFAR(in_channels=input_shape[0], num_classes=num_classes, **kw),
}


def build_model(name: str, input_shape, num_classes: int, **kwargs) -> nn.Module:
    """Build the architecture ``name`` (see :data:`MODELS`) for inputs of ``input_shape``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
