import pytest
import torch
from torch import nn

from alive import Linked, dead_neurons, liveness
from alive.diagnostics import dead_unit_gradients


def _net(bias, act=None):
    """2 inputs -> 3 hidden units with chosen biases and unit weights on input 0 -> 1 output."""
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, 0] = 1.0
        lin.bias.copy_(torch.tensor(bias))
    act = act or nn.ReLU()
    fan = 6 if isinstance(act, Linked) else 3
    return nn.Sequential(lin, act, nn.Linear(fan, 1))


def test_dead_affine_units_and_dead_points_by_hand():
    x = torch.tensor([[-3.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])
    net = _net([-10.0, 10.0, 0.0])  # unit 0 always <= 0 (dead), unit 1 always > 0 (affine), unit 2 separates
    rep = liveness(net, x)
    row = rep.layers.iloc[0]
    assert (row.units, row.dead_units, row.affine_units, row.dead_points) == (3, 1, 1, 0)
    net2 = _net([-10.0, -10.0, 0.0])  # point x0 = -3 and x1 = -1: every unit <= 0 -> dead points
    rep2 = liveness(net2, (x, torch.zeros(3)))
    assert rep2.dead_points == 2 and rep2.summary["dead_point_fraction"] == pytest.approx(2 / 3)
    assert "2 dead" in repr(rep2)


def test_liveness_streams_in_batches_and_restores_mode():
    x = torch.randn(50, 2)
    net = _net([-10.0, 10.0, 0.0])
    net.train()
    a = liveness(net, x, batch_size=7)
    b = liveness(net, x, batch_size=1000)
    assert a.summary == b.summary and net.training


def test_dead_neurons_counts_linked_units_not_members():
    x = torch.tensor([[-3.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])
    plain = dead_neurons(_net([-10.0, 10.0, 0.0]), x)
    assert plain.loc[0, "dead"] == 1 and plain.loc[0, "neurons"] == 3
    linked = dead_neurons(_net([-10.0, 10.0, 0.0], Linked("relu")), x)
    row = linked.iloc[0]
    # unit 0: relu(z) is always 0 but relu(-z) is not -> one dead member, no dead linked unit
    assert (row.neurons, row.dead, row.dead_members) == (3, 0, 2)


def test_flat_linked_units_are_reported():
    net = _net([0.0, 0.0, 1.0], Linked("relu"))
    with torch.no_grad():
        net[0].weight.zero_()  # units 0 and 1: z == 0 everywhere -> every member flat
    rep = liveness(net, torch.randn(8, 2))
    assert rep.linked.flat_units.tolist() == [2]
    assert rep.summary["flat_linked_units"] == 2


def test_bad_data_and_models():
    with pytest.raises(TypeError, match="data must be"):
        liveness(_net([0.0, 0.0, 0.0]), "not data")
    with pytest.raises(ValueError, match="no activation"):
        dead_neurons(nn.Sequential(nn.Linear(2, 2)), torch.randn(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        liveness(_net([0.0, 0.0, 0.0]), torch.randn(2, 2), batch_size=0)


def test_dead_unit_gradient_demo():
    t = dead_unit_gradients(bias=-100.0)
    assert t.loc["ReLU", "|dL/dw|"] == 0.0
    assert t.loc["LK-ReLU", "|dL/dw|"] > 0 and t.loc["ReLU + Sep-U", "|dL/dw|"] > 0
    assert t["receives gradient"].tolist() == [False, True, True]
    # Sep-U on one unit: d/db of ½·relu(1 - max z) = -½ per unit, times λ
    assert t.loc["ReLU + Sep-U", "|dL/db|"] == pytest.approx(0.5e-4)


def test_liveness_reads_what_the_activation_sees_after_batchnorm():
    from alive.models import MLP

    torch.manual_seed(0)
    net = MLP(2, 2, depth=1, width=4, batchnorm=True)
    linear = next(m for m in net.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        linear.bias.fill_(-100.0)  # every raw output negative...
    x = torch.randn(64, 2)
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm1d))
    bn.momentum = 1.0  # ...but BatchNorm, its running statistics those of x, centres them
    net.train()
    net(x)
    rep = liveness(net, x)
    assert rep.summary["measured_at"] == "activation input"
    assert rep.summary["dead_units"] == 0 and rep.dead_points < 64
    assert dead_neurons(net, x).dead.sum() == 0
    raw = liveness(net, x, layers=[linear])  # the layer's own output, on request
    assert raw.summary["measured_at"] == "layer output"
    assert raw.summary["dead_units"] == 4 and raw.dead_points == 64


@pytest.mark.parametrize("activation", ["lk-selu", "lk-prelu", "lk-swish", "lk-relu"])
def test_a_linked_activation_is_one_layer_not_one_per_member(activation):
    from alive.activations import make_activation

    net = nn.Sequential(nn.Linear(2, 3), make_activation(activation), nn.Linear(6, 3), make_activation(activation), nn.Linear(6, 1))
    x = torch.randn(16, 2)
    assert dead_neurons(net, x).name.tolist() == ["1", "3"]
    rep = liveness(net, x)
    assert rep.layers.layer.tolist() == ["1", "3"] and rep.summary["units"] == 6


def test_an_activation_module_called_twice_is_two_layers():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.act = nn.Linear(2, 3), nn.Linear(3, 2), nn.Linear(2, 1), nn.ReLU()

        def forward(self, x):
            return self.c(self.act(self.b(self.act(self.a(x)))))

    net = Twice()
    with torch.no_grad():
        net.b.bias.fill_(-100.0)  # the second call sees a dead layer
    rep = liveness(net, torch.randn(10, 2))
    assert rep.layers.layer.tolist() == ["act", "act (call 2)"]
    assert rep.layers.dead_units.tolist()[1] == 2 and rep.dead_points == 10


def test_models_without_activation_modules_fall_back_to_their_layer_outputs():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    rep = liveness(Functional(), torch.randn(10, 2))
    assert rep.summary["measured_at"] == "layer output" and rep.layers.layer.tolist() == ["a"]

    class DeclaredOnly(Functional):  # holds an activation module but never calls it
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

    net = DeclaredOnly()
    with torch.no_grad():
        net.a.bias.fill_(-100.0)
    rep = liveness(net, torch.randn(10, 2))
    assert rep.summary["measured_at"] == "layer output" and rep.summary["dead_units"] == 3
    with pytest.raises(ValueError, match="layers= is empty"):
        liveness(Functional(), torch.randn(10, 2), layers=[])


def test_an_output_nonlinearity_is_not_a_hidden_layer():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    x = torch.randn(50, 4)
    rep = liveness(net, x)
    assert rep.layers.layer.tolist() == ["1"]
    assert liveness(net, x, include_output=True).layers.layer.tolist() == ["1", "3"]


def test_activations_called_by_keyword_and_a_changing_number_of_calls():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(2, 3), nn.Linear(3, 1), nn.ReLU()

        def forward(self, x):
            return self.b(self.act(input=self.a(x)))

    assert liveness(Keyword(), torch.randn(10, 2)).layers.layer.tolist() == ["act"]

    class Varying(Keyword):
        def forward(self, x):
            h = self.act(self.a(x))
            if x.shape[0] < 5:  # the last, smaller batch takes a second activation
                h = self.act(h)
            return self.b(h)

    with pytest.raises(RuntimeError, match="activation modules .* times in different forward passes"):
        liveness(Varying(), torch.randn(12, 2), batch_size=8)



def test_sequences_through_linear_layers_have_their_features_as_units():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 2)  # 5 samples of 4 positions: the units are the 3 features, not the 4 positions
    x[0, :, 0] = -torch.rand(4) - 0.5  # sample 0: every position negative on input 0 -> dead at the layer
    x[1:, 0, 0] = 1.0
    net = _net([-0.1, 10.0, 0.0])  # unit 0: z = x0 - 0.1; unit 1 always on; unit 2: z = x0
    with torch.no_grad():
        net[0].bias[1] = -10.0  # unit 1 always off: dead
    rep = liveness(net, x)
    row = rep.layers.iloc[0]
    assert (row.units, row.dead_units, row.affine_units, row.dead_points) == (3, 1, 0, 1)
    assert rep.points == 5 and rep.dead_points == 1
    assert liveness(net, x, unit_dim=1).layers.iloc[0].units == 4  # the positions read as units, if asked
    assert liveness(net, x, layers=[net[0]]).layers.iloc[0].units == 3  # a Linear's own output too
    dn = dead_neurons(net, x)
    assert (dn.loc[0, "neurons"], dn.loc[0, "dead"]) == (3, 1)
    linked = _net([-0.1, -10.0, 0.0], Linked("relu", dim=-1))
    dn = dead_neurons(linked, x).iloc[0]
    assert (dn.neurons, dn.dead, dn.dead_members) == (3, 0, 1)  # unit 1: relu(z) always 0, relu(-z) not
    with torch.no_grad():
        linked[0].weight[1].zero_()
        linked[0].bias[1] = 0.0
    assert liveness(linked, x).linked.flat_units.tolist() == [1]  # z == 0 everywhere: both members flat


def test_conv1d_maps_keep_channels_as_units_and_bad_unit_dims_are_refused():
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 1))
    rep = liveness(net, torch.randn(4, 2, 8))
    assert rep.layers.iloc[0].units == 3
    for bad in ("last", 0, True, 1.0):
        with pytest.raises(ValueError, match="unit_dim"):
            liveness(net, torch.randn(4, 2, 8), unit_dim=bad)
    with pytest.raises(ValueError, match="unit_dim"):
        dead_neurons(net, torch.randn(4, 2, 8), unit_dim="features")
    with pytest.raises(ValueError, match="does not name a unit dimension"):
        liveness(net, torch.randn(4, 2, 8), unit_dim=3)


