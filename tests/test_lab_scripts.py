"""The lab scripts, run unchanged against the emulators, as a lab would run them."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pnn.emulators import EmulatedHardware, ScpiEmulator, SerialBoardEmulator, parse_layers

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "lab_scripts" / name), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(params=["scpi", "serial"])
def emulated(request, tmp_path):
    hardware = EmulatedHardware(parse_layers("12x16:tanh,16x7:linear"), seed=0)
    if request.param == "scpi":
        emulator = ScpiEmulator(hardware).start()
    else:
        emulator = SerialBoardEmulator(hardware, link=tmp_path / "board").start()
    station = emulator.write_station(tmp_path / "station.toml", timeout_s=2.0)
    yield emulator, station
    emulator.stop()


def test_check_station_changes_no_output(emulated):
    emulator, station = emulated
    result = run_script("check_station.py", "--station", str(station))
    assert result.returncode == 0, result.stderr
    assert "station OK" in result.stdout
    assert "EMULATED" in result.stdout
    assert "layer2.weight" in result.stdout
    assert not emulator.level_writes()
    assert not emulator.sequences


def test_check_station_bad_file_exit_code(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[instruments.daq]\nresource = 'TCPIP::127.0.0.1::1::SOCKET'\ndriver = 'scpi-source-meter'\ntimout_s = 1\n")
    result = run_script("check_station.py", "--station", str(bad))
    assert result.returncode == 2
    assert "did you mean 'timeout_s'" in result.stderr


def test_sweep_node_writes_table_and_goes_safe(emulated, tmp_path):
    emulator, station = emulated
    out = tmp_path / "sweep.csv"
    result = run_script("sweep_node.py", "--station", str(station), "--node", "layer1", "--input", "3",
                        "--points", "11", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(out.open()))
    assert rows[0][0].startswith("input3")
    table = np.array(rows[1:], dtype=float)
    assert table.shape == (11, 17)
    np.testing.assert_allclose(table[[0, -1], 0], [-1.0, 1.0])
    _, channels, swept = emulator.sequences[-1]
    assert swept.shape == (11, 12)
    np.testing.assert_array_equal(swept[:, [0, 1, 2]], 0.0)
    # The safe state at the end puts the inputs back to 0.
    np.testing.assert_array_equal(emulator.hardware.get_levels(list(channels)), 0.0)


def test_sweep_node_unknown_node(emulated):
    _, station = emulated
    result = run_script("sweep_node.py", "--station", str(station), "--node", "layer9")
    assert result.returncode == 2
    assert "no node named 'layer9'" in result.stderr


def test_train_station_runs_and_records(emulated, tmp_path):
    emulator, station = emulated
    result = run_script("train_station.py", "--station", str(station), "--epochs", "6", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.splitlines()[0].split(": ")[1])
    # Measured 0.837 after 6 epochs; chance is 1/7.
    assert accuracy >= 0.6
    assert "rejected batches: 0" in result.stdout
    assert (tmp_path / "run" / "summary.json").is_file()
    assert len(emulator.level_writes()) > 100
