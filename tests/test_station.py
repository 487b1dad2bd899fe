"""Station files: checks before any output changes, limits, and the safe state."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from pnn.devices import ConnectionLost, load_station, parse_station
from pnn.emulators import EmulatedHardware, LayerSpec, ScpiEmulator, SerialBoardEmulator
from pnn.errors import ConfigError, InstrumentError, InstrumentTimeout


@pytest.fixture
def emulator():
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], seed=0)
    with ScpiEmulator(hardware) as emu:
        yield emu


@pytest.fixture
def station_text(emulator):
    return emulator.station_toml(timeout_s=0.3, deadline_s=0.6)


def _write(tmp_path, text, name="station.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _no_output_changed(emulator):
    """True when the emulator received no command that changes an output."""
    changing = [entry.command for entry in emulator.commands()
                if entry.command.upper().startswith(("SOUR:SEQ:DATA", "INIT", "*RST"))]
    return not emulator.level_writes() and not changing


# ------------------------------------------------------------------------------ loading
def test_load_and_build_change_no_output(emulator, station_text, tmp_path):
    station = load_station(_write(tmp_path, station_text))
    nodes = station.build_nodes()
    assert [node.name for node in nodes] == ["layer1"]
    assert station.instruments["emulator"].identity_ == emulator.identity
    assert _no_output_changed(emulator)
    station.close()
    assert _no_output_changed(emulator)


def test_limits_come_from_the_instrument(emulator, station_text, tmp_path):
    with load_station(_write(tmp_path, station_text)) as station:
        node = station.build_nodes()[0]
        weight = node.parameters["weight"]
        lower, upper, resolution = emulator.hardware.weight_range(0)
        assert float(weight.lower_array.min()) == pytest.approx(lower)
        assert float(weight.upper_array.max()) == pytest.approx(upper)
        assert weight.resolution == pytest.approx(resolution)
        report = {row["array"]: row for row in station.limits_report()}
        assert report["weight"]["instrument_range"] == pytest.approx((lower, upper))


def test_station_narrows_limits_onto_the_grid(emulator, station_text, tmp_path):
    text = station_text.replace('shape = [2, 3]', 'shape = [2, 3]\nlimits = [-1.0, 1.0]')
    with load_station(_write(tmp_path, text)) as station:
        weight = station.build_nodes()[0].parameters["weight"]
        lower, _, resolution = emulator.hardware.weight_range(0)
        upper_limit = float(weight.upper_array.max())
        assert -1.0 <= float(weight.lower_array.min()) < -1.0 + resolution
        assert 1.0 - resolution < upper_limit <= 1.0
        assert (upper_limit - lower) / resolution == pytest.approx(round((upper_limit - lower) / resolution))


def test_wider_limit_fails_before_any_output(emulator, station_text, tmp_path):
    text = station_text.replace('shape = [2, 3]', 'shape = [2, 3]\nlimits = [-20.0, 20.0]')
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_station(path)
    message = str(info.value)
    assert str(path) in message
    assert "[nodes.layer1.parameters.weight]" in message
    assert "limits = [-20, 20] is wider than instrument 'emulator' allows" in message
    assert "narrow the limits" in message
    assert _no_output_changed(emulator)


def test_identity_mismatch_fails_before_any_output(emulator, station_text, tmp_path):
    text = station_text.replace('identity = "PNN,EMULATED-SCPI"', 'identity = "ACME,DAQ-8"')
    with pytest.raises(InstrumentError, match="identifies as 'PNN,EMULATED-SCPI,SN0001,1.0'.*expects 'ACME,DAQ-8'"):
        load_station(_write(tmp_path, text))
    assert _no_output_changed(emulator)


def test_wrong_terminator_fails_before_any_output(emulator, station_text, tmp_path):
    text = station_text.replace('transfer = "binary"', 'transfer = "binary"\nread_termination = "\\r\\n"')
    with pytest.raises(InstrumentTimeout, match="terminator mismatch"):
        load_station(_write(tmp_path, text))
    assert _no_output_changed(emulator)


def test_unreachable_resource(station_text, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    text = station_text.replace(station_text.split('resource = "')[1].split('"')[0],
                                f"TCPIP::127.0.0.1::{free_port}::SOCKET")
    with pytest.raises(ConnectionLost, match="unreachable"):
        load_station(_write(tmp_path, text))


# ---------------------------------------------------------------------- file checks
@pytest.mark.parametrize(
    "change, message",
    [
        (("timeout_s = 0.3", "timout_s = 0.3"), r"unknown key 'timout_s' in \[instruments.emulator\]; did you mean 'timeout_s'\?"),
        (('driver = "scpi-source-meter"', 'driver = "scpi-sorce"'), "unknown driver 'scpi-sorce'"),
        (('transfer = "binary"', 'transfer = "binary"\nmax_values_per_line = 4'), "driver 'scpi-source-meter' has no such option"),
        (('transfer = "binary"', 'transfer = "binary"\nchecksum = true'), "driver 'scpi-source-meter' has no such option"),
        (("shape = [2, 3]", "shape = [3, 3]"), r"6 channel\(s\) for shape \[3, 3\]"),
        (('gradient = "outer-product"', 'gradient = "backprop"'), "'backprop' is not one of"),
    ],
)
def test_file_errors_name_file_table_and_key(station_text, tmp_path, change, message):
    path = _write(tmp_path, station_text.replace(*change))
    with pytest.raises(ConfigError, match=message) as info:
        parse_station(path)
    assert str(path) in str(info.value)


def test_serial_checksum_option_is_a_boolean(tmp_path):
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], preset="ideal", seed=0)
    with SerialBoardEmulator(hardware, link=tmp_path / "board") as emulator:
        text = emulator.station_toml()
    on = parse_station(_write(tmp_path, text.replace('transfer = "binary"', 'transfer = "binary"\nchecksum = true')))
    assert on.instruments["emulator"].options["checksum"] is True
    with pytest.raises(ConfigError, match="checksum.*expected"):
        parse_station(_write(tmp_path, text.replace('transfer = "binary"', 'transfer = "binary"\nchecksum = "yes"')))


def test_missing_safe_value_is_explained(station_text, tmp_path):
    text = station_text.replace("safe = 0.0\n\n[nodes.outputs]", "\n[nodes.outputs]")
    with pytest.raises(ConfigError, match=r"\[nodes.layer1.inputs\] is missing the key 'safe'.*on Ctrl-C"):
        parse_station(_write(tmp_path, text))


def test_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_station(_write(tmp_path, "[instruments.daq\nresource = 1"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_station(tmp_path / "nope.toml")


def test_shared_source_channel_is_rejected(station_text, tmp_path):
    text = station_text.replace('[nodes.inputs]\ninstrument = "emulator"\nchannels = "1:3"',
                                '[nodes.inputs]\ninstrument = "emulator"\nchannels = "4:6"')
    with pytest.raises(ConfigError, match="channel 4 of 'emulator' is already used"):
        parse_station(_write(tmp_path, text))


def test_resolution_finer_than_instrument(emulator, station_text, tmp_path):
    text = station_text.replace("shape = [2, 3]", "shape = [2, 3]\nresolution = 0.001")
    with pytest.raises(ConfigError, match="resolution = 0.001 is finer than instrument 'emulator' can set"):
        load_station(_write(tmp_path, text))


def test_max_step_below_resolution(emulator, station_text, tmp_path):
    _, _, resolution = emulator.hardware.weight_range(0)
    text = station_text.replace("shape = [2, 3]\nmax_step", f"shape = [2, 3]\nmax_step = {resolution / 2!r}\nold_max_step")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("old_max_step"))
    with pytest.raises(ConfigError, match="is not larger than the resolution"):
        load_station(_write(tmp_path, text))


def test_parse_without_connecting(station_text, tmp_path):
    config = parse_station(_write(tmp_path, station_text))
    assert list(config.instruments) == ["emulator"]
    assert config.nodes[0].parameters["weight"].shape == (2, 3)
    assert config.apply_on == ("exit", "error", "interrupt")


# ------------------------------------------------------------------------ safe state
def _set_weights(station, value):
    node = station.build_nodes()[0]
    node.set_parameters({"weight": np.full((2, 3), value)})
    return node


def _weights_on_emulator(emulator):
    first = emulator.hardware.channels[0].first_weight - 1
    return emulator.hardware.levels[first : first + 6]


@pytest.mark.parametrize("raised", [None, RuntimeError, KeyboardInterrupt])
def test_safe_state_on_exit_error_and_interrupt(emulator, station_text, tmp_path, raised):
    path = _write(tmp_path, station_text)
    with pytest.raises(raised) if raised else _nothing():
        with load_station(path) as station:
            _set_weights(station, 1.5)
            assert np.all(_weights_on_emulator(emulator) > 1.4)
            if raised:
                raise raised("stop")
    np.testing.assert_array_equal(_weights_on_emulator(emulator), 0.0)
    assert station.closed


def test_safe_state_only_on_configured_events(emulator, station_text, tmp_path):
    text = station_text + '\n[safe_state]\napply_on = ["interrupt"]\n'
    with load_station(_write(tmp_path, text)) as station:
        _set_weights(station, 1.5)
    assert np.all(_weights_on_emulator(emulator) > 1.4)


def test_safe_state_ramps_within_max_step(emulator, station_text, tmp_path):
    with load_station(_write(tmp_path, station_text)) as station:
        node = _set_weights(station, 3.0)
        max_step = node.parameters["weight"].max_step
    history = {}
    for _, channel, value in emulator.level_writes():
        history.setdefault(channel, [0.0]).append(value)
    weight_channel = emulator.hardware.channels[0].first_weight
    steps = np.abs(np.diff(history[weight_channel]))
    assert history[weight_channel][-1] == 0.0
    assert len(steps) >= 2 * int(3.0 / max_step)
    assert np.all(steps <= max_step * (1 + 1e-9))


def test_extra_safe_state_outputs(emulator, station_text, tmp_path):
    text = station_text + (
        '\n[safe_state]\n[[safe_state.outputs]]\ninstrument = "emulator"\nchannels = "1:3"\nvalue = 0.5\nmax_step = 0.2\n'
    )
    with load_station(_write(tmp_path, text)):
        pass
    np.testing.assert_allclose(emulator.hardware.levels[:3], 0.5, atol=1e-2)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
