"""The result store: one small JSON record per training run, keyed by a hash of its configuration.

``results/<experiment>/<key>.json`` where ``key = RunConfig.key(precision)`` hashes every
field of the configuration, the resolved precision and :data:`alive.config.RESULT_VERSION`.
:func:`run` returns the stored record when there is one and trains (then stores) otherwise;
:func:`sweep` does that for many configurations, resumably and optionally sharded over
machines (``shard=(i, n)``); :func:`load` turns stored records into a pandas DataFrame.

Environment variables: ``ALIVE_RESULTS`` (the store folder, default ``./results``),
``ALIVE_NO_TRAIN=1`` (never train: a missing record raises :class:`MissingResult`; the
book's reproducibility check uses it) and ``ALIVE_WORKERS`` (how many trainings a sweep
runs at once, in worker processes, when ``workers`` is not given; default 1).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pickle
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd

from .config import ConfigError, RunConfig
from .workers import check_workers, in_workers

__all__ = ["Store", "MissingResult", "run", "sweep", "count_missing", "load", "histories", "parse_shard", "default_store"]

log = logging.getLogger("alive")


class MissingResult(LookupError):
    """A record is not stored and training is not allowed (``ALIVE_NO_TRAIN=1``)."""


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"2/8"`` or ``(2, 8)`` -> ``(2, 8)``; shard ``i`` of ``n`` takes every ``n``-th run."""
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i, n = (int(p) for p in shard.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 'i/n' (e.g. '0/4'), got {shard!r}") from None
    else:
        i, n = shard
    if n <= 0 or not 0 <= i < n:
        raise ValueError(f"shard i/n needs 0 <= i < n, got {i}/{n}")
    return i, n


class Store:
    """A folder of JSON records (default ``$ALIVE_RESULTS`` or ``./results``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        if root is None:
            root = os.environ.get("ALIVE_RESULTS") or project_folder("results")
        self.root = Path(root)

    def path(self, experiment: str, key: str) -> Path:
        return self.root / experiment / f"{key}.json"

    def checkpoint_path(self, experiment: str, key: str) -> Path:
        return self.root / experiment / f"{key}.ckpt"

    def get(self, cfg: RunConfig, precision: str) -> dict | None:
        p = self.path(cfg.experiment, cfg.key(precision))
        if not p.exists():
            return None
        with open(p) as f:
            return json.load(f)

    def put(self, record: dict) -> Path:
        """Write ``record`` atomically (temporary file + rename); returns its path."""
        exp = record["config"]["experiment"]
        p = self.path(exp, record["key"])
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(_clean(record), f, indent=1, sort_keys=True, allow_nan=False)
                f.write("\n")
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    @contextmanager
    def lock(self, experiment: str, key: str) -> Iterator[bool]:
        """An exclusive lock file so that two processes never train the same run at once.

        Yields False (and holds nothing) when another live process holds it.
        """
        p = self.root / experiment / f"{key}.lock"
        p.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _stale(p):
                    p.unlink(missing_ok=True)
                    continue
                yield False
                return
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}")
            try:
                yield True
            finally:
                p.unlink(missing_ok=True)
            return
        yield False

    def lock_holder(self, experiment: str, key: str) -> str:
        """Who holds the lock of a run, for error messages: the file, its host and pid, its age."""
        p = self.root / experiment / f"{key}.lock"
        try:
            holder = p.read_text().strip() or "(being written)"
            age = time.time() - p.stat().st_mtime
        except OSError:
            return f"{p} (gone)"
        return f"lock {p} held by {holder!r} for {age:.0f} s"

    def records(self, experiment: str | None = None) -> list[dict]:
        folders = [self.root / experiment] if experiment else sorted(p for p in self.root.iterdir() if p.is_dir())
        out = []
        for folder in folders:
            for p in sorted(folder.glob("*.json")):
                with open(p) as f:
                    out.append(json.load(f))
        return out


def project_folder(name: str) -> Path:
    """``name`` (``results``, ``profiles``) of the enclosing checkout (a folder with
    ``pyproject.toml``), else ``./name``: so a notebook run from ``notebooks/`` or ``book/`` finds
    the project's stored results and profiles. ``profiles`` (read only) are also found in the
    checkout the package is installed from (editable), from any folder."""
    here = Path.cwd().resolve()
    folders = [here, *here.parents]
    if name == "profiles":  # read only: never send results written elsewhere into the checkout
        folders.append(Path(__file__).resolve().parents[2])  # src/alive/results.py in an editable install
    for folder in folders:
        if (folder / "pyproject.toml").exists() and (folder / name).is_dir():
            return folder / name
    return here / name


def _stale(lock: Path, grace_s: float = 30.0) -> bool:
    """Whether ``lock`` (``"host pid"``) belongs to no running process. A lock still empty is
    being written (between its creation and the pid): live for ``grace_s``. A lock of another
    host cannot be checked from here and counts as live (remove it by hand if that run died)."""
    try:
        text = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return True
    if not text:
        return age > grace_s
    host, pid = (text[0], text[1]) if len(text) > 1 else (socket.gethostname(), text[0])
    if host != socket.gethostname():
        return False
    try:
        pid = int(pid)
    except ValueError:
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _clean(obj):
    """JSON-safe: NaN/inf become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def default_store() -> Store:
    return Store()


def _no_train() -> bool:
    return os.environ.get("ALIVE_NO_TRAIN", "") not in ("", "0")


def _precision(cfg: RunConfig, device) -> str:
    from .train import resolve_device, resolve_precision

    return resolve_precision(cfg.precision, resolve_device(device))


def run(config: RunConfig, store: Store | None = None, device=None, retrain: bool = False, **fit_kwargs) -> dict:
    """The record of ``config``: from the store if there, else trained, stored and returned.

    ``fit_kwargs`` go to :func:`alive.train.fit` (``compile``, ``progress``, ...); training
    checkpoints into the store every ``checkpoint_every`` epochs (default 10) and resumes
    from there if it was killed.
    """
    from .train import fit

    store = store or default_store()
    precision = _precision(config, device)
    if not retrain:
        rec = store.get(config, precision)
        if rec is not None:
            return rec
    if _no_train():
        raise MissingResult(
            f"no stored result for {config.label} (experiment {config.experiment!r}, key {config.key(precision)}) "
            "and ALIVE_NO_TRAIN is set"
        )
    key = config.key(precision)
    with store.lock(config.experiment, key) as mine:
        if not mine:
            raise RuntimeError(f"another process is training {config.experiment}/{key}: {store.lock_holder(config.experiment, key)}; "
                               "run again when it is done, or delete that lock file if its process is gone")
        fit_kwargs.setdefault("checkpoint", store.checkpoint_path(config.experiment, key))
        fit_kwargs.setdefault("checkpoint_every", 10)
        record = fit(config, device=device, **fit_kwargs)
        store.put(record)
    return record


def sweep(
    configs: Sequence[RunConfig],
    store: Store | None = None,
    device=None,
    shard=None,
    engine: str = "auto",
    progress: str = "auto",
    train: bool = True,
    retrain_before: str | None = None,
    workers: int | None = None,
    **fit_kwargs,
) -> list[dict]:
    """Records for every configuration, training only what is missing.

    A sweep killed half-way and restarted trains only the missing runs and never writes a
    record twice. ``shard="i/n"`` trains only the runs with ``index % n == i`` in the list of
    all runs sorted by key, so ``n`` machines or GPUs (a SLURM array, one process per GPU) can
    share one sweep and one store; the returned list then holds the records available so far. ``engine="auto"`` trains groups of small
    MLP/CNN grid cells together with :mod:`alive.grid` (same results, much faster);
    ``"single"`` trains one network at a time. ``workers``: how many grid groups, and then how
    many single runs, train at once in worker processes that share the CPU threads
    (:mod:`alive.workers`; default ``$ALIVE_WORKERS`` or 1); ``fit_kwargs`` must then be
    picklable (checked first; a ``data=`` dataset is copied to each run's worker).

    ``retrain_before`` (an ISO date or time, UTC unless it names a zone) counts records
    created before that moment as missing: they are trained again and overwritten, e.g. after
    a fix to what a record measures. Restartable like any sweep: a retrained record is newer.
    """
    from .grid import can_batch, group_configs, train_groups

    workers = _workers(workers)
    if workers > 1 and fit_kwargs:
        try:  # now, not after the grid stage: the single runs' options go to other processes
            pickle.dumps(fit_kwargs)
        except Exception as e:
            raise ConfigError(f"with workers > 1 the training options go to worker processes and must be picklable: {e}") from None
    store = store or default_store()
    stale_before = _retrain_moment(retrain_before) if retrain_before is not None else None
    i, n = parse_shard(shard)
    configs = list(configs)
    precision = {id(c): _precision(c, device) for c in configs}
    # shards own a fixed slice of *all* runs (sorted by key), so shards started at different
    # times, or restarted, never skip or duplicate a run
    ordered = sorted(_distinct_runs(configs, precision).items())
    pending = {k for k, c in ordered if _missing(store, c, precision[id(c)], stale_before)}
    mine = [c for j, (k, c) in enumerate(ordered) if j % n == i and k in pending]
    if mine and (_no_train() or not train):
        raise MissingResult(
            f"{len(mine)} of {len(configs)} results are not stored"
            + (" or older than retrain_before" if stale_before is not None else "")
            + f" (e.g. {mine[0].label} in {mine[0].experiment!r}) "
            "and training is off (ALIVE_NO_TRAIN or train=False)"
        )
    if mine:
        log.info("sweep: %d stored, %d to train here (shard %d/%d)", len(configs) - len(pending), len(mine), i, n)
    single = mine
    if engine != "single":
        batchable = [c for c in mine if can_batch(c)]
        single = [c for c in mine if not can_batch(c)]
        for _ in train_groups(group_configs(batchable, device=device), device=device, progress=progress,
                              workers=workers, store=store):
            pass  # each group's records are stored as it finishes
    calls = []
    for c in single:
        stale = stale_before is not None and _missing(store, c, precision[id(c)], stale_before)
        if stale:  # nor resume from a checkpoint of a run older than the fix
            ckpt = store.checkpoint_path(c.experiment, c.key(precision[id(c)]))
            if ckpt.exists() and datetime.datetime.fromtimestamp(ckpt.stat().st_mtime, datetime.timezone.utc) < stale_before:
                ckpt.unlink()
        calls.append((c, store, device, stale, progress, fit_kwargs))
    for _ in in_workers(_run, calls, workers, what="run"):
        pass  # each run stores its own record
    out = []
    for c in configs:
        rec = store.get(c, precision[id(c)])
        if rec is not None:
            out.append(rec)
    return out


def _run(config: RunConfig, store: Store, device, retrain: bool, progress: str, fit_kwargs: dict) -> None:
    """:func:`run` without returning the record (a worker process sends back nothing)."""
    run(config, store, device, retrain=retrain, progress=progress, **fit_kwargs)


def _workers(workers: int | None) -> int:
    """``workers``, or ``$ALIVE_WORKERS``, or 1; anything but a positive integer is refused."""
    if workers is None:
        text = os.environ.get("ALIVE_WORKERS", "").strip() or "1"
        try:
            workers = int(text)
        except ValueError:
            raise ConfigError(f"ALIVE_WORKERS must be a positive integer, got {text!r}") from None
    try:
        return check_workers(workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _missing(store: Store, config: RunConfig, precision: str, stale_before: datetime.datetime | None) -> bool:
    rec = store.get(config, precision)
    if rec is None:
        return True
    if stale_before is None:
        return False
    try:  # a record that does not say when it was made counts as old
        return _moment(rec["environment"]["created"]) < stale_before
    except (KeyError, TypeError, ConfigError):
        return True


def _distinct_runs(configs: Sequence[RunConfig], precision: dict[int, str]) -> dict[tuple[str, str], RunConfig]:
    """One configuration per stored run, ``(experiment, key)``: equal configurations train once."""
    runs: dict[tuple[str, str], RunConfig] = {}
    for c in configs:
        runs.setdefault((c.experiment, c.key(precision[id(c)])), c)
    return runs


def count_missing(configs: Sequence[RunConfig], store: Store | None = None, device=None, retrain_before: str | None = None) -> int:
    """How many of ``configs`` (distinct runs) :func:`sweep` would train, with the same arguments."""
    store = store or default_store()
    stale_before = _retrain_moment(retrain_before) if retrain_before is not None else None
    precision = {id(c): _precision(c, device) for c in configs}
    return sum(_missing(store, c, precision[id(c)], stale_before) for c in _distinct_runs(configs, precision).values())


def _moment(text: str) -> datetime.datetime:
    """An ISO date or time as an aware datetime (UTC when it names no zone; ``Z`` is UTC)."""
    try:
        t = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except (TypeError, ValueError, AttributeError):
        raise ConfigError(f"not an ISO date or time: {text!r} (e.g. 2026-12-01 or 2026-12-01T21:30)") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.timezone.utc)


def _retrain_moment(text: str) -> datetime.datetime:
    t = _moment(text)
    if t > datetime.datetime.now(datetime.timezone.utc):
        # every record it retrains would again be older than it: a sweep that never settles
        raise ConfigError(f"retrain_before {text!r} lies in the future (UTC unless it names a zone)")
    return t


_METRIC_COLUMNS = ("best_val_acc", "best_epoch", "final_val_acc", "final_train_acc", "final_train_loss", "epochs_run", "parameters")


def _row(rec: dict) -> dict[str, Any]:
    row = dict(rec["config"])
    row["key"] = rec["key"]
    row["status"] = rec["status"]
    row["diverged_epoch"] = rec.get("diverged_epoch")
    for k in _METRIC_COLUMNS:
        row[k] = rec["metrics"].get(k)
    row["total_s"] = rec["timing"]["total_s"]
    row["mean_epoch_s"] = rec["timing"]["mean_epoch_s"]
    row["device"] = rec["environment"]["device"]
    live = rec.get("diagnostics", {}).get("liveness")
    if live and _liveness_comparable(rec["config"], live.get("measured_at")):
        row["dead_units"] = live["dead_units"]
        row["units"] = live["units"]
        row["dead_point_fraction"] = live["dead_point_fraction"]
    dn = rec.get("diagnostics", {}).get("dead_neurons")
    if dn is not None:
        row["dead_neurons"] = sum(dn)
    return row


# models whose every hidden Linear/Conv feeds its activation directly: there the layer outputs
# that liveness read before it read the activations' inputs are the same tensors
_DIRECT_MODELS = ("mlp", "cnn", "width", "depth", "params")


def _liveness_comparable(config: dict, measured_at: str | None) -> bool:
    """Whether a record's liveness means what :func:`alive.diagnostics.liveness` measures now.

    Records stored before liveness read the activations' inputs counted the raw Linear/Conv
    outputs: before BatchNorm (which say nothing about what a ReLU sees), and in AllCNN and
    ResNet also layers no activation follows. Those are left out of frames."""
    if measured_at == "activation input":
        return True
    if config.get("batchnorm"):
        return False
    return measured_at == "layer output" or config.get("model") in _DIRECT_MODELS


def to_frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per record: every config field, the metrics, timing and liveness summary."""
    return pd.DataFrame([_row(r) for r in records])


def load(experiment: str | None = None, store: Store | None = None, records: Iterable[dict] | None = None) -> pd.DataFrame:
    """Stored records of ``experiment`` (or the given ``records``) as a DataFrame."""
    if records is None:
        records = (store or default_store()).records(experiment)
    return to_frame(records)


def histories(records: Iterable[dict]) -> pd.DataFrame:
    """Per-epoch histories in long form: one row per (run, epoch)."""
    frames = []
    for r in records:
        h = pd.DataFrame(r["history"])
        h["key"] = r["key"]
        h["label"] = RunConfig.from_dict(r["config"]).label
        frames.append(h)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
