"""Alignment metrics: the per-epoch angle between each hidden node's update and backprop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pnn.config import TrainConfig
from pnn.controller import PhysicalNoProp
from pnn.errors import ConfigError
from pnn.experiment import train
from pnn.learning import make_rule
from pnn.learning.angles import angle_degrees
from pnn.network import DigitalLinear, PhysicalNetwork, Readout
from pnn.runs import load_tree

REPO = Path(__file__).resolve().parents[1]


def epoch_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "epoch"]


def test_angle_degrees():
    assert angle_degrees(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(90.0)
    assert angle_degrees(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == pytest.approx(0.0, abs=1e-4)
    assert angle_degrees(np.array([1.0, 0.0]), np.array([-3.0, 0.0])) == pytest.approx(180.0)
    assert np.isnan(angle_degrees(np.zeros(3), np.ones(3)))


@pytest.mark.parametrize("rule,feedback", [("dfa", "random"), ("fa", "learned"), ("dtp", "random")])
def test_epoch_records_hold_angles(tmp_path, rule, feedback):
    train(TrainConfig(rule=rule, feedback=feedback, device="digital", epochs=3, hidden=[16, 16], log_alignment=True,
                      out=str(tmp_path / "run")), progress=False)
    records = epoch_records(tmp_path / "run")
    assert len(records) == 3
    for record in records:
        assert set(k for k in record if k.startswith("alignment_")) == {"alignment_layer1", "alignment_layer2"}
        for key in ("alignment_layer1", "alignment_layer2"):
            assert 0.0 < record[key] < 180.0


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_alignment_rules_descend_after_training(tmp_path, rule):
    # The forward weights come to align with the random feedback while training, so after a few
    # epochs every hidden update is within 90 degrees of the backprop gradient.
    summary = train(TrainConfig(rule=rule, feedback="random", device="digital", epochs=8, hidden=[64, 64],
                                log_alignment=True, out=str(tmp_path / "run")), progress=False)
    records = epoch_records(tmp_path / "run")
    for record in records[-3:]:
        for key in ("alignment_layer1", "alignment_layer2"):
            assert 0.0 < record[key] < 90.0, (key, record[key])
    assert summary["alignment_degrees"] == {
        "layer1": records[-1]["alignment_layer1"], "layer2": records[-1]["alignment_layer2"]
    }


@pytest.mark.parametrize("rule,device,preset", [("bp", "digital", None), ("pat", "crossbar", "ideal")])
def test_backprop_reference_has_zero_angle(tmp_path, rule, device, preset):
    train(TrainConfig(rule=rule, device=device, preset=preset, epochs=2, hidden=[16, 16], log_alignment=True,
                      out=str(tmp_path / "run")), progress=False)
    for record in epoch_records(tmp_path / "run"):
        assert record["alignment_layer1"] < 0.01
        assert record["alignment_layer2"] < 0.01


@pytest.mark.parametrize("feedback", ["random", "learned"])
def test_probe_leaves_training_unchanged(tmp_path, feedback):
    config = dict(rule="dfa", feedback=feedback, device="digital", epochs=3, hidden=[16, 16], seed=2)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **config), progress=False)
    probed = train(TrainConfig(out=str(tmp_path / "probed"), log_alignment=True, **config), progress=False)
    assert probed["train_loss"] == plain["train_loss"]
    a = load_tree(tmp_path / "plain" / "checkpoint.npz")["network"]
    b = load_tree(tmp_path / "probed" / "checkpoint.npz")["network"]
    for name in ("layer1", "layer2", "layer3"):
        np.testing.assert_array_equal(a[name]["parameters"]["weight"], b[name]["parameters"]["weight"])


def test_alignment_needs_node_models(rng):
    class Opaque(Readout):
        has_input_gradient = False

    network = PhysicalNetwork([DigitalLinear(4, 6, rng=0, name="fc0"), Opaque(6, name="opaque"),
                               DigitalLinear(6, 3, rng=1, name="fc1", activation="linear"), Readout(3)])
    controller = PhysicalNoProp(network, make_rule("dfa"), epochs=1, progress=False, log_alignment=True)
    x = rng.uniform(-1, 1, (20, 4))
    with pytest.raises(ConfigError, match=r"alignment metrics \(--log-alignment\): node 'opaque'.*no model"):
        controller.fit(x, rng.integers(0, 3, 20))
    assert np.all(network[0].get_parameters()["weight"] == DigitalLinear(4, 6, rng=0).get_parameters()["weight"])


def test_command_line_option(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pnn", "train", "--rule", "ifa", "--device", "digital", "--epochs", "2",
         "--hidden", "8", "8", "--log-alignment", "--quiet", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["config"]["log_alignment"] is True
    assert all("alignment_layer1" in record for record in epoch_records(out))
    assert re.search(r"angle to backprop, last epoch: layer1 [0-9.]+ deg, layer2 [0-9.]+ deg", result.stdout)


def test_summary_has_no_angles_without_the_option(tmp_path):
    summary = train(TrainConfig(rule="dfa", device="digital", epochs=1, hidden=[8], out=str(tmp_path / "run")),
                    progress=False)
    assert "alignment_degrees" not in summary
    assert not any(key.startswith("alignment_") for key in epoch_records(tmp_path / "run")[0])
