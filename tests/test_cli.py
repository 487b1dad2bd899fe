"""The command line: help texts, the name catalog, and exit codes."""

from __future__ import annotations

import pytest

from pnn import catalog
from pnn.cli import main
from pnn.learning import RULES
from pnn.simulators import DEVICES
from pnn.datasets import DATASET_NAMES
from pnn.learning.feedback import FEEDBACK_STRATEGIES


def test_catalog_matches_registries():
    assert set(catalog.RULE_NAMES) == set(RULES)
    assert set(catalog.DEVICE_NAMES) == set(DEVICES)
    assert tuple(catalog.DATASET_NAMES) == tuple(DATASET_NAMES)
    assert tuple(catalog.FEEDBACK_NAMES) == tuple(FEEDBACK_STRATEGIES)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_train_help_states_units(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "parameter units per unit gradient" in text
    assert "examples per update" in text
    assert "passes over the training set" in text


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epoch", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--help" in err[0]
