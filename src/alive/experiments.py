"""Every table and figure of the two papers as one function call: parameters → runs → tables.

Each experiment has a parameters dataclass (the notebook's ``parameters`` cell, validated:
a wrong type or an unknown name is one clear error before anything trains), builds its
:class:`~alive.config.RunConfig` list, gets the records from the result store (training only
what is missing) and returns an :class:`ExperimentResult` with our numbers beside the
papers' and a check of each claim the paper makes about them.

``run("depth", epochs=3, seeds=[0, 1])`` is what a notebook calls; ``configs("depth", ...)``
lists the runs without training (the CLI's ``sweep --experiment`` trains them).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import paper
from .activations import display_name, parse_activation
from .config import ConfigError, RunConfig, check_fields
from .results import Store, sweep, to_frame

__all__ = [
    "EXPERIMENTS",
    "check_parameters",
    "ExperimentResult",
    "params",
    "configs",
    "run",
    "METHODS",
    "METHOD_LABELS",
    "compare_methods",
    "compare_claims",
    "by_seed",
    "stored",
    "stored_by_seed",
    "deepest_good",
    "narrowest_good",
]


# --------------------------------------------------------------------------- parameters
@dataclass
class Common:
    """Parameters every experiment takes."""

    profile: str = "smoke"
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 1
    batch_size: int | None = 32
    n_train: int | None = 256
    n_test: int | None = 256
    require_full: bool = False
    device: str | None = None
    precision: str = "auto"
    long: str | None = None  # a profile of longer, stored runs the notebook shows (it never trains them)
    long_seeds: list[int] | None = None  # the seeds of those runs to show (None: the long profile's own)

    def __post_init__(self):
        check_fields(self)
        if self.profile not in ("smoke", "book", "paper", "long", "custom"):
            raise ConfigError(f"profile must be smoke, book, paper, long or custom, got {self.profile!r}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct (a repeated seed would count its runs twice), got {self.seeds}")
        for name in ("activations", "methods", "widths", "depths", "units", "nets", "scalings"):
            if isinstance(getattr(self, name, None), list) and not getattr(self, name):
                raise ConfigError(f"{name} must list at least one value")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        for name in ("activations", "methods", "reference_methods"):
            for a in getattr(self, name, ()):
                if name == "activations":
                    try:
                        parse_activation(a)
                    except ValueError as exc:
                        raise ConfigError(str(exc)) from None
                elif a not in METHODS:
                    raise ConfigError(f"unknown method {a!r}; valid methods: {', '.join(METHODS)}")


@dataclass
class WidthParams(Common):
    """Table 1: one conv layer of ``units`` units; SGD lr 0.01, batch 32, 50 epochs (paper)."""

    units: list[int] = field(default_factory=lambda: [50, 400])
    activations: list[str] = field(default_factory=lambda: list(paper.ACTIVATIONS))
    lr: float = 0.01


@dataclass
class DepthParams(Common):
    """Table 2: the 50-layer, 4-unit net; Adam lr 1e-3, batch 32, decay 1e-6 (text; the code used 0)."""

    depth: int = 50
    width: int = 4
    activations: list[str] = field(default_factory=lambda: list(paper.ACTIVATIONS))
    widened: list[str] = field(default_factory=lambda: ["relu", "prelu", "selu", "swish"])
    batchnorm: bool = True
    lr: float = 1e-3
    decay: float = 1e-6
    sweep_depths: list[int] = field(default_factory=list)
    sweep_activations: list[str] = field(default_factory=lambda: ["relu", "lk-relu", "selu", "lk-selu"])


@dataclass
class ParamsParams(Common):
    """Table 3: single vs √2 vs linked; RMSprop lr 1e-4, decay 1e-6, batch 32, 200 epochs (paper)."""

    activations: list[str] = field(default_factory=lambda: ["relu", "prelu", "selu", "swish"])
    lr: float = 1e-4
    decay: float = 1e-6


@dataclass
class AllCNNParams(Common):
    """Table 4: All-CNN-C; SGD Nesterov 0.9, lr 0.01, decay 1e-6, the step schedule, flips + shifts."""

    activations: list[str] = field(default_factory=lambda: list(paper.ACTIVATIONS))
    width_mult: float = 1.0
    lr: float = 0.01
    decay: float = 1e-6
    schedule: str = "allcnn"


@dataclass
class ResNetParams(Common):
    """Tables 5–6: the scaled ResNet-50; Adam lr 1e-3, decay 1e-6, batch 128, flips + shifts."""

    activations: list[str] = field(default_factory=lambda: list(paper.ACTIVATIONS))
    without_bn: list[str] = field(default_factory=lambda: ["lk-relu", "selu", "lk-selu"])
    lr: float = 1e-3
    decay: float = 1e-6


@dataclass
class ScalingParams(Common):
    """Input standardisation: the Table 2 and Table 3 nets on raw, /255 and standardised input."""

    nets: list[str] = field(default_factory=lambda: ["depth", "params"])
    depth: int = 50
    activations: list[str] = field(default_factory=lambda: ["relu", "lk-relu", "selu", "lk-selu"])
    scalings: list[str] = field(default_factory=lambda: ["raw", "unit", "standardize"])

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.nets) - set(_SCALING_NETS))
        if unknown:
            raise ConfigError(f"unknown nets {unknown}; the scaling experiment trains the Table 2 net ('depth') "
                              "and the Table 3 net ('params')")


@dataclass
class GridParams(Common):
    """A depth × width grid of rectangular networks (the separation paper's figures)."""

    dataset: str = "moons"
    methods: list[str] = field(default_factory=lambda: ["relu", "relu+bn", "sep-u", "sep-p", "sep-up"])
    widths: list[int] = field(default_factory=lambda: [1, 2, 3])
    depths: list[int] = field(default_factory=lambda: [1, 10])
    lr: float = 0.01
    weight: float = 1e-4
    rho: float = 0.5
    zero_rho: float = 0.51
    anneal_p0: float = 0.9
    anneal_epochs: int = 1000
    batch_size: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    threshold: float = 0.95
    reference_methods: list[str] = field(default_factory=list)  # trained as in the Figure 1-3 experiments (shared runs)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold is an accuracy in (0, 1], got {self.threshold}")


# --------------------------------------------------------------------------- result
@dataclass
class ExperimentResult:
    """What a notebook shows: the runs, the table beside the paper's, the claims check."""

    name: str
    params: Any
    runs: pd.DataFrame
    table: pd.DataFrame
    claims: pd.DataFrame
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        """Which profile, data, sizes and devices the numbers come from (no machine paths)."""
        p = self.params
        sources = sorted({r.get("data_source", "?") for r in self.records})
        devices = sorted({r["environment"]["device"] for r in self.records})
        diverged = int((self.runs["status"] == "diverged").sum()) if len(self.runs) else 0
        lines = [
            f"experiment: {self.name}   profile: {p.profile}",
            f"runs: {len(self.records)} ({diverged} diverged), seeds {list(p.seeds)}, {p.epochs} epochs, batch size {p.batch_size}",
            "data: " + "; ".join(sources),
            "trained on: " + "; ".join(devices),
        ]
        return "\n".join(lines)


def _claim(claim: str, paper_says: str, ours: str, agrees: bool | None) -> dict:
    verdict = "n/a" if agrees is None else ("supported" if agrees else "not supported")
    return {"claim": claim, "paper": paper_says, "ours": ours, "verdict": verdict}


def _claims(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["claim", "paper", "ours", "verdict"])


def _long(table: pd.DataFrame, group: str, sources: dict[str, str]) -> pd.DataFrame:
    """Long form ``(group, item, source, accuracy)`` of a wide table, for bar charts."""
    rows = []
    for item, row in table.iterrows():
        for col, source in sources.items():
            if col in table.columns and pd.notna(row[col]):
                rows.append({"group": group, "item": item, "source": source, "accuracy": float(row[col])})
    return pd.DataFrame(rows, columns=["group", "item", "source", "accuracy"])


def _base_config(p: Common, **kw) -> RunConfig:
    d = dict(
        dataset="cifar10",
        n_train=p.n_train,
        n_test=p.n_test,
        epochs=p.epochs,
        batch_size=p.batch_size,
        require_full=p.require_full,
        precision=p.precision,
    )
    d.update(kw)
    return RunConfig(**d)


def _median(runs: pd.DataFrame, by: list[str], col: str = "best_val_acc") -> pd.DataFrame:
    return runs.groupby(by, dropna=False)[col].agg(["median", "max", "min", "count"]).reset_index()


def _chance(runs: pd.DataFrame) -> float:
    return 0.1


def _learns(acc: float, chance: float = 0.1, margin: float = 0.05) -> bool:
    return acc is not None and not (isinstance(acc, float) and math.isnan(acc)) and acc > chance + margin


# --------------------------------------------------------------------------- Table 1
def _width_configs(p: WidthParams) -> list[RunConfig]:
    return [
        _base_config(p, experiment="width", model="width", width=u, activation=a, optimizer="sgd", lr=p.lr, seed=s)
        for u in p.units
        for a in p.activations
        for s in p.seeds
    ]


def _width_result(p: WidthParams, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    med = runs.groupby(["width", "activation"])["best_val_acc"].median().unstack()
    rows = []
    for u in p.units:
        if u in med.index:
            rows.append(("ours (median)", u, med.loc[u]))
        for v in ("v2", "v1"):
            t = paper.table1(v)
            if u in t.index:
                rows.append((f"paper {v}", u, t.loc[u]))
    table = pd.DataFrame([r[2].rename(None) for r in rows])
    table.index = pd.MultiIndex.from_tuples([(r[1], r[0]) for r in rows], names=["units", "source"])
    table = table[[a for a in p.activations if a in table.columns]]
    table.columns = [display_name(a) for a in table.columns]
    claims = []
    bases = [a for a in p.activations if not a.startswith("lk-") and "lk-" + a in p.activations]
    pv2 = paper.table1("v2")
    for u in p.units:
        if u not in med.index:
            continue
        ours_better = [b for b in bases if med.loc[u, "lk-" + b] > med.loc[u, b]]
        paper_better = [b for b in bases if u in pv2.index and pv2.loc[u, "lk-" + b] > pv2.loc[u, b]]
        claims.append(
            _claim(
                f"{u} units: a linked activation beats its plain version",
                f"{len(paper_better)}/{len(bases)} ({', '.join(display_name(b) for b in paper_better)})",
                f"{len(ours_better)}/{len(bases)} ({', '.join(display_name(b) for b in ours_better) or 'none'})",
                len(ours_better) * 2 >= len(bases),
            )
        )
    if len(p.units) >= 2 and all(u in med.index for u in p.units[:2]) and bases:
        u0, u1 = p.units[0], p.units[1]
        gap = lambda u: float(np.mean([med.loc[u, "lk-" + b] - med.loc[u, b] for b in bases]))  # noqa: E731
        claims.append(
            _claim(
                f"the linked-minus-plain gap shrinks from {u0} to {u1} units",
                "yes (mean gap v2: %+.3f -> %+.3f)" % tuple(
                    float(np.mean([pv2.loc[u, "lk-" + b] - pv2.loc[u, b] for b in bases])) for u in (50, 400)
                ),
                f"mean gap {gap(u0):+.3f} -> {gap(u1):+.3f}",
                gap(u1) < gap(u0),
            )
        )
    comparison = pd.concat(
        [_long(table.xs(u, level="units").T, f"{u} units", {"ours (median)": "ours", "paper v2": "paper v2", "paper v1": "paper v1"})
         for u in p.units if u in table.index.get_level_values("units")],
        ignore_index=True,
    )
    return table, _claims(claims), {"comparison": comparison}


# --------------------------------------------------------------------------- Table 2
def _depth_rows(p: DepthParams) -> list[tuple[str, bool, bool]]:
    rows = []
    for a in p.activations:
        rows.append((a, False, False))
        if a in p.widened:
            rows.append((a, True, False))
    if p.batchnorm:
        rows.append(("relu", False, True))
    return rows


def _depth_config(p: DepthParams, depth: int, a: str, w: bool, bn: bool, s: int) -> RunConfig:
    return _base_config(p, experiment="depth", model="depth", depth=depth, width=p.width, activation=a, widen=w,
                        batchnorm=bn, optimizer="adam", lr=p.lr, decay=p.decay, seed=s)


def _sweep_rows(p: DepthParams) -> list[tuple[str, bool, bool]]:
    return [(a, False, False) for a in p.sweep_activations] + ([("relu", False, True)] if p.batchnorm else [])


def _depth_configs(p: DepthParams) -> list[RunConfig]:
    table = [_depth_config(p, p.depth, a, w, bn, s) for a, w, bn in _depth_rows(p) for s in p.seeds]
    sweep = [_depth_config(p, d, a, w, bn, s) for d in p.sweep_depths for a, w, bn in _sweep_rows(p) for s in p.seeds if d != p.depth]
    return table + sweep


def _row_label(a: str, widen: bool, bn: bool) -> str:
    return display_name(a) + (" √2" if widen else "") + (" + BN" if bn else "")


def _depth_result(p: DepthParams, runs: pd.DataFrame, records: list[dict]):
    pv = {v: paper.table2(v) for v in ("v2", "v1")}
    sweep_runs = runs
    runs = runs[runs.depth == p.depth]
    records = [r for r in records if r["config"]["depth"] == p.depth]
    rows, dead_rows = [], []
    for a, w, bn in _depth_rows(p):
        sel = runs[(runs.activation == a) & (runs.widen == w) & (runs.batchnorm == bn)]
        row = {"net": _row_label(a, w, bn)}
        row["ours max"] = sel.best_val_acc.max()
        row["ours median"] = sel.best_val_acc.median()
        row["runs"] = len(sel)
        row["diverged"] = int((sel.status == "diverged").sum())
        for v, t in pv.items():
            m = t[(t.activation == a) & (t.widen == w) & (t.batchnorm == bn)]
            row[f"paper {v} max"] = m["max"].iloc[0] if len(m) else np.nan
            row[f"paper {v} median"] = m["median"].iloc[0] if len(m) else np.nan
        row["dead neurons (median)"] = sel.dead_neurons.median() if "dead_neurons" in sel else np.nan
        row["parameters"] = sel.parameters.iloc[0] if len(sel) else np.nan
        rows.append(row)
        for rec in records:
            c = rec["config"]
            if (c["activation"], c["widen"], c["batchnorm"]) == (a, w, bn) and rec.get("diagnostics", {}).get("dead_neurons"):
                for layer, (dead, total) in enumerate(zip(rec["diagnostics"]["dead_neurons"], rec["diagnostics"]["neurons"]), 1):
                    dead_rows.append({"net": row["net"], "seed": c["seed"], "layer": layer, "dead": dead, "neurons": total, "dead fraction": dead / total})
    table = pd.DataFrame(rows).set_index("net")
    dead = pd.DataFrame(dead_rows, columns=["net", "seed", "layer", "dead", "neurons", "dead fraction"])
    med = table["ours median"]
    claims = []

    def lab(a, w=False, bn=False):
        return _row_label(a, w, bn)

    fail = [lab(a) for a in ("relu", "prelu", "swish") if a in p.activations] + [lab(a, True) for a in ("relu", "prelu", "swish") if a in p.widened]
    fail = [f for f in fail if f in med.index]
    if fail:
        learned = [f for f in fail if _learns(med[f])]
        claims.append(_claim("plain ReLU, PReLU, Swish (and √2) fail to learn (10%)", "all stay at 0.10",
                             "learned: " + (", ".join(learned) or "none"), not learned))
    learn = [lab(a) for a in ("lk-relu", "lk-prelu", "lk-selu", "selu") if a in p.activations]
    learn = [f for f in learn if f in med.index]
    if learn:
        failed = [f for f in learn if not _learns(med[f])]
        claims.append(_claim("LK-ReLU, LK-PReLU, LK-SELU and SELU learn", "0.52-0.57 median (v2)",
                             "failed: " + (", ".join(failed) or "none") + f"; medians {', '.join(f'{f} {med[f]:.3f}' for f in learn)}",
                             not failed))
    if lab("lk-swish") in med.index:
        claims.append(_claim("LK-Swish fails (exploding gradients)", "0.10", f"{med[lab('lk-swish')]:.3f}", not _learns(med[lab("lk-swish")])))
    if lab("relu", False, True) in med.index:
        linked = [med[f] for f in (lab("lk-relu"), lab("lk-selu")) if f in med.index]
        bn = med[lab("relu", False, True)]
        claims.append(_claim("ReLU + BN learns but is worse than the linked nets", "0.511 vs 0.561-0.567 (v2 median)",
                             f"{bn:.3f} vs {', '.join(f'{x:.3f}' for x in linked)}", bool(linked) and _learns(bn) and bn < max(linked)))
    if len(dead):
        per = dead.groupby(["net", "layer"])["dead"].median().unstack("layer")
        plain = [f for f in (lab("relu"), lab("prelu")) if f in per.index]
        linked = [f for f in (lab("lk-relu"), lab("lk-prelu"), lab("lk-selu")) if f in per.index]
        if plain:
            first = []
            for f in plain:
                layers = [c for c in per.columns if per.loc[f, c] > 0]
                first.append(f"{f}: {'layer ' + str(min(layers)) if layers else 'none'}")
            ok = all(any(per.loc[f] > 0) for f in plain)
            claims.append(_claim("plain activations show dead neurons (from layer ~7)", "from layer 7 onwards", "first dead layer " + "; ".join(first), ok))
        if linked:
            total = {f: int(per.loc[f].sum()) for f in linked}
            claims.append(_claim("linked activations keep every neuron alive", "no dead neurons",
                                 ", ".join(f"{f}: {n} dead" for f, n in total.items()), all(n == 0 for n in total.values())))
    comparison = _long(table, "Table 2 (median over seeds)", {"ours median": "ours", "paper v2 median": "paper v2", "paper v1 median": "paper v1"})
    extra = {"dead_neurons": dead, "comparison": comparison}
    if p.sweep_depths:
        rows = []
        for a, w, bn in _sweep_rows(p):
            sel = sweep_runs[(sweep_runs.activation == a) & (sweep_runs.widen == w) & (sweep_runs.batchnorm == bn)]
            for d in sorted(set(p.sweep_depths) | {p.depth}):
                at = sel[sel.depth == d]
                if len(at):
                    rows.append({"net": _row_label(a, w, bn), "depth": d, "best_val_acc": at.best_val_acc.median()})
        sweep = pd.DataFrame(rows)
        extra["depth_sweep"] = sweep
        deepest = {}
        for net, g in sweep.groupby("net", sort=False):
            ok = g[g.best_val_acc > 0.15]
            deepest[net] = int(ok.depth.max()) if len(ok) else 0
        plain = [n for n in deepest if not n.startswith("LK-") and "BN" not in n]
        linked = [n for n in deepest if n.startswith("LK-")]
        if plain and linked:
            claims.append(_claim("beyond the paper: linked nets train deeper than their plain versions (accuracy > 0.15)",
                                 "implied by Table 2",
                                 ", ".join(f"{n}: {d or 'none'}" for n, d in deepest.items()),
                                 all(deepest["LK-" + n] >= deepest[n] for n in plain if "LK-" + n in deepest)))
    return table, _claims(claims), extra


# --------------------------------------------------------------------------- Table 3
def _params_configs(p: ParamsParams) -> list[RunConfig]:
    out = []
    for a in p.activations:
        for variant in ("single", "sqrt2", "linked"):
            act = "lk-" + a if variant == "linked" else a
            for s in p.seeds:
                out.append(_base_config(p, experiment="params", model="params", activation=act, widen=variant == "sqrt2",
                                        optimizer="rmsprop", lr=p.lr, decay=p.decay, seed=s))
    return out


def _variant(row) -> str:
    return "linked" if row["activation"].startswith("lk-") else ("sqrt2" if row["widen"] else "single")


def _params_result(p: ParamsParams, runs: pd.DataFrame):
    runs = runs.assign(variant=runs.apply(_variant, axis=1), base=runs.activation.str.replace("lk-", "", regex=False))
    med = runs.groupby(["base", "variant"])["best_val_acc"].median().unstack()
    params = runs.groupby(["base", "variant"])["parameters"].first().unstack()
    cols = {}
    for v in ("single", "sqrt2", "linked"):
        cols[("ours (median)", v)] = med.get(v)
    for ver in ("v2", "v1"):
        t = paper.table3(ver)
        for v in ("single", "sqrt2", "linked"):
            cols[(f"paper {ver}", v)] = t[v]
    for v in ("single", "sqrt2", "linked"):
        cols[("parameters", v)] = params.get(v)
    table = pd.DataFrame(cols).loc[[a for a in p.activations if a in med.index]]
    table.index = [display_name(a) for a in table.index]
    claims = []
    for a in p.activations:
        if a not in med.index or med.loc[a].isna().any():
            continue
        ours = med.loc[a]
        t = paper.table3("v2").loc[a]
        claims.append(_claim(f"{display_name(a)}: linked beats single and √2",
                             f"single {t.single:.3f}, √2 {t.sqrt2:.3f}, linked {t.linked:.3f}",
                             f"single {ours.single:.3f}, √2 {ours.sqrt2:.3f}, linked {ours.linked:.3f}",
                             ours.linked > ours.single and ours.linked > ours.sqrt2))
    names = {"single": "single", "sqrt2": "√2", "linked": "linked"}
    comparison = pd.concat(
        [_long(table[[c for c in table.columns if c[1] == v]].droplevel(1, axis=1), names[v],
               {"ours (median)": "ours", "paper v2": "paper v2", "paper v1": "paper v1"}) for v in names],
        ignore_index=True,
    )
    return table, _claims(claims), {"comparison": comparison}


# --------------------------------------------------------------------------- Tables 4-6
def _allcnn_configs(p: AllCNNParams) -> list[RunConfig]:
    return [
        _base_config(p, experiment="allcnn", model="allcnn", activation=a, width_mult=p.width_mult, optimizer="nesterov",
                     momentum=0.9, lr=p.lr, decay=p.decay, schedule=p.schedule, augment=True, seed=s)
        for a in p.activations
        for s in p.seeds
    ]


def _single_table(p, runs: pd.DataFrame, published: Callable[[str], pd.Series]) -> pd.DataFrame:
    by = runs.groupby("activation")
    diverged = by["status"].apply(lambda s: f"{int((s == 'diverged').sum())}/{len(s)}")
    table = pd.DataFrame({"ours (median)": by["best_val_acc"].median(), "ours diverged": diverged,
                          "paper v2": published("v2"), "paper v1": published("v1")})
    table = table.loc[[a for a in p.activations if a in table.index]]
    table.index = [display_name(a) for a in table.index]
    return table


def _linked_vs_plain_claims(p, runs, published, title) -> list[dict]:
    med = runs.groupby("activation")["best_val_acc"].median()
    pv = published("v2")
    bases = [a for a in p.activations if not a.startswith("lk-") and "lk-" + a in p.activations and a in med and "lk-" + a in med]
    ours = [b for b in bases if med["lk-" + b] > med[b]]
    theirs = [b for b in bases if pv["lk-" + b] > pv[b]]
    best_ours = med.loc[[a for a in p.activations if a in med]].idxmax() if len(med) else None
    rows = [
        _claim(f"{title}: linked beats plain, per activation", f"{len(theirs)}/{len(bases)} ({', '.join(display_name(b) for b in theirs)})",
               f"{len(ours)}/{len(bases)} ({', '.join(display_name(b) for b in ours) or 'none'})", len(ours) * 2 > len(bases) if bases else None),
        _claim(f"{title}: a linked activation is best overall", display_name(pv.idxmax()),
               display_name(best_ours) if best_ours else "-", None if best_ours is None else best_ours.startswith("lk-")),
    ]
    return rows


def _allcnn_result(p: AllCNNParams, runs: pd.DataFrame):
    table = _single_table(p, runs, paper.table4)
    comparison = _long(table, "Table 4", {"ours (median)": "ours", "paper v2": "paper v2", "paper v1": "paper v1"})
    return table, _claims(_linked_vs_plain_claims(p, runs, paper.table4, "All-CNN")), {"comparison": comparison}


def _resnet_configs(p: ResNetParams) -> list[RunConfig]:
    out = []
    for a in p.activations:
        for s in p.seeds:
            out.append(_base_config(p, experiment="resnet", model="resnet50", activation=a, batchnorm=True, optimizer="adam",
                                    lr=p.lr, decay=p.decay, augment=True, seed=s))
    for a in p.without_bn:
        for s in p.seeds:
            out.append(_base_config(p, experiment="resnet", model="resnet50", activation=a, batchnorm=False, optimizer="adam",
                                    lr=p.lr, decay=p.decay, augment=True, seed=s))
    return out


def _resnet_result(p: ResNetParams, runs: pd.DataFrame):
    with_bn = runs[runs.batchnorm]
    table5 = _single_table(p, with_bn, paper.table5)
    claims = _linked_vs_plain_claims(p, with_bn, paper.table5, "ResNet-50")
    # Table 6: accuracy and total wall time relative to LK-ReLU without BN, per device and seed
    rows = []
    pv = {v: paper.table6(v) for v in ("v2", "v1")}
    ref = runs[(runs.activation == "lk-relu") & (~runs.batchnorm)]
    for a, bn in paper._T6_ROWS:
        sel = runs[(runs.activation == a) & (runs.batchnorm == bn)]
        if not len(sel):
            continue
        ratios = []
        for _, r in sel.iterrows():
            m = ref[(ref.seed == r.seed) & (ref.device == r.device)]
            if len(m):
                ratios.append(r.total_s / m.total_s.iloc[0])
        row = {"net": display_name(a) + (" BN" if bn else " no BN"), "ours accuracy": sel.best_val_acc.median(),
               "ours time ratio": float(np.median(ratios)) if ratios else np.nan}
        for v, t in pv.items():
            m = t[(t.activation == a) & (t.batchnorm == bn)]
            row[f"paper {v} accuracy"] = m.accuracy.iloc[0]
            row[f"paper {v} time ratio"] = m.time_ratio.iloc[0]
        rows.append(row)
    table6 = pd.DataFrame(rows).set_index("net") if rows else pd.DataFrame()
    if len(table6):
        for a in ("LK-ReLU", "LK-SELU"):
            if f"{a} BN" in table6.index and f"{a} no BN" in table6.index:
                d = table6.loc[f"{a} no BN", "ours accuracy"] - table6.loc[f"{a} BN", "ours accuracy"]
                claims.append(_claim(f"{a} performs about the same with and without BN", "within 0.5 points (v2)",
                                     f"no BN minus BN: {d:+.3f} (same: within 0.02)", abs(d) < 0.02))
        if "LK-ReLU BN" in table6.index:
            r = table6.loc["LK-ReLU BN", "ours time ratio"]
            claims.append(_claim("dropping BN makes LK-ReLU about 2x faster", "2.09x (v2)", f"{r:.2f}x", r > 1.5 if r == r else None))
    comparison = _long(table5, "Table 5 (with BN)", {"ours (median)": "ours", "paper v2": "paper v2", "paper v1": "paper v1"})
    if len(table6):
        comparison = pd.concat([comparison, _long(table6, "Table 6", {"ours accuracy": "ours", "paper v2 accuracy": "paper v2", "paper v1 accuracy": "paper v1"})], ignore_index=True)
    return table5, _claims(claims), {"table6": table6, "comparison": comparison}


# --------------------------------------------------------------------------- standardisation
# the nets the scaling experiment trains: the Table 2 net (at the parameters' depth), the Table 3 net
_SCALING_NETS: dict[str, Callable[[ScalingParams], dict]] = {
    "depth": lambda p: dict(model="depth", depth=p.depth, width=4, optimizer="adam", lr=1e-3, decay=1e-6),
    "params": lambda p: dict(model="params", optimizer="rmsprop", lr=1e-4, decay=1e-6),
}


def _scaling_configs(p: ScalingParams) -> list[RunConfig]:
    out = []
    for net in p.nets:
        for a in p.activations:
            for sc in p.scalings:
                for s in p.seeds:
                    out.append(_base_config(p, experiment="scaling", activation=a, scaling=sc, seed=s, **_SCALING_NETS[net](p)))
    return out


def _scaling_result(p: ScalingParams, runs: pd.DataFrame):
    runs = runs.assign(net=runs.model.map({"depth": f"Table 2 net ({p.depth} x 4)", "params": "Table 3 net"}))
    table = runs.groupby(["net", "activation", "scaling"])["best_val_acc"].median().unstack("scaling")
    table = table[[s for s in p.scalings if s in table.columns]]
    table.index = pd.MultiIndex.from_tuples([(n, display_name(a)) for n, a in table.index], names=["net", "activation"])
    claims = []
    if {"raw", "standardize"} <= set(table.columns):
        for net in table.index.get_level_values(0).unique():
            for a in p.activations:
                key = (net, display_name(a))
                if key not in table.index:
                    continue
                raw, std = table.loc[key, "raw"], table.loc[key, "standardize"]
                if a.startswith("lk-"):
                    claims.append(_claim(f"{net}, {display_name(a)}: raw 0-255 input trains as well as standardised input",
                                         "linked neurons remove the need for standardised input (abstract; not measured)",
                                         f"raw {raw:.3f} vs standardised {std:.3f}", raw >= std - 0.02))
                else:
                    claims.append(_claim(f"{net}, {display_name(a)}: plain activation on raw input (for contrast)",
                                         "plain units need standardised input (implied)", f"raw {raw:.3f} vs standardised {std:.3f}", None))
    comparison = pd.concat(
        [_long(table.xs(net, level="net"), net, {sc: sc for sc in table.columns}) for net in table.index.get_level_values("net").unique()],
        ignore_index=True,
    )
    return table, _claims(claims), {"comparison": comparison}


# --------------------------------------------------------------------------- separation grids
#: grid methods: name -> RunConfig changes (λ, ρ and annealing come from the parameters)
METHODS = ("relu", "relu+bn", "sep-u", "sep-p", "sep-up", "lk-relu", "lk-relu+bn", "sep-up-zero", "relu-zero")


def _method_kwargs(m: str, p: GridParams) -> dict:
    if m == "relu":
        return {}
    if m == "relu+bn":
        return {"batchnorm": True}
    if m in ("sep-u", "sep-p", "sep-up"):
        return {"constraint": m.split("-")[1], "weight": p.weight, "rho": p.rho}
    if m == "lk-relu":
        return {"activation": "lk-relu"}
    if m == "lk-relu+bn":
        return {"activation": "lk-relu", "batchnorm": True}
    zero = {"init": "zero"}
    if p.dataset == "moons":
        zero.update(annealed_dropout=p.anneal_p0, anneal_epochs=p.anneal_epochs)
    if m == "sep-up-zero":
        zero.update(constraint="up", weight=p.weight, rho=p.zero_rho)
    return zero


_EXPERIMENT_OF_DATASET = {"moons": "moons", "mnist": "mnist", "cifar10": "cifar"}


def _grid_configs(p: GridParams, experiment: str) -> list[RunConfig]:
    model = "mlp" if p.dataset == "moons" else "cnn"
    out = []
    for m in list(p.methods) + [r for r in p.reference_methods if r not in p.methods]:
        exp = experiment if m in p.methods else _EXPERIMENT_OF_DATASET[p.dataset]
        for d in p.depths:
            for w in p.widths:
                for s in p.seeds:
                    kw = dict(experiment=exp, dataset=p.dataset, model=model, depth=d, width=w, optimizer="adam",
                              lr=p.lr, epochs=p.epochs, batch_size=p.batch_size, seed=s, precision=p.precision,
                              **_method_kwargs(m, p))
                    if p.dataset != "moons":
                        kw.update(n_train=p.n_train, n_test=p.n_test, require_full=p.require_full)
                    out.append(RunConfig(**kw))
    return out


def method_of(row) -> str:
    """The grid method name of a run (a row of :func:`alive.results.to_frame`)."""
    zero = row["init"] == "zero"
    if row["constraint"] != "none":
        return "sep-up-zero" if zero else f"sep-{row['constraint']}"
    if zero:
        return "relu-zero"
    name = "lk-relu" if row["activation"] == "lk-relu" else "relu"
    return name + ("+bn" if row["batchnorm"] else "")


METHOD_LABELS = {
    "relu": "ReLU", "relu+bn": "ReLU + BN", "sep-u": "Sep-U", "sep-p": "Sep-P", "sep-up": "Sep-UP",
    "lk-relu": "LK-ReLU", "lk-relu+bn": "LK-ReLU + BN", "sep-up-zero": "Sep-UP, zero init", "relu-zero": "ReLU, zero init",
}


def _grid_frame(runs: pd.DataFrame) -> pd.DataFrame:
    g = runs.assign(method=runs.apply(method_of, axis=1))
    cols = ["method", "depth", "width", "seed", "best_val_acc", "final_train_acc", "status"]
    for c in ("dead_point_fraction", "dead_units", "units"):
        if c in g:
            cols.append(c)
    g = g[cols].copy()
    if "dead_units" in g:
        g["dead_unit_fraction"] = g.dead_units / g.units
    return g


def deepest_good(grid: pd.DataFrame, method: str, threshold: float, width: int | None = None) -> int | None:
    """The largest depth at which ``method`` reaches ``threshold`` (median over seeds), at ``width`` or any width."""
    g = grid[grid.method == method]
    if width is not None:
        g = g[g.width == width]
    med = g.groupby(["depth", "width"]).best_val_acc.median()
    good = med[med >= threshold]
    return int(good.index.get_level_values("depth").max()) if len(good) else None


def narrowest_good(grid: pd.DataFrame, method: str, threshold: float, depth: int) -> int | None:
    """The smallest width at which ``method`` reaches ``threshold`` at ``depth`` (median over seeds)."""
    g = grid[(grid.method == method) & (grid.depth == depth)]
    med = g.groupby("width").best_val_acc.median()
    good = med[med >= threshold]
    return int(good.index.min()) if len(good) else None


def _breakdown(grid: pd.DataFrame, method: str, threshold: float) -> str:
    """For each width, the deepest depth reaching the threshold, compactly."""
    parts = []
    for w in sorted(grid.width.unique()):
        d = deepest_good(grid, method, threshold, w)
        parts.append(f"w{w}:{d if d is not None else '-'}")
    return " ".join(parts)


def _by_depth(grid: pd.DataFrame, method: str, width: int | None = None) -> pd.Series:
    """Median best accuracy per depth (over widths, or at ``width``, and seeds)."""
    g = grid[grid.method == method]
    return (g if width is None else g[g.width == width]).groupby("depth").best_val_acc.median()


def _grid_claims(p: GridParams, grid: pd.DataFrame, figure: str) -> pd.DataFrame:
    t = p.threshold
    methods = set(grid.method)
    widths = sorted(grid.width.unique())
    deepest_depth = int(grid.depth.max())
    said = paper.SEPARATION_CLAIMS[figure]
    say = {}
    for method, sentence in said:
        say.setdefault(method, sentence)  # a method's first claim (fig4 has two for one method)
    rows = []

    def deepest(m, w=None):
        return deepest_good(grid, m, t, w)

    def per_width(m):
        return f"per width {_breakdown(grid, m, t)}"

    def relu_breakdown(layers: str, lo: int, hi: int):
        d = deepest("relu")
        # a grid that stops before the breakdown cannot show it (n/a)
        rows.append(_claim(f"ReLU breaks down at {layers} layers (deepest net reaching {t:.0%})", say["relu"],
                           f"deepest: {d}; {per_width('relu')}", None if d is None or d == deepest_depth <= hi else lo <= d <= hi))

    if figure == "fig1":
        if "relu" in methods:
            relu_breakdown("20-30", 10, 40)
        if "relu+bn" in methods:
            need = {d: narrowest_good(grid, "relu+bn", t, d) for d in sorted(grid.depth.unique())}
            # single seeds make the narrowest width noisy, so the trend is judged by its rank
            # correlation with depth; a depth no width reaches counts as needing more than the widest
            beyond = max(widths) + 1
            trend = pd.Series([beyond if w is None else w for w in need.values()], dtype=float)
            rho = trend.corr(pd.Series(list(need), dtype=float), method="spearman") if trend.nunique() > 1 else float("nan")
            rows.append(_claim(f"ReLU + BN needs wider layers as depth grows (narrowest width reaching {t:.0%}; "
                               "rank correlation with depth ≥ 0.5)", say["relu+bn"],
                               ", ".join(f"d{d}: {w if w is not None else '-'}" for d, w in need.items()) + f"; correlation {rho:.2f}",
                               None if len(need) < 3 or np.isnan(rho) else bool(rho >= 0.5)))
        if "sep-up" in methods:
            if 3 in widths:
                # every depth up to 60 must reach it, not only the deepest
                acc3 = _by_depth(grid, "sep-up", 3)
                upto = acc3[acc3.index <= 60]
                misses = [int(d) for d in upto.index if upto[d] < t]
                ours = (f"width 3 below {t:.0%} at depths {misses}" if misses else f"width 3 at {t:.0%} at every depth up to 60") + \
                    f" (deepest at width 3: {deepest('sep-up', 3)}); {per_width('sep-up')}"
                verdict = None if deepest_depth < 60 else not misses
            else:
                ours, verdict = "width 3 not in the grid", None
            rows.append(_claim(f"Sep-UP reaches {t:.0%} at width 3 at every depth up to 60 layers", say["sep-up"], ours, verdict))
            others = {m: deepest(m) or 0 for m in ("relu", "relu+bn") if m in methods}
            ds = deepest("sep-up") or 0
            rows.append(_claim("Sep-UP trains deeper than ReLU and ReLU + BN", "Sep-UP is superior to all its competitors",
                               f"deepest reaching {t:.0%}: Sep-UP {ds}, " + ", ".join(f"{METHOD_LABELS[m]} {v}" for m, v in others.items()),
                               all(ds > v for v in others.values()) if others else None))
        if 1 in widths:
            ok = grid[(grid.width == 1)].groupby(["method", "depth"]).best_val_acc.median()
            n_ok = int((ok >= t).sum())
            rows.append(_claim(f"no network of width 1 reaches {t:.0%}", say["all"], f"{n_ok} width-1 cells reach it", n_ok == 0))
    if figure == "fig5":
        if "sep-u" in methods and 1 in widths:
            acc1 = _by_depth(grid, "sep-u", 1)
            deep = acc1.get(deepest_depth, np.nan)
            # the paper's 120 layers: a shallower grid cannot test it
            rows.append(_claim(f"Sep-U trains {deepest_depth} layers of a single unit (above chance)", say["sep-u"],
                               f"width 1, depth {deepest_depth}: {deep:.3f}",
                               None if deepest_depth < 120 or np.isnan(deep) else bool(deep > 0.6)))
            if "sep-up" in methods:
                a, b = grid[grid.method == "sep-u"].best_val_acc.mean(), grid[grid.method == "sep-up"].best_val_acc.mean()
                rows.append(_claim("Sep-U is less accurate than Sep-UP", say["sep-u"], f"mean best accuracy Sep-U {a:.3f}, Sep-UP {b:.3f}", a < b))
        if "sep-p" in methods:
            acc = _by_depth(grid, "sep-p")
            shallow, deep = acc[acc.index <= 40].mean(), acc[acc.index > 40].mean()
            rows.append(_claim("Sep-P works up to 40 layers and is much worse deeper", say["sep-p"],
                               f"median accuracy, depth <= 40: {shallow:.3f}, deeper: {deep:.3f}; {per_width('sep-p')}",
                               None if np.isnan(deep) else bool(deep < shallow - 0.05)))
    if figure == "fig2":
        if "relu" in methods:
            relu_breakdown("20", 8, 24)
        if "relu+bn" in methods:
            acc = _by_depth(grid, "relu+bn")
            rows.append(_claim("ReLU + BN accuracy degrades with depth", say["relu+bn"],
                               f"median accuracy at depth {acc.index.min()}: {acc.iloc[0]:.3f}, at {acc.index.max()}: {acc.iloc[-1]:.3f}",
                               bool(acc.iloc[-1] < acc.iloc[0] - 0.02)))
        if "sep-up" in methods:
            acc = _by_depth(grid, "sep-up")
            spread = acc.max() - acc.min()
            rows.append(_claim("Sep-UP accuracy is constant across depths", say["sep-up"],
                               f"median accuracy from {acc.min():.3f} to {acc.max():.3f} over depths {list(acc.index)}", bool(spread < 0.05)))
    if figure == "fig3":
        drops = {m: _by_depth(grid, m) for m in ("relu", "relu+bn", "sep-up") if m in methods}
        if drops:
            text = ", ".join(f"{METHOD_LABELS[m]} {a.iloc[0]:.3f} -> {a.iloc[-1]:.3f}" for m, a in drops.items())
            degrade = all(a.iloc[-1] < a.iloc[0] for a in drops.values())
            robust = "sep-up" in drops and min(drops, key=lambda m: drops[m].iloc[0] - drops[m].iloc[-1]) == "sep-up"
            rows.append(_claim("all methods degrade with depth, Sep-UP the least", say["all"], text, degrade and robust))
        if {"relu", "sep-up"} <= methods:
            acc = grid.groupby("method").best_val_acc.mean()
            rows.append(_claim("ReLU is best on average, closely followed by Sep-UP", say["relu"],
                               ", ".join(f"{METHOD_LABELS[m]} {acc[m]:.3f}" for m in acc.index),
                               bool(acc.idxmax() == "relu" and acc["relu"] - acc["sep-up"] < 0.03)))
        if "relu+bn" in methods and "final_train_acc" in grid:
            gap = (grid.final_train_acc - grid.best_val_acc).groupby(grid.method).mean()
            rows.append(_claim("ReLU + BN overfits (largest train-validation gap)", say["relu"],
                               ", ".join(f"{METHOD_LABELS[m]} {gap[m]:+.3f}" for m in gap.index), bool(gap.idxmax() == "relu+bn")))
    if figure == "fig4" and "sep-up-zero" in methods:
        w60 = narrowest_good(grid, "sep-up-zero", t, 60) if 60 in set(grid.depth) else None
        ref = narrowest_good(grid, "sep-up", t, 60) if "sep-up" in methods and 60 in set(grid.depth) else None
        rows.append(_claim(f"zero init needs width 25 at depth 60 to reach {t:.0%} (Glorot: width 2)", say["sep-up-zero"],
                           f"narrowest width at depth 60: zero init {w60}, Glorot {ref}; {per_width('sep-up-zero')}",
                           None if w60 is None else bool(ref is None or w60 > ref)))
        if "relu+bn" in methods:
            dz, db = deepest("sep-up-zero") or 0, deepest("relu+bn") or 0
            az, ab = grid[grid.method == "sep-up-zero"].best_val_acc.mean(), grid[grid.method == "relu+bn"].best_val_acc.mean()
            rows.append(_claim("zero-initialised Sep-UP beats ReLU + BN (Glorot) in depth and accuracy", said[1][1],
                               f"deepest reaching {t:.0%}: {dz} vs {db}; mean accuracy {az:.3f} vs {ab:.3f}", bool(dz >= db and az > ab)))
        if "relu-zero" in methods:
            acc = grid[grid.method == "relu-zero"].best_val_acc.max()
            rows.append(_claim("without the constraint, zero-initialised ReLU cannot break the symmetry", "(implied: the constraint is needed)",
                               f"best accuracy of any zero-initialised plain ReLU net: {acc:.3f}", bool(acc < 0.75)))
    return _claims(rows)


def _grid_result(p: GridParams, runs: pd.DataFrame, figure: str):
    grid = _grid_frame(runs)
    table = grid.pivot_table(index=["method", "width"], columns="depth", values="best_val_acc", aggfunc="median")
    table = table.rename(index=METHOD_LABELS, level=0)
    claims = _grid_claims(p, grid, figure)
    if figure == "fig1":  # the MOONS chapter also shows the appendix's Figure 5 (Sep-U, Sep-P)
        claims = pd.concat([claims, _grid_claims(p, grid, "fig5")], ignore_index=True)
    return table, claims, {"grid": grid}


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Experiment:
    params: type
    configs: Callable[[Any], list[RunConfig]]
    result: Callable[..., tuple]
    wants_records: bool = False
    # The experiment's defaults are its smoke profile, the values of its notebook's parameters
    # cell: the dataclass defaults updated by these. A book/paper/long profile file overlays the
    # same base in the notebook (papermill) and in ``alive sweep``, so both train the same runs.
    smoke: dict = field(default_factory=dict)


EXPERIMENTS: dict[str, _Experiment] = {
    "width": _Experiment(WidthParams, _width_configs, _width_result,
                         smoke=dict(units=[50, 100], n_train=128, n_test=128)),
    "depth": _Experiment(DepthParams, _depth_configs, _depth_result, wants_records=True,
                         smoke=dict(depth=10, n_train=128, n_test=128, sweep_depths=[2, 4])),
    "params": _Experiment(ParamsParams, _params_configs, _params_result, smoke=dict(n_train=128, n_test=128)),
    "allcnn": _Experiment(AllCNNParams, _allcnn_configs, _allcnn_result,
                          smoke=dict(width_mult=0.125, n_train=128, n_test=128, batch_size=64)),
    "resnet": _Experiment(ResNetParams, _resnet_configs, _resnet_result, smoke=dict(n_train=64, n_test=64)),
    "scaling": _Experiment(ScalingParams, _scaling_configs, _scaling_result,
                           smoke=dict(depth=10, activations=["relu", "lk-relu"], n_train=128, n_test=128)),
    "moons": _Experiment(GridParams, lambda p: _grid_configs(p, "moons"), lambda p, r: _grid_result(p, r, "fig1"),
                         smoke=dict(seeds=[10], epochs=50)),
    "mnist": _Experiment(GridParams, lambda p: _grid_configs(p, "mnist"), lambda p, r: _grid_result(p, r, "fig2"),
                         smoke=dict(seeds=[10], methods=["relu", "relu+bn", "sep-up"], widths=[2, 4], depths=[2, 4], lr=0.001,
                                    weight=1e-08, batch_size=128, n_train=512, n_test=256, threshold=0.9)),
    "cifar": _Experiment(GridParams, lambda p: _grid_configs(p, "cifar"), lambda p, r: _grid_result(p, r, "fig3"),
                         smoke=dict(seeds=[10], methods=["relu", "relu+bn", "sep-up"], widths=[10], depths=[2, 4], lr=0.001,
                                    weight=1e-08, batch_size=128, n_train=256, n_test=128, threshold=0.3)),
    "zero_init": _Experiment(GridParams, lambda p: _grid_configs(p, "zero_init"), lambda p, r: _grid_result(p, r, "fig4"),
                             smoke=dict(seeds=[10], epochs=50, methods=["sep-up-zero", "relu-zero"],
                                        reference_methods=["sep-up", "relu+bn"], widths=[2, 3], anneal_epochs=10)),
}


_GRID_DATASETS = {"moons": "moons", "zero_init": "moons", "mnist": "mnist", "cifar": "cifar10"}


def compare_methods(results: dict[str, ExperimentResult]) -> pd.DataFrame:
    """One row per (data set, method) of grid results: depth reached, accuracy, dead points and units."""
    rows = []
    for label, res in results.items():
        grid, t = res.extra["grid"], res.params.threshold
        for m in res.params.methods:
            g = grid[grid.method == m]
            if not len(g):
                continue
            rows.append(
                {
                    "data": label,
                    "method": METHOD_LABELS[m],
                    f"deepest net reaching threshold": deepest_good(grid, m, t),
                    "threshold": t,
                    "mean best accuracy": g.best_val_acc.mean(),
                    "cells at threshold": f"{int((g.groupby(['depth', 'width']).best_val_acc.median() >= t).sum())}/{g.groupby(['depth', 'width']).ngroups}",
                    "mean dead-point fraction": g.dead_point_fraction.mean() if "dead_point_fraction" in g else np.nan,
                    "mean dead-unit fraction": g.dead_unit_fraction.mean() if "dead_unit_fraction" in g else np.nan,
                }
            )
    return pd.DataFrame(rows).set_index(["data", "method"])


def compare_claims(results: dict[str, ExperimentResult]) -> pd.DataFrame:
    """The claims of several results of one experiment side by side (e.g. one per seed): one
    row per claim, the paper's statement, then ``ours`` and ``verdict`` under each label."""
    tables = {label: res.claims.set_index("claim") for label, res in results.items()}
    if not tables:
        raise ValueError("compare_claims needs at least one result")
    claims = list(dict.fromkeys(c for t in tables.values() for c in t.index))  # first seen first
    paper = pd.concat([t["paper"] for t in tables.values()])
    parts = {("", "paper"): paper[~paper.index.duplicated()].reindex(claims)}
    for label, t in tables.items():
        parts[(label, "ours")] = t["ours"].reindex(claims)
        parts[(label, "verdict")] = t["verdict"].reindex(claims)
    return pd.DataFrame(parts, index=pd.Index(claims, name="claim"))


def by_seed(res: ExperimentResult) -> dict[str, ExperimentResult]:
    """``res`` split into one result per seed (its own records, no second read), then ``res``
    itself as ``"median of n seeds"``: the labels :func:`compare_methods` and
    :func:`compare_claims` show. A one-seed result comes back alone."""
    seeds = list(res.params.seeds)
    if len(seeds) == 1:
        return {f"seed {seeds[0]}": res}
    out = {f"seed {s}": _result(res.name, dataclasses.replace(res.params, seeds=[s]),
                                [r for r in res.records if r["config"]["seed"] == s]) for s in seeds}
    out[f"median of {len(seeds)} seeds"] = res
    return out


def stored_by_seed(name: str, seeds: Sequence[int], profile: str | None = None, **values) -> dict[str, ExperimentResult]:
    """:func:`by_seed` of the stored results of experiment ``name`` for these seeds (see
    :func:`stored`; never trains). Raises :class:`~alive.results.MissingResult` naming the first
    seed whose runs are not all stored."""
    from .results import MissingResult

    if not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"stored_by_seed needs a non-empty list of distinct seeds, got {seeds!r}")
    res = stored(name, profile=profile, seeds=list(seeds), **values)
    if res is None:
        missing = next(s for s in seeds if stored(name, profile=profile, seeds=[s], **values) is None)
        raise MissingResult(f"not every run of {name!r} ({profile or 'given'} parameters) is stored for seed {missing}")
    return by_seed(res)


def check_parameters(namespace: dict, notebook: str) -> None:
    """Check a notebook's parameters before it runs anything (call it in the notebook's first
    cell after its parameters): one clear error for

    * a parameter papermill injected (``-p``, ``-f``) that the notebook's ``parameters`` cell
      does not define (a misspelling would otherwise be ignored silently);
    * ``profile`` naming a profile (``book``, ``paper``, ``long``) whose file
      ``profiles/<profile>/<notebook>.yml`` holds other values than the notebook's: the label
      would be wrong (pass the file with ``-f``, or call your own values ``profile="custom"``);
    * ``long`` naming a profile file that does not exist.

    ``namespace`` is the notebook's ``globals()``; the injected cell is found in IPython's input
    history (papermill starts it with ``# Parameters``).
    """
    from .cli import load_profile

    history = list(namespace.get("In") or [])
    injected_at = [i for i, cell in enumerate(history) if i > 0 and cell.startswith("# Parameters\n")]
    if injected_at:
        # the parameters cell ran just before the first injected one; the last injected one counts
        # (a user may edit and re-run it on its own)
        defaults = _assigned_names(history[injected_at[0] - 1])
        unknown = sorted(_assigned_names(history[injected_at[-1]]) - defaults)
        if unknown and defaults:
            hints = [f"{u!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(u, defaults, 1)) else repr(u)
                     for u in unknown]
            raise ConfigError(f"unknown parameter(s) {', '.join(hints)} for notebook {notebook!r}; "
                              f"it takes {', '.join(sorted(defaults))}")
    profile = namespace.get("profile")
    if profile in ("book", "paper", "long"):
        for key, value in load_profile(notebook, profile).items():
            if key in namespace and namespace[key] != value:
                raise ConfigError(
                    f"profile={profile!r}, but {key}={namespace[key]!r} is not the value of profiles/{profile}/{notebook}.yml "
                    f"({value!r}): pass the file (papermill -f profiles/{profile}/{notebook}.yml), or label your own values profile='custom'")
    if namespace.get("long") is not None:
        load_profile(notebook, namespace["long"])


def _assigned_names(source: str) -> set[str]:
    """The names a cell assigns at its top level."""
    names: set[str] = set()
    try:
        body = ast.parse(source).body
    except SyntaxError:  # (IPython keeps a cell that failed to parse in its history too)
        return names
    for node in body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))  # a, b = ... too
    return names


