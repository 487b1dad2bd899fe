"""Training on emulated instruments with DFA, then auditing every command the emulator received.

The audit replays the emulator's record in order: every level written must lie within the
station's limits, no step on a ramped channel may exceed its ``max_step``, and every batch row
must lie within the input limits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pnn.controller import PhysicalNoProp
from pnn.datasets import load_dataset
from pnn.devices import build_station_layers, load_station
from pnn.emulators import EmulatedHardware, ScpiEmulator, SerialBoardEmulator, parse_layers
from pnn.learning import DFA
from pnn.network import Encoder, PhysicalNetwork, Readout

REPO = Path(__file__).resolve().parents[1]
LAYERS = "12x16:tanh,16x7:linear"


def _emulator(kind: str, tmp_path: Path):
    hardware = EmulatedHardware(parse_layers(LAYERS), seed=0)
    if kind == "scpi":
        return ScpiEmulator(hardware).start()
    return SerialBoardEmulator(hardware, link=tmp_path / "board").start()


def _channel_limits(station_path: Path) -> tuple[dict, dict]:
    """Return {instrument channel: (lower, upper, max_step)} for parameters and for inputs."""
    station = load_station(station_path)
    try:
        parameters, inputs = {}, {}
        for node in station.build_nodes():
            for name, bank in [("inputs", node._inputs), *node._banks.items()]:
                spec = bank.spec
                table = inputs if name == "inputs" else parameters
                for k, channel in enumerate(bank.group.channels):
                    table[channel] = (float(spec.lower_array.flat[k]), float(spec.upper_array.flat[k]), spec.max_step)
    finally:
        station.close()
    return parameters, inputs


def audit(emulator, station_path: Path) -> dict[str, int]:
    """Check the emulator's record against the station limits; return counts of what was checked."""
    parameters, inputs = _channel_limits(station_path)
    last = {channel: 0.0 for channel in parameters}
    checked = {"levels": 0, "rows": 0}
    for _, channel, value in emulator.level_writes():
        if channel in inputs:
            lower, upper, _ = inputs[channel]
            assert lower - 1e-9 <= value <= upper + 1e-9, (channel, value)
            continue
        lower, upper, max_step = parameters[channel]
        assert lower - 1e-9 <= value <= upper + 1e-9, (channel, value, lower, upper)
        assert abs(value - last[channel]) <= max_step * (1 + 1e-9), (channel, last[channel], value, max_step)
        last[channel] = value
        checked["levels"] += 1
    for _, channels, rows in emulator.sequences:
        lower = np.array([inputs[c][0] for c in channels])
        upper = np.array([inputs[c][1] for c in channels])
        assert np.all(rows >= lower - 1e-6)
        assert np.all(rows <= upper + 1e-6)
        checked["rows"] += rows.shape[0]
    assert not [entry for entry in emulator.commands() if entry.command.upper().startswith("*RST")]
    return checked


@pytest.mark.parametrize("kind", ["scpi", "serial"])
def test_dfa_trains_on_emulated_instruments(kind, tmp_path):
    emulator = _emulator(kind, tmp_path)
    try:
        station_path = emulator.write_station(tmp_path / "station.toml", timeout_s=2.0)
        data = load_dataset("vowels")
        layers = build_station_layers(station_path, 12, 7)
        encoder = Encoder(12, lower=-1.0, upper=1.0).fit(data.x_train)
        network = PhysicalNetwork([encoder, *layers, Readout(7)])
        controller = PhysicalNoProp(
            network, DFA(), lr=3e-3, epochs=20, batch_size=8, seed=0, clip_updates=True, progress=False,
        )
        try:
            controller.fit(data.x_train, data.y_train, n_classes=7)
            accuracy = controller.evaluate(data.x_test, data.y_test)["accuracy"]
        finally:
            network.apply_safe_state()
            network.close()
        # Measured 0.918 on both emulators with these settings; chance is 1/7.
        assert accuracy >= 0.85
        assert controller.n_rejected_ == 0
        checked = audit(emulator, station_path)
        assert checked["levels"] > 1000
        assert checked["rows"] >= 20 * len(data.x_train)
    finally:
        emulator.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["scpi", "serial"])
def test_pnn_train_station_reaches_90_percent(kind, tmp_path):
    emulator = _emulator(kind, tmp_path)
    try:
        station_path = emulator.write_station(tmp_path / "station.toml", timeout_s=2.0)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run(
            [sys.executable, "-m", "pnn", "train", "--station", str(station_path), "--epochs", "40", "--quiet",
             "--out", str(tmp_path / "run")],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert result.returncode == 0, result.stderr
        accuracy = float(result.stdout.strip().splitlines()[0].split(": ")[1])
        # Measured 0.918 on both emulators.
        assert accuracy >= 0.90
        audit(emulator, station_path)
        # The run ended with the safe state: every parameter channel is back at 0.
        parameters, _ = _channel_limits(station_path)
        levels = emulator.hardware.levels[np.array(sorted(parameters)) - 1]
        np.testing.assert_array_equal(levels, 0.0)
    finally:
        emulator.stop()
