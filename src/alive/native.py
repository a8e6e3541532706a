"""Native CPU kernels, compiled on first use with the system's C compiler.

A thin deep network's separation penalty is a few small tensors per layer, and PyTorch's CPU
operations on them cost far more in per-operation latency than in arithmetic (a 50-layer,
4-unit MLP: 1.32-1.48x the plain training step). The C99 kernels of ``csrc/separation.c``
(and the headers it includes) do that work in C:

* ``separation_body.h``: the penalty of a stack of layers, and its gradient, in one pass per
  layer; :mod:`alive.functional` uses it for CPU float32/float64 tensors and falls back to its
  PyTorch operations wherever it does not apply;
* ``position_extremes.h``: the max and min of feature maps over their positions in one pass,
  and their gradient at the rows that have one (:func:`position_extremes`,
  :func:`position_spread`), for :class:`alive.functional._PositionExtremes` on CPU tensors;
* ``linked_relu.h``: the mirror-linked ReLU, one pass each way (:func:`linked_relu_rows`),
  which :func:`alive.functional.linked_relu` uses for large CPU tensors;
* ``dense_stack.h`` (:class:`DenseStack`): the forward and backward pass of a whole stack of
  dense ReLU networks (BatchNorm and the penalty included), each network at its own width, for
  the grid engine (:class:`alive.grid.GridStack`), where hundreds of networks of 1-25 units made
  PyTorch's per-call costs and the padding to the widest network the bulk of the time;
* ``dense_penalty.cpp`` (:func:`dense_penalty`): a C++ autograd node, built against the
  installed PyTorch, for the penalty of a deep rectangular MLP's layers (the constraint's
  common case): it calls the penalty kernel on each layer where the layer lies, without a
  stacking copy, and gives each layer a gradient tensor of its own, into which autograd then
  adds the activation's gradient in place (the Python node's were views of one stacked
  gradient, each added into a new tensor); no Python runs in either pass. Optional: without a
  C++20 compiler the Python node does the same, slightly slower.

On x86-64 Linux with GCC the hot loops are also compiled for AVX2 + FMA, chosen at load time
where the CPU has them. Where PyTorch runs on GNU OpenMP (Linux wheels) the library is built
with ``-fopenmp`` and so shares PyTorch's thread pool: large tensors (the linked ReLU, feature
maps) are split among ``torch.get_num_threads()`` threads; elsewhere the kernels are serial.
As for PyTorch's own operations, a process forked after that pool ran must use one thread
(``torch.set_num_threads(1)``, as DataLoader workers do; :mod:`alive.workers` spawns).
The library is built once per source version into a per-user cache.

Environment:

* ``ALIVE_NATIVE=0`` turns the kernels off (PyTorch operations: bit for bit the results of the
  engine before the kernels);
* ``CC`` names the compiler (default ``cc``), ``CXX`` the C++ one (default ``c++``);
* ``ALIVE_CACHE`` the cache folder (default ``$XDG_CACHE_HOME/alive`` or ``~/.cache/alive``):
  one that only you can write, as the library found there is loaded.

Without a compiler (or when the build fails) a warning says so once and everything still
works, through PyTorch operations. A failed build of the C++ node is said once and remembered
beside it (a ``.failed`` file: delete it to try again).
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

__all__ = ["available", "disabled", "library", "dense_penalty", "separation_penalty", "linked_relu_rows",
           "linked_relu_rows_grad", "position_extremes", "position_spread", "DenseStack", "AGGREGATIONS"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "separation.c"
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
LIBS = ("-lm",)
OPENMP = ("-fopenmp",)
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


PYTORCH_OPENMP = frozenset({"libgomp.so.1"})  # the runtime PyTorch's Linux wheels load (their own copy, this soname)


def _shares_pytorch_openmp() -> bool:
    """Whether a library built with ``-fopenmp`` would share PyTorch's OpenMP thread pool: on
    Linux, where PyTorch's parallel backend is OpenMP and the GNU runtime it loaded answers to
    the name ``libgomp.so.1`` the library asks for (a wheel with a renamed copy, or another
    runtime, would give a second pool competing for the cores: the kernels then stay serial)."""
    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    return _openmp_runtimes() == PYTORCH_OPENMP


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (Linux), by file name (libgomp.so.1.x as libgomp.so.1)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/lib" in line}
    return {"libgomp.so.1" if name.startswith("libgomp.so.1") else name for name in names
            if name.startswith(("libgomp", "libomp", "libiomp"))}


def _target(compiler: list[str], flags: tuple[str, ...] = FLAGS) -> Path:
    """Where the library for these sources, this compiler and flags and this machine is cached."""
    sources = [f.read_bytes() for f in sorted(SOURCE.parent.iterdir()) if f.suffix in (".c", ".h")]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(compiler + list(flags) + list(LIBS)).encode(),
                                     platform.machine().encode(), sys.platform.encode()])).hexdigest()[:16]
    return _cache_dir() / f"separation-{key}{'.dll' if sys.platform == 'win32' else '.so'}"


def _build(compiler: list[str], target: Path, flags: tuple[str, ...] = FLAGS) -> None:
    _compile(compiler, target, lambda out: [*compiler, *flags, "-o", out, str(SOURCE), *LIBS])


def _compile(compiler: list[str], target: Path, command, timeout: float = 300) -> None:
    """Run ``command(out)``, a compiler writing the library ``out``, and move it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # a private name, then an atomic rename: worker processes may build at the same time
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem.rsplit('-', 1)[0]}-", suffix=target.suffix)
    os.close(fd)
    try:
        done = subprocess.run(command(tmp), capture_output=True, text=True, errors="replace", timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-2000:]}")
        if os.path.getsize(tmp) == 0:
            raise RuntimeError(f"{' '.join(compiler)} wrote no library")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(compiler: list[str]) -> ctypes.CDLL:
    """The cached library, built first if missing; one that does not load is built again.
    With OpenMP where it shares PyTorch's pool (:func:`_shares_pytorch_openmp`) and the
    compiler can: an OpenMP build that fails, or brings in another runtime, is remembered beside
    the library (delete the ``.failed`` file to try again), and the serial one is used."""
    failed, why = None, None
    if _shares_pytorch_openmp():
        target = _target(compiler, FLAGS + OPENMP)
        failed = target.with_suffix(".failed")
        if not failed.exists():
            try:
                lib = _open(compiler, target, FLAGS + OPENMP)
                runtimes = _openmp_runtimes()
                if runtimes == PYTORCH_OPENMP:
                    return lib
                # (a compiler whose OpenMP is another runtime, e.g. clang's libomp: a second pool,
                # and thread numbers asked of the wrong one; the serial library calls neither)
                why = RuntimeError(f"its OpenMP runtime is not PyTorch's: {sorted(runtimes)}")
            except (OSError, RuntimeError, AttributeError) as err:  # (a timeout is not remembered)
                why = err
            except subprocess.SubprocessError as err:
                log.info("alive: the native kernels are built without OpenMP this time (%s)", err)
    lib = _open(compiler, _target(compiler), FLAGS)
    if why is not None:  # (only OpenMP failed: the next process goes straight to the serial one)
        log.info("alive: the native kernels are built without OpenMP (%s)", why)
        with contextlib.suppress(OSError):
            failed.write_text(f"{why}\n")
    return lib


