import pytest

from alive.config import ConfigError, RunConfig


def test_defaults_are_valid_and_key_is_stable():
    a = RunConfig(depth=2, width=3)
    assert a.key("fp32") == RunConfig(depth=2, width=3).key("fp32")
    assert a.key("fp32") != a.replace(seed=1).key("fp32")
    assert a.key("fp32") != a.key("bf16")
    assert len(a.key("fp32")) == 16
    # an int in a float field is the same configuration (and key) as the float
    b = RunConfig(depth=2, width=3, lr=1, moons_noise=0)
    assert b == RunConfig(depth=2, width=3, lr=1.0, moons_noise=0.0)
    assert b.key("fp32") == RunConfig(depth=2, width=3, lr=1.0, moons_noise=0.0).key("fp32")
    assert type(b.lr) is float and type(a.depth) is int


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(activation="relux"), "valid names are"),
        (dict(optimizer="adamw"), "valid choices: adam, rmsprop, sgd, nesterov"),
        (dict(epochs="3"), "epochs must be int"),
        (dict(epochs=0), "epochs must be positive"),
        (dict(width=-2), "width must be positive"),
        (dict(lr=-0.1), "lr must be a positive"),
        (dict(constraint="up"), "needs a positive weight"),
        (dict(weight=1e-4), "constraint is 'none'"),
        (dict(dataset="cifar10"), "does not fit data set"),
        (dict(widen=True), "not a parameter of model 'mlp'"),
        (dict(rho=2.0), "rho must lie"),
        (dict(batchnorm="yes"), "batchnorm must be bool"),
        (dict(constraint="u", weight=float("nan")), "weight must be a finite non-negative"),
        (dict(decay=float("inf")), "decay must be a finite"),
        (dict(margin=-3.0), "margin must be a finite non-negative"),
        (dict(prelu_init=float("nan")), "prelu_init must be finite"),
        (dict(experiment="../elsewhere"), "experiment must be a plain name"),
        (dict(experiment=""), "experiment must be a plain name"),
        (dict(momentum=0.9), "momentum applies to the sgd and nesterov optimizers, not 'adam'"),
    ],
)
def test_invalid_configs_fail_with_one_clear_message(kw, message):
    base = dict(depth=2, width=3)
    base.update(kw)
    with pytest.raises(ConfigError, match=message):
        RunConfig(**base)


def test_replace_and_from_dict_reject_unknown_fields():
    with pytest.raises(ConfigError, match="unknown config field"):
        RunConfig(depth=1, width=1).replace(colour="red")
    with pytest.raises(ConfigError, match="unknown config field"):
        RunConfig.from_dict({"depth": 1, "width": 1, "colour": "red"})


def test_model_kwargs_and_label():
    c = RunConfig(dataset="cifar10", model="width", width=400, activation="lk-prelu")
    assert c.model_kwargs() == {"activation": "lk-prelu", "init": "glorot_uniform", "prelu_init": 0.0, "units": 400}
    d = RunConfig(dataset="cifar10", model="depth", widen=True, batchnorm=True)
    assert d.label == "ReLU √2 +BN"
    e = RunConfig(depth=2, width=2, constraint="up", weight=1e-4, annealed_dropout=0.9)
    assert e.model_kwargs()["dropout"] == (0.9, 1000) and "Sep-UP" in e.label
