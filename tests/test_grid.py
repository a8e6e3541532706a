"""The batched grid engine gives the same result as training each network alone."""
import pytest
import torch

from alive.config import RunConfig
from alive.grid import GridStack, _width_buckets, group_configs, train_group
from alive.train import fit

BASE = RunConfig(experiment="g", depth=1, width=1, epochs=25, batch_size=None, lr=0.01)
CELLS = [(3, 4, "none", 10), (5, 2, "up", 10), (2, 5, "u", 11), (4, 3, "p", 10), (1, 1, "up", 12)]


def _cells(**kw):
    return [BASE.replace(depth=d, width=w, constraint=c, weight=1e-2 if c != "none" else 0.0, seed=s, **kw) for d, w, c, s in CELLS]


def _compare(cfgs, loss_tol=2e-6, exact_acc=True, ties="split"):
    grid = {r["key"]: r for r in train_group(cfgs, progress="quiet", ties=ties)}
    for c in cfgs:
        single = fit(c, device="cpu", progress="quiet")
        batched = grid[single["key"]]
        assert len(single["history"]["train_loss"]) == len(batched["history"]["train_loss"]) == c.epochs
        for a, b in zip(single["history"]["train_loss"], batched["history"]["train_loss"]):
            assert a == pytest.approx(b, abs=loss_tol)
        if exact_acc:
            assert single["history"]["val_acc"] == batched["history"]["val_acc"]
            assert single["diagnostics"] == batched["diagnostics"]
        assert single["metrics"]["parameters"] == batched["metrics"]["parameters"]


@pytest.mark.parametrize("activation", ["relu", "lk-relu", "selu", "sigmoid"])
def test_mlp_cells_match_single_runs(activation):
    _compare(_cells(activation=activation))


def test_runs_of_equal_depth_share_a_penalty_pass_and_still_match_single_runs():
    # nets of equal depth make runs of several layers penalised in one pass
    cells = [(4, 3, "up", 10), (4, 2, "p", 11), (4, 4, "u", 10), (2, 3, "up", 12)]
    cfgs = [BASE.replace(depth=d, width=w, constraint=c, weight=1e-2, seed=s, epochs=10) for d, w, c, s in cells]
    _compare(cfgs)
    _compare(cfgs, loss_tol=1e-4, exact_acc=False, ties="first")


def test_fast_index_extremes_stay_within_float_noise():
    # exact ties (from dead points) get the whole gradient on one point instead of a share
    _compare(_cells(), loss_tol=1e-4, exact_acc=False, ties="first")


def test_other_aggregations_and_margins_match():
    _compare(_cells(aggregation="norm", margin=0.5))
    _compare(_cells(aggregation="mean", rho=0.6))


def test_batchnorm_cells_match_while_the_running_statistics_agree():
    # Adam turns the numerically-zero gradient of a bias followed by BN into noise-driven
    # steps, so BN nets drift apart at float precision after a few epochs: compare early
    _compare([c.replace(batchnorm=True, epochs=3) for c in _cells()], loss_tol=1e-5, exact_acc=False)


def test_zero_init_cells_match_single_runs():
    _compare([c.replace(init="zero") for c in _cells()])


def test_conv_cells_match_single_runs(data_dir):
    base = RunConfig(experiment="g", dataset="mnist", model="cnn", depth=1, width=1, epochs=2, batch_size=64, lr=1e-3,
                     n_train=192, n_test=64, seed=3)
    cfgs = [base.replace(depth=d, width=w, constraint=c, weight=1e-2 if c != "none" else 0.0, activation=a)
            for d, w, c, a in [(3, 4, "none", "relu"), (2, 2, "up", "relu"), (4, 3, "u", "relu"), (1, 4, "p", "relu")]]
    # float32 sums of grouped and single convolutions run in a CPU-dependent order (oneDNN picks
    # kernels by instruction set): losses agree to ~1e-6 relative, not bit for bit
    _compare(cfgs, loss_tol=5e-6)
    _compare([c.replace(activation="lk-relu") for c in cfgs], loss_tol=5e-6)
    # the engine's default for conv stacks: index extremes over points and units
    _compare(cfgs, loss_tol=1e-4, exact_acc=False, ties="first")


def test_padding_has_no_effect_on_a_network():
    narrow = BASE.replace(depth=3, width=2, constraint="up", weight=0.01)
    alone = train_group([narrow], progress="quiet")[0]
    stacked = {r["key"]: r for r in train_group([narrow, BASE.replace(depth=5, width=7)], progress="quiet")}[alone["key"]]
    assert alone["history"]["train_loss"] == pytest.approx(stacked["history"]["train_loss"], abs=5e-7)
    assert alone["diagnostics"] == stacked["diagnostics"]


