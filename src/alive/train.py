"""One training run, from a :class:`~alive.config.RunConfig` to a result record.

The loop is short on purpose (in the spirit of airbench): the data set lives on the device
as tensors, batches are index tensors, augmentation is batched tensor ops, and one epoch is
``forward → cross-entropy (+ λ·separation penalty) → backward → step`` followed by an
evaluation on the validation set. Everything the papers report comes out of the record:
per-epoch history, the best validation accuracy over epochs (their metric), wall times, and
the dead-neuron / liveness diagnostics of the final network.

Multi-GPU / multi-node: launch with ``torchrun``; each process takes its slice of every
global batch and :class:`~torch.nn.parallel.DistributedDataParallel` averages gradients, so
the run equals the single-process one (the separation penalty sees the global batch).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import platform
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .config import RunConfig
from .constraints import SeparationConstraint
from .data import Dataset, augment, batches, load
from .diagnostics import dead_neurons, liveness
from .init import set_epoch
from .models import build_model, count_parameters
from .workers import in_worker

__all__ = [
    "fit",
    "evaluate",
    "make_optimizer",
    "lr_factor",
    "resolve_device",
    "resolve_precision",
    "load_data",
    "TrainingInterrupted",
    "device_name",
    "keep_freed_memory",
]

log = logging.getLogger("alive")
MAX_HISTORY = 500  # epochs stored per record; longer runs keep every k-th epoch and the last


class TrainingInterrupted(RuntimeError):
    """Raised by ``fit(..., stop_after=N)`` after the checkpoint of epoch N (to test resuming)."""


def resolve_device(device=None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def keep_freed_memory(device="cpu") -> bool:
    """Let the C allocator keep freed memory for reuse when training on ``device`` is a CPU
    (glibc; a no-op for other devices and where it is not there).

    PyTorch takes its CPU tensors straight from ``malloc``. glibc serves blocks above its mmap
    threshold with fresh pages and returns them to the system when they are freed, so each
    training step page-faults its activations and gradients in again; on this project's
    2-core machine that was 25-40 % of a small convnet's step. Raising the mmap threshold to
    its maximum (32 MiB) and the trim threshold to 1 GiB keeps those blocks in the heap.
    :func:`fit` and :func:`alive.grid.train_group` call it on a CPU; set the environment
    variable ``ALIVE_KEEP_FREED_MEMORY=0`` to leave the allocator alone. Returns whether the
    setting is in effect.
    """
    if torch.device(device).type != "cpu" or os.environ.get("ALIVE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` is bf16 autocast on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=6)
def _load_cached(dataset: str, items: tuple) -> Dataset:
    return load(dataset, **dict(items))


def load_data(cfg: RunConfig) -> Dataset:
    """The data set of ``cfg`` on the CPU (cached across runs of one process)."""
    return _load_cached(cfg.dataset, tuple(sorted(cfg.data_kwargs().items())))


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """The papers' optimisers with Keras' defaults (Adam/RMSprop ``eps=1e-7``, RMSprop ``rho=0.9``)."""
    params = list(params)
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    # fused: one kernel for the whole update of every parameter (on a CPU ~3x faster than
    # foreach, whose CPU path is a loop of per-tensor operations); foreach where no fused exists
    fused = {"fused": True} if all(t.device.type in ("cpu", "cuda") for t in tensors) else {"foreach": True}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-7, **fused)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-7, foreach=True)
    if cfg.optimizer == "nesterov":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum or 0.9, nesterov=True, **fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, **fused)


def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter optimiser state its parameter's memory layout.

    A checkpoint keeps the layout it was saved in (say channels-last moments) and the CPU fused
    kernels do not check strides: a resume with the other layout would silently mix elements.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


_ALLCNN_STEPS = ((500 / 3000, 1.0), (2000 / 3000, 0.75), (2350 / 3000, 0.5), (2750 / 3000, 0.1), (math.inf, 0.05))


def lr_factor(cfg: RunConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the initial rate after ``step`` updates: Keras time decay × the epoch schedule.

    ``allcnn``: ×1 until epoch 500, ×0.75 until 2000, ×0.5 until 2350, ×0.1 until 2750, then
    ×0.05 (of 3000 epochs; boundaries scale with ``cfg.epochs`` for shorter runs).
    """

    def factor(step: int) -> float:
        f = 1.0 / (1.0 + cfg.decay * step)
        if cfg.schedule == "allcnn":
            frac = (step // steps_per_epoch) / cfg.epochs
            f *= next(m for bound, m in _ALLCNN_STEPS if frac < bound)
        return f

    return factor


def _fp32_matmuls(device: torch.device, precision: str) -> None:
    """``precision="fp32"`` on CUDA means fp32: TF32 tensor-core math is switched off."""
    if device.type == "cuda":
        allow = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024, precision: str = "fp32", channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in eval mode."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(x.device, precision):
            out = model(xb).float()
        loss += F.cross_entropy(out, yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum()
    model.train(was)
    n = max(1, x.shape[0])
    return loss.item() / n, correct.item() / n


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _use_channels_last(setting, conv: bool) -> bool:
    if setting == "auto":
        return conv  # measured: helps convs on CUDA and ~1.1-1.3x on this project's CPU
    return bool(setting) and conv


def _progress(mode: str, total: int, label: str):
    if mode in ("auto", "bar") and in_worker():  # workers share one terminal: log lines, not bars
        mode = "log"
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=label, leave=False, dynamic_ncols=True)
    return None


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(
    config: RunConfig,
    *,
    device=None,
    data: Dataset | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    compile: bool = False,
    channels_last="auto",
    progress: str = "auto",
    stop_after: int | None = None,
    eval_batch_size: int = 1024,
) -> dict[str, Any]:
    """Train one network as ``config`` says and return its result record (a JSON-able dict).

    Args:
        config: the run configuration (validated on construction).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        data: a preloaded :class:`~alive.data.Dataset` (default: loaded from the config).
        checkpoint: a file to save to every ``checkpoint_every`` epochs and to resume from if it
            exists; a resumed run ends with the same result as an uninterrupted one. The file
            is removed when the run ends.
        compile: wrap the model in ``torch.compile``.
        channels_last: ``"auto"`` (convolutional models), ``True`` or ``False``.
        progress: ``"auto"`` (a tqdm bar on a terminal, log lines otherwise), ``"bar"``,
            ``"log"`` or ``"quiet"``.
        stop_after: raise :class:`TrainingInterrupted` after the checkpoint of this epoch.

    Returns:
        the record: ``config``, ``status`` (``"ok"`` or ``"diverged"``), ``metrics``
        (``best_val_acc`` over epochs, ...), ``history`` (per epoch; its ``lr`` is the rate
        after the epoch's last step, the one the next epoch starts with, as Keras logs it),
        ``timing``, ``diagnostics``, ``environment``.
    """
    cfg = config
    if stop_after is not None and (checkpoint is None or checkpoint_every <= 0):
        raise ValueError("stop_after stops after a checkpoint: it needs checkpoint= and checkpoint_every > 0")
    dev = resolve_device(device)
    keep_freed_memory(dev)
    precision = resolve_precision(cfg.precision, dev)
    rank, world = _dist()
    _fp32_matmuls(dev, precision)
    torch.manual_seed(cfg.seed)
    ds = (data if data is not None else load_data(cfg)).to(dev)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, **cfg.model_kwargs()).to(dev)
    conv = ds.x_train.dim() == 4
    use_cl = _use_channels_last(channels_last, conv)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    constraint = None
    if cfg.constraint != "none":
        constraint = SeparationConstraint(
            model, cfg.constraint, cfg.weight, cfg.rho, cfg.margin, cfg.aggregation, cfg.conv_reduction
        )
    net: nn.Module = model
    if world > 1:
        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if compile:
        net = torch.compile(net)
    opt = make_optimizer(cfg, model.parameters())
    n_train = ds.x_train.shape[0]
    if world > 1 and min(n_train, cfg.batch_size or n_train) < world:
        raise ValueError(f"{world} processes need batches of at least {world} samples (batch_size {cfg.batch_size}, {n_train} training points)")
    steps_per_epoch = 1 if cfg.batch_size is None else math.ceil(n_train / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # data order and augmentation
    hist: dict[str, list] = defaultdict(list)
    status, diverged_epoch, start_epoch = "ok", None, 0
    live_hist: list[dict] = []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        if state["key"] != cfg.key(precision):
            raise RuntimeError(f"checkpoint {ckpt} belongs to another configuration")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _match_state_layout(opt)
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        hist = defaultdict(list, state["history"])
        live_hist = state.get("liveness", [])
        start_epoch = state["epoch"]
        log.info("%s: resumed from %s at epoch %d", cfg.label, ckpt, start_epoch)

    bar = _progress(progress, cfg.epochs, cfg.label) if rank == 0 else None
    if bar is not None:
        bar.update(start_epoch)
    log_every = max(1, cfg.epochs // 10)
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        set_epoch(model, epoch)
        net.train()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        pen_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.int64)
        seen = 0
        # the order is drawn on the CPU (the same on every device) and moved once per epoch
        for idx in batches(n_train, cfg.batch_size, gen, device=dev):
            xb, yb = ds.x_train[idx], ds.y_train[idx]
            if cfg.augment:
                xb = augment(xb, gen)
            n_global = len(yb)
            if world > 1:
                # some process would get no sample (its mean loss: NaN): every process skips this
                # last, smaller batch (and its scheduler step, a negligible drift from one process)
                if n_global < world:
                    continue
                xb, yb = xb.tensor_split(world)[rank], yb.tensor_split(world)[rank]
            if use_cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(dev, precision):
                out = net(xb).float()
                loss = F.cross_entropy(out, yb)
                # DDP averages gradients over processes: weight each shard by its size so the
                # result is the global batch mean even when the batch does not split evenly
                total = loss * (len(yb) * world / n_global) if world > 1 else loss
                if constraint is not None:
                    pen = constraint.penalty().float()
                    total = total + pen
                    pen_sum += pen.detach().double() * len(yb)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().double() * len(yb)
            correct += (out.detach().argmax(1) == yb).sum()
            seen += len(yb)
        if constraint is not None:
            constraint.clear()
        if world > 1:  # report the global batch, not this process's shard
            totals = torch.stack([loss_sum, pen_sum, correct.double(), torch.tensor(float(seen), device=dev, dtype=torch.float64)])
            dist.all_reduce(totals)
            loss_sum, pen_sum, correct, seen = totals[0], totals[1], totals[2], int(totals[3].item())
        train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
        penalty = pen_sum.item() / seen
        val_loss, val_acc = evaluate(model, ds.x_test, ds.y_test, eval_batch_size, precision, use_cl)
        if constraint is not None:
            constraint.clear()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        hist["epoch"].append(epoch + 1)
        hist["train_loss"].append(_finite(train_loss))
        hist["train_acc"].append(train_acc)
        hist["val_loss"].append(_finite(val_loss))
        hist["val_acc"].append(val_acc)
        hist["penalty"].append(_finite(penalty))
        hist["lr"].append(opt.param_groups[0]["lr"])  # after the epoch's last step (see the docstring)
        hist["time"].append(time.perf_counter() - t0)
        if not (math.isfinite(train_loss + penalty) and math.isfinite(val_loss)):
            status, diverged_epoch = "diverged", epoch + 1
            log.warning("%s: loss is not finite at epoch %d; the run is recorded as diverged", cfg.label, epoch + 1)
            break
        if cfg.liveness_every and (epoch + 1) % cfg.liveness_every == 0:
            live_hist.append({"epoch": epoch + 1, **liveness(model, ds.x_train, eval_batch_size).summary})
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.3f}")
            bar.update(1)
        elif progress != "quiet" and rank == 0 and ((epoch + 1) % log_every == 0 or epoch + 1 == cfg.epochs):
            log.info("%s epoch %d/%d loss %.4f val_acc %.4f (%.1fs)", cfg.label, epoch + 1, cfg.epochs, train_loss, val_acc, hist["time"][-1])
        if ckpt is not None and checkpoint_every and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < cfg.epochs:
            if rank == 0:
                _save_checkpoint(
                    ckpt,
                    {
                        "key": cfg.key(precision),
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "generator": gen.get_state(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                        "history": dict(hist),
                        "liveness": live_hist,
                    },
                )
            if stop_after is not None and epoch + 1 >= stop_after:
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(f"stopped after epoch {epoch + 1} (checkpoint {ckpt})")
    if bar is not None:
        bar.close()
    total_time = time.perf_counter() - t_start

    diagnostics: dict[str, Any] = {}
    if cfg.diagnostics and status == "ok":
        dn = dead_neurons(model, ds.x_train, eval_batch_size)
        live = liveness(model, ds.x_train, eval_batch_size)
        diagnostics = {
            "dead_neurons": dn["dead"].tolist(),
            "dead_members": dn["dead_members"].tolist(),
            "neurons": dn["neurons"].tolist(),
            "liveness": live.summary,
            "dead_units_per_layer": live.layers["dead_units"].tolist(),
            "dead_points_per_layer": live.layers["dead_points"].tolist(),
        }
        if len(live.linked):
            diagnostics["flat_linked_units"] = live.linked["flat_units"].tolist()
    if live_hist:
        diagnostics["liveness_history"] = live_hist
    if constraint is not None:
        constraint.remove()
    if ckpt is not None and rank == 0 and ckpt.exists():
        ckpt.unlink()

    val = hist["val_acc"]
    best = max(range(len(val)), key=lambda i: val[i]) if val else None
    metrics = {
        "best_val_acc": val[best] if val else None,
        "best_epoch": hist["epoch"][best] if val else None,
        "final_val_acc": val[-1] if val else None,
        "final_train_acc": hist["train_acc"][-1] if val else None,
        "final_train_loss": hist["train_loss"][-1] if val else None,
        "final_val_loss": hist["val_loss"][-1] if val else None,
        "epochs_run": len(val),
        "parameters": count_parameters(model),
    }
    return {
        "key": cfg.key(precision),
        "config": cfg.to_dict(),
        "precision": precision,
        "status": status,
        "diverged_epoch": diverged_epoch,
        "metrics": metrics,
        "history": _thin(dict(hist)),
        "timing": {
            "total_s": total_time,
            "mean_epoch_s": sum(hist["time"]) / max(1, len(hist["time"])),
        },
        "diagnostics": diagnostics,
        "environment": _environment(dev, world),
        "data_source": ds.source,
    }


def _thin(hist: dict[str, list]) -> dict[str, list]:
    n = len(hist.get("epoch", []))
    if n <= MAX_HISTORY:
        return hist
    step = math.ceil(n / MAX_HISTORY)
    keep = list(range(step - 1, n, step))
    if keep[-1] != n - 1:
        keep.append(n - 1)
    return {k: [v[i] for i in keep] for k, v in hist.items()}


def _environment(dev: torch.device, world: int) -> dict[str, Any]:
    return {
        "device": device_name(dev),
        "world_size": world,
        "torch": torch.__version__,
        "alive": __version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
