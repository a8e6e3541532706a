"""Figures and table formatting for the book (seaborn / matplotlib; no training here)."""
from __future__ import annotations

import math
from typing import Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from .activations import Linked, display_name, make_activation
from .config import ConfigError

__all__ = [
    "setup",
    "linked_activation_figure",
    "heatmaps",
    "dead_neurons_per_layer",
    "ours_vs_paper",
    "history_figure",
    "comparison_bars",
    "accuracy_vs_depth",
]


def setup() -> None:
    """Book style: seaborn's paper theme, three decimals in tables, wide frames; inside a
    Jupyter kernel, figures are shown inline even where ``MPLBACKEND`` names a file backend."""
    _inline_in_jupyter()
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    pd.set_option("display.float_format", _number)
    pd.set_option("display.max_columns", 40)
    pd.set_option("display.width", 160)
    pd.set_option("display.max_colwidth", 120)


def _number(v: float) -> str:
    """Three decimals, but small non-zero values (gradients, penalties) in scientific notation."""
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.3f}"


def _inline_in_jupyter() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        shell.run_line_magic("matplotlib", "inline")


def _curves(act, z: torch.Tensor):
    z = z.clone().requires_grad_(True)
    out = act(z.unsqueeze(0)).reshape(-1)  # members stacked along dim 0: (d * n,)
    d = out.numel() // z.numel()
    values, slopes = [], []
    for k in range(d):
        member = out[k * z.numel() : (k + 1) * z.numel()]
        (g,) = torch.autograd.grad(member.sum(), z, retain_graph=True)
        values.append(member.detach())
        slopes.append(g.detach())
    return values, slopes


