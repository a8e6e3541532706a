import json
import math
import os
import time
from pathlib import Path

import pytest

import alive.train
from alive.config import RunConfig
from alive.results import MissingResult, Store, load, parse_shard, run, sweep

CFG = RunConfig(experiment="t", depth=2, width=3, epochs=3, batch_size=None, lr=0.01)


def test_run_stores_once_and_then_reads(tmp_path, monkeypatch):
    store = Store(tmp_path)
    rec = run(CFG, store, device="cpu", progress="quiet")
    files = list((tmp_path / "t").iterdir())
    assert [f.name for f in files] == [f"{rec['key']}.json"]
    assert json.loads(files[0].read_text())["metrics"] == rec["metrics"]
    monkeypatch.setattr(alive.train, "fit", lambda *a, **k: pytest.fail("trained twice"))
    assert run(CFG, store, device="cpu") == json.loads(files[0].read_text())


def test_no_train_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIVE_NO_TRAIN", "1")
    with pytest.raises(MissingResult, match="ALIVE_NO_TRAIN"):
        run(CFG, Store(tmp_path), device="cpu")
    with pytest.raises(MissingResult):
        sweep([CFG], Store(tmp_path), device="cpu")


def test_sweep_killed_half_way_resumes_without_duplicates(tmp_path, monkeypatch):
    store = Store(tmp_path)
    cfgs = [CFG.replace(seed=s, batchnorm=bool(s % 2)) for s in range(4)]
    real_fit, calls = alive.train.fit, []

    def flaky(cfg, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(cfg.seed)
        return real_fit(cfg, **kw)

    monkeypatch.setattr(alive.train, "fit", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep(cfgs, store, device="cpu", engine="single", progress="quiet")
    assert len(list((tmp_path / "t").glob("*.json"))) == 2
    monkeypatch.setattr(alive.train, "fit", real_fit)
    recs = sweep(cfgs + cfgs[:1], store, device="cpu", engine="single", progress="quiet")
    assert len(recs) == 5 and len({r["key"] for r in recs}) == 4
    assert len(list((tmp_path / "t").glob("*.json"))) == 4
    assert not list((tmp_path / "t").glob("*.lock")) and not list((tmp_path / "t").glob("*.tmp"))


def test_single_runs_in_worker_processes_store_the_same_records(tmp_path, two_workers_threads):
    cfgs = [CFG.replace(seed=s) for s in range(3)]
    here = {r["key"]: r for r in sweep(cfgs, Store(tmp_path / "a"), device="cpu", engine="single", progress="quiet")}
    there = {r["key"]: r for r in sweep(cfgs, Store(tmp_path / "b"), device="cpu", engine="single", progress="quiet",
                                        workers=2)}
    assert here.keys() == there.keys() and len(here) == 3
    for k, r in here.items():
        assert r["history"]["val_acc"] == there[k]["history"]["val_acc"]
        assert r["history"]["train_loss"] == pytest.approx(there[k]["history"]["train_loss"], rel=1e-5)
        assert there[k]["environment"]["device"].endswith(two_workers_threads)
    assert not list((tmp_path / "b" / "t").glob("*.lock"))


def test_in_workers_yields_every_result_and_raises_a_worker_error_here():
    from alive.workers import in_workers

    assert sorted(in_workers(math.sqrt, [(4.0,), (9.0,), (16.0,)], workers=2)) == [2.0, 3.0, 4.0]
    assert list(in_workers(math.sqrt, [(4.0,), (9.0,)], workers=1)) == [2.0, 3.0]  # here, in order
    with pytest.raises(ValueError, match="math domain error"):
        list(in_workers(math.sqrt, [(4.0,), (-1.0,)], workers=2))
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        in_workers(math.sqrt, [(4.0,)], workers=0)  # refused at the call, before any iteration


def _nap_or_fail(seconds: float, started: str) -> float:
    Path(started, f"{os.getpid()}-{seconds}-{time.monotonic_ns()}").touch()
    if seconds < 0:
        raise RuntimeError("this call fails")
    time.sleep(seconds)
    return seconds


def test_a_failing_worker_call_stops_the_others_and_starts_no_more(tmp_path):
    import multiprocessing

    from alive.workers import in_workers

    calls = [(-1.0, str(tmp_path))] + [(30.0, str(tmp_path))] * 5
    with pytest.raises(RuntimeError, match="this call fails"):
        list(in_workers(_nap_or_fail, calls, workers=2))
    started = [p.name for p in tmp_path.iterdir()]
    assert len(started) <= 2 and any("--1.0-" in n for n in started)  # the failed call and at most the one beside it
    assert not multiprocessing.active_children()  # the 30-second nap was stopped, not waited for
    gen = in_workers(_nap_or_fail, [(0.0, str(tmp_path))] + [(30.0, str(tmp_path))] * 3, workers=2)
    assert next(gen) == 0.0
    gen.close()  # a caller that stops iterating stops the workers too
    assert not multiprocessing.active_children()


def test_sweep_refuses_unpicklable_training_options_for_workers_before_training(tmp_path):
    with pytest.raises(ValueError, match="must be picklable"):
        sweep([CFG], Store(tmp_path), device="cpu", workers=2, stop_after=lambda: 1)
    assert not (tmp_path / "t").exists()


def test_shards_partition_the_pending_runs(tmp_path):
    cfgs = [CFG.replace(seed=s, epochs=1) for s in range(5)]
    seen = []
    for i in range(3):
        before = {p.name for p in (tmp_path / "t").glob("*.json")} if (tmp_path / "t").exists() else set()
        sweep(cfgs, Store(tmp_path), device="cpu", shard=f"{i}/3", engine="single", progress="quiet")
        after = {p.name for p in (tmp_path / "t").glob("*.json")}
        seen.append(after - before)
    assert sum(len(s) for s in seen) == 5 and all(len(s) >= 1 for s in seen)
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("3/3")


def test_grid_engine_is_used_for_grid_cells_and_load_makes_a_frame(tmp_path):
    cfgs = [CFG.replace(depth=d, width=w) for d in (1, 3) for w in (1, 4)]
    recs = sweep(cfgs, Store(tmp_path), device="cpu", progress="quiet")
    assert all(r["timing"].get("batched_with") for r in recs)
    df = load("t", Store(tmp_path))
    assert len(df) == 4 and {"depth", "width", "best_val_acc", "dead_point_fraction", "status"} <= set(df.columns)


def test_retrain_before_trains_older_records_again_and_only_once(tmp_path, monkeypatch):
    from alive.config import ConfigError
    from alive.results import count_missing

    store = Store(tmp_path)
    cfgs = [CFG.replace(seed=s) for s in range(3)]
    sweep(cfgs, store, device="cpu", engine="single", progress="quiet")
    for path in sorted((tmp_path / "t").glob("*.json"))[:2]:  # two records made in 2020
        rec = json.loads(path.read_text())
        rec["environment"]["created"] = "2020-06-01T12:00:00+00:00"
        path.write_text(json.dumps(rec))
    ckpt = store.checkpoint_path("t", rec["key"])  # and a checkpoint left by a killed 2020 run: not resumed
    ckpt.write_bytes(b"not a checkpoint of today's code")
    os.utime(ckpt, (1591012800, 1591012800))
    assert count_missing(cfgs, store, "cpu") == 0
    assert count_missing(cfgs, store, "cpu", retrain_before="2020-06-01T11:00") == 0
    assert count_missing(cfgs, store, "cpu", retrain_before="2020-06-01T12:00:01+00:00") == 2
    assert count_missing(cfgs, store, "cpu", retrain_before="2020-06-01T14:00+02:00") == 0  # 12:00 UTC: not before
    real_fit, calls = alive.train.fit, []
    monkeypatch.setattr(alive.train, "fit", lambda cfg, **kw: calls.append(cfg.seed) or real_fit(cfg, **kw))
    recs = sweep(cfgs, store, device="cpu", engine="single", progress="quiet", retrain_before="2021-01-01")
    assert len(calls) == 2 and len(recs) == 3 and len(list((tmp_path / "t").glob("*.json"))) == 3
    assert all(r["environment"]["created"] > "2021" for r in recs) and not ckpt.exists()
    sweep(cfgs, store, device="cpu", engine="single", progress="quiet", retrain_before="2021-01-01")  # a restart
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="ISO date"):
        sweep(cfgs, store, device="cpu", retrain_before="yesterday")
    with pytest.raises(ConfigError, match="in the future"):
        count_missing(cfgs, store, "cpu", retrain_before="2999-01-01")
    path = sorted((tmp_path / "t").glob("*.json"))[0]  # a record that does not say when it was made: old
    rec = json.loads(path.read_text())
    del rec["environment"]["created"]
    path.write_text(json.dumps(rec))
    assert count_missing(cfgs, store, "cpu", retrain_before="2021-01-01T00:00:00Z") == 1
    monkeypatch.setenv("ALIVE_NO_TRAIN", "1")
    with pytest.raises(MissingResult, match="older than retrain_before"):
        sweep(cfgs, store, device="cpu", retrain_before="2021-01-01")


def test_lock_blocks_a_second_trainer(tmp_path):
    store = Store(tmp_path)
    with store.lock("t", "abc") as first:
        with store.lock("t", "abc") as second:
            assert first and not second
    assert not (tmp_path / "t" / "abc.lock").exists()


def test_old_batchnorm_liveness_is_left_out_of_frames():
    from alive.results import to_frame

    def rec(bn, measured):
        live = {"dead_units": 3, "units": 8, "dead_point_fraction": 0.5}
        if measured:
            live["measured_at"] = "activation input"
        cfg = RunConfig(depth=2, width=4, batchnorm=bn)
        return {"key": cfg.key("fp32"), "config": cfg.to_dict(), "status": "ok", "metrics": {}, "timing": {"total_s": 1, "mean_epoch_s": 1},
                "environment": {"device": "cpu"}, "diagnostics": {"liveness": live}}

    f = to_frame([rec(True, False), rec(True, True), rec(False, False)])
    assert f.dead_point_fraction.isna().tolist() == [True, False, False]
    assert f.dead_units.tolist()[1:] == [3, 3]
    # AllCNN's stride-2 convs feed no activation: its old layer-output liveness is left out too
    old = rec(False, False)
    old["config"]["model"] = "allcnn"
    assert "dead_point_fraction" not in to_frame([old])


def test_stale_locks(tmp_path):
    import os
    import socket

    from alive.results import _stale

    lock = tmp_path / "k.lock"
    lock.write_text("")
    assert not _stale(lock)  # being written: live for a grace period
    old = lock.stat().st_mtime - 60
    os.utime(lock, (old, old))
    assert _stale(lock)  # never written: its writer died
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    assert not _stale(lock)
    lock.write_text(f"{socket.gethostname()} 999999999")
    assert _stale(lock)  # no such process here
    lock.write_text("another-host 1")
    assert not _stale(lock)  # cannot be checked from here
    lock.write_text(str(os.getpid()))  # the older format: a pid alone
    assert not _stale(lock)



def test_retrain_before_also_retrains_grid_cells(tmp_path):
    store = Store(tmp_path)
    cfgs = [CFG.replace(depth=1, width=w) for w in (1, 4)]
    sweep(cfgs, store, device="cpu", progress="quiet")
    for path in (tmp_path / "t").glob("*.json"):
        rec = json.loads(path.read_text())
        rec["environment"]["created"] = "2020-06-01T12:00:00+00:00"
        path.write_text(json.dumps(rec))
    recs = sweep(cfgs, store, device="cpu", progress="quiet", retrain_before="2021-01-01")
    assert all(r["environment"]["created"] > "2021" and r["timing"].get("batched_with") for r in recs)


def test_a_worker_logs_instead_of_drawing_progress_bars(monkeypatch):
    import alive.workers
    from alive.train import _progress

    bar = _progress("bar", 3, "here")
    assert bar is not None
    bar.close()
    monkeypatch.setattr(alive.workers, "_in_worker", True)
    assert alive.workers.in_worker()
    assert _progress("bar", 3, "in a worker") is None and _progress("auto", 3, "in a worker") is None
