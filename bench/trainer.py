"""The trainer's speed against a minimal hand-written loop, side by side in one run.

For the deep thin net (Table 2) and the parameter-count net (Table 3), both with linked ReLU,
this times one epoch of ``alive.train.fit`` (evaluation on a tiny set, no diagnostics) and
one epoch of the shortest loop that trains the same model on the same device-resident data:

    for idx in randperm batches: loss = cross_entropy(model(x[idx]), y[idx]); backward; step

It prints steps per second of both and ends with ``name: value`` lines of the ratio
trainer / hand loop (target: >= 0.9).

Usage: python bench/trainer.py [--device cuda] [--quick]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import report, sync  # noqa: E402

from alive.config import RunConfig  # noqa: E402
from alive.data import Dataset  # noqa: E402
from alive.models import build_model  # noqa: E402
from alive.train import fit, keep_freed_memory, make_optimizer  # noqa: E402


def synthetic(n: int, n_test: int, device) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n + n_test, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n + n_test,), generator=g)
    return Dataset("cifar10", x[:n], y[:n], x[n:], y[n:], 10, source="synthetic", scaling="unit")


def hand_loop(cfg: RunConfig, data: Dataset, device, channels_last: bool) -> float:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, 10, **cfg.model_kwargs()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model.parameters())
    x, y = data.x_train.to(device), data.y_train.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sync(device)
    t = time.perf_counter()
    for idx in torch.randperm(len(y), device=device).split(cfg.batch_size):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t


def trainer(cfg: RunConfig, data: Dataset, device, channels_last: bool) -> float:
    rec = fit(cfg, device=device, data=data, progress="quiet", channels_last=channels_last)
    return rec["history"]["time"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = 256 if args.quick else 2048
    data = synthetic(n, 64, args.device)
    kept = keep_freed_memory(args.device)  # as the trainers do
    print(f"torch {torch.__version__}, allocator keeps freed memory: {kept}, device {args.device}, {torch.get_num_threads()} threads, {n} images per epoch")
    ratios = {}
    cases = {
        "depth_net": RunConfig(dataset="cifar10", model="depth", activation="lk-relu", epochs=1, batch_size=32, diagnostics=False, precision="fp32"),
        "params_net": RunConfig(dataset="cifar10", model="params", activation="lk-relu", optimizer="rmsprop", lr=1e-4, epochs=1, batch_size=32, diagnostics=False, precision="fp32"),
    }
    for name, cfg in cases.items():
        cl = cfg.model != "depth"  # what fit's "auto" picks is measured separately; compare like with like
        t_hand, t_fit = [], []
        hand_loop(cfg, data, args.device, cl)  # warm-up
        for _ in range(args.rounds if not args.quick else 1):
            t_hand.append(hand_loop(cfg, data, args.device, cl))
            t_fit.append(trainer(cfg, data, args.device, cl))
        steps = -(-n // cfg.batch_size)
        h, f = statistics.median(t_hand), statistics.median(t_fit)
        print(f"{name}: hand loop {steps / h:.1f} steps/s, trainer {steps / f:.1f} steps/s (trainer epoch includes its evaluation on 64 images)")
        ratios[f"trainer_vs_hand_{name}"] = h / f
    report(ratios)


if __name__ == "__main__":
    main()