def test_grouping_buckets_and_validation():
    cfgs = [BASE.replace(depth=d, width=w) for d in (1, 10, 20) for w in (1, 2, 3, 10, 25)]
    groups = group_configs(cfgs)
    assert sorted(id(c) for g in groups for c in g) == sorted(id(c) for c in cfgs)
    for g in groups:
        assert len({(c.batchnorm, c.activation) for c in g}) == 1
    buckets = _width_buckets(cfgs, overhead=0.0)  # no overhead: every width its own stack
    assert len(buckets) == 5
    assert len(_width_buckets(cfgs, overhead=1e12)) == 1  # huge overhead: one padded stack
    with pytest.raises(ValueError, match="differ only"):
        train_group([BASE, BASE.replace(lr=0.1)])
    with pytest.raises(ValueError, match="cannot be trained by the grid engine"):
        group_configs([RunConfig(dataset="cifar10", model="params")])


def test_a_diverging_network_does_not_touch_the_others():
    cfgs = [BASE.replace(depth=2, width=3, seed=s, epochs=6) for s in (0, 1)]
    clean = {r["config"]["seed"]: r for r in train_group(cfgs, progress="quiet")}
    import alive.grid as G

    real = G.GridStack.forward

    def poisoned(self, x, *a, **k):
        out = real(self, x, *a, **k)
        if self.training_epoch == 2 and k.get("train", True):
            logits = out[0].clone()
            logits[0] = float("nan")
            out = (logits,) + tuple(out[1:])
        return out

    G.GridStack.forward = poisoned
    G.GridStack.training_epoch = 0
    try:
        import alive.grid

        orig_freeze = alive.grid._freeze
        recs = {}
        # count epochs through the history hook: patch set on the stack via a small wrapper
        epochs = {"n": 0}

        def counting(stack, x, y, batch, precision):
            epochs["n"] += 1
            stack.training_epoch = epochs["n"]
            return orig_eval(stack, x, y, batch, precision)

        orig_eval = alive.grid._evaluate
        alive.grid._evaluate = counting
        recs = {r["config"]["seed"]: r for r in train_group(cfgs, progress="quiet")}
    finally:
        G.GridStack.forward = real
        alive.grid._evaluate = orig_eval
        del G.GridStack.training_epoch
    poisoned_seed = recs[0]["config"]["seed"] if recs[0]["status"] == "diverged" else 1
    assert {r["status"] for r in recs.values()} == {"ok", "diverged"}
    other = 1 - poisoned_seed
    assert recs[other]["history"]["train_loss"] == clean[other]["history"]["train_loss"]
    assert recs[poisoned_seed]["diverged_epoch"] == 3


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_frozen_network_is_zero_in_parameters_and_optimiser_state_and_stays_so(model):
    from alive.grid import _freeze, _net_rows
    from alive.train import make_optimizer

    if model == "mlp":
        base, shape = BASE.replace(batchnorm=True), (2,)
    else:
        base, shape = RunConfig(experiment="g", dataset="mnist", model="cnn", depth=1, width=1, batch_size=8, batchnorm=True), (1, 6, 6)
    cfgs = [base.replace(depth=d, width=w, seed=s) for d, w, s in [(3, 2, 0), (2, 3, 1), (1, 2, 2)]]
    stack = GridStack(cfgs, shape, 2)
    opt = make_optimizer(base, [stack.flatten_parameters()])
    x = torch.randn(8, *shape)

    def step(keep):
        logits, _ = stack(x)
        loss = torch.where(keep, logits.square().mean((1, 2)), torch.zeros(3)).sum()
        stack.zero_grad()
        loss.backward()
        opt.step()

    step(torch.ones(3, dtype=torch.bool))  # every moment non-zero
    dead = torch.tensor([False, True, False])
    before = [p.detach().clone().view(rows) for p, rows in _net_rows(stack)]
    _freeze(stack, opt, dead)
    flat = stack._flat.data
    for k, t in enumerate([flat] + [v for v in opt.state[stack._flat].values() if v.dim() > 0]):
        for (p, rows), old in zip(_net_rows(stack), before):
            view = t[p.data.storage_offset():][: p.numel()].view(rows)
            if view.shape[0] > 1:  # the net is in this layer
                assert not view[1].any()
            if k == 0:  # the others' parameters are untouched
                assert torch.equal(view[0], old[0])
    for _ in range(3):
        step(~dead)
    for p, rows in _net_rows(stack):
        view = p.detach().view(rows)
        if view.shape[0] > 1:
            assert not view[1].any()


def test_diagnostics_see_the_activation_input_after_batchnorm():
    cfgs = [BASE.replace(depth=d, width=w, batchnorm=True) for d, w in [(3, 2), (2, 3)]]
    stack = GridStack(cfgs, (2,), 2)
    seen, real_units = [], []

    def look(l, z, a):  # z: (nets, points, units); BatchNorm at init in train mode: mean 0, variance 1 per unit
        seen.append(torch.equal(torch.relu(z), a))
        mean, var = z.mean(1), z.var(1, unbiased=False)
        padded = (z == 0).all(1)
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
        assert torch.allclose(var[~padded], torch.ones_like(var[~padded]), atol=0.05)  # eps (1e-3) shrinks small ones
        real_units.append(int((~padded).sum()))

    stack(torch.randn(16, 2), train=True, on_layer=look)
    assert seen == [True] * 3 and real_units == [2 + 3, 2 + 3, 2]


