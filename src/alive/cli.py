"""Command line: ``python -m alive train | sweep | results``.

Examples::

    python -m alive train --dataset moons --model mlp --depth 20 --width 3 \\
        --constraint up --weight 1e-4 --lr 0.01 --epochs 5000 --batch-size none
    python -m alive sweep --experiment depth --profile book          # profiles/book/depth.yml
    python -m alive sweep --experiment moons --profile paper --shard 0/4 --device cuda
    python -m alive sweep --experiment moons --profile paper --workers 2     # two grid groups at once
    python -m alive results --experiment depth
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, get_type_hints

from .config import ConfigError, RunConfig
from .results import project_folder

__all__ = ["main", "load_profile"]


def _parse_value(text: str, hint) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    s = str(hint)
    if "bool" in s and low in ("true", "false", "1", "0", "yes", "no"):
        return low in ("true", "1", "yes")
    if "int" in s and "float" not in s:
        try:
            return int(text)
        except ValueError:
            pass
    if "float" in s or "int" in s:
        try:
            return float(text) if "float" in s else int(text)
        except ValueError:
            pass
    return text


def load_profile(experiment: str, profile: str, root: str | os.PathLike | None = None) -> dict:
    """Parameters of ``experiment`` in ``profile`` (``profiles/<profile>/<experiment>.yml``).

    ``root`` defaults to the ``profiles`` folder of the enclosing checkout. The ``smoke``
    profile is the notebook's own defaults.
    """
    import yaml

    if not isinstance(profile, str):
        raise ConfigError(f"a profile is named by a string (smoke, book, paper, long), got {profile!r}")
    if profile == "smoke":
        return {"profile": "smoke"}
    path = Path(root if root is not None else project_folder("profiles")) / profile / f"{experiment}.yml"
    if not path.exists():
        raise ConfigError(f"no profile file {path} (profiles: smoke, book, paper, long)")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    values.setdefault("profile", profile)
    return values


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one network and store its result",
                       description="Train one configuration (every RunConfig field is an option) and store the record under results/.")
    hints = get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=f.name.upper(), default=None,
                       help=f"(default: {f.default!r}; type {hints[f.name]})".replace("%", "%%"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--store", default=None, help="result folder (default: $ALIVE_RESULTS or ./results)")
    p.add_argument("--retrain", action="store_true", help="train even if a result is stored")


def _sweep_parser(sub) -> None:
    from .experiments import EXPERIMENTS

    p = sub.add_parser("sweep", help="train every run of an experiment that is not stored yet",
                       description="Train the runs of a book experiment (the configurations its notebook shows) that are not "
                                   "in the store; restartable and shardable.")
    p.add_argument("--experiment", required=True, help="one of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--profile", default="book", help="smoke, book or paper (reads profiles/<profile>/<experiment>.yml)")
    p.add_argument("--profiles-dir", default=None, help="default: profiles/ of the enclosing checkout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter (YAML value), repeatable")
    p.add_argument("--shard", default=None, help="i/n: train only every n-th pending run starting at i")
    p.add_argument("--device", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--engine", default="auto", choices=("auto", "single"), help="auto batches grid cells (alive.grid)")
    p.add_argument("--workers", type=int, default=None,
                   help="grid groups (then single runs) trained at once in worker processes, sharing the CPU threads "
                        "(default: $ALIVE_WORKERS or 1; on a 2-core CPU 2 is ~1.2x faster)")
    p.add_argument("--dry-run", action="store_true", help="count the runs and how many a sweep would train (all shards), train nothing")
    p.add_argument("--retrain-before", default=None, metavar="DATE",
                   help="train again (and overwrite) the stored runs created before DATE (ISO, UTC unless zoned), "
                        "e.g. after a fix to what a record measures; restartable")


def _results_parser(sub) -> None:
    p = sub.add_parser("results", help="list stored results", description="Print stored results of an experiment as a table.")
    p.add_argument("--experiment", default=None, help="folder under the store (default: all)")
    p.add_argument("--store", default=None)
    p.add_argument("--format", default="table", choices=("table", "csv", "json"))
    p.add_argument("--columns", default="experiment,model,activation,depth,width,batchnorm,constraint,seed,status,best_val_acc,epochs_run,total_s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch summary")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sweep_parser(sub)
    _results_parser(sub)
    return parser


def _cmd_train(args) -> int:
    from .results import Store, run

    hints = get_type_hints(RunConfig)
    values = {f.name: _parse_value(getattr(args, f.name), hints[f.name]) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}
    cfg = RunConfig(**values)
    rec = run(cfg, Store(args.store) if args.store else None, device=args.device, retrain=args.retrain, compile=args.compile)
    m = rec["metrics"]
    print(f"{cfg.label}: status {rec['status']}, best val acc {m['best_val_acc']:.4f} (epoch {m['best_epoch']}), "
          f"{m['epochs_run']} epochs, {rec['timing']['total_s']:.1f} s on {rec['environment']['device']}, key {rec['key']}")
    return 0


def _cmd_sweep(args) -> int:
    import yaml

    from . import experiments
    from .results import Store, count_missing, parse_shard, sweep

    values = load_profile(args.experiment, args.profile, args.profiles_dir)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        values[k] = yaml.safe_load(v)
    if args.device:
        values["device"] = args.device
    parse_shard(args.shard)
    cfgs = experiments.configs(args.experiment, **values)
    store = Store(args.store) if args.store else Store()
    if args.dry_run:
        todo = count_missing(cfgs, store, values.get("device"), args.retrain_before)
        print(f"{args.experiment} ({args.profile}): {len(cfgs)} runs, {todo} to train")
        return 0
    recs = sweep(cfgs, store=store, device=values.get("device"), shard=args.shard, engine=args.engine,
                 retrain_before=args.retrain_before, workers=args.workers)
    print(f"{args.experiment} ({args.profile}): {len(recs)}/{len(cfgs)} results stored")
    return 0


def _cmd_results(args) -> int:
    from .results import Store, load

    df = load(args.experiment, Store(args.store) if args.store else None)
    if df.empty:
        print("no stored results")
        return 0
    cols = [c for c in args.columns.split(",") if c in df.columns]
    df = df[cols]
    if args.format == "csv":
        df.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(json.dumps(df.to_dict(orient="records"), indent=1, default=str))
    else:
        with __import__("pandas").option_context("display.max_rows", None, "display.width", 200):
            print(df.to_string(index=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command in ("train", "sweep") else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return {"train": _cmd_train, "sweep": _cmd_sweep, "results": _cmd_results}[args.command](args)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    return 1
