"""Data sets as tensors on the device: MOONS, MNIST and CIFAR-10, scaling and batched augmentation.

Where the images come from (``source="auto"``, first that applies):

1. ``root=...``: a torchvision data set folder (``download=True`` fetches it there);
2. the environment variable ``ALIVE_DATA``: a folder with the npz files ``mnist.npz`` and
   ``cifar10.npz`` (full) or ``cifar10_subset.npz`` (the offline subset this project ships
   beside the repository);
3. torchvision's download into ``ALIVE_DATA_ROOT`` (default ``~/.cache/alive-data``).

The loader records which source and how many images it used in :attr:`Dataset.source`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "DataError",
    "DATASETS",
    "SCALINGS",
    "load",
    "moons",
    "mnist",
    "cifar10",
    "augment",
    "batches",
]

DATASETS = ("moons", "mnist", "cifar10")
SCALINGS = ("raw", "unit", "standardize")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# shapes of the npz files of ../shared/data (see its README); the full sets have the same layout
_NPZ_LAYOUT = {
    "mnist": {"x": (28, 28), "x_dtype": np.uint8},
    "cifar10": {"x": (3, 32, 32), "x_dtype": np.uint8},
}
_FULL_SIZES = {"mnist": (60000, 10000), "cifar10": (50000, 10000)}


class DataError(RuntimeError):
    """A data set could not be found or is damaged."""


@dataclass
class Dataset:
    """A classification data set held as tensors (on one device).

    ``x_*`` are float32 of shape ``(N, C, H, W)`` for images or ``(N, F)`` for MOONS;
    ``y_*`` are int64 labels. ``source`` says where the data came from and how much was used.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    source: str
    scaling: str = "unit"
    full: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        """The same data set with every tensor on ``device``."""
        d = torch.device(device)
        return Dataset(
            self.name,
            self.x_train.to(d),
            self.y_train.to(d),
            self.x_test.to(d),
            self.y_test.to(d),
            self.num_classes,
            self.source,
            self.scaling,
            self.full,
            dict(self.meta),
        )

    def describe(self) -> str:
        """One line: name, source, sizes, scaling."""
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} validation images of shape "
            f"{self.input_shape}, scaling={self.scaling}, source={self.source}"
        )

    def __repr__(self) -> str:
        return f"Dataset({self.describe()})"


# --------------------------------------------------------------------------- MOONS
def moons(n: int = 100, noise: float = 0.0, val_fraction: float = 0.15, random_state: int = 42) -> Dataset:
    """The separation paper's MOONS protocol.

    ``make_moons(n, noise)``; each feature divided by its range (max − min); an 85/15
    train/validation split with ``random_state=42`` (for ``n=100``).
    """
    from sklearn.datasets import make_moons
    from sklearn.model_selection import train_test_split

    if n < 4:
        raise ValueError(f"moons needs at least 4 points, got n={n}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    x, y = make_moons(n_samples=n, noise=noise, random_state=random_state)
    x = x / (x.max(0) - x.min(0))
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=val_fraction, random_state=random_state)
    t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    return Dataset(
        "moons",
        t(xtr, torch.float32),
        t(ytr, torch.int64),
        t(xva, torch.float32),
        t(yva, torch.int64),
        2,
        source=f"sklearn.make_moons(n={n}, noise={noise}, random_state={random_state})",
        scaling="range",
        meta={"noise": noise, "n": n},
    )


# --------------------------------------------------------------------------- images
def _check_npz(name: str, path: Path, arrays) -> None:
    layout = _NPZ_LAYOUT[name]
    for split in ("train", "test"):
        for key in (f"x_{split}", f"y_{split}"):
            if key not in arrays:
                raise DataError(f"{path} is damaged: it has no array {key!r} (found {sorted(arrays.keys())})")
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != layout["x_dtype"] or tuple(x.shape[1:]) != layout["x"]:
            raise DataError(
                f"{path} is damaged: x_{split} has dtype {x.dtype} and shape {x.shape}, "
                f"expected uint8 images of shape (N, {', '.join(map(str, layout['x']))})"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path} is damaged: y_{split} has dtype {y.dtype} and shape {y.shape}, expected {x.shape[0]} integer labels")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DataError(f"{path} is damaged: y_{split} has labels from {y.min()} to {y.max()}, expected 0-9")


