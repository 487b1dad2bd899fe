"""The emulators and the pnn emulate / pnn devices commands."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pnn.cli import main
from pnn.devices import ScpiSourceMeter, TransportSettings, VisaTransport
from pnn.emulators import EmulatedHardware, FaultConfig, LayerSpec, ScpiEmulator, emulated_node, parse_layers
from pnn.emulators.base import split_commands, split_messages
from pnn.emulators.faults import parse_fault_rates
from pnn.devices import ConnectionLost
from pnn.errors import ConfigError, InstrumentTimeout, MeasurementError, PnnError

REPO = Path(__file__).resolve().parents[1]
FAST = TransportSettings(timeout_s=0.3, deadline_s=0.6)


# ------------------------------------------------------------------------- framing
def test_split_messages_keeps_blocks_whole():
    buffer = bytearray(b"*IDN?\nSOUR:SEQ:DATA #15a\nb;c;:INIT\nFETC")
    assert split_messages(buffer) == [b"*IDN?", b"SOUR:SEQ:DATA #15a\nb;c;:INIT"]
    assert buffer == b"FETC"


def test_split_messages_waits_for_incomplete_block():
    buffer = bytearray(b"DATA #210abc\n")
    assert split_messages(buffer) == []
    buffer += b"defghij\n"
    assert split_messages(buffer) == [b"DATA #210abc\ndefghij"]


def test_split_commands_keeps_trailing_block_bytes():
    message = b":SOUR1:VOLT 1 ;:DATA #12a ;INIT"
    assert split_commands(message) == [b"SOUR1:VOLT 1", b"DATA #12a ", b"INIT"]


def test_parse_layers_and_faults():
    assert parse_layers("12x8:tanh, 8x7:linear") == [LayerSpec(12, 8, "tanh"), LayerSpec(8, 7, "linear")]
    with pytest.raises(ConfigError, match="N_INxN_OUT"):
        parse_layers("12-8")
    assert parse_fault_rates(["late=0.25", "overrange=0.01"]) == {"late": 0.25, "overrange": 0.01}
    with pytest.raises(ConfigError, match="unknown fault kind"):
        parse_fault_rates(["latte=0.1"])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        FaultConfig(rates={"late": 2.0})


# --------------------------------------------------------------------------- hardware
def test_hardware_channels_compute_the_crossbar():
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], preset="ideal")
    channels = hardware.channels[0]
    weight = np.array([[0.5, -0.25, 1.0], [0.0, 0.75, -0.5]])
    hardware.set_levels(range(channels.first_weight, channels.first_bias), weight.ravel())
    hardware.set_levels([channels.first_bias, channels.first_bias + 1], [0.1, -0.2])
    x = np.array([[0.2, -0.4, 0.6], [1.0, 0.0, -1.0]])
    readings = hardware.run([1, 2, 3], x, [1, 2, 3, 4])
    preactivation = x @ weight.T + np.array([0.1, -0.2])
    np.testing.assert_allclose(readings[:, 2:], preactivation, atol=1e-6)
    np.testing.assert_allclose(readings[:, :2], np.tanh(preactivation), atol=1e-6)
    np.testing.assert_array_equal(hardware.get_levels([1, 2, 3]), x[-1])


def test_hardware_rejects_out_of_range_levels_atomically():
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")])
    with pytest.raises(ValueError, match="out of range"):
        hardware.set_levels([1, 2], [0.5, 5.0])
    np.testing.assert_array_equal(hardware.get_levels([1, 2]), [0.0, 0.0])
    with pytest.raises(ValueError, match="does not exist"):
        hardware.set_levels([999], [0.0])


# ----------------------------------------------------------------------------- server
def test_scpi_emulator_binds_loopback_only_and_records_time():
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")])
    with ScpiEmulator(hardware) as emulator:
        with socket.create_connection(("127.0.0.1", emulator.port), timeout=2) as connection:
            connection.sendall(b"*IDN?\nSOUR4:VOLT 0.5;:SOUR4:VOLT?\n")
            reply = b""
            while reply.count(b"\n") < 2:
                reply += connection.recv(1024)
        address = emulator._server.getsockname()[0] if emulator._server else None
        entries = emulator.commands()
    assert address == "127.0.0.1"
    assert reply == b"PNN,EMULATED-SCPI,SN0001,1.0\n0.5\n"
    assert [entry.command for entry in entries] == ["*IDN?", "SOUR4:VOLT 0.5", "SOUR4:VOLT?"]
    assert entries[0].t <= entries[1].t <= entries[2].t
    assert emulator.level_writes() == [(entries[1].t, 4, 0.5)]


def test_scpi_emulator_error_queue_and_silent_failed_query():
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")])
    with ScpiEmulator(hardware) as emulator:
        driver = ScpiSourceMeter(VisaTransport(emulator.resource, FAST, name="emu"), name="emu")
        driver.connect()
        with pytest.raises(InstrumentTimeout, match="no reply"):
            driver.query("level_get", channel=999)
        assert driver.read_errors() == [(-114, "Header suffix out of range; source channel 999 does not exist (1..11)")]
        driver.close()


def test_garbled_reading_is_a_measurement_error():
    node = emulated_node("scpi", 3, 2, seed=0, timeout_s=0.5, transfer="ascii")
    try:
        # The completion reply arrives intact (in two pieces); the readings arrive garbled.
        node.emulator.inject("split", split_pieces=2, split_pause_s=0.0)
        node.emulator.inject("garbled")
        with pytest.raises(MeasurementError):
            node.forward(np.zeros((4, 3)))
        assert node.forward(np.zeros((4, 3))).shape == (4, 2)
    finally:
        node.close()


def test_resync_survives_a_garbled_identity_reply():
    node = emulated_node("scpi", 3, 2, seed=0, timeout_s=0.3, deadline_s=0.6)
    try:
        node.emulator.inject("no_reply")
        with pytest.raises(InstrumentTimeout):
            node.forward(np.zeros((4, 3)))
        # The first resynchronisation reply is garbled; the second attempt gets through.
        node.emulator.inject("garbled")
        assert node.forward(np.zeros((4, 3))).shape == (4, 2)
        assert node.instruments["emulator"].transport.stats.resyncs == 1
    finally:
        node.close()


def test_noise_and_latency_options():
    node = emulated_node("scpi", 3, 2, seed=0, preset="ideal", timeout_s=1.0,
                         faults=FaultConfig(latency_s=0.02, noise_std=0.05, seed=1))
    try:
        start = time.monotonic()
        first = node.forward(np.zeros((50, 3)))
        assert time.monotonic() - start >= 0.04
        second = node.forward(np.zeros((50, 3)))
        assert 0.02 < float(np.std(first - second)) < 0.12
    finally:
        node.close()


# ---------------------------------------------------------------------------- commands
def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pnn", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_emulate_scpi_command_picks_a_free_port(tmp_path):
    record = tmp_path / "record.jsonl"
    station = tmp_path / "station.toml"
    result = _run_cli("emulate", "scpi", "--port", "0", "--layers", "3x2:tanh", "--duration", "0.5",
                      "--record", str(record), "--write-station", str(station))
    assert result.returncode == 0, result.stderr
    port = int(re.search(r"port (\d+)", result.stdout).group(1))
    assert port > 0
    assert f"TCPIP::127.0.0.1::{port}::SOCKET" in result.stdout
    assert "layer1 (3 -> 2, tanh)" in result.stdout
    assert f"TCPIP::127.0.0.1::{port}::SOCKET" in station.read_text()
    assert record.exists()


def test_emulate_serial_command_prints_device(tmp_path):
    result = _run_cli("emulate", "serial", "--layers", "3x2", "--duration", "0.5", "--link", str(tmp_path / "board"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"serial board emulator on /dev/\S+", result.stdout)
    assert f"resource: {tmp_path / 'board'}" in result.stdout


def test_emulate_rejects_bad_options(capsys):
    assert main(["emulate", "scpi", "--fault", "late"]) == 2
    assert "write KIND=RATE" in capsys.readouterr().err
    assert main(["emulate", "scpi", "--layers", "3by2"]) == 2


def test_emulate_recorded_commands_as_json_lines(tmp_path):
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")])
    path = tmp_path / "record.jsonl"
    with ScpiEmulator(hardware, record_path=path) as emulator:
        with socket.create_connection(("127.0.0.1", emulator.port), timeout=2) as connection:
            connection.sendall(b"SOUR1:VOLT 0.25\n*OPC?\n")
            connection.recv(16)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["command"] for line in lines] == ["SOUR1:VOLT 0.25", "*OPC?"]
    assert all(line["t"] >= 0 for line in lines)


def test_devices_command_lists_ports(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "serial ports (pyserial):" in out
    assert "local only" in out


def test_devices_command_identifies_station_without_writing(tmp_path, capsys):
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")])
    with ScpiEmulator(hardware) as emulator:
        station = emulator.write_station(tmp_path / "station.toml", timeout_s=1.0)
        assert main(["devices", "--station", str(station)]) == 0
        out = capsys.readouterr().out
        assert "emulator: TCPIP::127.0.0.1::" in out
        assert "PNN,EMULATED-SCPI,SN0001,1.0" in out
        assert "node layer1 weight" in out
        assert not emulator.level_writes()
        assert not emulator.sequences


def test_devices_command_bad_station_is_one_line(tmp_path, capsys):
    assert main(["devices", "--station", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "not found" in err[0]


def test_slow_period_delays_replies():
    node = emulated_node("scpi", 3, 2, seed=0, timeout_s=1.0, faults=FaultConfig(slow_latency_s=0.15))
    try:
        instrument = node.instruments["emulator"]
        start = time.monotonic()
        instrument.identify()
        fast = time.monotonic() - start
        node.emulator.inject("slow", slow_s=1.0)
        instrument.identify()
        start = time.monotonic()
        instrument.identify()
        slow = time.monotonic() - start
        assert fast < 0.1
        assert slow >= 0.15
    finally:
        node.close()


def test_disconnect_fault_then_automatic_reconnect():
    node = emulated_node("scpi", 3, 2, seed=0, timeout_s=0.3, deadline_s=0.6)
    try:
        node.emulator.inject("disconnect")
        with pytest.raises(PnnError):
            node.forward(np.zeros((4, 3)))
        outputs = None
        for _ in range(3):
            try:
                outputs = node.forward(np.zeros((4, 3)))
                break
            except PnnError:
                continue
        assert outputs is not None
        assert node.emulator.faults.counts["disconnect"] == 1
        assert node.instruments["emulator"].reconnects >= 1
    finally:
        node.close()


class _FakePort:
    def __init__(self, device, vid, pid, serial_number):
        self.device, self.vid, self.pid, self.serial_number = device, vid, pid, serial_number


def test_serial_adapter_found_by_usb_identity(tmp_path, monkeypatch):
    from serial.tools import list_ports

    from pnn.devices import SerialBoard, SerialOptions, SerialTransport, UsbIdentity
    from pnn.emulators import SerialBoardEmulator

    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")])
    with SerialBoardEmulator(hardware) as emulator:
        ports = [_FakePort("/dev/ttyUSB7", 0x1234, 0x5678, "OTHER"),
                 _FakePort(emulator.device_path, 0x2341, 0x8036, "SN0001")]
        monkeypatch.setattr(list_ports, "comports", lambda: ports)
        usb = UsbIdentity(vid=0x2341, pid=0x8036, serial_number="SN0001")
        transport = SerialTransport("/dev/ttyACM-old-path", FAST, name="board", options=SerialOptions(usb=usb))
        board = SerialBoard(transport, name="board")
        assert board.connect() == emulator.identity
        board.close()
        missing = SerialTransport("/dev/ttyACM0", FAST, name="board",
                                  options=SerialOptions(usb=UsbIdentity(vid=0x9999)))
        with pytest.raises(ConnectionLost, match="no serial port with USB identity"):
            missing.open()
