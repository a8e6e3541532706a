"""alive: linked neurons and separation constraints, keeping every unit and every point alive.

A literate reproduction of Riera & Pujol, *Solving internal covariate shift in deep learning
with linked neurons*, and of *Superseding model scaling by penalizing dead units and points
with separation constraints*.

>>> import alive
>>> act = alive.Linked("relu")                       # (relu(z), relu(-z))
>>> sep = alive.SeparationConstraint(net, kind="up", weight=1e-4)   # doctest: +SKIP
"""
__version__ = "0.1.0"

from . import functional
from .activations import (
    Linked,
    LinkedPReLU,
    LinkedReLU,
    LinkedSELU,
    LinkedSwish,
    available_activations,
    check_linkage,
    linkage_table,
    make_activation,
    register_activation,
    widen,
)
from .constraints import SeparationConstraint, hidden_layers
from .diagnostics import dead_neurons, liveness
from .init import AnnealedDropout, init_, zero_init_

__all__ = [
    "__version__",
    "functional",
    "Linked",
    "LinkedReLU",
    "LinkedPReLU",
    "LinkedSELU",
    "LinkedSwish",
    "available_activations",
    "check_linkage",
    "linkage_table",
    "make_activation",
    "register_activation",
    "widen",
    "SeparationConstraint",
    "hidden_layers",
    "liveness",
    "dead_neurons",
    "AnnealedDropout",
    "init_",
    "zero_init_",
]