def _npz_candidates(name: str) -> list[Path]:
    env = os.environ.get("ALIVE_DATA")
    if not env:
        return []
    folder = Path(env).expanduser()
    files = ["mnist.npz"] if name == "mnist" else ["cifar10.npz", "cifar10_subset.npz"]
    return [folder / f for f in files]


def _from_npz(name: str, path: Path):
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zip errors, truncation, pickles
        raise DataError(f"{path} cannot be read as an npz file ({exc})") from exc
    _check_npz(name, path, arrays)
    x_tr, y_tr, x_te, y_te = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    if name == "mnist":
        x_tr, x_te = x_tr[:, None], x_te[:, None]
    full = (len(y_tr), len(y_te)) == _FULL_SIZES[name]
    return x_tr, y_tr, x_te, y_te, f"npz {path.name}" + ("" if full else " (subset)"), full


def _from_torchvision(name: str, root: Path, download: bool):
    import torchvision

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as exc:
        raise DataError(f"torchvision could not load {name} from {root} (download={download}): {exc}") from exc

    def arrays(ds):
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        y = np.asarray(ds.targets, dtype=np.int64)
        x = x[:, None] if name == "mnist" else x.transpose(0, 3, 1, 2)  # CIFAR is stored NHWC
        return np.ascontiguousarray(x), y

    x_tr, y_tr = arrays(train)
    x_te, y_te = arrays(test)
    return x_tr, y_tr, x_te, y_te, f"torchvision {root}", True


def _load_images(name: str, root, download: bool, source: str):
    if source not in ("auto", "npz", "torchvision"):
        raise ValueError(f"unknown data source {source!r}; choose 'auto', 'npz' or 'torchvision'")
    if root is not None or source == "torchvision":
        folder = Path(root) if root is not None else Path(os.environ.get("ALIVE_DATA_ROOT", "~/.cache/alive-data"))
        return _from_torchvision(name, folder.expanduser(), download or root is None)
    for path in _npz_candidates(name):
        if path.exists():
            return _from_npz(name, path)
    if source == "npz":
        where = os.environ.get("ALIVE_DATA")
        raise DataError(
            f"no npz file for {name}: "
            + (f"ALIVE_DATA={where} holds none of {[p.name for p in _npz_candidates(name)]}" if where else "ALIVE_DATA is not set")
        )
    folder = Path(os.environ.get("ALIVE_DATA_ROOT", "~/.cache/alive-data")).expanduser()
    try:
        return _from_torchvision(name, folder, download=True)
    except DataError as exc:
        raise DataError(
            f"{name} is not available. Set ALIVE_DATA to a folder with the npz files, pass root= to a "
            f"torchvision data set folder, or allow a download (tried {folder}): {exc}"
        ) from exc


def _scale(x_tr: Tensor, x_te: Tensor, scaling: str):
    if scaling == "raw":
        return x_tr, x_te, {}
    if scaling == "unit":
        return x_tr / 255.0, x_te / 255.0, {}
    dims = [0] + list(range(2, x_tr.dim()))
    mean, std = x_tr.mean(dims, keepdim=True), x_tr.std(dims, keepdim=True).clamp_min(1e-6)
    return (x_tr - mean) / std, (x_te - mean) / std, {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}