def _open(compiler: list[str], target: Path, flags: tuple[str, ...]) -> ctypes.CDLL:
    if target.exists():
        try:
            return _bind(ctypes.CDLL(str(target)))
        except (OSError, AttributeError):  # a damaged file (e.g. a copy cut short): replace it
            target.unlink(missing_ok=True)
    _build(compiler, target, flags)
    return _bind(ctypes.CDLL(str(target)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for sfx in _SUFFIX.values():
        fn = getattr(lib, f"sep_penalty_{sfx}")
        fn.argtypes = [p, p, i64, i64, i64, p, p, p, f64, f64, i32, i32, p, f64, p, p, p]
        fn.restype = i32
        fwd, bwd = getattr(lib, f"linked_relu_forward_{sfx}"), getattr(lib, f"linked_relu_backward_{sfx}")
        fwd.argtypes, bwd.argtypes = [p, i64, i64, p, i32], [p, p, i64, i64, p, i32]
        fwd.restype = bwd.restype = i32
        ext, spread = getattr(lib, f"position_extremes_{sfx}"), getattr(lib, f"position_spread_{sfx}")
        ext.argtypes = [p, i64, i64, i64, i64, i64, i64, p, p, i32]
        spread.argtypes = [p, i64, i64, i64, i64, i64, i64, p, p, i64, p, p, i32]
        ext.restype = spread.restype = i32
        count = getattr(lib, f"spread_count_{sfx}")
        count.argtypes, count.restype = [p, p, i64], i64
    fwd, bwd = lib.stack_forward_f32, lib.stack_backward_f32
    shape = [p, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, i64, i64]
    fwd.argtypes = shape + [p, p, f64, f64, p, p, f64, f64, i32, i32, p, p, p, p, p]
    bwd.argtypes = shape + [p, p, f64, f64, i32, p, p, p, p, p, p]
    fwd.restype = bwd.restype = i32
    lib.stack_saved_f32.argtypes = [p, p, i64, i64, i32]
    lib.stack_saved_f32.restype = i64
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
                log.warning("alive: the native kernels are not available (%s); the separation penalty and the "
                            "grid engine use PyTorch operations, which are slower on thin networks. Set CC to a C compiler "
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


CPP_SOURCE = SOURCE.with_name("dense_penalty.cpp")
CPP_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC")
_cpp_op = None
_cpp_tried = False


def _cpp_target(compiler: list[str]) -> Path:
    """Where the C++ node for this source, compiler and PyTorch build is cached."""
    sources = [CPP_SOURCE.read_bytes(), CPP_SOURCE.with_name("sep_penalty.h").read_bytes()]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(compiler + list(CPP_FLAGS)).encode(),
                                     torch.__version__.encode(), str(Path(torch.__file__).parent).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    return _cache_dir() / f"dense-penalty-{key}.so"


def _cpp_command(compiler: list[str], out: str) -> list[str]:
    root = Path(torch.__file__).parent
    lib = root / "lib"
    return [*compiler, *CPP_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-I", str(root / "include"), "-o", out, str(CPP_SOURCE), "-L", str(lib), "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{lib}"]


def _build_cpp(compiler: list[str], target: Path) -> None:
    log.info("alive: building the C++ node of the separation penalty (once, about 15 s)")
    _compile(compiler, target, lambda out: _cpp_command(compiler, out), timeout=600)


def _dense_penalty_graph(zs, coef_u, coef_p, rho, margin, agg, first, scale, grad):
    """The C++ node's gradient as a graph (a double backward): the reference's, differentiated."""
    from .functional import _reference_penalty  # (functional imports this module)

    aggregation, ties = next(k for k, v in AGGREGATIONS.items() if v == agg), "first" if first else "split"
    # the penalty's own (partial) derivatives: with respect to the stack, not to the layers, from
    # each of which the graph also leads through the next layers to the penalty
    zh = torch.stack(zs)
    out = scale * _reference_penalty(zh, None, coef_u, coef_p, None, rho, margin, aggregation, ties).sum()
    (g,) = torch.autograd.grad(out, zh, grad, create_graph=True, allow_unused=True)
    return list((torch.zeros_like(zh) if g is None else g).unbind(0))


_graph_impl = None  # the Python implementation of alive_native::dense_penalty_graph, kept registered


class _Remembered(RuntimeError):
    """The C++ node's build failed (said once, remembered beside the library)."""


def _open_cpp(target: Path) -> bool:
    """Load the built node at ``target``; ``False`` if there is none (a damaged one is removed)."""
    if not target.exists():
        return False
    try:
        torch.ops.load_library(str(target))
        return True
    except OSError:  # a damaged file (e.g. a copy cut short): built again
        target.unlink(missing_ok=True)
        return False


def _load_cpp_library(compiler: list[str]) -> None:
    """Load the node's library, built first if missing; one process builds while the others
    wait. A failed build is remembered beside it (``.failed``) and said once."""
    target = _cpp_target(compiler)
    failed = target.with_suffix(".failed")
    if _open_cpp(target):
        return
    if failed.exists():
        raise _Remembered(f"an earlier build failed (delete {failed} to try again)")
    import fcntl  # (POSIX; the node is built on Linux only)

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _open_cpp(target):  # built by another process meanwhile
            return
        try:
            _build_cpp(compiler, target)
            torch.ops.load_library(str(target))
        except (OSError, RuntimeError) as err:
            with contextlib.suppress(OSError):
                failed.write_text(f"{err}\n")
            log.warning("alive: the C++ node of the separation penalty could not be built (%s); deep rectangular MLPs "
                        "use the Python node, a few per cent of a training step slower. Set CXX to a C++20 compiler "
                        "and delete %s to try again.", err, failed)
            raise _Remembered(str(err)) from err


def _load_cpp(lib: ctypes.CDLL, compiler: list[str]):
    global _graph_impl
    # a second library of the same operators would abort the process: one already loaded (by
    # this module before a reload, or from another cache) serves
    if not hasattr(torch.ops.alive_native, "dense_penalty"):
        _load_cpp_library(compiler)
    ops = torch.ops.alive_native
    ops.set_kernels(*(ctypes.cast(getattr(lib, f"sep_penalty_{s}"), ctypes.c_void_p).value for s in ("f32", "f64")))
    if _graph_impl is None:
        impl = torch.library.Library("alive_native", "IMPL")
        with contextlib.suppress(RuntimeError):  # (registered by this module before a reload: that one serves)
            impl.impl("dense_penalty_graph", _dense_penalty_graph, "CompositeImplicitAutograd")
        _graph_impl = impl
    return ops.dense_penalty.default


def dense_penalty():
    """The C++ autograd node ``dense_penalty(zs, coef_u, coef_p, rho, margin, agg, first, scale)``:
    ``scale`` × the sum over the same-shaped ``(points, units)`` CPU layers ``zs`` of
    ``coef_u·g_U + coef_p·g_P`` (``agg``: the aggregation's code in :data:`AGGREGATIONS`;
    ``first``: ties ``"first"``), by :func:`separation_penalty`'s kernel, with its gradient. Built
    on first use against the installed PyTorch (Linux, a C++20 compiler: ``CXX``, default
    ``c++``; about 15 s, once); ``None`` where it cannot be, and inside :func:`disabled`. The
    Python node of :mod:`alive.functional` then gives the same bits, with a stacking copy and
    autograd's per-layer views and additions around it: a 50-layer, 4-unit MLP's training step
    ~2 % slower (``bench/overhead.py``'s MLP ratio 0.01–0.02 higher, side by side). A backward
    pass that builds a graph (``create_graph``) differentiates the PyTorch reference instead."""
    global _cpp_op, _cpp_tried
    if _suspended:
        return None
    if _cpp_tried:
        return _cpp_op
    lib = library()
    with _lock:
        if not _cpp_tried:
            if lib is not None and sys.platform.startswith("linux"):
                compiler = shlex.split(os.environ.get("CXX") or "c++")
                try:
                    _cpp_op = _load_cpp(lib, compiler)
                except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                    log.info("alive: the C++ node of the separation penalty is not used (%s)", err)
            _cpp_tried = True
    return _cpp_op


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (see alive.native.available())")
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def separation_penalty(zh: Tensor, zl: Tensor, coef_u: Tensor, coef_p: Tensor, real_units: Tensor | None,
                       rho: float, margin: float, aggregation: str, first: bool, scale: float | None = None,
                       grad: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(out, d_zh, d_zl)``: ``out[k] = coef_u[k]·A(s_U) + coef_p[k]·A(s_P)`` for each layer
    ``k`` of the stacks ``zh`` (maxima) and ``zl`` (minima, ``zh`` itself for dense layers),
    ``(n, points, units)`` contiguous CPU tensors of one float dtype; ``A`` the aggregation;
    ``real_units`` (int32 ``(n,)``) keeps trailing padded units out. With ``scale``, ``out`` is
    instead ``scale·Σ_k out[k]`` (0-dim). With ``grad``, also the gradient of ``out`` (of
    ``Σ_k out[k]`` without ``scale``) with respect to ``zh`` and ``zl`` (the same tensor twice when
    ``zl is zh``; else ``None``), computed in the same pass over each layer: a backward pass
    then only scales it. Tied extremes share their gradient equally unless ``first``."""
    n, P, U = zh.shape
    out = zh.new_empty(n)
    total = None if scale is None else zh.new_empty(())
    dzh = torch.empty_like(zh) if grad else None
    dzl = dzh if zl is zh or not grad else torch.empty_like(zl)
    fn = _kernel("sep_penalty", zh.dtype)
    if fn(zh.data_ptr(), zl.data_ptr(), n, P, U, _ptr(real_units), coef_u.data_ptr(), coef_p.data_ptr(),
          rho, margin, AGGREGATIONS[aggregation], int(first), out.data_ptr(), 1.0 if scale is None else scale,
          _ptr(total), _ptr(dzh), _ptr(dzl)):
        raise MemoryError("the native separation kernel could not allocate its work buffer")
    return out if total is None else total, dzh, dzl


def linked_relu_rows(z: Tensor, rows: int, length: int, out: Tensor) -> None:
    """``out`` ← the mirror-linked ReLU of ``z``: each of ``rows`` rows of ``length`` elements
    of ``z`` (in memory order) becomes ``relu(z)`` then ``relu(-z)``, two rows of ``out``. CPU
    float32/float64 tensors laid out so in memory (the caller checks). Large tensors are split
    among ``torch.get_num_threads()`` threads of PyTorch's pool where the library shares it."""
    _kernel("linked_relu_forward", z.dtype)(z.data_ptr(), rows, length, out.data_ptr(), _threads(rows * length))


def linked_relu_rows_grad(grad: Tensor, out: Tensor, rows: int, length: int, dz: Tensor) -> None:
    """``dz`` ← the gradient of :func:`linked_relu_rows` for the output gradient ``grad`` (laid
    out as ``out``), read from its output: ``g_pos·[out_pos > 0] − g_neg·[out_neg > 0]``."""
    _kernel("linked_relu_backward", out.dtype)(grad.data_ptr(), out.data_ptr(), rows, length, dz.data_ptr(),
                                               _threads(rows * length))


def position_extremes(z: Tensor, hi: Tensor, lo: Tensor) -> None:
    """``hi``, ``lo`` (``(N, C)``, contiguous) ← the max and min over the positions of each row
    and channel of ``z``, a ``(N, C, S)`` view of feature maps (any strides; one pass over
    memory where the positions, or the channels (channels-last), are contiguous); NaN where one
    is. CPU float32/float64 tensors (the caller checks)."""
    n, c, s = z.shape
    for out in (hi, lo):  # (the kernel writes n·c elements of z's type through raw pointers)
        if out.dtype != z.dtype or out.numel() != n * c or not out.is_contiguous():
            raise ValueError(f"position_extremes: hi and lo must be contiguous {z.dtype} tensors of {n * c} elements")
    _kernel("position_extremes", z.dtype)(z.data_ptr(), n, c, s, *z.stride(), hi.data_ptr(), lo.data_ptr(),
                                          _threads(z.numel()))


def position_spread(z: Tensor, g_hi: Tensor, g_lo: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient of :func:`position_extremes` at the rows where the upstream gradients
    ``g_hi`` (of the maxima) or ``g_lo`` (minima), contiguous ``(N, C)`` of ``z``'s dtype, are
    non-zero: ``(index, values)``, ``index`` int64 ``(2, k)`` the rows' ``n`` and ``c`` (the
    maxima's rows first, each part in row order), ``values`` ``(k, S)`` the row's gradient shared
    equally among the positions that hold its extreme."""
    n, c, s = z.shape
    for g in (g_hi, g_lo):
        if g.dtype != z.dtype or g.numel() != n * c or not g.is_contiguous():
            raise ValueError(f"position_spread: g_hi and g_lo must be contiguous {z.dtype} tensors of {n * c} elements")
    k = _kernel("spread_count", z.dtype)(g_hi.data_ptr(), g_lo.data_ptr(), n * c)
    index = torch.empty(2, k, dtype=torch.int64)
    values = z.new_empty(k, s)
    if k and _kernel("position_spread", z.dtype)(z.data_ptr(), n, c, s, *z.stride(), g_hi.data_ptr(), g_lo.data_ptr(),
                                                 k, index.data_ptr(), values.data_ptr(), _threads(k * s)):
        raise RuntimeError("position_spread: the gradients changed while it ran")
    return index, values


GRAIN = 32768  # elements per thread below which one thread does it all (PyTorch's own grain size)


def _threads(elements: int) -> int:
    return torch.get_num_threads() if elements >= 2 * GRAIN else 1


_kernels: tuple = (None, {})


def _kernel(name: str, dtype: torch.dtype):
    """The kernel ``name`` for ``dtype``, looked up once per loaded library (every call counts
    on a thin net)."""
    global _kernels
    lib = _loaded()
    if _kernels[0] is not lib:
        _kernels = lib, {}
    found = _kernels[1].get((name, dtype))
    if found is None:
        found = _kernels[1][name, dtype] = getattr(lib, f"{name}_{_SUFFIX[dtype]}")
    return found


class DenseStack:
    """A stack of rectangular dense ReLU networks as the native kernels of
    ``csrc/dense_stack.h`` see it (the grid engine's :class:`alive.grid.GridStack`): each network
    runs at its own width, the whole stack in one call per pass. float32 CPU tensors only.

    ``depths`` / ``widths``: per network, deepest first; ``offsets``: element offsets into the
    flat parameter, per layer ``"weight"``, ``"bias"`` (and ``"gamma"``, ``"beta"`` with
    BatchNorm), and ``"head_w"``, ``"head_b"``; ``running``: each layer's running mean and
    variance buffers (``(nets, wm)``, BatchNorm only); ``coef_u`` / ``coef_p``: each network's
    λ (both or neither: no penalty).

    A training :meth:`forward` returns what its :meth:`backward` reads; :meth:`backward` hands
    those buffers back for the next pass (a training loop then does not page-fault tens of MB
    in every step), and a pass dropped without a backward simply lets them go.
    """

    def __init__(self, depths, widths, wm: int, inputs: int, classes: int, offsets: dict,
                 running: list[tuple[Tensor, Tensor]] | None, eps: float, momentum: float,
                 coef_u: Tensor | None, coef_p: Tensor | None, rho: float, margin: float, aggregation: str):
        self.depth = torch.tensor(list(depths), dtype=torch.int32)
        self.width = torch.tensor(list(widths), dtype=torch.int32)
        if len(self.depth) != len(self.width) or not len(self.depth):
            raise ValueError("DenseStack needs one depth and one width per network")
        if (self.width < 1).any() or (self.width > wm).any() or (self.depth < 1).any():
            raise ValueError("DenseStack needs widths in 1..wm and depths >= 1")
        if (self.depth[1:] > self.depth[:-1]).any():
            raise ValueError("DenseStack needs the networks sorted by depth, deepest first")
        if min(inputs, classes) < 1:
            raise ValueError(f"DenseStack needs inputs and classes >= 1, got {inputs} and {classes}")
        self.n, self.wm, self.inputs, self.classes = len(self.depth), wm, inputs, classes
        layers = int(self.depth[0])
        self.batchnorm = running is not None
        keys = ("weight", "bias", "gamma", "beta") if self.batchnorm else ("weight", "bias")
        for k in keys:
            if len(offsets[k]) != layers:
                raise ValueError(f"DenseStack needs {layers} {k} offsets, got {len(offsets[k])}")
        self.offsets = {k: torch.tensor(offsets[k], dtype=torch.int64) for k in keys}
        self.head = int(offsets["head_w"]), int(offsets["head_b"])
        # how far into the flat parameter the kernels read and write: checked on every call
        nets = [int((self.depth > l).sum()) for l in range(layers)]
        ends = [self.head[0] + self.n * wm * classes, self.head[1] + self.n * classes]
        for l, n in enumerate(nets):
            ends.append(int(self.offsets["weight"][l]) + n * (inputs if l == 0 else wm) * wm)
            ends += [int(self.offsets[k][l]) + n * wm for k in keys[1:]]
        if min(min(int(self.offsets[k].min()) for k in keys), *self.head) < 0:
            raise ValueError("DenseStack offsets must be >= 0")
        self.extent = max(ends)
        if running is not None:
            if len(running) != layers or any(
                    t.numel() < n * wm or not t.is_contiguous() or t.dtype != torch.float32 or t.device.type != "cpu"
                    for pair, n in zip(running, nets) for t in pair):
                raise ValueError("DenseStack needs, per layer, contiguous float32 CPU running statistics of (nets, wm)")
        self.running = running
        self.eps, self.momentum = float(eps), float(momentum)
        if (coef_u is None) != (coef_p is None):
            raise ValueError("DenseStack takes both coef_u and coef_p, or neither")
        for c in (coef_u, coef_p):
            if c is not None and (c.numel() != self.n or c.device.type != "cpu"):
                raise ValueError(f"DenseStack needs coef_u and coef_p of {self.n} values on the CPU")
        self.penalised = coef_u is not None and bool(((coef_u != 0) | (coef_p != 0)).any())
        self.coef_u = coef_u.detach().float().contiguous() if self.penalised else None
        self.coef_p = coef_p.detach().float().contiguous() if self.penalised else None
        self.rho, self.margin, self.agg = float(rho), float(margin), AGGREGATIONS[aggregation]
        # rows of the penalty's extremes a training pass keeps: one per layer of a penalised network
        self.penalty_blocks = int(self.depth[(self.coef_u != 0) | (self.coef_p != 0)].sum()) if self.penalised else 0
        self._spare: tuple | None = None  # (save, ext, idx) handed back by the last backward
        self._spare_lock = threading.Lock()

    def _buffers(self, lib: ctypes.CDLL, points: int) -> tuple:
        """Buffers for a training pass of ``points`` points: the spare ones when large enough
        (the layout for fewer points is a prefix of that for more)."""
        need = lib.stack_saved_f32(self.depth.data_ptr(), self.width.data_ptr(), self.n, points, int(self.batchnorm))
        size = self.penalty_blocks * (2 * self.wm + 2 * points)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[0].numel() >= need and spare[1].numel() >= size:
            return spare
        return torch.empty(need), torch.empty(size), torch.empty(size, dtype=torch.int32)

    def _common(self, flat: Tensor, x: Tensor, points: int) -> list:
        o = self.offsets
        return [x.data_ptr(), 0 if x.dim() == 2 else points * self.inputs, self.n, points, self.inputs, self.classes,
                self.wm, self.depth.data_ptr(), self.width.data_ptr(), flat.data_ptr(), o["weight"].data_ptr(),
                o["bias"].data_ptr(), _ptr(o.get("gamma")), _ptr(o.get("beta")), *self.head]

    def _check(self, flat: Tensor, x: Tensor) -> int:
        if flat.dtype != torch.float32 or x.dtype != torch.float32 or flat.device.type != "cpu" or x.device.type != "cpu":
            raise ValueError("DenseStack runs on float32 CPU tensors")
        if not (flat.is_contiguous() and x.is_contiguous()):
            raise ValueError("DenseStack needs contiguous tensors")
        if flat.numel() < self.extent:
            raise ValueError(f"DenseStack: the flat parameter has {flat.numel()} elements, its offsets need {self.extent}")
        if x.shape[-1] != self.inputs or x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] != self.n):
            raise ValueError(f"DenseStack takes inputs (points, {self.inputs}) or ({self.n}, points, {self.inputs}), "
                             f"got {tuple(x.shape)}")
        if x.shape[-2] < 1:
            raise ValueError("DenseStack needs at least one point")
        return x.shape[-2]

    def forward(self, flat: Tensor, x: Tensor, train: bool) -> tuple[Tensor, Tensor, tuple | None]:
        """``(logits (nets, points, classes), penalty (nets,), saved)``; ``saved`` (for
        :meth:`backward`) only when ``train``: BatchNorm then normalises by the batch and
        updates its running statistics, and the penalty is computed."""
        P = self._check(flat, x)
        if train and self.batchnorm and P < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {P} point")  # as BatchNorm
        lib = _loaded()
        logits = torch.empty(self.n, P, self.classes)
        pen = torch.zeros(self.n)
        save, ext, idx = self._buffers(lib, P) if train else (None, None, None)
        rm = rv = None
        if self.batchnorm:
            rm = (ctypes.c_void_p * len(self.running))(*[m.data_ptr() for m, _ in self.running])
            rv = (ctypes.c_void_p * len(self.running))(*[v.data_ptr() for _, v in self.running])
        pen_args = (_ptr(self.coef_u), _ptr(self.coef_p)) if self.penalised else (None, None)
        if lib.stack_forward_f32(*self._common(flat, x, P), rm, rv, self.eps, self.momentum, *pen_args, self.rho,
                                 self.margin, self.agg, int(train), _ptr(save), _ptr(ext), _ptr(idx),
                                 logits.data_ptr(), pen.data_ptr()):
            raise MemoryError("the native dense stack kernel could not allocate its work buffer")
        return logits, pen, (_Pass(self, P, (save, ext, idx)) if train else None)

    def backward(self, flat: Tensor, x: Tensor, saved: tuple, grad_logits: Tensor, grad_pen: Tensor | None) -> Tensor:
        """The gradient with respect to ``flat`` of ``Σ grad_logits·logits + Σ grad_pen·penalty``
        for the training pass that returned ``saved`` (``flat`` and ``x`` as they were then);
        its buffers go back for the next pass, so ``saved`` serves one backward."""
        P = self._check(flat, x)
        if not (isinstance(saved, _Pass) and saved.stack is self and saved.points == P):
            raise ValueError(f"DenseStack.backward needs what this stack's forward pass of these {P} points returned")
        if saved.buffers is None:
            raise RuntimeError("DenseStack.backward: this pass's backward was already run (its buffers are reused)")
        save, ext, idx = saved.buffers
        grad_logits = grad_logits.float().contiguous()
        if grad_logits.shape != (self.n, P, self.classes) or grad_logits.device.type != "cpu":
            raise ValueError(f"DenseStack.backward: gradient of shape {tuple(grad_logits.shape)} for logits "
                             f"{(self.n, P, self.classes)}")
        gpen = None
        if grad_pen is not None and self.penalised:
            gpen = grad_pen.float().contiguous()
            if gpen.numel() != self.n or gpen.device.type != "cpu":
                raise ValueError(f"DenseStack.backward: {gpen.numel()} penalty gradients for {self.n} networks")
        grad = torch.zeros_like(flat)
        pen_args = (_ptr(self.coef_u), _ptr(self.coef_p)) if self.penalised else (None, None)
        if _loaded().stack_backward_f32(*self._common(flat, x, P), *pen_args, self.rho, self.margin, self.agg,
                                        save.data_ptr(), _ptr(ext), _ptr(idx), grad_logits.data_ptr(), _ptr(gpen),
                                        grad.data_ptr()):
            raise MemoryError("the native dense stack kernel could not allocate its work buffer")
        with self._spare_lock:
            self._spare, saved.buffers = saved.buffers, None
        return grad


class _Pass:
    """What a training pass of a :class:`DenseStack` saved for its backward (once)."""

    __slots__ = ("stack", "points", "buffers")

    def __init__(self, stack: DenseStack, points: int, buffers: tuple):
        self.stack, self.points, self.buffers = stack, points, buffers
