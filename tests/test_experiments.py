import pandas as pd
import pytest

import alive.experiments as E
from alive.config import ConfigError


def test_parameter_types_and_names_are_checked_early():
    with pytest.raises(ConfigError, match="epochs must be int"):
        E.params("depth", epochs="4")
    with pytest.raises(ConfigError, match="seeds must be a list of int"):
        E.params("depth", seeds=0)
    with pytest.raises(ConfigError, match="unknown parameter"):
        E.params("depth", epoch=4)
    with pytest.raises(ConfigError, match="valid names"):
        E.params("width", activations=["relu", "lk-relux"])
    with pytest.raises(ConfigError, match="unknown method"):
        E.params("moons", methods=["relu", "dropout"])
    with pytest.raises(ConfigError, match="runs on mnist"):
        E.params("mnist", dataset="moons")


@pytest.mark.parametrize(
    "name,kw,count",
    [
        ("width", dict(seeds=[0, 1]), 2 * 8 * 2),
        ("depth", dict(seeds=[0, 1, 2]), 13 * 3 + 2 * 5 * 3),  # + smoke sweep depths [2, 4] of 5 nets
        ("params", dict(), 12),
        ("allcnn", dict(), 8),
        ("resnet", dict(), 11),
        ("scaling", dict(), 2 * 2 * 3),
        ("scaling", dict(activations=["relu", "lk-relu", "selu", "lk-selu"]), 2 * 4 * 3),
        ("moons", dict(widths=[1, 2], depths=[1, 10, 20]), 5 * 2 * 3),
        ("zero_init", dict(methods=["sep-up-zero"]), 4 + 2 * 4),  # + the two reference methods
        ("zero_init", dict(methods=["sep-up-zero"], reference_methods=[]), 4),
    ],
)
def test_run_counts(name, kw, count):
    assert len(E.configs(name, **kw)) == count


def test_paper_configurations_follow_the_papers():
    from alive.cli import load_profile

    d = E.configs("depth", **load_profile("depth", "paper"))
    assert 50 in {c.depth for c in d} and {c.epochs for c in d} == {200}
    assert {c.optimizer for c in d} == {"adam"} and {c.lr for c in d} == {1e-3} and {c.batch_size for c in d} == {32}
    assert {(c.activation, c.widen) for c in d if c.widen} == {("relu", True), ("prelu", True), ("selu", True), ("swish", True)}
    assert [c for c in d if c.batchnorm][0].activation == "relu"
    z = E.configs("zero_init", **load_profile("zero_init", "paper"))
    zero_sep = [c for c in z if c.constraint == "up" and c.init == "zero"]
    assert len(zero_sep) == 9 * 13  # the whole grid, one seed
    assert all(c.rho == 0.51 and c.annealed_dropout == 0.9 and c.weight == 1e-4 and c.epochs == 5000 for c in zero_sep)
    assert {c.init for c in z if c.constraint == "up" and c.rho == 0.5} == {"glorot_uniform"}  # the Glorot reference
    r = E.configs("resnet", **load_profile("resnet", "paper"))
    assert sum(not c.batchnorm for c in r) == 3 and all(c.augment and c.batch_size == 128 and c.lr == 1e-3 for c in r)


def test_smoke_runs_end_to_end_with_tables_and_claims():
    res = E.run("moons", widths=[1, 3], depths=[1, 3], epochs=20, progress="quiet")
    assert set(res.extra["grid"].method) == {"relu", "relu+bn", "sep-u", "sep-p", "sep-up"}
    assert list(res.claims.columns) == ["claim", "paper", "ours", "verdict"]
    assert set(res.claims.verdict) <= {"supported", "not supported", "n/a"}
    verdicts = res.claims.set_index("claim").verdict
    assert len(verdicts) == 8  # Figure 1's five claims and Figure 5's three
    assert verdicts["no network of width 1 reaches 95%"] != "n/a"
    assert verdicts["Sep-UP trains deeper than ReLU and ReLU + BN"] != "n/a"
    # a 3-layer grid cannot test 60 (Sep-UP), 120 (Sep-U) or "worse beyond 40" (Sep-P)
    assert verdicts["Sep-UP reaches 95% at width 3 at every depth up to 60 layers"] == "n/a"
    assert verdicts["Sep-P works up to 40 layers and is much worse deeper"] == "n/a"
    assert "profile: smoke" in res.describe()
    assert isinstance(res.table, pd.DataFrame) and res.table.shape[1] == 2
    cmp = E.compare_methods({"MOONS": res})
    assert len(cmp) == 5