def _images(name, scaling, n_train, n_test, root, download, source, require_full) -> Dataset:
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALINGS}")
    for label, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"{label} must be a positive int or None, got {n!r}")
    x_tr, y_tr, x_te, y_te, where, full = _load_images(name, root, download, source)
    if require_full and not full:
        raise DataError(
            f"this configuration needs the full {name} ({_FULL_SIZES[name][0]} + {_FULL_SIZES[name][1]} images) "
            f"but only {where} with {len(y_tr)} + {len(y_te)} is available; pass root= with the full data set"
        )
    for label, n, have in (("n_train", n_train, len(y_tr)), ("n_test", n_test, len(y_te))):
        if n is not None and n > have:
            raise DataError(f"{label}={n} but {where} has only {have} {label[2:]} images; ask for at most {have} (or None for all)")
    x_tr, y_tr, x_te, y_te = x_tr[:n_train], y_tr[:n_train], x_te[:n_test], y_te[:n_test]
    xt = torch.from_numpy(np.ascontiguousarray(x_tr)).float()
    xv = torch.from_numpy(np.ascontiguousarray(x_te)).float()
    xt, xv, stats = _scale(xt, xv, scaling)
    return Dataset(
        name,
        xt,
        torch.from_numpy(np.asarray(y_tr, dtype=np.int64)),
        xv,
        torch.from_numpy(np.asarray(y_te, dtype=np.int64)),
        10,
        source=f"{where}, using {len(y_tr)} train / {len(y_te)} test",
        scaling=scaling,
        full=full and n_train is None and n_test is None,
        meta=stats,
    )


def mnist(scaling="unit", n_train=None, n_test=None, root=None, download=False, source="auto", require_full=False) -> Dataset:
    """MNIST as ``(N, 1, 28, 28)`` float tensors; the first ``n_train`` / ``n_test`` images if given."""
    return _images("mnist", scaling, n_train, n_test, root, download, source, require_full)


def cifar10(scaling="unit", n_train=None, n_test=None, root=None, download=False, source="auto", require_full=False) -> Dataset:
    """CIFAR-10 as ``(N, 3, 32, 32)`` float tensors; the test set serves as validation (as in the papers)."""
    return _images("cifar10", scaling, n_train, n_test, root, download, source, require_full)


def load(name: str, **kwargs) -> Dataset:
    """Load a data set by name (``"moons"``, ``"mnist"``, ``"cifar10"``)."""
    if name == "moons":
        return moons(**kwargs)
    if name == "mnist":
        return mnist(**kwargs)
    if name == "cifar10":
        return cifar10(**kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


# --------------------------------------------------------------------------- batching
def batches(n: int, batch_size: int | None, generator: torch.Generator | None = None, shuffle: bool = True, device=None) -> Iterator[Tensor]:
    """Index tensors of one epoch (the last batch may be smaller); ``batch_size=None`` is one full batch."""
    if batch_size is None or batch_size >= n:
        yield (torch.randperm(n, generator=generator).to(device) if shuffle else torch.arange(n, device=device))
        return
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def augment(x: Tensor, generator: torch.Generator | None = None, flip: bool = True, shift: float = 0.1) -> Tensor:
    """Random horizontal flips and random shifts of up to ``shift`` of each axis, as batched tensor ops.

    Shifts are whole pixels, drawn uniformly in ``[-round(shift·H), round(shift·H)]`` per image
    and axis, and the uncovered border repeats the nearest edge pixel (Keras' ``fill_mode="nearest"``).
    Random numbers are drawn on the CPU from ``generator`` so runs are reproducible on any device.

    Shape:
        ``x``: ``(N, C, H, W)``; output the same.
    """
    n, _, h, w = x.shape
    dev = x.device
    cols = torch.arange(w).expand(n, w)
    rows = torch.arange(h).expand(n, h)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    if shift > 0:
        mh, mw = round(shift * h), round(shift * w)
        dy = torch.randint(-mh, mh + 1, (n, 1), generator=generator)
        dx = torch.randint(-mw, mw + 1, (n, 1), generator=generator)
        rows = (rows - dy).clamp_(0, h - 1)
        cols = (cols.gather(1, (torch.arange(w).expand(n, w) - dx).clamp(0, w - 1)))
    rows, cols = rows.to(dev), cols.to(dev)
    idx = rows[:, :, None] * w + cols[:, None, :]  # (n, h, w) flat source index per output pixel
    flat = x.reshape(n, x.shape[1], h * w)
    return flat.gather(2, idx.reshape(n, 1, h * w).expand(-1, x.shape[1], -1)).reshape_as(x)
