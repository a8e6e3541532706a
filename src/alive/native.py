"""Native CPU kernels, compiled on first use with the system's C compiler.

A thin deep network's separation penalty is a few small tensors per layer, and PyTorch's CPU
operations on them cost far more in per-operation latency than in arithmetic (a 50-layer,
4-unit MLP: 1.32-1.48x the plain training step). The C99 kernels of ``csrc/separation.c``
(and the ``separation_body.h`` it includes) compute the penalty of a stack of layers, and its
gradient, in one pass per layer. They are built once per source version into a per-user
cache; :mod:`alive.functional` uses them for CPU float32/float64 tensors and falls back to
its PyTorch operations wherever they do not apply.

Environment:

* ``ALIVE_NATIVE=0`` turns the kernels off (the PyTorch path, bit for bit the earlier results);
* ``CC`` names the compiler (default ``cc``);
* ``ALIVE_CACHE`` the cache folder (default ``$XDG_CACHE_HOME/alive`` or ``~/.cache/alive``):
  one that only you can write, as the library found there is loaded.

Without a compiler (or when the build fails) a warning says so once and everything still
works, through PyTorch operations.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "disabled", "library", "separation_forward", "separation_backward", "AGGREGATIONS"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "separation.c"
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
AGGREGATIONS = {"paper": 0, "squared_sum": 1, "mean": 2}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_suspended = False  # inside disabled()


def _cache_dir() -> Path:
    root = os.environ.get("ALIVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "alive")
    return Path(root) / "native"


def _off_by_environment() -> bool:
    value = os.environ.get("ALIVE_NATIVE", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes", ""):
        raise ValueError(f"ALIVE_NATIVE must be 0 or 1, got {value!r}")
    return value in ("0", "false", "off", "no")


def _target(compiler: list[str]) -> Path:
    """Where the library for these sources, this compiler and this machine is cached."""
    sources = [f.read_bytes() for f in sorted(SOURCE.parent.iterdir()) if f.suffix in (".c", ".h")]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(compiler + list(FLAGS)).encode(),
                                     platform.machine().encode(), sys.platform.encode()])).hexdigest()[:16]
    return _cache_dir() / f"separation-{key}{'.dll' if sys.platform == 'win32' else '.so'}"


def _build(compiler: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # a private name, then an atomic rename: worker processes may build at the same time
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".separation-", suffix=target.suffix)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              errors="replace", timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-2000:]}")
        if os.path.getsize(tmp) == 0:
            raise RuntimeError(f"{' '.join(compiler)} wrote no library")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(compiler: list[str]) -> ctypes.CDLL:
    """The cached library, built first if missing; one that does not load is built again."""
    target = _target(compiler)
    if target.exists():
        try:
            return _bind(ctypes.CDLL(str(target)))
        except (OSError, AttributeError):  # a damaged file (e.g. a copy cut short): replace it
            target.unlink(missing_ok=True)
    _build(compiler, target)
    return _bind(ctypes.CDLL(str(target)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for sfx in _SUFFIX.values():
        fwd, bwd = getattr(lib, f"sep_forward_{sfx}"), getattr(lib, f"sep_backward_{sfx}")
        fwd.argtypes = [p, p, i64, i64, i64, p, p, p, f64, f64, i32, p, p, p]
        bwd.argtypes = [p, p, i64, i64, i64, p, p, p, f64, f64, i32, p, p, p, p, p]
        fwd.restype = bwd.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; ``None`` if turned off or unbuildable."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        if not _off_by_environment():
            try:
                _library = _load(shlex.split(os.environ.get("CC") or "cc"))
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError, AttributeError) as err:
                log.warning("alive: the native separation kernel is not available (%s); the penalty uses "
                            "PyTorch operations, which are slower on thin networks. Set CC to a C compiler "
                            "(or ALIVE_CACHE to a writable folder), or ALIVE_NATIVE=0 to silence this.", err)
        _tried = True
    return _library


def available() -> bool:
    """Whether the native kernels are used (builds them on the first call)."""
    return not _suspended and library() is not None


@contextlib.contextmanager
def disabled():
    """Within the block no new computation uses the kernels (side-by-side comparisons, tests);
    a backward pass of one made before still can."""
    global _suspended
    before, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = before


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the native separation kernel is not available (see alive.native.available())")
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def separation_forward(zh: Tensor, zl: Tensor, coef_u: Tensor, coef_p: Tensor, real_units: Tensor | None,
                       rho: float, margin: float, aggregation: str, first: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(out, extremes, arg_extremes)``: ``out[k] = coef_u[k]·A(s_U) + coef_p[k]·A(s_P)`` for
    each layer ``k`` of the stacks ``zh`` (maxima) and ``zl`` (minima, ``zh`` itself for dense
    layers), ``(n, points, units)`` contiguous CPU tensors of one float dtype; ``A`` the
    aggregation; ``real_units`` (int32 ``(n,)``) keeps trailing padded units out. The extremes
    (and, for ``first`` ties, their first positions) feed :func:`separation_backward`."""
    n, P, U = zh.shape
    E = 2 * U + 2 * P
    ext = zh.new_empty(n, E)
    idx = torch.empty(n, E, dtype=torch.int32) if first else None
    out = zh.new_empty(n)
    fn = getattr(_loaded(), f"sep_forward_{_SUFFIX[zh.dtype]}")
    if fn(zh.data_ptr(), zl.data_ptr(), n, P, U, _ptr(real_units), coef_u.data_ptr(), coef_p.data_ptr(),
          rho, margin, AGGREGATIONS[aggregation], ext.data_ptr(), _ptr(idx), out.data_ptr()):
        raise MemoryError("the native separation kernel could not allocate its work buffer")
    return out, ext, idx


def separation_backward(zh: Tensor, zl: Tensor, coef_u: Tensor, coef_p: Tensor, real_units: Tensor | None,
                        rho: float, margin: float, aggregation: str, ext: Tensor, idx: Tensor | None,
                        grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(d out/d zh, d out/d zl)`` weighted by ``grad`` (``(n,)``); the same tensor twice when
    ``zl is zh``. Tied extremes share their gradient equally unless ``idx`` (first ties) is given."""
    n, P, U = zh.shape
    dzh = torch.empty_like(zh)
    dzl = dzh if zl is zh else torch.empty_like(zl)
    fn = getattr(_loaded(), f"sep_backward_{_SUFFIX[zh.dtype]}")
    if fn(zh.data_ptr(), zl.data_ptr(), n, P, U, _ptr(real_units), coef_u.data_ptr(), coef_p.data_ptr(),
          rho, margin, AGGREGATIONS[aggregation], ext.data_ptr(), _ptr(idx), grad.data_ptr(),
          dzh.data_ptr(), dzl.data_ptr()):
        raise MemoryError("the native separation kernel could not allocate its work buffer")
    return dzh, dzl