def linked_activation_figure(z_min: float = -4.0, z_max: float = 4.0, points: int = 801, extra: Sequence[str] = ()):
    """Figure 1 of the linked-neurons paper with derivatives: (a) min-max linked ReLU,
    (b) mirror-linked SELU, plus any ``extra`` linked names; top row values, bottom row slopes."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"points must be an int of at least 2, got {points!r}")
    if not z_min < z_max:
        raise ConfigError(f"the plotted range needs z_min < z_max, got z_min={z_min!r}, z_max={z_max!r}")
    z = torch.linspace(z_min, z_max, points)
    panels = [("(a) ReLU, min-max linkage", Linked("relu", "minmax", dim=0)), ("(b) SELU, mirror linkage", Linked("selu", "mirror", dim=0))]
    panels += [(f"{display_name(n)}, mirror linkage", make_activation(n, dim=0)) for n in extra]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.0), sharex=True, squeeze=False)
    for j, (title, act) in enumerate(panels):
        values, slopes = _curves(act, z)
        for k, (v, s) in enumerate(zip(values, slopes)):
            label = f"$g_{k + 1}$"
            axes[0, j].plot(z, v, lw=2, label=label)
            axes[1, j].plot(z, s, lw=2, label=label + "'")
        alive = torch.stack(slopes).abs().amax(0) > 0
        axes[1, j].fill_between(z, -0.05, 0.05, where=~alive.numpy(), color="red", alpha=0.4, label="all flat")
        axes[0, j].set_title(title)
        axes[0, j].set_ylabel("activation $g_i(z)$")
        axes[1, j].set_ylabel("derivative $g_i'(z)$")
        axes[1, j].set_xlabel("pre-activation $z$")
        axes[0, j].legend(loc="upper left")
        axes[1, j].legend(loc="upper left")
    fig.tight_layout()
    return fig


def heatmaps(
    grid: pd.DataFrame,
    methods: Sequence[str],
    value: str = "best_val_acc",
    labels: dict[str, str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "rocket",
    title: str | None = None,
    fmt: str = ".2f",
):
    """One depth × width heatmap per method (rows = width, columns = depth), one colour scale.

    ``grid`` has one row per run with ``method``, ``depth``, ``width`` and ``value``; seeds are
    combined by the median. Cells never trained stay blank.
    """
    labels = labels or {}
    methods = [m for m in methods if m in set(grid.method)]
    if not methods:
        raise ValueError("none of the requested methods is in the grid")
    vals = grid[value].astype(float)
    vmin = float(np.nanmin(vals)) if vmin is None else vmin
    vmax = float(np.nanmax(vals)) if vmax is None else vmax
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    depths = sorted(grid.depth.unique())
    widths = sorted(grid.width.unique())
    fig, axes = plt.subplots(rows, cols, figsize=(0.55 * len(depths) * cols + 2.5, 0.42 * len(widths) * rows + 1.6), squeeze=False)
    for ax, m in zip(axes.flat, methods):
        g = grid[grid.method == m].pivot_table(index="width", columns="depth", values=value, aggfunc="median")
        g = g.reindex(index=widths, columns=depths)
        sns.heatmap(g, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, annot=len(depths) <= 14, fmt=fmt, cbar=True,
                    annot_kws={"fontsize": 7}, linewidths=0.3, linecolor="white")
        ax.invert_yaxis()
        ax.set_title(labels.get(m, m))
        ax.set_xlabel("depth (hidden layers)")
        ax.set_ylabel("width (units per layer)")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def dead_neurons_per_layer(dead: pd.DataFrame, nets: Sequence[str] | None = None, value: str = "dead fraction"):
    """Median (over seeds) dead-neuron fraction per layer, one line per net, plain and linked panels."""
    if dead.empty:
        raise ValueError("no dead-neuron diagnostics in these records")
    nets = list(nets) if nets is not None else list(dict.fromkeys(dead.net))
    med = dead.groupby(["net", "layer"])[value].median().reset_index()
    plain = [n for n in nets if not n.startswith("LK-")]
    linked = [n for n in nets if n.startswith("LK-")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, group, title in ((axes[0], plain, "plain activations (and BN)"), (axes[1], linked, "linked activations")):
        for n in group:
            d = med[med.net == n]
            ax.plot(d.layer, d[value], marker="o", ms=2.5, lw=1.5, label=n)
        ax.set_title(title)
        ax.set_xlabel("layer (activation index, 1 = the 7x7 conv)")
        ax.legend(fontsize=8, ncol=2)
    axes[0].set_ylabel("dead neurons (fraction of the layer)")
    axes[0].set_ylim(-0.03, 1.03)
    fig.tight_layout()
    return fig


def ours_vs_paper(table: pd.DataFrame, ours: str, papers: Sequence[str], ylabel: str = "best validation accuracy", title: str | None = None):
    """Grouped bars: our column beside the papers' columns for every row of ``table``."""
    cols = [ours] + [p for p in papers if p in table.columns]
    long = table[cols].reset_index().melt(id_vars=table.index.name or "index", var_name="source", value_name="accuracy")
    key = table.index.name or "index"
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(table)), 4))
    sns.barplot(long, x=key, y="accuracy", hue="source", ax=ax)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    if title:
        ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def history_figure(histories: pd.DataFrame, value: str = "val_acc", hue: str = "label", title: str | None = None):
    """Per-epoch curves (median over seeds) of ``value`` for each ``hue`` group."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(histories, x="epoch", y=value, hue=hue, estimator="median", errorbar=None, ax=ax)
    ax.set_ylabel(value.replace("_", " "))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def comparison_bars(comparison: pd.DataFrame, ylabel: str = "best validation accuracy", title: str | None = None):
    """Bars of our accuracy beside the papers', one panel per group (e.g. per table or width)."""
    groups = list(dict.fromkeys(comparison.group))
    items = max(comparison.groupby("group").item.nunique())
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.0, 0.75 * items) * len(groups), 4.2), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], groups):
        d = comparison[comparison.group == g]
        sns.barplot(d, x="item", y="accuracy", hue="source", ax=ax)
        ax.set_title(g)
        ax.set_xlabel("")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=35)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_vs_depth(sweep: pd.DataFrame, chance: float = 0.1):
    """Best validation accuracy (median over seeds) against depth, one line per net."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(sweep, x="depth", y="best_val_acc", hue="net", marker="o", ax=ax)
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("depth (3x3 conv layers of 4 units after the 7x7 conv)")
    ax.set_ylabel("best validation accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
