"""Mistakes a new user makes on the command line: one line, exit code 2, the value and the fix."""

from __future__ import annotations

import sys

import pytest

from pnn.cli import main
from pnn.errors import ConfigError
from pnn.simulators import get_device


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("read_noise_std=abc", "setting read_noise_std='abc' is invalid; give a number, for example read_noise_std=0.02"),
        ("adc_bits=abc", "setting adc_bits='abc' is invalid; give a whole number, for example adc_bits=8"),
        ("adc_bits=8.5", "setting adc_bits=8.5 is invalid; give a whole number"),
        ("read_noise_std=true", "setting read_noise_std=True is invalid; give a number"),
    ],
)
def test_device_option_of_wrong_type(option, message, tmp_path, capsys):
    code = main(["train", "--device-option", option, "--epochs", "1", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_device_option_of_right_type_is_applied():
    kind = get_device("crossbar")
    assert kind.config("default", {"adc_bits": 6, "read_noise_std": 0}).adc_bits == 6
    with pytest.raises(ConfigError, match="whole number"):
        kind.config("default", {"levels": 64.0})


def test_misspelled_option_names_the_command_and_the_fix(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--optimzer", "adam"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("pnn train: error: unrecognized arguments: --optimzer adam")
    assert "did you mean --optimizer?" in err
    assert "see 'pnn train --help'" in err


def test_sweep_plot_without_matplotlib_is_a_usage_error(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('[fixed]\ndataset = "vowels"\nepochs = 1\n[grid]\nseed = [0, 1]\n', encoding="utf-8")
    # A None entry in sys.modules makes the import fail as it does where matplotlib is missing.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "pnn.sweep.plot", raising=False)
    code = main(["sweep", str(spec), "--plot"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pnn sweep --plot needs matplotlib" in err
    assert "pip install 'pnn-lab[plot]'" in err