def test_grid_helpers():
    grid = pd.DataFrame({"method": "relu", "depth": [1, 1, 10, 10], "width": [1, 2, 1, 2], "seed": 0,
                         "best_val_acc": [0.9, 1.0, 0.5, 0.97]})
    assert E.deepest_good(grid, "relu", 0.95) == 10
    assert E.deepest_good(grid, "relu", 0.95, width=1) is None
    assert E.narrowest_good(grid, "relu", 0.95, depth=1) == 2


def test_stored_results_by_seed_and_their_claims_side_by_side():
    from alive.results import MissingResult

    kw = dict(widths=[1, 2], depths=[1, 3], epochs=5, methods=["relu", "sep-up"])
    E.run("moons", seeds=[10, 11], progress="quiet", **kw)  # trains both seeds into the test's store
    by_seed = E.stored_by_seed("moons", [10, 11], **kw)
    assert list(by_seed) == ["seed 10", "seed 11", "median of 2 seeds"]
    assert set(by_seed["seed 11"].extra["grid"].seed) == {11}
    assert set(by_seed["median of 2 seeds"].extra["grid"].seed) == {10, 11}
    claims = E.compare_claims(by_seed)
    assert list(claims.index) == list(by_seed["seed 10"].claims.claim)
    assert list(claims.columns) == [("", "paper")] + [(k, c) for k in by_seed for c in ("ours", "verdict")]
    assert list(claims[("seed 11", "ours")]) == list(by_seed["seed 11"].claims.ours)
    assert len(E.compare_methods(by_seed)) == 3 * 2
    with pytest.raises(MissingResult, match="seed 12"):
        E.stored_by_seed("moons", [10, 12], **kw)
    assert set(E.stored("moons", seeds=(11,), **kw).extra["grid"].seed) == {11}
    with pytest.raises(ConfigError, match="seeds must be"):
        E.stored("moons", seeds=11, **kw)
    with pytest.raises(ConfigError, match="non-empty list of distinct seeds"):
        E.stored_by_seed("moons", 11, **kw)
    with pytest.raises(ConfigError, match="distinct"):
        E.stored_by_seed("moons", [10, 10], **kw)
    assert list(E.by_seed(by_seed["median of 2 seeds"])) == list(by_seed)
    assert list(E.by_seed(by_seed["seed 10"])) == ["seed 10"]


def test_each_zero_init_claim_quotes_its_own_sentence_of_the_paper():
    from alive import paper

    rows = [dict(method=m, depth=d, width=w, seed=10, best_val_acc=acc, final_train_acc=acc, status="ok")
            for m, good_width in (("sep-up-zero", 25), ("sep-up", 2), ("relu+bn", 99))
            for d in (1, 60) for w in (2, 25)
            for acc in [1.0 if w >= good_width else 0.5]]
    claims = E._grid_claims(E.params("zero_init", threshold=0.95), pd.DataFrame(rows), "fig4")
    sentences = [s for _, s in paper.SEPARATION_CLAIMS["fig4"]]
    assert claims.paper.tolist()[:2] == sentences
    assert claims.verdict.tolist()[:2] == ["supported", "supported"]  # width 25 vs 2 at depth 60; 60 layers vs none


