"""Bad input on every command: one line naming the value and the fix, exit code 2, no traceback.

Each case runs the command line in-process (``pnn.cli.main``) and checks what a person sees on
stderr. Cases for ``pnn train`` options and configuration files that were covered before live
in tests/test_train_e2e.py and tests/test_station.py; these are the ones found by trying the
commands with broken files, unwritable paths and unreachable instruments.
"""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest

from pnn.cli import main
from pnn.emulators import EmulatedHardware, LayerSpec, ScpiEmulator


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo the handler ``main`` adds for the captured stderr, which closes after each test."""
    handlers = list(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)


def _one_line_error(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING ")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pnn {argv[0]}: error: "), err
    assert message in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed must be a whole number >= 0, got -1"),
        (["--max-consecutive-invalid", "0"], "max_consecutive_invalid must be at least 1"),
        (["--retry-backoff", "-1"], "retry_backoff_s must be a number of seconds >= 0"),
        (["--retry-backoff", "nan"], "retry_backoff_s must be a number of seconds >= 0"),
        (["--checkpoint-interval", "-5"], "checkpoint_interval_s must be a number of seconds >= 0"),
        (["--checkpoint-every", "-1"], "checkpoint_every must be 0 (off) or a number of steps"),
    ],
)
def test_train_options(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    _one_line_error(capsys, ["train", "--quiet", "--out", str(out), *args], message)
    # Bad settings are found before the run folder exists, so the same --out works once fixed.
    assert not out.exists()


def test_config_file_seed(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("seed = -3\n")
    _one_line_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")], "seed must be")


# -------------------------------------------------------------------------- run folders
def _run_folder(tmp_path, config):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{", "config.json is unreadable"),
        ("[]", 'has no "config" table'),
        ('{"config": {"epochs": "ten"}}', "epochs must be an integer"),
        ('{"config": {"learning_rate": 1}}', "unknown setting(s) learning_rate"),
    ],
)
def test_resume_broken_config(capsys, tmp_path, config, message):
    folder = _run_folder(tmp_path, config)
    _one_line_error(capsys, ["train", "--resume", str(folder)], message)


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04 not really a zip"])
def test_resume_damaged_checkpoint(capsys, tmp_path, content):
    folder = _run_folder(tmp_path, json.dumps({"config": {"epochs": 1, "hidden": [4]}}))
    (folder / "checkpoint.npz").write_bytes(content)
    line = _one_line_error(capsys, ["train", "--resume", str(folder)], "is damaged or not a NumPy .npz file")
    assert "start the run again" in line


def test_resume_damaged_summary(capsys, tmp_path):
    folder = _run_folder(tmp_path, json.dumps({"config": {"epochs": 1, "hidden": [4]}}))
    (folder / "summary.json").write_text("{not json")
    _one_line_error(capsys, ["train", "--resume", str(folder)], "summary.json is unreadable")


# --------------------------------------------------------------------------- stations
@pytest.fixture(scope="module")
def emulator():
    hardware = EmulatedHardware([LayerSpec(12, 7, "linear")], seed=0)
    with ScpiEmulator(hardware) as emu:
        yield emu


@pytest.fixture
def station(emulator, tmp_path):
    def write(*changes):
        text = emulator.station_toml(timeout_s=0.3)
        for old, new in changes:
            assert old in text
            text = text.replace(old, new, 1)
        path = tmp_path / "station.toml"
        path.write_text(text)
        return path
    return write


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


STATION_CASES = [
    (lambda e: [("timeout_s = 0.3", "timeout_s = true")], "[instruments.emulator] timeout_s: expected a number, got True"),
    (lambda e: [('transfer = "binary"', 'transfer = "binary"\ncommands = {level_set = "SOUR{chan}:VOLT {value}"}')],
     "commands.level_set = 'SOUR{chan}:VOLT {value}' uses {chan}"),
    (lambda e: [('channels = "1:12"', 'channels = "1001:1012"')], "rejected the query: -114"),
    (lambda e: [(e.resource, f"TCPIP::127.0.0.1::{_free_port()}::SOCKET")], "is unreachable: emulator: cannot reach"),
    (lambda e: [('identity = "PNN,EMULATED-SCPI"', 'identity = "ACME,DAQ-8"')], "but the station file expects 'ACME,DAQ-8'"),
    (lambda e: [('transfer = "binary"', 'transfer = "binary"\nread_termination = "\\r\\n"')], "terminator mismatch"),
]


@pytest.mark.parametrize(("changes", "message"), STATION_CASES)
def test_train_station_errors(capsys, emulator, station, tmp_path, changes, message):
    path = station(*changes(emulator))
    before = len(emulator.level_writes())
    _one_line_error(capsys, ["train", "--station", str(path), "--quiet", "--out", str(tmp_path / "run")], message)
    assert len(emulator.level_writes()) == before
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("changes", "message"), STATION_CASES[3:])
def test_devices_station_errors(capsys, emulator, station, changes, message):
    _one_line_error(capsys, ["devices", "--station", str(station(*changes(emulator)))], message)


def test_safe_output_outside_the_range(capsys, emulator, station, tmp_path):
    extra = '\n[safe_state]\n[[safe_state.outputs]]\ninstrument = "emulator"\nchannels = "1:2"\nvalue = 5.0\n'
    path = station()
    path.write_text(path.read_text() + extra)
    _one_line_error(capsys, ["devices", "--station", str(path)], "value = 5 lies outside channel 1")


# ---------------------------------------------------------------------------- emulate
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scpi", "--port", "0", "--record", "/proc/no/such/record.jsonl"], "cannot open the command record"),
        (["scpi", "--port", "0", "--write-station", "/proc/no/such/station.toml"], "cannot write the station file"),
        (["serial", "--link", "/proc/no/such/board"], "cannot create the link /proc/no/such/board"),
        (["serial", "--max-rows", "0"], "max_rows must be at least 1"),
        (["scpi", "--port", "0", "--duration", "-1"], "--duration must be a positive number of seconds"),
        (["scpi", "--layers", "0x3"], "both sizes must be at least 1"),
        (["scpi", "--layers", "100000x100000"], "use at most 1000000 per layer"),
        (["scpi", "--latency", "nan"], "latency_s must be a number >= 0"),
    ],
)
def test_emulate_options(capsys, args, message):
    # Each stops within 0.2 s if the bad option were accepted, instead of serving until Ctrl-C.
    duration = [] if "--duration" in args else ["--duration", "0.2"]
    _one_line_error(capsys, ["emulate", *args, *duration], message)


# ------------------------------------------------------------------------------ sweep
def test_sweep_scheduler_without_port(capsys, tmp_path):
    spec = tmp_path / "sweep.toml"
    spec.write_text('[sweep]\nout = "out"\n[fixed]\nepochs = 1\nhidden = [4]\n[grid]\nseed = [0]\n')
    _one_line_error(capsys, ["sweep", str(spec), "--scheduler", "nonsense", "--quiet"], "check the address")


def test_network_rejects_nan_between_nodes():
    """A NaN reading never reaches the next node as an input (a station with two nodes)."""
    from pnn.errors import MeasurementError
    from pnn.network import DigitalLinear, PhysicalNetwork

    first, second = DigitalLinear(3, 2, rng=0, name="first"), DigitalLinear(2, 2, rng=0, name="second")
    first.weight[:] = np.nan
    network = PhysicalNetwork([first, second])
    with pytest.raises(MeasurementError, match="node 'first'"):
        network.forward(np.ones((1, 3)))
    assert second._state is None
