"""Worker processes that share this process's CPU threads: several trainings at once.

On a CPU much of a small network's training time is per-operation work that one thread does
alone, so ``n`` processes of ``threads / n`` threads each finish a batch of trainings sooner
than one process of all the threads (the paper MOONS grid: 1.18-1.20x with two workers of one
thread on this project's 2-core CPU, ``bench/grid.py``). On a GPU the workers share the device.

Workers are started with ``spawn`` (a forked PyTorch process can hang in its thread pool), so
a script that uses them needs the usual ``if __name__ == "__main__":`` guard; a notebook does
not. What a worker runs must be importable and its arguments picklable.

Example::

    >>> from alive.workers import in_workers
    >>> for record in in_workers(fit, [(c,) for c in configs], workers=2):  # doctest: +SKIP
    ...     store.put(record)
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["check_workers", "in_workers"]

log = logging.getLogger("alive")


def check_workers(workers: Any) -> int:
    """``workers`` if it is a positive integer; anything else is refused with a ValueError."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return workers


def in_workers(fn: Callable, calls: Sequence[tuple], workers: int, what: str = "run") -> Iterator[Any]:
    """``fn(*args)`` for every ``args`` in ``calls``, in ``workers`` processes; yields each
    result as it finishes (not in order). ``workers == 1`` (or one call) runs them here, in
    order. Each worker gets ``torch.get_num_threads() // workers`` threads (at least one). If a
    call fails, or the caller stops iterating, the calls not yet started are dropped and the
    error is raised here."""
    check_workers(workers)
    calls = list(calls)
    if workers == 1 or len(calls) < 2:
        for args in calls:
            yield fn(*args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(workers, len(calls))
    threads = max(1, torch.get_num_threads() // workers)
    log.info("%d %ss on %d worker processes of %d thread(s)", len(calls), what, workers, threads)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        pending = [pool.submit(fn, *args) for args in calls]
        try:
            for i, done in enumerate(as_completed(pending), 1):
                result = done.result()
                log.info("%s %d/%d done", what, i, len(pending))
                yield result
        finally:
            for f in pending:
                f.cancel()
