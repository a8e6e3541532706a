import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("ALIVE_DATA"):
    candidate = ROOT.parent / "shared" / "data"
    if candidate.is_dir():
        os.environ["ALIVE_DATA"] = str(candidate)


@pytest.fixture(autouse=True)
def _seed_and_store(tmp_path, monkeypatch):
    """Every test starts from a fixed seed and writes results to its own store."""
    torch.manual_seed(0)
    monkeypatch.setenv("ALIVE_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("ALIVE_NO_TRAIN", raising=False)
    monkeypatch.delenv("ALIVE_WORKERS", raising=False)  # a user's setting would move sweeps out of monkeypatch's reach
    yield


@pytest.fixture
def two_workers_threads() -> str:
    """How a record made by one of two worker processes ends its device: its share of the threads."""
    return f"{max(1, torch.get_num_threads() // 2)} threads)"


@pytest.fixture
def data_dir():
    d = os.environ.get("ALIVE_DATA")
    if not d or not Path(d, "mnist.npz").exists():
        pytest.skip("offline data (../shared/data) not available")
    return Path(d)
