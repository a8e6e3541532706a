"""The published numbers of both papers, as data (nothing here is computed).

Linked neurons (Riera & Pujol, arXiv 1712.02609): Tables 1–6 of the later version ("v2",
the headline values) and of the first version ("v1", kept where they differ). All are the
best validation accuracy over epochs on CIFAR-10 (the test set used as validation); Tables
1–3 are medians over runs (Table 2 also the max).

Separation constraints (anonymous review version): Figures 1–5 are heatmaps without
numbers; :data:`SEPARATION_CLAIMS` holds what the text and captions state about them.
"""
from __future__ import annotations

import pandas as pd

__all__ = [
    "ACTIVATIONS",
    "table1",
    "table2",
    "table3",
    "table4",
    "table5",
    "table6",
    "SEPARATION_CLAIMS",
    "SEPARATION_SETTINGS",
]

#: the eight activations of the linked-neurons tables, in the papers' column order
ACTIVATIONS = ("relu", "lk-relu", "prelu", "lk-prelu", "selu", "lk-selu", "swish", "lk-swish")

_T1 = {
    "v2": {50: (0.5767, 0.5909, 0.5771, 0.5908, 0.4992, 0.5730, 0.5559, 0.5488),
           400: (0.6154, 0.6165, 0.6156, 0.6168, 0.5227, 0.599, 0.5442, 0.5405)},
    "v1": {50: (0.5706, 0.5707, 0.5709, 0.5710, 0.4840, 0.5051, 0.5504, 0.5222),
           400: (0.5934, 0.5863, 0.5940, 0.5867, 0.4994, 0.5312, 0.5004, 0.5352)},
}

# Table 2 rows: (activation, widened, batchnorm) -> (max, median)
_T2_ROWS = (
    ("relu", False, False), ("lk-relu", False, False), ("relu", True, False),
    ("prelu", False, False), ("lk-prelu", False, False), ("prelu", True, False),
    ("selu", False, False), ("lk-selu", False, False), ("selu", True, False),
    ("swish", False, False), ("lk-swish", False, False), ("swish", True, False),
    ("relu", False, True),
)
_T2 = {
    "v2": ((0.1, 0.1), (0.5667, 0.5607), (0.1, 0.1), (0.1, 0.1), (0.5458, 0.5210), (0.1, 0.1),
           (0.5654, 0.5643), (0.5876, 0.5670), (0.5707, 0.5703), (0.1, 0.1), (0.1, 0.1), (0.1, 0.1),
           (0.5202, 0.5114)),
    "v1": ((0.1, 0.1), (0.2014, 0.2014), (0.1, 0.1), (0.1, 0.1), (0.2039, 0.2039), (0.1, 0.1),
           (0.2010, 0.2010), (0.2843, 0.2843), (0.2386, 0.2386), (0.1, 0.1), (0.1, 0.1), (0.1, 0.1),
           (0.1205, 0.1205)),
}

# Table 3: base activation -> (single, sqrt2, linked)
_T3 = {
    "v2": {"relu": (0.7337, 0.7581, 0.7696), "prelu": (0.7201, 0.7568, 0.7687),
           "selu": (0.6981, 0.7012, 0.7559), "swish": (0.6961, 0.7376, 0.7368)},
    "v1": {"relu": (0.7232, 0.7394, 0.7360), "prelu": (0.7068, 0.7379, 0.7369),
           "selu": (0.5766, 0.7379, 0.7080), "swish": (0.5766, 0.7379, 0.7146)},
}

_T4 = {
    "v2": (0.9301, 0.9468, 0.9422, 0.9232, 0.9304, 0.9197, 0.9261, 0.8971),
    "v1": (0.317, 0.8674, 0.8677, 0.7833, 0.8283, 0.8918, 0.8613, 0.8243),
}

_T5 = {
    "v2": (0.8973, 0.9027, 0.8907, 0.9027, 0.9041, 0.9134, 0.905, 0.9139),
    "v1": (0.6479, 0.7176, 0.7418, 0.7561, 0.8094, 0.8081, 0.791, 0.8054),
}

# Table 6: (activation, batchnorm) -> (accuracy, time ratio to LK-ReLU without BN)
_T6_ROWS = (("lk-relu", True), ("lk-relu", False), ("selu", True), ("selu", False), ("lk-selu", True), ("lk-selu", False))
_T6 = {
    "v2": ((0.9027, 2.09), (0.9048, 1.0), (0.9041, 2.07), (0.8611, 1.38), (0.9134, 2.08), (0.9088, 1.6)),
    "v1": ((0.7176, 2.302884), (0.7656, 1.0), (0.8094, 2.376538), (0.7625, 1.102254), (0.8081, 2.750654), (0.7661, 1.510567)),
}


