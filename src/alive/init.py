"""Weight initialisation schemes and the annealed dropout of the zero-initialisation experiment."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .constraints import WEIGHTED_TYPES

__all__ = [
    "INIT_SCHEMES",
    "init_",
    "zero_init_",
    "annealed_dropout_rate",
    "AnnealedDropout",
    "set_epoch",
]

INIT_SCHEMES = ("glorot_uniform", "kaiming", "zero")


def init_(model: nn.Module, scheme: str = "glorot_uniform") -> nn.Module:
    """Initialise every ``Linear`` / ``Conv`` layer of ``model`` in place and return it.

    * ``"glorot_uniform"``: Glorot/Xavier uniform weights, zero biases (Keras' default, used
      by both papers);
    * ``"kaiming"``: PyTorch's default ``reset_parameters`` (Kaiming uniform with a = √5);
    * ``"zero"``: every weight and bias 0 (§4.2 of the separation paper).

    Normalisation layers and activation parameters (PReLU slopes) are left as built.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    for m in model.modules():
        if not isinstance(m, WEIGHTED_TYPES):
            continue
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{type(m).__name__} is a lazy module whose shape is not known yet: "
                             "run one forward pass before initialising it")
        if scheme == "kaiming":
            m.reset_parameters()
            continue
        with torch.no_grad():
            if scheme == "glorot_uniform":
                nn.init.xavier_uniform_(m.weight)
            else:
                m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
    return model


def zero_init_(model: nn.Module) -> nn.Module:
    """Set every weight and bias of every ``Linear`` / ``Conv`` layer to 0 (in place)."""
    return init_(model, "zero")


def annealed_dropout_rate(epoch: int, p0: float = 0.9, epochs: int = 1000) -> float:
    """Annealed dropout rate ``max(0, p0 - p0 * epoch / epochs)`` (Rennie et al.; the authors use 0.9, 1000)."""
    if epochs <= 0:
        raise ValueError(f"annealing epochs must be positive, got {epochs}")
    if epoch < 0:
        raise ValueError(f"the epoch of annealed dropout counts from 0, got {epoch}")
    return max(0.0, p0 - p0 * epoch / epochs)


class AnnealedDropout(nn.Module):
    r"""Dropout whose rate decays linearly to zero: :math:`p(e) = \max(0, p_0 - p_0 e / E)`.

    Call :func:`set_epoch` (or set ``.epoch``) at the start of each epoch. Inactive in eval mode
    and once the rate reaches 0.

    Shape:
        - Input: any. Output: same shape.

    Example:
        >>> drop = AnnealedDropout(p0=0.9, epochs=1000)
        >>> drop.epoch = 500
        >>> drop.rate
        0.45
    """

    def __init__(self, p0: float = 0.9, epochs: int = 1000):
        super().__init__()
        if not 0.0 <= p0 < 1.0:
            raise ValueError(f"p0 must lie in [0, 1), got {p0}")
        if epochs <= 0:
            raise ValueError(f"annealing epochs must be positive, got {epochs}")
        self.p0, self.epochs, self.epoch = float(p0), int(epochs), 0

    @property
    def rate(self) -> float:
        return annealed_dropout_rate(self.epoch, self.p0, self.epochs)

    def forward(self, x: Tensor) -> Tensor:
        p = self.rate
        if not self.training or p == 0.0:
            return x
        return F.dropout(x, p, training=True)

    def extra_repr(self) -> str:
        return f"p0={self.p0}, epochs={self.epochs}, epoch={self.epoch}"


def set_epoch(model: nn.Module, epoch: int) -> None:
    """Tell every :class:`AnnealedDropout` in ``model`` the current epoch."""
    for m in model.modules():
        if isinstance(m, AnnealedDropout):
            m.epoch = int(epoch)
