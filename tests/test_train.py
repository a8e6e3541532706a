import math

import pytest
import torch

from alive.config import RunConfig
from alive.train import TrainingInterrupted, fit, lr_factor, make_optimizer

MOONS = RunConfig(depth=3, width=6, epochs=30, batch_size=None, lr=0.01, seed=3)


def test_training_reduces_the_loss_on_moons():
    rec = fit(MOONS, progress="quiet")
    h = rec["history"]
    assert h["train_loss"][-1] < 0.7 * h["train_loss"][0]
    assert rec["status"] == "ok" and rec["metrics"]["epochs_run"] == 30
    assert rec["metrics"]["best_val_acc"] == max(h["val_acc"])
    assert rec["diagnostics"]["liveness"]["units"] == 18


def test_constraint_penalty_is_recorded_and_decreases():
    rec = fit(MOONS.replace(constraint="up", weight=0.1), progress="quiet")
    pen = rec["history"]["penalty"]
    assert pen[0] > 0 and pen[-1] < pen[0]


def test_deterministic_on_cpu():
    a, b = fit(MOONS, progress="quiet"), fit(MOONS, progress="quiet")
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert a["key"] == b["key"]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    cfg = RunConfig(depth=2, width=4, epochs=6, batch_size=16, lr=0.01, seed=1, annealed_dropout=0.5, anneal_epochs=4)
    full = fit(cfg, progress="quiet")
    ck = tmp_path / "run.ckpt"
    with pytest.raises(TrainingInterrupted):
        fit(cfg, progress="quiet", checkpoint=ck, checkpoint_every=2, stop_after=4)
    assert ck.exists()
    resumed = fit(cfg, progress="quiet", checkpoint=ck, checkpoint_every=2)
    for k in ("train_loss", "val_loss", "val_acc", "penalty"):
        assert resumed["history"][k] == full["history"][k]
    assert resumed["diagnostics"] == full["diagnostics"]
    assert not ck.exists()


def test_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = RunConfig(depth=2, width=4, epochs=4, batch_size=None, lr=0.01)
    ck = tmp_path / "run.ckpt"
    with pytest.raises(TrainingInterrupted):
        fit(cfg, progress="quiet", checkpoint=ck, checkpoint_every=1, stop_after=1)
    with pytest.raises(RuntimeError, match="another configuration"):
        fit(cfg.replace(seed=5), progress="quiet", checkpoint=ck)


def test_divergence_is_recorded_with_its_epoch():
    cfg = RunConfig(depth=2, width=4, epochs=20, batch_size=None, lr=1e6, optimizer="sgd", seed=0)
    rec = fit(cfg, progress="quiet")
    assert rec["status"] == "diverged"
    assert rec["diverged_epoch"] == rec["metrics"]["epochs_run"] <= 20
    assert any(v is None for v in rec["history"]["train_loss"] + rec["history"]["val_loss"])


def test_keras_time_decay_and_allcnn_schedule():
    f = lr_factor(RunConfig(depth=1, width=1, decay=1e-3), steps_per_epoch=10)
    assert f(0) == 1.0 and f(1000) == pytest.approx(0.5)
    g = lr_factor(RunConfig(dataset="cifar10", model="allcnn", schedule="allcnn", epochs=3000), steps_per_epoch=1)
    assert [g(e) for e in (0, 499, 500, 1999, 2000, 2349, 2350, 2749, 2750, 2999)] == [1, 1, 0.75, 0.75, 0.5, 0.5, 0.1, 0.1, 0.05, 0.05]
    h = lr_factor(RunConfig(dataset="cifar10", model="allcnn", schedule="allcnn", epochs=30), steps_per_epoch=1)
    assert h(5) == 0.75 and h(29) == 0.05  # boundaries scale with the run length


def test_optimisers_use_keras_defaults():
    p = [torch.nn.Parameter(torch.zeros(1))]
    adam = make_optimizer(RunConfig(depth=1, width=1), p)
    assert adam.defaults["eps"] == 1e-7
    rms = make_optimizer(RunConfig(depth=1, width=1, optimizer="rmsprop"), p)
    assert rms.defaults["alpha"] == 0.9
    nes = make_optimizer(RunConfig(depth=1, width=1, optimizer="nesterov"), p)
    assert nes.defaults["nesterov"] and nes.defaults["momentum"] == 0.9
    assert adam.defaults["fused"] and nes.defaults["fused"] and rms.defaults["foreach"]  # fused where it exists


def test_optimiser_takes_parameter_groups():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer(RunConfig(depth=1, width=1), [{"params": [a]}, {"params": [b], "lr": 0.5}])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.5] and opt.defaults["fused"]


def test_resumed_optimiser_state_takes_the_parameters_layout():
    from alive.train import _match_state_layout

    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    opt = make_optimizer(RunConfig(depth=1, width=1), [p])
    saved = torch.randn(2, 3, 4, 5)  # a checkpoint written in the default layout
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": saved.clone(), "exp_avg_sq": saved.abs()}
    _match_state_layout(opt)
    assert opt.state[p]["exp_avg"].stride() == p.stride() and torch.equal(opt.state[p]["exp_avg"], saved)
    assert torch.equal(opt.state[p]["exp_avg_sq"], saved.abs()) and opt.state[p]["step"].item() == 3.0


def test_fused_adam_step_is_the_adam_formula():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer(RunConfig(depth=1, width=1, lr=0.1), [p])
    g = torch.tensor([0.5, -3.0])
    for step in (1, 2):
        p.grad = g.clone()
        opt.step()
    # constant gradient: both bias-corrected moments equal g and g², the step is lr·g/(|g| + eps)
    expected = torch.tensor([1.0, -2.0]) - 2 * 0.1 * g / (g.abs() + 1e-7)
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_conv_training_step_on_cifar(data_dir):
    cfg = RunConfig(dataset="cifar10", model="depth", depth=3, n_train=64, n_test=32, epochs=2, batch_size=16,
                    augment=True, activation="lk-relu", constraint="up", weight=1e-3)
    rec = fit(cfg, progress="quiet")
    assert rec["status"] == "ok" and len(rec["diagnostics"]["dead_neurons"]) == 4
    assert "cifar10_subset.npz" in rec["data_source"]


def test_keep_freed_memory_sets_glibc_and_can_be_switched_off(monkeypatch):
    import ctypes
    import sys

    from alive.train import keep_freed_memory

    monkeypatch.setenv("ALIVE_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("ALIVE_KEEP_FREED_MEMORY")
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("glibc's mallopt is not available here")
    assert keep_freed_memory("cuda") is False  # another device: the allocator is left alone
    assert keep_freed_memory() is True


def test_stop_after_without_a_checkpoint_is_refused():
    cfg = RunConfig(depth=1, width=2, epochs=2, batch_size=None)
    with pytest.raises(ValueError, match="stop_after .* needs checkpoint="):
        fit(cfg, progress="quiet", stop_after=1)

