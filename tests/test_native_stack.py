"""The native dense stack kernel (alive.native.DenseStack, csrc/dense_stack.h) against the grid
engine's PyTorch operations: the same logits, penalties, gradients and running statistics."""
import math

import pytest
import torch

from alive import native
from alive.config import RunConfig
from alive.grid import GridStack, train_group

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernels")

BASE = RunConfig(experiment="g", depth=1, width=1, epochs=2, batch_size=None, lr=0.01, seed=3, diagnostics=False)
# depth, width, constraint: padded widths, one-layer nets, nets leaving the stack at every depth
SHAPES = [(5, 3, "up"), (3, 7, "u"), (4, 1, "p"), (2, 5, "none"), (5, 9, "up"), (1, 4, "up"), (3, 2, "p")]


def _stack(bn=False, inputs=2, classes=3, penalty=True, shapes=SHAPES, **kw):
    cfgs = []
    for d, w, con in shapes:
        extra = {"constraint": con, "weight": 0.3 if con != "none" else 0.0} if penalty else {}
        cfgs.append(BASE.replace(depth=d, width=w, seed=len(cfgs), batchnorm=bn, **extra, **kw))
    stack = GridStack(cfgs, (inputs,), classes)
    stack.flatten_parameters()
    return stack


def _step(stack, x, use_native, weights):
    """Logits, penalty, flat gradient and buffers of one training forward + backward."""
    state = {k: v.clone() for k, v in stack.state_dict().items()}
    stack.zero_grad()
    if use_native:
        assert stack.native_dense(x) is not None
        logits, pen = stack(x, train=True)
    else:
        with native.disabled():
            assert stack.native_dense(x) is None
            logits, pen = stack(x, train=True)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    ((logits * g).sum() + (pen * weights).sum()).backward()
    out = logits.detach().clone(), pen.detach().clone(), stack._flat.grad.clone(), \
        {k: v.clone() for k, v in stack.state_dict().items()}
    stack.load_state_dict(state)
    return out


def _assert_same_step(stack, x, tol=1e-5):
    weights = torch.arange(1.0, stack.n + 1)  # a different upstream gradient per net's penalty
    l1, p1, g1, b1 = _step(stack, x, True, weights)
    l2, p2, g2, b2 = _step(stack, x, False, weights)
    torch.testing.assert_close(l1, l2, rtol=tol, atol=tol)
    torch.testing.assert_close(p1, p2, rtol=tol, atol=tol / 10)
    torch.testing.assert_close(g1, g2, rtol=10 * tol, atol=10 * tol * float(g2.abs().max()))
    assert not torch.equal(g1, torch.zeros_like(g1))
    if stack.batchnorm:  # padded units' too: PyTorch's kernel decays them, and so does the native one
        for k in b1:
            torch.testing.assert_close(b1[k], b2[k], rtol=1e-5, atol=1e-6)
    return p1


@pytest.mark.parametrize("aggregation", ["paper", "squared_sum", "mean"])
def test_penalised_stack_matches_the_pytorch_operations(aggregation):
    stack = _stack(aggregation=aggregation, rho=0.3, margin=0.7)
    x = torch.randn(stack.n, 37, 2, generator=torch.Generator().manual_seed(0))
    pen = _assert_same_step(stack, x)
    assert (pen[[i for i, c in enumerate(stack.configs) if c.constraint == "none"]] == 0).all()
    assert (pen[[i for i, c in enumerate(stack.configs) if c.constraint != "none"]] > 0).all()


@pytest.mark.parametrize("points", [1, 2, 3, 8, 9, 100])
@pytest.mark.parametrize("penalty", [False, True])
def test_batchnorm_stack_matches_including_running_statistics(points, penalty):
    stack = _stack(bn=True, inputs=5, penalty=penalty)
    x = torch.randn(stack.n, points, 5, generator=torch.Generator().manual_seed(points))
    if points == 1:  # BatchNorm cannot train on one point: both paths refuse it; evaluation can
        for off in (False, True):
            with native.disabled() if off else torch.enable_grad(), pytest.raises(ValueError, match="more than 1 value"):
                stack(x, train=True)
        with torch.no_grad():
            a, _ = stack(x, train=False)
            with native.disabled():
                b, _ = stack(x, train=False)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return
    # two points normalise to ±1 over a variance near eps: rounding of the mean is amplified
    _assert_same_step(stack, x, tol=1e-3 if points == 2 else 1e-5)