def _version(version: str) -> str:
    if version not in ("v1", "v2"):
        raise ValueError(f"paper version must be 'v1' or 'v2', got {version!r}")
    return version


def table1(version: str = "v2") -> pd.DataFrame:
    """Table 1 (width): rows = conv units (50, 400), columns = the eight activations."""
    t = _T1[_version(version)]
    return pd.DataFrame([dict(units=u, **dict(zip(ACTIVATIONS, vals))) for u, vals in t.items()]).set_index("units")


def table2(version: str = "v2") -> pd.DataFrame:
    """Table 2 (depth): one row per (activation, widened, batchnorm); columns max, median."""
    rows = [
        {"activation": a, "widen": w, "batchnorm": bn, "max": mx, "median": md}
        for (a, w, bn), (mx, md) in zip(_T2_ROWS, _T2[_version(version)])
    ]
    return pd.DataFrame(rows)


def table3(version: str = "v2") -> pd.DataFrame:
    """Table 3 (parameters): rows = base activation, columns single / sqrt2 / linked."""
    t = _T3[_version(version)]
    return pd.DataFrame([{"activation": a, "single": s, "sqrt2": r, "linked": l} for a, (s, r, l) in t.items()]).set_index("activation")


def table4(version: str = "v2") -> pd.Series:
    """Table 4 (All-CNN): best validation accuracy per activation."""
    return pd.Series(dict(zip(ACTIVATIONS, _T4[_version(version)])), name=f"paper {version}")


def table5(version: str = "v2") -> pd.Series:
    """Table 5 (ResNet-50 with BatchNorm): best validation accuracy per activation."""
    return pd.Series(dict(zip(ACTIVATIONS, _T5[_version(version)])), name=f"paper {version}")


def table6(version: str = "v2") -> pd.DataFrame:
    """Table 6 (ResNet-50 with and without BatchNorm): accuracy and time ratio."""
    rows = [
        {"activation": a, "batchnorm": bn, "accuracy": acc, "time_ratio": tr}
        for (a, bn), (acc, tr) in zip(_T6_ROWS, _T6[_version(version)])
    ]
    return pd.DataFrame(rows)


#: the settings of the separation paper's figures (§4, and the authors' code where the text is silent)
SEPARATION_SETTINGS = {
    "moons": {"widths": [1, 2, 3, 4, 5, 10, 15, 20, 25], "depths": [1] + list(range(10, 121, 10)),
              "epochs": 5000, "lr": 0.01, "batch_size": None, "weight": 1e-4, "seed": 10},
    "mnist": {"widths": [2, 4, 6, 8], "depths": [2, 4, 8, 16, 24, 32, 48, 64],
              "epochs": 50, "lr": 1e-4, "batch_size": 1024, "weight": 1e-8, "seed": 10},
    "cifar10": {"widths": [10], "depths": [2, 10, 25, 30, 40],
                "epochs": 50, "lr": 1e-4, "batch_size": 1024, "weight": 1e-8, "seed": 10},
}

#: what the separation paper says its figures show (quoted or closely paraphrased)
SEPARATION_CLAIMS = {
    "fig1": [
        ("relu", "ReLU breaks down at 20 layers (caption) / at only 30 layers (text)."),
        ("relu+bn", "ReLU + BN requires more units per layer as depth increases (severe accuracy degradation)."),
        ("sep-up", "Sep-UP works with the minimum width (3) up to 60 layers deep, then starts to degrade."),
        ("all", "No configuration with width below 2-3 reaches maximum accuracy."),
    ],
    "fig2": [
        ("relu", "ReLU breaks down at 20 layers."),
        ("relu+bn", "ReLU + BN accuracy degrades with depth."),
        ("sep-up", "Sep-UP shows constant accuracy regardless of the number of layers."),
    ],
    "fig3": [
        ("all", "All methods degrade with depth, Sep-UP is the most robust."),
        ("relu", "ReLU performs best, closely followed by Sep-UP; ReLU + BN clearly overfits."),
    ],
    "fig4": [
        ("sep-up-zero", "With zero initialisation Sep-UP needs width 25 for depth 60 (Glorot: width 2) for maximum accuracy."),
        ("sep-up-zero", "Zero-initialised Sep-UP is still superior to ReLU + BN in depth, width and accuracy."),
    ],
    "fig5": [
        ("sep-u", "Sep-U trains 120 layers of a single unit, with lower accuracy than Sep-UP; it needs wider layers for perfect accuracy."),
        ("sep-p", "Sep-P keeps a constant-width area from 1 to 40 layers, and is much worse deeper."),
    ],
}
