"""Overhead of linking and of the separation constraint, measured side by side in one run.

Prints, then ends with one ``name: value`` line per ratio (targets: <= 1.15):

* ``linked_relu_vs_relu``: forward + backward of the linked ReLU on x (output 2x the size)
  over a plain ReLU on a tensor of that output size;
* ``linked_relu_vs_naive``: the same over ``cat(relu(x), relu(-x))``;
* ``sepup_step_mlp50x4`` / ``sepup_step_cnn``: a full training step (forward, loss, backward,
  Adam) with Sep-UP over the same step without it, on a 50-layer width-4 MLP and a small CNN;
  ``sepup_step_cnn_channels_last``: the same CNN in the channels-last layout that
  ``alive.train.fit`` gives convolutional models;
* ``..._pytorch_penalty``: the same ratios with the penalty computed by PyTorch operations
  instead of the native kernel (``alive.native``), timed in the same rounds (CPU, where the
  kernel could be built).

Usage: python bench/overhead.py [--device cuda] [--quick]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import medians, paired_ratio, report, rounds_of  # noqa: E402

import alive  # noqa: E402
from alive import native  # noqa: E402
from alive.functional import linked_relu  # noqa: E402
from alive.models import MLP, RectCNN  # noqa: E402
from alive.config import RunConfig  # noqa: E402
from alive.train import keep_freed_memory, make_optimizer  # noqa: E402


def activation_ratios(device, quick):
    shape = (64, 32, 32, 32) if not quick else (8, 16, 16, 16)
    x = torch.randn(shape, device=device, requires_grad=True)
    x2 = torch.randn((shape[0], 2 * shape[1]) + shape[2:], device=device, requires_grad=True)
    g1 = torch.randn_like(x2)

    def linked():
        linked_relu(x, 1).backward(g1)

    def naive():
        torch.cat((torch.relu(x), torch.relu(-x)), 1).backward(g1)

    def plain():
        torch.relu(x2).backward(g1)

    r = rounds_of({"linked": linked, "naive": naive, "relu": plain}, device=device, rounds=5 if quick else 15)
    t = medians(r)
    print(f"activation fwd+bwd on {tuple(shape)} -> {tuple(x2.shape)}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()))
    return {"linked_relu_vs_relu": paired_ratio(r, "linked", "relu"), "linked_relu_vs_naive": paired_ratio(r, "linked", "naive")}


def step_ratios(make_model, x, y, device, quick, name, key, memory_format=torch.contiguous_format, rounds=15, repeat=10):
    torch.manual_seed(0)
    plain_model = make_model().to(device, memory_format=memory_format)
    sep_model = make_model().to(device, memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    sep_model.load_state_dict(plain_model.state_dict())
    sep = alive.SeparationConstraint(sep_model, kind="up", weight=1e-4)
    opts = {m: make_optimizer(RunConfig(depth=1, width=1, lr=1e-3), m.parameters()) for m in (plain_model, sep_model)}  # as fit does

    def step(model, constrained):
        loss = F.cross_entropy(model(x), y)
        if constrained:
            loss = loss + sep.penalty()
        opts[model].zero_grad(set_to_none=True)
        loss.backward()
        opts[model].step()

    def pytorch_step():
        with native.disabled():
            step(sep_model, True)

    fns = {"plain": lambda: step(plain_model, False), "sep-up": lambda: step(sep_model, True)}
    if native.available() and device == "cpu":
        fns["sep-up, PyTorch penalty"] = pytorch_step
    r = rounds_of(fns, device=device, rounds=5 if quick else rounds, repeat=3 if quick else repeat)
    t = medians(r)
    print(f"{name} training step: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()))
    ratios = {key: paired_ratio(r, "sep-up", "plain")}
    if "sep-up, PyTorch penalty" in r:
        ratios[key + "_pytorch_penalty"] = paired_ratio(r, "sep-up, PyTorch penalty", "plain")
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a format check, not a measurement)")
    args = ap.parse_args()
    dev = args.device
    kept = keep_freed_memory(dev)  # as the trainers do
    print(f"torch {torch.__version__}, allocator keeps freed memory: {kept}, device {dev}, {torch.get_num_threads()} threads")
    ratios = activation_ratios(dev, args.quick)
    b = 64 if args.quick else 256
    x = torch.randn(b, 2, device=dev)
    y = torch.randint(0, 2, (b,), device=dev)
    # (a step of a few ms: more, shorter rounds for the same time, a steadier median)
    ratios |= step_ratios(lambda: MLP(2, 2, depth=50, width=4), x, y, dev, args.quick, "MLP 50x4", "sepup_step_mlp50x4",
                          rounds=40, repeat=5)
    xi = torch.randn(16 if args.quick else 128, 1, 28, 28, device=dev)
    yi = torch.randint(0, 10, (xi.shape[0],), device=dev)
    cnn = lambda: RectCNN(1, 10, 28, depth=4, width=16)  # noqa: E731
    ratios |= step_ratios(cnn, xi, yi, dev, args.quick, "CNN 4x16", "sepup_step_cnn")
    ratios |= step_ratios(cnn, xi, yi, dev, args.quick, "CNN 4x16 channels-last", "sepup_step_cnn_channels_last",
                          memory_format=torch.channels_last)
    report(ratios)


if __name__ == "__main__":
    main()