def test_check_parameters_refuses_injected_unknown_names_wrong_profile_labels_and_missing_long():
    from alive.config import ConfigError
    from alive.cli import load_profile

    import json
    from pathlib import Path

    cells = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "moons.ipynb").read_text())["cells"]
    defaults = "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])

    def namespace(injected: str, **values):
        ns = {"In": ["", defaults, injected, "import alive.experiments as E"]}
        exec(defaults, {}, ns)
        ns.update(values)
        return ns

    E.check_parameters(namespace("# Parameters\nepochs = 3\n", epochs=3), "moons")  # a known name
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        E.check_parameters(namespace("# Parameters\nepoch = 3\n", epoch=3), "moons")
    E.check_parameters({"In": ["", defaults], "epoch": 3, "profile": "smoke"}, "moons")  # no papermill: nothing injected
    with pytest.raises(ConfigError, match="profile='paper', but epochs=50 is not the value of profiles/paper/moons.yml"):
        E.check_parameters(namespace('# Parameters\nprofile = "paper"\n', profile="paper"), "moons")
    paper = load_profile("moons", "paper")
    E.check_parameters(namespace("# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in paper.items()), **paper), "moons")
    E.check_parameters(namespace('# Parameters\nprofile = "custom"\nepochs = 7\n', profile="custom", epochs=7), "moons")
    with pytest.raises(ConfigError, match="no profile file"):
        E.check_parameters(namespace('# Parameters\nlong = "nosuch"\n', long="nosuch"), "moons")


@pytest.mark.parametrize("values, message", [
    ({"seeds": [10, 10]}, "distinct"), ({"methods": []}, "at least one"), ({"depths": []}, "at least one"),
    ({"threshold": 5.0}, r"\(0, 1\]"), ({"threshold": 0.0}, r"\(0, 1\]"),
])
def test_grid_parameters_are_checked_before_any_run(values, message):
    from alive.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        E.params("moons", **values)


def test_scaling_nets_are_checked():
    from alive.config import ConfigError

    with pytest.raises(ConfigError, match="unknown nets"):
        E.params("scaling", nets=["depth", "resnet"])


def test_check_parameters_reads_the_first_parameters_cell_and_the_last_injected_one():
    from alive.config import ConfigError

    params = 'profile = "smoke"\nlo, hi = -1.0, 1.0\nepochs: int = 5\n'
    ns = {"profile": "smoke", "lo": -1.0, "hi": 1.0, "epochs": 5}
    # papermill ran it; then the user edited the injected cell and re-ran it with the next one
    history = ["", params, "# Parameters\nepochs = 2\n", "import alive.experiments as E", "# Parameters\nhi = 2.0\n"]
    E.check_parameters({**ns, "In": history}, "moons")
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        E.check_parameters({**ns, "In": history + ["# Parameters\nepoch = 2\n"]}, "moons")
    E.check_parameters({**ns, "In": ["", "this is not python (", "# Parameters\nepochs = 2\n"]}, "moons")


def _fig_claims(figure, depths, reach):
    """Claims of a one-seed grid where every method reaches accuracy 1.0 up to depth ``reach[m]``."""
    rows = [dict(method=m, depth=d, width=w, seed=10, best_val_acc=1.0 if d <= reach.get(m, 0) else 0.5,
                 final_train_acc=1.0, status="ok", dead_point_fraction=0.0, dead_unit_fraction=0.0)
            for m in reach for d in depths for w in (1, 3)]
    return E._grid_claims(E.params("moons", threshold=0.95), pd.DataFrame(rows), figure).set_index("claim").verdict


def test_breakdown_and_depth_claims_are_na_only_where_the_grid_is_too_shallow():
    relu = "ReLU breaks down at 20-30 layers (deepest net reaching 95%)"
    assert _fig_claims("fig1", [1, 10, 20, 30, 40], {"relu": 20})[relu] == "supported"  # fails at 30 and 40: visible
    assert _fig_claims("fig1", [1, 10], {"relu": 10})[relu] == "n/a"  # still fine at the deepest depth
    assert _fig_claims("fig1", [1, 10, 20, 30, 40, 50], {"relu": 50})[relu] == "not supported"
    sep_u = _fig_claims("fig5", [1, 10], {"sep-u": 10})
    assert sep_u["Sep-U trains 10 layers of a single unit (above chance)"] == "n/a"
    deep = _fig_claims("fig5", [1, 60, 120], {"sep-u": 120})
    assert deep["Sep-U trains 120 layers of a single unit (above chance)"] == "supported"


def test_results_stay_out_of_the_checkout_when_run_elsewhere(tmp_path, monkeypatch):
    from pathlib import Path

    from alive.results import project_folder

    monkeypatch.chdir(tmp_path)
    assert project_folder("results") == tmp_path.resolve() / "results"
    assert project_folder("profiles") == Path(__file__).resolve().parents[1] / "profiles"
