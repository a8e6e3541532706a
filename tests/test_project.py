"""The project's own consistency: dependencies, notebooks, profiles, book."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

import alive.experiments as E
from alive import native

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def _names(reqs):
    return {re.split(r"[<>=!~ ]", r, 1)[0].strip().lower(): r.replace(" ", "") for r in reqs}


def test_pyproject_and_environment_yml_agree():
    import tomllib

    pj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(pj["dependencies"]) + [r for extra in pj["optional-dependencies"].values() for r in extra]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _names(reqs) == _names(pip)
    assert "torch==2.14.1" in reqs and "torchvision==0.29.1" in reqs


def test_notebook_sources_are_clean_and_parameterised():
    assert len(NOTEBOOKS) >= 12
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), name
        assert "parameters" in code[0]["metadata"].get("tags", []), name
        assert 'profile = "smoke"' in "".join(code[0]["source"]), name


def test_every_notebook_has_valid_book_and_paper_profiles():
    for name in NOTEBOOKS:
        for profile in ("book", "paper"):
            path = ROOT / "profiles" / profile / f"{name}.yml"
            assert path.exists(), path
            values = yaml.safe_load(path.read_text()) or {}
            assert values.get("profile") == profile, path
            if name in E.EXPERIMENTS:
                E.params(name, **values)  # types and names are valid


def test_book_lists_every_notebook_and_the_makefile_runs_them():
    toc = (ROOT / "book" / "_toc.yml").read_text()
    make = (ROOT / "Makefile").read_text()
    listed = re.search(r"^NOTEBOOKS := (.*)$", make, re.M).group(1).split()
    assert sorted(listed) == NOTEBOOKS
    for name in NOTEBOOKS:
        assert f"book/{name}" in toc
    assert (ROOT / "_config.yml").exists() and "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_starts_with_make_book_then_make_test_and_its_example_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^make \w+", readme, re.M)
    assert commands[:2] == ["make book", "make test"]
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["loss"].requires_grad and scope["model"].hidden[0][0].weight.grad is not None


def test_long_profiles_are_valid():
    paths = sorted((ROOT / "profiles" / "long").glob("*.yml"))
    assert paths
    for path in paths:
        values = yaml.safe_load(path.read_text())
        assert values.get("profile") == "long", path
        E.params(path.stem, **values)


def test_notebook_parameters_are_the_experiments_smoke_defaults():
    """papermill (notebook defaults + profile file) and ``alive sweep`` (experiment defaults +
    the same file) must describe the same runs."""
    checked = 0
    for name in NOTEBOOKS:
        if name not in E.EXPERIMENTS:
            continue
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        scope: dict = {}
        exec("".join(cell["source"]), scope)
        defaults = dataclasses.asdict(E.params(name))
        for key, value in scope.items():
            if not key.startswith("__"):
                assert defaults[key] == value, (name, key, value, defaults[key])
                checked += 1
    assert checked > 50


def test_overhead_bench_prints_one_ratio_per_line():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--quick"], capture_output=True, text=True, check=True).stdout
    steps = {"sepup_step_mlp50x4", "sepup_step_cnn", "sepup_step_cnn_channels_last"}
    names = {"linked_relu_vs_relu", "linked_relu_vs_naive"} | steps
    if native.available():  # the same steps with the PyTorch penalty, beside the native kernel's
        names |= {s + "_pytorch_penalty" for s in steps}
    tail = dict(line.split(": ") for line in out.strip().splitlines()[-len(names):])
    assert set(tail) == names
    assert all(float(v) > 0 for v in tail.values())
