"""Worker processes that share this process's CPU threads: several trainings at once.

On a CPU much of a small network's training time is per-operation work that one thread does
alone, so ``n`` processes of ``threads / n`` threads each finish a batch of trainings sooner
than one process of all the threads (the paper MOONS grid: 1.18-1.20x with two workers of one
thread on this project's 2-core CPU, ``bench/grid.py``). On a GPU the workers share the device.

Workers are started with ``spawn`` (a forked PyTorch process can hang in its thread pool), so
a script that uses them needs the usual ``if __name__ == "__main__":`` guard; a notebook does
not. What a worker runs must be importable and its arguments picklable. Workers log through
the ``alive`` logger at the caller's level, and end themselves if the caller's process dies.

Example::

    >>> from alive.workers import in_workers
    >>> for record in in_workers(fit, [(c,) for c in configs], workers=2):  # doctest: +SKIP
    ...     store.put(record)
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["check_workers", "in_workers", "in_worker"]

log = logging.getLogger("alive")
_in_worker = False


def check_workers(workers: Any) -> int:
    """``workers`` if it is a positive integer; anything else is refused with a ValueError."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return workers


def in_worker() -> bool:
    """Whether this process is one of :func:`in_workers`'s workers (the trainers then show
    log lines instead of progress bars: the workers share one terminal)."""
    return _in_worker


def in_workers(fn: Callable, calls: Sequence[tuple], workers: int, what: str = "run") -> Iterator[Any]:
    """``fn(*args)`` for every ``args`` in ``calls``, in ``workers`` processes; yields each
    result as it finishes (not in order). ``workers == 1`` (or one call) runs them here, in
    order. Each worker gets ``torch.get_num_threads() // workers`` threads (at least one).

    At most ``workers`` calls are out at a time, the next one sent as one finishes. If a call
    fails, or the caller stops iterating, the calls still running are stopped (their worker
    processes ended) and none of the rest is started; a failure is raised here.
    """
    check_workers(workers)
    calls = list(calls)
    if workers == 1 or len(calls) < 2:
        return (fn(*args) for args in calls)
    return _spawned(fn, calls, min(workers, len(calls)), what)


def _spawned(fn: Callable, calls: list[tuple], workers: int, what: str) -> Iterator[Any]:
    threads = max(1, torch.get_num_threads() // workers)
    log.info("%d %ss on %d worker processes of %d thread(s)", len(calls), what, workers, threads)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads, log.getEffectiveLevel()))
    todo, out, finished = list(reversed(calls)), set(), 0
    clean = False
    try:
        while todo or out:
            while todo and len(out) < workers:
                out.add(pool.submit(fn, *todo.pop()))
            done, out = wait(out, return_when=FIRST_COMPLETED)
            for f in done:
                result = f.result()
                finished += 1
                log.info("%s %d/%d done", what, finished, len(calls))
                yield result
        clean = True
    finally:
        if not clean:  # an error or an abandoned iteration: stop what still runs, now
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)  # with its workers ended, this waits for no call


def _start_worker(threads: int, level: int) -> None:
    global _in_worker
    _in_worker = True
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s [%(processName)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alive").setLevel(level)
    parent = multiprocessing.parent_process()
    if parent is not None:  # a worker outliving its caller would hold a lock (and a GPU) forever
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
