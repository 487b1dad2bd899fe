"""Calibrating an emulated station and training on it with its records, through the command line."""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
import time

import numpy as np
import pytest

from pnn.calibration import CalibrationStore, Calibrator, Sweep, get_model
from pnn.cli import main
from pnn.emulators import EmulatedHardware, ScpiEmulator, emulated_node, parse_layers
from pnn.errors import CalibrationError

LAYERS = "12x8:tanh,8x7:linear"


def start(serial_number: str = "SN0001", preset: str = "default") -> ScpiEmulator:
    return ScpiEmulator(EmulatedHardware(parse_layers(LAYERS), preset=preset, seed=0), serial_number=serial_number).start()


@pytest.fixture
def station(tmp_path):
    emulator = start()
    path = emulator.write_station(tmp_path / "station.toml", timeout_s=2.0)
    yield emulator, path
    emulator.stop()


def run_cli(monkeypatch, *arguments: str, answers: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    return main([*arguments])


def test_calibrate_station_writes_a_record_per_node(station, monkeypatch, capsys):
    emulator, path = station
    assert run_cli(monkeypatch, "calibrate", "--station", str(path), "--yes", "--quiet", "--points", "40") == 0
    out = capsys.readouterr().out
    assert "emulator: PNN,EMULATED-SCPI,SN0001,1.0" in out
    store = CalibrationStore(path.parent / "calibrations")
    records = {record.node: record for record in store.records()}
    assert sorted(records) == ["layer1", "layer2"]
    assert records["layer1"].model == "tanh"
    assert records["layer2"].model == "linear"
    assert records["layer1"].identity["instruments"][0]["identity"] == "PNN,EMULATED-SCPI,SN0001,1.0"
    assert len(list((path.parent / "calibrations" / "plots").glob("*.png"))) == 2
    # Calibrating restored every parameter channel to where it was (0 V after power-on).
    np.testing.assert_array_equal(emulator.hardware.levels, 0.0)


def test_calibrate_one_node_interactively(station, monkeypatch, capsys):
    _, path = station
    code = run_cli(monkeypatch, "calibrate", "--station", str(path), "--node", "layer2", "--quiet", "--points", "30",
                   answers="r\ns\n")
    assert code == 0
    out = capsys.readouterr().out
    assert "== node 'layer2' ==" in out
    assert "layer1" not in out.split("== node")[1]
    assert out.count("Accept, redo or skip this calibration?") == 2
    assert CalibrationStore(path.parent / "calibrations").records() == []


def test_unknown_station_node_is_a_usage_error(station, monkeypatch, capsys):
    _, path = station
    assert run_cli(monkeypatch, "calibrate", "--station", str(path), "--node", "layer9", "--yes") == 2
    assert "no node named layer9; the nodes are layer1, layer2" in capsys.readouterr().err


def test_fits_of_emulated_node_recover_the_crossbar():
    # The emulated node computes tanh(W x + b) in a crossbar behind SCPI: amplitude 1, gain 1.
    # Its weights start at 0 V, so the default sweep sets weights and biases too.
    node = emulated_node("scpi", 6, 4, seed=0, timeout_s=2.0)
    try:
        with pytest.raises(CalibrationError, match="node 'layer1' output channel 0: the stimulus takes a single value"):
            Calibrator(sweep=Sweep(points=20, repeats=1)).fit(node, progress=False)
        calibrator = Calibrator().fit(node, progress=False)
    finally:
        node.close()
    for channel in calibrator.fit_.channels:
        for name, truth in zip(get_model("tanh").parameter_names, (1.0, 1.0, 0.0, 0.0)):
            assert abs(channel.parameters[name] - truth) <= 4 * channel.uncertainties[name], (channel.channel, name)


def calibrate_station(monkeypatch, path, *options: str) -> None:
    assert run_cli(monkeypatch, "calibrate", "--station", str(path), "--yes", "--quiet", "--points", "30", "--repeats", "2",
                   "--parameter-points", "2", *options) == 0


def test_train_stores_the_record_hashes(station, monkeypatch, capsys, tmp_path):
    _, path = station
    calibrate_station(monkeypatch, path)
    code = run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "2", "--quiet", "--out", str(tmp_path / "run"))
    assert code == 0
    store = CalibrationStore(path.parent / "calibrations")
    expected = {record.node: record.content_hash for record in store.records()}
    used = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert {name: entry["record"] for name, entry in used["nodes"].items()} == expected
    assert used["store"] == str(store.path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["calibrations"] == expected
    identity = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert identity["calibrations"] == expected


def test_train_refuses_another_instrument(tmp_path, monkeypatch, capsys):
    first = start("SN0001")
    try:
        path = first.write_station(tmp_path / "station.toml", timeout_s=2.0)
        calibrate_station(monkeypatch, path)
    finally:
        first.stop()
    # Another unit of the same model replies after the restart: its serial number differs.
    second = start("SN0002")
    try:
        path = second.write_station(tmp_path / "station.toml", timeout_s=2.0)
        code = run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "1", "--quiet", "--out", str(tmp_path / "run"))
        err = capsys.readouterr().err
        assert code == 1
        assert "was made for another device than the connected node 'layer1'" in err
        assert "SN0001" in err
        assert "SN0002" in err
        assert not (tmp_path / "run").exists()
        np.testing.assert_array_equal(second.hardware.levels, 0.0)
        code = run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "1", "--quiet", "--allow-identity-mismatch",
                       "--out", str(tmp_path / "run"))
        assert code == 0
    finally:
        second.stop()