def test_empty_groups_are_refused_clearly():
    with pytest.raises(ValueError, match="at least one configuration"):
        train_group([])
    with pytest.raises(ValueError, match="at least one configuration"):
        GridStack([], (2,), 2)


@pytest.mark.parametrize("activation", ["relu", "lk-relu"])
def test_conv_stack_is_the_same_function_in_both_memory_layouts(activation, monkeypatch):
    base = RunConfig(experiment="g", dataset="mnist", model="cnn", depth=1, width=1, batch_size=8, activation=activation)
    cfgs = [base.replace(depth=d, width=w, constraint="up", weight=1e-2) for d, w in [(3, 4), (2, 2), (1, 3)]]
    stack = GridStack(cfgs, (2, 12, 12), 10)
    assert stack.channels_last  # few stacked channels: the faster layout on a CPU
    x = torch.randn(8, 2, 12, 12)  # two input channels: one would look the same in either layout
    outs, seen = [], []
    conv2d = torch.nn.functional.conv2d

    def spy(h, *args, **kw):
        seen.append(h.stride(1) == 1)  # channels innermost
        return conv2d(h, *args, **kw)

    for layout in (True, False):
        stack.channels_last = layout
        seen.clear()
        monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
        logits, pen = stack(x)
        monkeypatch.undo()
        assert seen and (all(seen) if layout else not any(seen))
        (logits.square().sum() + pen.sum()).backward()
        outs.append((logits.detach(), pen.detach(), [p.grad.clone() for p in stack.parameters()]))
        stack.zero_grad()
    (l1, p1, g1), (l2, p2, g2) = outs
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(p1, p2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g1, g2))


def test_flattened_parameters_share_values_and_gradients_with_the_module():
    from alive.grid import _flatten_parameters

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in net.parameters()]
    flat = _flatten_parameters(net)
    assert flat.numel() == sum(p.numel() for p in net.parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    for _ in range(2):  # accumulates in place into the flat gradient, step after step
        flat.grad.zero_()
        net(torch.randn(5, 3)).square().sum().backward()
        assert torch.equal(flat.grad, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        assert flat.grad.abs().sum() > 0
    torch.optim.SGD([flat], lr=0.1).step()
    expected = [b - 0.1 * p.grad for p, b in zip(net.parameters(), before)]
    assert all(torch.allclose(p.detach(), e) for p, e in zip(net.parameters(), expected))


def test_stack_zero_grad_keeps_the_flat_gradient():
    stack = GridStack([BASE.replace(depth=2, width=3), BASE.replace(depth=1, width=2)], (2,), 2)
    flat = stack.flatten_parameters()
    logits, _ = stack(torch.randn(4, 2))
    logits.sum().backward()
    assert flat.grad.abs().sum() > 0
    stack.zero_grad()  # in place, not set to None
    assert stack.head_b.grad is not None and flat.grad.abs().sum() == 0
    stack(torch.randn(4, 2))[0].sum().backward()
    assert torch.equal(flat.grad, torch.cat([p.grad.reshape(-1) for p in stack.parameters()]))


def test_worker_processes_train_the_same_records_and_refuse_bad_counts(tmp_path, monkeypatch, two_workers_threads):
    from alive.grid import train_groups
    from alive.results import Store, sweep

    cfgs = [BASE.replace(depth=d, width=w, constraint=c, weight=1e-2 if c != "none" else 0.0, epochs=6, batchnorm=bn)
            for d, w, c in [(2, 2, "up"), (3, 1, "none")] for bn in (False, True)]
    groups = group_configs(cfgs, device="cpu")
    assert len(groups) == 2  # with and without BatchNorm
    here = {r["key"]: r for g in train_groups(groups, device="cpu", progress="quiet") for r in g}
    there = {r["key"]: r for g in train_groups(groups, device="cpu", progress="quiet", workers=2) for r in g}
    assert here.keys() == there.keys() and len(here) == 4
    for k, r in here.items():
        assert r["history"]["val_acc"] == there[k]["history"]["val_acc"]
        assert r["history"]["train_loss"] == pytest.approx(there[k]["history"]["train_loss"], abs=1e-6)
        assert there[k]["environment"]["device"].endswith(two_workers_threads)  # each worker got its share
    monkeypatch.setenv("ALIVE_WORKERS", "2")  # a sweep takes its workers from the environment
    recs = sweep(cfgs, Store(tmp_path), device="cpu", progress="quiet")
    assert sorted(r["key"] for r in recs) == sorted(here)
    assert all(r["environment"]["device"].endswith(two_workers_threads) for r in recs)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            train_groups(groups, workers=bad)
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            sweep(cfgs, Store(tmp_path), device="cpu", workers=bad)
    monkeypatch.setenv("ALIVE_WORKERS", "two")
    with pytest.raises(ValueError, match="ALIVE_WORKERS must be a positive integer, got 'two'"):
        sweep(cfgs, Store(tmp_path), device="cpu")
