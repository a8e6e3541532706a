"""Two processes (gloo, CPU) train the same run as one process: same result."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alive.config import RunConfig
from alive.train import fit

CFG = RunConfig(depth=3, width=5, epochs=4, batch_size=17, lr=0.01, seed=2, constraint="up", weight=0.05, diagnostics=False)


def _worker(rank, world, port, out, cfg=CFG):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rec = fit(cfg, device="cpu", progress="quiet")
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rec, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    single = fit(CFG, device="cpu", progress="quiet")
    out = tmp_path / "ddp.json"
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    ddp = json.loads(out.read_text())
    assert ddp["environment"]["world_size"] == 2
    for k in ("train_loss", "val_loss", "penalty"):
        assert len(single["history"][k]) == len(ddp["history"][k]) == CFG.epochs, k
        for a, b in zip(single["history"][k], ddp["history"][k]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), k
    assert single["history"]["val_acc"] == ddp["history"]["val_acc"]


@pytest.mark.slow
def test_a_last_batch_smaller_than_the_world_is_skipped_not_nan(tmp_path):
    cfg = CFG.replace(batch_size=42, epochs=2)  # 85 MOONS points: batches of 42, 42 and 1
    out = tmp_path / "ddp.json"
    port = 29500 + (os.getpid() + 500) % 1000
    mp.spawn(_worker, args=(2, port, str(out), cfg), nprocs=2, join=True)
    ddp = json.loads(out.read_text())
    assert ddp["status"] == "ok"
    assert all(v is not None and v == v for v in ddp["history"]["train_loss"] + ddp["history"]["penalty"])