def _lookup(name: str) -> _Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; valid experiments: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def params(name: str, **values) -> Any:
    """The validated parameters of experiment ``name``: its smoke defaults (the notebook's
    parameters cell) updated by ``values``; unknown names and wrong types raise."""
    exp = _lookup(name)
    cls = exp.params
    values = {**copy.deepcopy(exp.smoke), **values}
    dataset = _GRID_DATASETS.get(name)
    if dataset is not None:
        values.setdefault("dataset", dataset)
        if values["dataset"] != dataset:
            raise ConfigError(f"experiment {name!r} runs on {dataset}, not {values['dataset']!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown parameter(s) {sorted(unknown)} for experiment {name!r}; it takes {', '.join(sorted(known))}")
    return cls(**values)


def configs(name: str, **values) -> list[RunConfig]:
    """Every run configuration of experiment ``name`` with these parameters."""
    return _lookup(name).configs(params(name, **values))


def stored(name: str, profile: str | None = None, store: Store | None = None, partial: bool = False,
           seeds: Sequence[int] | None = None, **values) -> ExperimentResult | None:
    """Experiment ``name`` from stored records only (never trains).

    For results too long to train on a CPU that were computed elsewhere (a GPU) and committed,
    such as each linked-neurons chapter's longer runs (``profile="long"``: the parameters of
    ``profiles/long/<name>.yml``, updated by ``values``). Returns None unless every run is
    stored, or, with ``partial=True``, unless at least one is (the tables show what is there).
    ``seeds``: the seeds to read (``None``: those of the profile, or of ``values``).
    """
    from .cli import load_profile
    from .results import MissingResult

    if profile is not None:
        values = {**load_profile(name, profile), **values}
    if seeds is not None:  # (anything but a list of ints gets the parameters' clear error)
        values["seeds"] = list(seeds) if isinstance(seeds, tuple) else seeds
    try:
        return run(name, store=store, train=False, partial=partial, **values)
    except MissingResult:
        return None


def run(name: str, store: Store | None = None, progress: str = "auto", train: bool = True, partial: bool = False,
        **values) -> ExperimentResult:
    """Run (or load) experiment ``name`` and return its tables, claims and records.

    ``train=False`` only reads stored records (:class:`~alive.results.MissingResult` if one is
    missing; with ``partial=True`` the missing runs are left out instead).
    """
    from .results import MissingResult, default_store
    from .train import resolve_device, resolve_precision

    exp = _lookup(name)
    p = params(name, **values)
    cfgs = exp.configs(p)
    if partial and not train:
        store = store or default_store()
        dev = resolve_device(p.device)
        cfgs = [c for c in cfgs if store.get(c, resolve_precision(c.precision, dev)) is not None]
        if not cfgs:
            raise MissingResult(f"no stored run of {name!r} for these parameters")
    records = sweep(cfgs, store=store, device=p.device, progress=progress, train=train)
    return _result(name, p, records)


def _result(name: str, p: Any, records: list[dict]) -> ExperimentResult:
    exp = _lookup(name)
    runs = to_frame(records)
    out = exp.result(p, runs, records) if exp.wants_records else exp.result(p, runs)
    table, claims, extra = out
    return ExperimentResult(name, p, runs, table, claims, extra, records)
