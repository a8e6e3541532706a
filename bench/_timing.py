"""Side-by-side timing: candidates are interleaved round by round and the median kept."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each function's per-round times."""
    return {k: statistics.median(v) for k, v in times.items()}


def rounds_of(fns: dict[str, Callable[[], None]], rounds: int = 7, repeat: int = 10, device="cpu", warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``rounds`` interleaved rounds."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(repeat):
                f()
            sync(device)
            times[name].append((time.perf_counter() - t) / repeat)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time over ``b``'s in the same round: a shared machine
    drifts by more than the effects measured here, and pairing cancels the drift."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def report(ratios: dict[str, float]) -> None:
    """The machine-readable tail: one ``name: value`` line per ratio."""
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
