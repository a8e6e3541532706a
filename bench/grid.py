"""The batched grid engine against one-network-at-a-time training, side by side in one run.

A slice of the MOONS grid of the separation paper (five methods: ReLU, ReLU + BN, Sep-U,
Sep-P, Sep-UP) is trained twice for the same number of full-batch epochs: by
``alive.grid.train_group`` (all networks at once) and by ``alive.train.fit`` one after the
other. Then the whole paper grid (widths 1-5, 10-25; depths 1-120; the five methods) is timed
for a few epochs with the engine and extrapolated to the paper's 5000 epochs.

Ends with ``grid_speedup: <ratio>`` (target >= 10), ``paper_moons_grid_minutes: <m>``
(target < 20 on a 2-core CPU), ``paper_moons_grid_minutes_no_penalty: <m>``, the same grid
with every separation penalty switched off (a floor: the cost of the networks themselves), and
``paper_moons_grid_minutes_workers: <m>``, the grid trained by as many worker processes as the
CPU has threads, at most one per group (``python -m alive sweep --workers``), largest first: each
group's median epoch time while the groups train side by side for 10 epochs, laid out on the
workers as they are handed out (the wall time of a short run, less that of a one-epoch run, was
too noisy: starting workers and building stacks swamp the difference).
On a CPU where the native kernels (``alive.native``) are built,
``paper_moons_grid_minutes_pytorch_ops: <m>`` times the grid once more with PyTorch operations
instead (``native.disabled()``: the engine's batched operations and the penalty's), in the same
run; the one-network-at-a-time loop uses the native penalty kernel where it applies.

Usage: python bench/grid.py [--device cuda] [--quick]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import report, sync  # noqa: E402

from alive import native  # noqa: E402
from alive.config import RunConfig  # noqa: E402
from alive.grid import group_configs, largest_first, train_group, train_groups  # noqa: E402
from alive.train import fit, keep_freed_memory  # noqa: E402

METHODS = {"relu": {}, "relu+bn": {"batchnorm": True}, "sep-u": {"constraint": "u", "weight": 1e-4},
           "sep-p": {"constraint": "p", "weight": 1e-4}, "sep-up": {"constraint": "up", "weight": 1e-4}}


def grid(depths, widths, epochs):
    base = RunConfig(experiment="bench", depth=1, width=1, epochs=epochs, batch_size=None, lr=0.01, seed=10, diagnostics=False)
    return [base.replace(depth=d, width=w, **kw) for kw in METHODS.values() for d in depths for w in widths]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = args.device
    depths, widths, epochs = ([1, 10], [1, 3], 20) if args.quick else ([1, 10, 20, 30], [1, 2, 3, 5, 10], 100)
    cfgs = grid(depths, widths, epochs)
    kept = keep_freed_memory(dev)  # as the trainers do
    print(f"torch {torch.__version__}, allocator keeps freed memory: {kept}, device {dev}; slice: {len(cfgs)} networks (depths {depths}, widths {widths}), {epochs} epochs")
    warm = grid([2], [2], 2)  # one-time costs (imports, allocator, autograd engine) paid by neither side
    train_group([warm[0], warm[2]], device=dev, progress="quiet")
    fit(warm[1], device=dev, progress="quiet")
    sync(dev)
    t = time.perf_counter()
    for group in group_configs(cfgs, device=dev):
        train_group(group, device=dev, progress="quiet")
    sync(dev)
    t_grid = time.perf_counter() - t
    t = time.perf_counter()
    for c in cfgs:
        fit(c, device=dev, progress="quiet")
    sync(dev)
    t_single = time.perf_counter() - t
    print(f"batched engine {t_grid:.1f} s, one at a time {t_single:.1f} s")
    ratios = {"grid_speedup": t_single / t_grid}

    paper = grid([1] + list(range(10, 121, 10)), [1, 2, 3, 4, 5, 10, 15, 20, 25], 3 if args.quick else 8)
    if args.quick:
        paper = [c for c in paper if c.depth <= 20]
    minutes = grid_minutes(paper, dev)
    print(f"paper MOONS grid ({len(paper)} networks): {minutes * 60 / 5 :.0f} ms per epoch -> {minutes:.1f} min for 5000 epochs")
    ratios["paper_moons_grid_minutes"] = minutes
    if dev == "cpu" and native.available():
        with native.disabled():
            slow = grid_minutes(paper, dev)
        print(f"the same grid by PyTorch operations (no native kernels): {slow * 60 / 5:.0f} ms per epoch -> {slow:.1f} min")
        ratios["paper_moons_grid_minutes_pytorch_ops"] = slow
    # the same networks with every penalty off (Sep-U, Sep-P, Sep-UP as plain ReLU nets of their
    # shapes): what the engine spends on the networks alone, a floor for the line above
    plain = [c.replace(constraint="none", weight=0.0) for c in paper]
    floor = grid_minutes(plain, dev)
    print(f"the same grid without penalties: {floor * 60 / 5:.0f} ms per epoch -> {floor:.1f} min")
    ratios["paper_moons_grid_minutes_no_penalty"] = floor
    threads = torch.get_num_threads()
    workers = min(threads, len(group_configs(paper, device=dev)))
    if dev == "cpu" and workers > 1:
        parallel = parallel_minutes(paper, dev, workers, 2 if args.quick else 10)
        print(f"the same grid with penalties, {workers} worker processes of {max(1, threads // workers)} thread(s): "
              f"{parallel:.1f} min")
        ratios["paper_moons_grid_minutes_workers"] = parallel
    report(ratios)


def grid_minutes(cfgs, dev):
    """Minutes for 5000 epochs of ``cfgs`` by the engine, from the median epoch time of a short run."""
    per_epoch = 0.0
    for group in group_configs(cfgs, device=dev):
        recs = train_group(group, device=dev, progress="quiet")
        per_epoch += statistics.median(recs[0]["history"]["time"][1:] or recs[0]["history"]["time"])
    return per_epoch * 5000 / 60


def parallel_minutes(cfgs, dev, workers, epochs):
    """Minutes for 5000 epochs of ``cfgs`` by ``workers`` worker processes: each group's median
    epoch time while they train side by side for ``epochs`` epochs (so sharing the CPU is in
    it, starting the workers and building the stacks is not), laid out as ``train_groups``
    hands the groups out (largest first, each to the first free worker)."""
    groups = largest_first(group_configs([c.replace(epochs=epochs) for c in cfgs], device=dev), dev)
    per_epoch = {}
    for recs in train_groups(groups, device=dev, progress="quiet", workers=workers):
        i = next(i for i, g in enumerate(groups) if any(c.key(recs[0]["precision"]) == recs[0]["key"] for c in g))
        per_epoch[i] = statistics.median(recs[0]["history"]["time"][1:])
    free = [0.0] * workers
    for i in range(len(groups)):
        k = min(range(workers), key=free.__getitem__)
        free[k] += per_epoch[i] * 5000
    return max(free) / 60


if __name__ == "__main__":
    main()