@pytest.mark.parametrize("inputs, classes", [(17, 1), (3, 10)])
def test_wider_stacks_more_inputs_and_classes(inputs, classes):
    shapes = [(4, 12, "up"), (3, 9, "u"), (3, 16, "p"), (1, 1, "up"), (2, 13, "none")]
    stack = _stack(inputs=inputs, classes=classes, shapes=shapes)
    _assert_same_step(stack, torch.randn(stack.n, 29, inputs, generator=torch.Generator().manual_seed(inputs)))


def test_exact_ties_from_duplicated_points():
    stack = _stack()
    x = torch.randn(stack.n, 6, 2, generator=torch.Generator().manual_seed(7)).repeat(1, 3, 1)  # each point thrice
    _assert_same_step(stack, x)


def test_an_empty_batch_is_refused():
    stack = _stack()
    with pytest.raises(ValueError, match="at least one point"):
        stack(torch.zeros(stack.n, 0, 2))


def test_one_input_shared_by_every_net_and_the_evaluation_pass():
    stack = _stack()
    x = torch.randn(11, 2, generator=torch.Generator().manual_seed(2))  # (points, features): no per-net copy
    _assert_same_step(stack, x)
    with torch.no_grad():
        a, pa = stack(x, train=False)
        with native.disabled():
            b, pb = stack(x, train=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (pa == 0).all() and (pb == 0).all()  # no penalty outside training


def test_hand_computed_single_unit_net():
    cfg = BASE.replace(depth=1, width=1, constraint="u", weight=0.5)
    stack = GridStack([cfg], (1,), 2)
    stack.flatten_parameters()
    with torch.no_grad():
        stack.weights[0].fill_(2.0)
        stack.biases[0].fill_(-1.0)
        stack.head_w.copy_(torch.tensor([[[1.0, -1.0]]]))
        stack.head_b.zero_()
    x = torch.tensor([[0.0], [0.25], [1.0]])  # z = -1, -0.5, 1; relu: 0, 0, 1
    logits, pen = stack(x, train=True)
    assert logits[0].tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, -1.0]]
    # Sep-U: max z = 1 (margin 1: slack 0), min z = -1 (slack 0): rho 0.5 -> 0
    assert pen.item() == 0.0
    with torch.no_grad():
        stack.biases[0].fill_(-3.0)  # z = -3, -2.5, -1: a dead unit, slack 1 - (-1) = 2 -> 0.5·2·0.5
    logits, pen = stack(x, train=True)
    assert pen.item() == pytest.approx(0.5 * 0.5 * 2.0)
    stack.zero_grad()
    pen.sum().backward()
    # the dead unit's only gradient is the penalty's, at its max (the last point): -0.5·0.5·x
    assert stack.weights[0].grad.item() == pytest.approx(-0.25 * 1.0)
    assert stack.biases[0].grad.item() == pytest.approx(-0.25)


