"""Drivers against replayed command/reply exchanges and a pyvisa-sim device file.

Each replay test lists the exact exchanges the driver must produce and asserts at the end that
every one of them was used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pnn.devices import (
    ScpiInstrument,
    ScpiMeter,
    ScpiSource,
    ScpiSourceMeter,
    SerialBoard,
    TransportSettings,
    VisaTransport,
)
from pnn.devices.instrument import get_driver, identity_matches
from pnn.devices.replay import Exchange, ReplayMismatch, ReplayTransport
from pnn.devices.scpi import encode_block
from pnn.errors import ConfigError, InstrumentError, InstrumentTimeout, MeasurementError

SIM_FILE = Path(__file__).parent / "data" / "sim_source.yaml"
FAST = TransportSettings(timeout_s=0.3, deadline_s=0.6)
IDN = "ACME,DAQ-8,SN42,2.1"


def _connected(driver_class, pairs, **options):
    # SCPI drivers clear errors left in the queue from before the connection.
    connect = [("*IDN?", IDN)] + ([("SYST:ERR?", '0,"No error"')] if issubclass(driver_class, ScpiInstrument) else [])
    transport = ReplayTransport.from_pairs([*connect, *pairs], FAST, name="daq")
    driver = driver_class(transport, name="daq", **options)
    driver.connect()
    return driver, transport


# ------------------------------------------------------------------------- identity
@pytest.mark.parametrize(
    "expected, matches",
    [("ACME,DAQ-8", True), ("acme, daq-8", True), ("ACME,DAQ-8,SN42", True), ("ACME,DAQ-8,SN43", False),
     ("ACME,DAQ-9", False), (",DAQ-8", True), ("ACME,DAQ-8,SN42,2.1,extra", False)],
)
def test_identity_matching(expected, matches):
    assert identity_matches(expected, IDN) is matches


def test_identity_mismatch_raises_before_anything_else():
    transport = ReplayTransport.from_pairs([("*IDN?", IDN)], FAST, name="daq")
    driver = ScpiSourceMeter(transport, name="daq", expected_identity="ACME,DAQ-8,SN99")
    with pytest.raises(InstrumentError, match="identifies as 'ACME,DAQ-8,SN42,2.1'.*expects 'ACME,DAQ-8,SN99'"):
        driver.connect()
    transport.assert_all_used()
    assert not transport.is_open


# ------------------------------------------------------------------------ scpi source
def test_source_reads_ranges_with_compound_queries():
    source, transport = _connected(ScpiSource, [
        ("SOUR1:VOLT? MIN;:SOUR1:VOLT? MAX;:SOUR1:VOLT:RES?;:SOUR2:VOLT? MIN", "-10;10;0.01;-5"),
        ("SOUR2:VOLT? MAX;:SOUR2:VOLT:RES?", "5;0.005"),
    ], max_commands_per_line=4)
    ranges = source.channel_ranges([1, 2])
    np.testing.assert_array_equal(ranges.lower, [-10, -5])
    np.testing.assert_array_equal(ranges.upper, [10, 5])
    np.testing.assert_array_equal(ranges.resolution, [0.01, 0.005])
    transport.assert_all_used()


def test_source_write_ends_with_error_check():
    source, transport = _connected(ScpiSource, [
        ("SOUR3:VOLT 0.25;:SOUR4:VOLT -1.5;:SYST:ERR?", '0,"No error"'),
    ])
    source.write_levels([3, 4], np.array([0.25, -1.5]))
    transport.assert_all_used()


def test_source_write_reports_instrument_errors():
    source, transport = _connected(ScpiSource, [
        ("SOUR3:VOLT 12;:SYST:ERR?", '-222,"Data out of range"'),
        ("SYST:ERR?", '-350,"Queue overflow"'),
        ("SYST:ERR?", '0,"No error"'),
    ])
    with pytest.raises(InstrumentError, match=r"-222 Data out of range; -350 Queue overflow"):
        source.write_levels([3], np.array([12.0]))
    transport.assert_all_used()


def test_source_read_back():
    source, transport = _connected(ScpiSource, [("SOUR1:VOLT?;:SOUR2:VOLT?", "0.5;-0.125")])
    np.testing.assert_array_equal(source.read_levels([1, 2]), [0.5, -0.125])
    transport.assert_all_used()


def test_command_overrides_adapt_the_dialect():
    source, transport = _connected(
        ScpiSource, [(":VOLT 0.5,(@7);:SYST:ERR?", '0,"No error"')],
        commands={"level_set": ":VOLT {value},(@{channel})"},
    )
    source.write_levels([7], np.array([0.5]))
    transport.assert_all_used()


def test_unknown_command_key_is_a_config_error():
    transport = ReplayTransport([], FAST)
    with pytest.raises(ConfigError, match="unknown command key 'level_sett'"):
        ScpiSource(transport, name="daq", commands={"level_sett": "X"})


@pytest.mark.parametrize(
    "key, template, message",
    [
        ("level_set", "SOUR{chan}:VOLT {value}", r"uses \{chan\}, which this command does not fill; it may use \{channel\}, \{value\}"),
        ("level_set", "SOUR{channel}:VOLT 1", r"must contain \{value\} once"),
        ("sequence_data", "DATA {data};:DATA {data}", r"must contain \{data\} once.*2 times"),
        ("level_get", "SOUR{channel}:VOLT? {", "not a valid template"),
    ],
)
def test_command_override_fields_are_checked(key, template, message):
    transport = ReplayTransport([], FAST)
    with pytest.raises(ConfigError, match=message):
        ScpiSourceMeter(transport, name="daq", commands={key: template})


def test_stale_errors_are_cleared_when_connecting():
    transport = ReplayTransport.from_pairs([
        ("*IDN?", IDN), ("SYST:ERR?", '-113,"Undefined header"'), ("SYST:ERR?", '0,"No error"'),
        ("SOUR3:VOLT 0.25;:SYST:ERR?", '0,"No error"'),
    ], FAST, name="daq")
    source = ScpiSource(transport, name="daq")
    source.connect()
    source.write_levels([3], np.array([0.25]))
    transport.assert_all_used()


def test_rejected_query_reports_the_queued_error():
    source, transport = _connected(ScpiSource, [
        ("SOUR99:VOLT? MIN;:SOUR99:VOLT? MAX;:SOUR99:VOLT:RES?", None),
        ("*IDN?", IDN),  # the link resynchronises after the timeout
        ("SYST:ERR?", '-114,"Header suffix out of range"'),
        ("SYST:ERR?", '0,"No error"'),
    ])
    with pytest.raises(InstrumentError, match="rejected the query: -114 Header suffix out of range"):
        source.channel_ranges([99])
    transport.assert_all_used()


# ------------------------------------------------------------------------- scpi meter
def test_meter_measure_with_overrange():
    meter, transport = _connected(ScpiMeter, [
        ("SENS:AVER:COUN 4;:MEAS:VOLT? (@1:3)", "0.5,9.9E+37,-0.25"),
        ("MEAS:VOLT? (@1:3)", "0.5,0.75,-0.25"),
    ])
    first = meter.measure([1, 2, 3], averages=4)
    assert np.isnan(first[1])
    second = meter.measure([1, 2, 3], averages=4)
    np.testing.assert_array_equal(second, [0.5, 0.75, -0.25])
    transport.assert_all_used()


def test_meter_garbled_reply_is_a_measurement_error():
    meter, transport = _connected(ScpiMeter, [("SENS:AVER:COUN 1;:MEAS:VOLT? (@1:2)", "0.5,0.?5")])
    with pytest.raises(MeasurementError, match="not a number"):
        meter.measure([1, 2])
    transport.assert_all_used()


# -------------------------------------------------------------------- batch sequences
def _batch_settings_line(data: bytes) -> bytes:
    return (
        b"FORM REAL,32;:FORM:BORD NORM;:SOUR:SEQ:CHAN (@1:2);:SENS:CHAN (@5:6,9);:SOUR:SEQ:DWEL 0.001;"
        b":SENS:AVER:COUN 2;:SOUR:SEQ:DATA " + data + b";:INIT;*OPC?\n"
    )


def test_batch_binary_is_two_exchanges():
    x = np.array([[0.5, -0.5], [0.25, 1.0]])
    readings = np.array([[1, 2, 3], [4, 5, 9.9e37]], dtype=">f4")
    block = encode_block(x.astype(">f4").tobytes())
    transport = ReplayTransport([
        Exchange(b"*IDN?\n", IDN.encode() + b"\n"),
        Exchange(b"SYST:ERR?\n", b'0,"No error"\n'),
        Exchange(_batch_settings_line(block), b"1\n"),
        Exchange(b"FETC?\n", encode_block(readings.tobytes()) + b"\n"),
        Exchange(b"SOUR:SEQ:DATA " + block + b";:INIT;*OPC?\n", b"1\n"),
        Exchange(b"FETC?\n", encode_block(readings.tobytes()) + b"\n"),
    ], FAST)
    driver = ScpiSourceMeter(transport, name="daq")
    driver.connect()
    first = driver.run_batch([1, 2], x, [5, 6, 9], settle_s=0.001, averages=2)
    assert first.shape == (2, 3)
    np.testing.assert_array_equal(first[0], [1, 2, 3])
    assert np.isnan(first[1, 2])
    # Unchanged settings are not sent again.
    driver.run_batch([1, 2], x, [5, 6, 9], settle_s=0.001, averages=2)
    transport.assert_all_used()


def test_batch_ascii():
    x = np.array([[0.5, -0.5]])
    line = (
        b"FORM ASC;:SOUR:SEQ:CHAN (@1:2);:SENS:CHAN (@3);:SOUR:SEQ:DWEL 0.0;:SENS:AVER:COUN 1;"
        b":SOUR:SEQ:DATA 0.5,-0.5;:INIT;*OPC?\n"
    )
    transport = ReplayTransport([
        Exchange(b"*IDN?\n", IDN.encode() + b"\n"),
        Exchange(b"SYST:ERR?\n", b'0,"No error"\n'),
        Exchange(line, b"1\n"),
        Exchange(b"FETC?\n", b"0.125\n"),
    ], FAST)
    driver = ScpiSourceMeter(transport, name="daq", transfer="ascii")
    driver.connect()
    np.testing.assert_array_equal(driver.run_batch([1, 2], x, [3], settle_s=0.0, averages=1), [[0.125]])
    transport.assert_all_used()


def test_batch_short_reply_is_a_measurement_error():
    x = np.zeros((2, 1))
    line = (
        b"FORM ASC;:SOUR:SEQ:CHAN (@1);:SENS:CHAN (@3);:SOUR:SEQ:DWEL 0.0;:SENS:AVER:COUN 1;"
        b":SOUR:SEQ:DATA 0.0,0.0;:INIT;*OPC?\n"
    )
    transport = ReplayTransport([
        Exchange(b"*IDN?\n", IDN.encode() + b"\n"),
        Exchange(b"SYST:ERR?\n", b'0,"No error"\n'),
        Exchange(line, b"1\n"),
        Exchange(b"FETC?\n", b"0.125\n"),
    ], FAST)
    driver = ScpiSourceMeter(transport, name="daq", transfer="ascii")
    driver.connect()
    with pytest.raises(MeasurementError, match="expected 2 value"):
        driver.run_batch([1], x, [3], settle_s=0.0, averages=1)


# ---------------------------------------------------------------------- serial board
def test_board_connect_reads_channel_counts():
    board, transport = _connected(SerialBoard, [("CHAN?", "40,16")])
    assert (board.n_dac, board.n_adc) == (40, 16)
    transport.assert_all_used()


def test_board_set_splits_long_lines_and_checks_ok():
    board, transport = _connected(SerialBoard, [
        ("CHAN?", "40,16"),
        ("SET 1=0.5,2=-0.25", "OK"),
        ("SET 3=1", "OK"),
        ("SET 4=9", "ERR 2 value out of range on channel 4"),
    ], max_values_per_line=2)
    board.write_levels([1, 2, 3], np.array([0.5, -0.25, 1.0]))
    with pytest.raises(InstrumentError, match=r"failed with error 2 \(value out of range on channel 4\)"):
        board.write_levels([4], np.array([9.0]))
    transport.assert_all_used()


def test_board_rejects_missing_channel_without_sending():
    board, transport = _connected(SerialBoard, [("CHAN?", "4,2")])
    with pytest.raises(ConfigError, match=r"channel\(s\) \[5\] do not exist"):
        board.read_levels([5])
    transport.assert_all_used()


def test_board_batch_binary():
    x = np.array([[0.5, -0.5], [0.0, 0.25]])
    readings = np.array([0.1, 0.2, 0.3, 0.4], dtype="<f4")
    board, transport = _connected(SerialBoard, [
        ("CHAN?", "40,16"),
        ("INPUTS 1,2", "OK"),
        ("OUTPUTS 3,4", "OK"),
        ("SETTLE 100", "OK"),
        ("AVG 1", "OK"),
    ])
    transport.exchanges.append(Exchange(b"RUNB 2 " + encode_block(x.astype("<f4").tobytes()) + b"\n",
                                        encode_block(readings.tobytes()) + b"\n"))
    values = board.run_batch([1, 2], x, [3, 4], settle_s=1e-4, averages=1)
    np.testing.assert_allclose(values, readings.reshape(2, 2))
    transport.assert_all_used()


def test_board_batch_error_reply():
    board, transport = _connected(SerialBoard, [
        ("CHAN?", "40,16"), ("INPUTS 1", "OK"), ("OUTPUTS 3", "OK"), ("SETTLE 0", "OK"), ("AVG 1", "OK"),
        ("RUN 1 0.5", "ERR 5 batch too large"),
    ], transfer="ascii")
    with pytest.raises(InstrumentError, match="error 5"):
        board.run_batch([1], np.array([[0.5]]), [3], settle_s=0.0, averages=1)
    transport.assert_all_used()


# ---------------------------------------------------------------------------- replay
def test_replay_rejects_unexpected_write():
    transport = ReplayTransport.from_pairs([("*IDN?", IDN)], FAST)
    transport.open()
    with pytest.raises(ReplayMismatch, match=r"expected the write b'\*IDN\?\\n', got b'\*RST\\n'"):
        transport.write("*RST")


def test_replay_reports_unused_exchanges():
    transport = ReplayTransport.from_pairs([("*IDN?", IDN), ("*OPC?", "1")], FAST)
    transport.open()
    assert transport.query("*IDN?") == IDN
    with pytest.raises(ReplayMismatch, match="1 expected exchange"):
        transport.assert_all_used()


def test_replay_missing_reply_times_out():
    transport = ReplayTransport.from_pairs([("*OPC?", None)], FAST)
    transport.open()
    with pytest.raises(InstrumentTimeout, match="no reply"):
        transport.query("*OPC?")


def test_driver_registry():
    assert get_driver("scpi-source-meter") is ScpiSourceMeter
    assert get_driver("pnn.devices.board:SerialBoard") is SerialBoard
    with pytest.raises(ConfigError, match="unknown driver 'scpi-sorce'"):
        get_driver("scpi-sorce")
    with pytest.raises(ConfigError, match="not a subclass"):
        get_driver("pnn.devices.scpi:Range")


# ------------------------------------------------------------------------- pyvisa-sim
@pytest.fixture
def sim_source():
    transport = VisaTransport("TCPIP::sim.example::5025::SOCKET", FAST, name="sim",
                              visa_library=f"{SIM_FILE}@sim")
    source = ScpiSource(transport, name="sim", max_commands_per_line=1, expected_identity="ACME,DAC-2")
    source.connect()
    yield source
    source.close()


def test_sim_source_ranges(sim_source):
    ranges = sim_source.channel_ranges([1, 2])
    np.testing.assert_array_equal(ranges.lower, [-5.0, -2.5])
    np.testing.assert_array_equal(ranges.upper, [5.0, 2.5])
    np.testing.assert_array_equal(ranges.resolution, [0.001, 0.0005])


def test_sim_source_set_and_read_back(sim_source):
    np.testing.assert_array_equal(sim_source.read_levels([1, 2]), [0.0, 1.25])
    sim_source.write_levels([1, 2], np.array([0.5, -1.5]))
    np.testing.assert_array_equal(sim_source.read_levels([1, 2]), [0.5, -1.5])


def test_sim_source_error_queue_after_rejected_level(sim_source):
    with pytest.raises(InstrumentError, match="-100 Command error"):
        sim_source.write_levels([1], np.array([7.0]))
    assert sim_source.read_errors() == []
