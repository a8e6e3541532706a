import subprocess
import sys

import pytest

from alive.cli import load_profile, main


def test_help_for_every_command(capsys):
    for cmd in ([], ["train"], ["sweep"], ["results"]):
        with pytest.raises(SystemExit) as e:
            main(cmd + ["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--activation" in out and "--shard" in out and "--experiment" in out


def test_unknown_names_are_rejected_before_training(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--activation", "relux", "--depth", "2", "--width", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown activation 'relux'" in err and "lk-relu" in err
    with pytest.raises(SystemExit):
        main(["sweep", "--experiment", "nope", "--profile", "smoke"])
    assert "valid experiments" in capsys.readouterr().err


def test_train_stores_a_result_and_results_lists_it(tmp_path, capsys):
    store = str(tmp_path)
    assert main(["train", "--depth", "2", "--width", "3", "--epochs", "3", "--batch-size", "none", "--lr", "0.01",
                 "--experiment", "cli", "--store", store, "--device", "cpu"]) == 0
    assert "best val acc" in capsys.readouterr().out
    assert main(["results", "--experiment", "cli", "--store", store, "--format", "csv"]) == 0
    assert "best_val_acc" in capsys.readouterr().out


def test_sweep_dry_run_and_profiles(tmp_path, capsys):
    assert main(["sweep", "--experiment", "moons", "--profile", "smoke", "--dry-run", "--store", str(tmp_path)]) == 0
    assert "30 runs, 30 to train" in capsys.readouterr().out
    dry = ["sweep", "--experiment", "moons", "--profile", "smoke", "--dry-run", "--store", str(tmp_path), "--retrain-before"]
    assert main(dry + ["2026-01-01"]) == 0
    assert "30 runs, 30 to train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(dry + ["last week"])
    assert exit_.value.code == 2 and "not an ISO date" in capsys.readouterr().err
    assert load_profile("depth", "book")["profile"] == "book"
    assert load_profile("moons", "book")["long"] == "paper"  # the stored paper grid beside the book one
    from alive.config import ConfigError

    with pytest.raises(ConfigError, match="named by a string"):
        load_profile("moons", 5)  # e.g. papermill -p long 5
    with pytest.raises(ConfigError, match="no profile file"):
        load_profile("moons", "nope")


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "alive", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "sweep" in out
