"""GPU checks (skipped without CUDA): the trainer and the grid engine on a GPU."""
import pytest
import torch

from alive.config import RunConfig
from alive.functional import _LinkedReLU, linked_relu
from alive.grid import train_group
from alive.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_linked_relu_on_cuda_matches_naive():
    x = torch.randn(8, 6, 5, 5, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    g = torch.randn(8, 12, 5, 5, device="cuda")
    assert type(linked_relu(x, 1).grad_fn).__name__ == "CatBackward0"
    _LinkedReLU.apply(x, 1).backward(g)
    torch.cat((torch.relu(y), torch.relu(-y)), 1).backward(g)
    assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fit_on_cuda(precision, data_dir):
    cfg = RunConfig(dataset="cifar10", model="depth", depth=4, activation="lk-relu", n_train=256, n_test=128, epochs=2,
                    batch_size=32, augment=True, constraint="up", weight=1e-4, precision=precision)
    rec = fit(cfg, device="cuda", progress="quiet")
    assert rec["status"] == "ok" and rec["precision"] == precision and rec["environment"]["device"].startswith("cuda")
    assert rec["history"]["train_loss"][-1] < rec["history"]["train_loss"][0]


def test_auto_precision_is_bf16_on_cuda_and_keys_differ():
    cfg = RunConfig(depth=2, width=3, epochs=2, batch_size=None, lr=0.01)
    assert fit(cfg, device="cuda", progress="quiet")["precision"] == "bf16"
    assert cfg.key("bf16") != cfg.key("fp32")


def test_compiled_model_trains_like_eager():
    cfg = RunConfig(depth=3, width=4, epochs=5, batch_size=None, lr=0.01, precision="fp32")
    eager = fit(cfg, device="cuda", progress="quiet")
    compiled = fit(cfg, device="cuda", progress="quiet", compile=True)
    assert len(eager["history"]["train_loss"]) == len(compiled["history"]["train_loss"]) == cfg.epochs
    for a, b in zip(eager["history"]["train_loss"], compiled["history"]["train_loss"]):
        assert a == pytest.approx(b, abs=1e-4)


def test_grid_engine_on_cuda_matches_cpu():
    base = RunConfig(depth=1, width=1, epochs=15, batch_size=None, lr=0.01, precision="fp32")
    cfgs = [base.replace(depth=d, width=w, constraint=c, weight=1e-2 if c != "none" else 0.0)
            for d, w, c in [(3, 4, "none"), (5, 2, "up"), (2, 5, "u")]]
    gpu = {r["key"]: r for r in train_group(cfgs, device="cuda", progress="quiet", ties="split")}
    cpu = {r["key"]: r for r in train_group(cfgs, device="cpu", progress="quiet", ties="split")}
    for k, r in cpu.items():
        assert r["history"]["train_loss"] == pytest.approx(gpu[k]["history"]["train_loss"], abs=1e-4)