def test_train_refuses_an_expired_record(station, monkeypatch, capsys, tmp_path):
    _, path = station
    calibrate_station(monkeypatch, path, "--valid-for", str(1 / 3600))
    time.sleep(1.1)
    code = run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "1", "--quiet", "--out", str(tmp_path / "a"))
    assert code == 1
    assert "expired at" in capsys.readouterr().err
    code = run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "1", "--quiet", "--allow-expired-calibration",
                   "--out", str(tmp_path / "b"))
    assert code == 0
    used = json.loads((tmp_path / "b" / "calibration.json").read_text())
    assert used["nodes"]["layer1"]["expired_at_start"] is True


def test_require_mode_needs_every_record(station, monkeypatch, capsys, tmp_path):
    _, path = station
    code = run_cli(monkeypatch, "train", "--station", str(path), "--calibration", "require", "--epochs", "1", "--quiet",
                   "--out", str(tmp_path / "run"))
    assert code == 1
    assert "node 'layer1' has no calibration record" in capsys.readouterr().err


def test_uncalibrated_station_still_trains(station, monkeypatch, caplog, tmp_path):
    _, path = station
    code = run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "1", "--quiet", "--out", str(tmp_path / "run"))
    assert code == 0
    used = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert used["nodes"] == {"layer1": {"record": None}, "layer2": {"record": None}}
    assert "training it uncalibrated" in caplog.text


def test_twin_gradients_and_drift_checks_on_station(station, monkeypatch, tmp_path):
    _, path = station
    calibrate_station(monkeypatch, path)
    code = run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "4", "--quiet", "--twin-gradients",
                   "--drift-check", "2", "--out", str(tmp_path / "run"))
    assert code == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [m for m in metrics if m["kind"] == "drift"]
    # Two checks (after epochs 2 and 4) of two nodes.
    assert len(checks) == 4
    # The emulator does not drift, so no check finds anything to correct.
    assert all(not check["exceeded"] for check in checks), [c["exceeded"] for c in checks]


def test_resume_keeps_the_calibration_it_started_with(station, monkeypatch, tmp_path):
    _, path = station
    calibrate_station(monkeypatch, path)
    run = tmp_path / "run"
    assert run_cli(monkeypatch, "train", "--station", str(path), "--epochs", "2", "--quiet", "--out", str(run)) == 0
    first = json.loads((run / "calibration.json").read_text())
    # Pretend the run stopped early: remove the summary so it can be resumed, then recalibrate.
    (run / "summary.json").unlink()
    calibrate_station(monkeypatch, path)
    assert run_cli(monkeypatch, "train", "--resume", str(run), "--quiet") == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["calibrations"] == {name: entry["record"] for name, entry in first["nodes"].items()}
    newest = {r.node: r.content_hash for r in CalibrationStore(path.parent / "calibrations").records()}
    assert summary["calibrations"] != newest


def test_simulated_run_with_twin_gradients(monkeypatch, tmp_path):
    code = run_cli(monkeypatch, "train", "--device", "crossbar", "--hidden", "16", "--epochs", "2", "--quiet",
                   "--twin-gradients", "--out", str(tmp_path / "run"))
    assert code == 0
    used = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert used["nodes"]["layer1"]["source"].endswith(".json")
    stored = CalibrationStore(tmp_path / "run" / "calibrations").records()
    assert {record.node for record in stored} == {"layer1", "layer2"}
    assert dt.datetime.fromisoformat(used["nodes"]["layer1"]["created"]) <= dt.datetime.now(dt.timezone.utc)