def test_auto_unit_dim_follows_the_linear_output_not_just_the_last_layer_type():
    x = torch.randn(8, 4)
    unflat = nn.Sequential(nn.Linear(4, 30), nn.Unflatten(1, (3, 2, 5)), nn.ReLU(), nn.Flatten(), nn.Linear(30, 1))
    assert liveness(unflat, x).layers.units.tolist() == [3]  # reshaped into 3 channels of 2x5
    assert dead_neurons(unflat, x).neurons.tolist() == [3]
    # an activation before the first Linear in every pass, batches smaller than the data set
    first = nn.Sequential(nn.Tanh(), nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    seq = torch.randn(8, 4, 2)
    assert liveness(first, seq, batch_size=4, unit_dim=-1).layers.units.tolist() == [2, 3]
    assert liveness(first, seq, batch_size=4).layers.units.tolist() == [4, 3]  # the input: no Linear before it
    assert dead_neurons(first, seq, batch_size=4).neurons.tolist() == [4, 3]
    # layers= on a module after a Linear on sequences: the Linear's features
    ln_net = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 1))
    assert liveness(ln_net, seq, layers=[ln_net[1]]).layers.units.tolist() == [3]
    assert liveness(ln_net, seq).layers.units.tolist() == [3]


def test_a_linked_activation_counts_units_along_its_own_dim_everywhere():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 3, 3), Linked("relu", dim=-1), nn.Flatten(), nn.Linear(3 * 12, 1))
    x = torch.randn(4, 2, 8)  # conv output (4, 3, 6); linked along the 6 positions -> (4, 3, 12)
    rep = liveness(net, x)
    assert rep.layers.units.tolist() == [6] and rep.linked.units.tolist() == [6]
    assert dead_neurons(net, x).neurons.tolist() == [6]