def test_a_nan_net_leaves_the_others_alone():
    stack = _stack()
    x = torch.randn(stack.n, 20, 2, generator=torch.Generator().manual_seed(4))
    ok_logits, ok_pen, ok_grad, _ = _step(stack, x, True, torch.ones(stack.n))
    with torch.no_grad():
        stack.weights[1][2].fill_(math.nan)  # net 2, second layer
    logits, pen, grad, _ = _step(stack, x, True, torch.ones(stack.n))
    others = [i for i in range(stack.n) if i != 2]
    assert torch.isnan(logits[2]).all() and torch.isnan(pen[2])
    torch.testing.assert_close(logits[others], ok_logits[others], rtol=0, atol=0)
    torch.testing.assert_close(pen[others], ok_pen[others], rtol=0, atol=0)
    head = stack.head_w.data_ptr() - stack._flat.data_ptr()
    rows = stack.head_w[0].numel()
    g_other = grad[head // 4:][: rows * stack.n].view(stack.n, -1)[others]
    assert torch.isfinite(g_other).all()


def test_buffers_are_reused_once_a_backward_is_done_and_never_while_a_graph_holds_them():
    stack = _stack()
    x = torch.randn(stack.n, 16, 2, generator=torch.Generator().manual_seed(5))
    ref = []
    for _ in range(2):
        stack.zero_grad()
        logits, pen = stack(x)
        (logits.sum() + pen.sum()).backward()
        ref.append(stack._flat.grad.clone())
    dense = stack.native_dense(x)
    kept = dense._spare[0].data_ptr()
    logits, pen = stack(x)
    assert logits.grad_fn.saved.buffers[0].data_ptr() == kept  # the last backward is done: reused
    logits2, pen2 = stack(x * 2)  # the first graph still holds its buffers: new ones
    assert logits2.grad_fn.saved.buffers[0].data_ptr() != kept
    stack.zero_grad()
    (logits.sum() + pen.sum()).backward()
    torch.testing.assert_close(stack._flat.grad, ref[0], rtol=0, atol=0)  # its buffers were not overwritten
    stack.zero_grad()
    (logits2.sum() + pen2.sum()).backward()
    assert not torch.equal(stack._flat.grad, ref[0])
    spare = dense._spare[0].data_ptr()
    logits3, _ = stack(x[:, :9].contiguous())  # fewer points (a short last batch): the spare buffers serve
    assert logits3.grad_fn.saved.buffers[0].data_ptr() == spare


def test_a_second_backward_is_refused_and_an_evaluation_pass_keeps_its_gradient():
    stack = _stack()
    x = torch.randn(stack.n, 6, 2)
    logits, pen = stack(x)
    loss = logits.sum() + pen.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
    assert stack.native_dense(x, train=False) is None  # under autograd: the PyTorch operations
    stack.zero_grad()
    logits, _ = stack(x, train=False)
    logits.sum().backward()
    got = stack._flat.grad.clone()
    with torch.no_grad():
        assert stack.native_dense(x, train=False) is not None
        a, _ = stack(x, train=False)
    torch.testing.assert_close(a, logits.detach(), rtol=1e-5, atol=1e-6)
    assert got.abs().sum() > 0


def test_dense_stack_backward_refuses_what_another_pass_saved():
    stack = _stack()
    x = torch.randn(stack.n, 6, 2)
    dense = stack.native_dense(x)
    flat = stack._flat.detach()
    logits, pen, saved = dense.forward(flat, x, True)
    with pytest.raises(ValueError, match="these 7 points"):
        dense.backward(flat, torch.randn(stack.n, 7, 2), saved, torch.ones(stack.n, 7, 3), None)
    with pytest.raises(ValueError, match="penalty gradients"):
        dense.backward(flat, x, saved, torch.ones_like(logits), torch.ones(stack.n + 1))
    with pytest.raises(ValueError, match="gradient of shape"):
        dense.backward(flat, x, saved, torch.ones(stack.n, 6, 2), None)
    dense.backward(flat, x, saved, torch.ones_like(logits), torch.ones(stack.n))
    with pytest.raises(RuntimeError, match="already run"):
        dense.backward(flat, x, saved, torch.ones_like(logits), torch.ones(stack.n))
    other = _stack().native_dense(x)
    _, _, saved = dense.forward(flat, x, True)
    with pytest.raises(ValueError, match="forward pass"):
        other.backward(flat, x, saved, torch.ones_like(logits), None)


@pytest.mark.parametrize("change", [
    {"activation": "lk-relu"}, {"activation": "selu"}, {"aggregation": "norm"}, {"init": "zero"},
    {"annealed_dropout": 0.5},
])
def test_stacks_it_does_not_cover_take_the_pytorch_path(change):
    cfgs = [BASE.replace(depth=2, width=3, constraint="up", weight=0.1, **change)]
    stack = GridStack(cfgs, (2,), 2)
    stack.flatten_parameters()
    assert stack.native_dense(torch.randn(1, 4, 2)) is None


def test_other_dtypes_devices_and_unflattened_stacks_take_the_pytorch_path():
    stack = GridStack([BASE.replace(depth=2, width=3)], (2,), 2)
    x = torch.randn(1, 4, 2)
    assert stack.native_dense(x) is None  # parameters not flattened yet
    stack.flatten_parameters()
    assert stack.native_dense(x) is not None
    assert stack.native_dense(x.double()) is None
    assert stack.native_dense(x.requires_grad_()) is None
    assert stack.native_dense(torch.randn(1, 4, 2), on_layer=lambda *a: None) is None
    with native.disabled():
        assert stack.native_dense(torch.randn(1, 4, 2)) is None


def test_dense_stack_refuses_bad_layouts_and_inputs():
    offsets = {"weight": [0], "bias": [6], "head_w": 9, "head_b": 15}
    with pytest.raises(ValueError, match="deepest first"):
        native.DenseStack([1, 2], [3, 3], 3, 2, 2, {**offsets, "weight": [0, 0], "bias": [0, 0]}, None, 1e-5, 0.1,
                          None, None, 0.5, 1.0, "paper")
    with pytest.raises(ValueError, match="widths in 1..wm"):
        native.DenseStack([1], [4], 3, 2, 2, offsets, None, 1e-5, 0.1, None, None, 0.5, 1.0, "paper")
    with pytest.raises(ValueError, match="both coef_u and coef_p"):
        native.DenseStack([1], [3], 3, 2, 2, offsets, None, 1e-5, 0.1, torch.ones(1), None, 0.5, 1.0, "paper")
    with pytest.raises(ValueError, match="of 1 values"):
        native.DenseStack([1], [3], 3, 2, 2, offsets, None, 1e-5, 0.1, torch.ones(2), torch.ones(2), 0.5, 1.0, "paper")
    with pytest.raises(ValueError, match="running statistics"):
        native.DenseStack([1], [3], 3, 2, 2, {**offsets, "gamma": [17], "beta": [20]},
                          [(torch.zeros(1, 3), torch.zeros(1, 2))], 1e-5, 0.1, None, None, 0.5, 1.0, "paper")
    dense = native.DenseStack([1], [3], 3, 2, 2, offsets, None, 1e-5, 0.1, None, None, 0.5, 1.0, "paper")
    flat = torch.zeros(17)
    with pytest.raises(ValueError, match="float32 CPU"):
        dense.forward(flat.double(), torch.zeros(4, 2), True)
    with pytest.raises(ValueError, match=r"\(points, 2\)"):
        dense.forward(flat, torch.zeros(4, 3), True)
    with pytest.raises(ValueError, match="offsets need 17"):
        dense.forward(flat[:16], torch.zeros(4, 2), True)
    with pytest.raises(ValueError, match=">= 0"):
        native.DenseStack([1], [3], 3, 2, 2, {**offsets, "head_b": -1}, None, 1e-5, 0.1, None, None, 0.5, 1.0, "paper")


def test_training_records_match_the_pytorch_operations():
    cfgs = [BASE.replace(depth=d, width=w, constraint=c, weight=1e-2 if c != "none" else 0.0, epochs=15, lr=0.01)
            for d, w, c in [(3, 2, "up"), (6, 4, "u"), (2, 5, "none"), (6, 1, "p")]]
    fast = train_group(cfgs, progress="quiet")
    with native.disabled():
        slow = train_group(cfgs, progress="quiet")
    for a, b in zip(fast, slow):
        assert a["key"] == b["key"]
        for k in ("train_loss", "val_loss", "penalty"):
            assert a["history"][k] == pytest.approx(b["history"][k], rel=1e-4, abs=1e-6), k
        assert a["metrics"]["best_val_acc"] == pytest.approx(b["metrics"]["best_val_acc"], abs=0.011)