def test_one_value_per_point_is_one_unit_whatever_the_unit_dim():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1), nn.Flatten(0), nn.Sigmoid())
    x = torch.randn(6, 2)
    for unit_dim in ("auto", -1):
        assert dead_neurons(net, x, unit_dim=unit_dim).neurons.tolist() == [3, 1]
        assert liveness(net, x, unit_dim=unit_dim, include_output=True).layers.units.tolist() == [3, 1]


def test_a_shared_activation_module_is_one_row_per_call_in_dead_neurons_and_liveness():
    class Thrice(nn.Module):  # one self.act for layers of 4, 5 and 4 units
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.out = nn.Linear(2, 4), nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.out(self.act(self.c(self.act(self.b(self.act(self.a(x)))))))

    net = Thrice()
    with torch.no_grad():
        net.b.bias.fill_(-100.0)  # the second call: every unit dead
        net.b.weight.zero_()
    x = torch.randn(16, 2)
    table = dead_neurons(net, x)
    assert table.name.tolist() == ["act", "act (call 2)", "act (call 3)"]
    assert table.neurons.tolist() == [4, 5, 4]
    assert table.dead.tolist()[1] == 5  # not OR-ed with the live first call
    rep = liveness(net, x)
    assert rep.layers.layer.tolist() == ["act", "act (call 2)", "act (call 3)"]
    with pytest.raises(ValueError, match="no samples"):
        liveness(net, x[:0])
