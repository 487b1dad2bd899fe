"""SCPI helpers: numbers, overrange, binary blocks, channel lists, validators and ramps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pnn.devices.replay import Exchange, ReplayTransport
from pnn.devices.scpi import (
    Choice,
    Range,
    block_checksum,
    decode_values,
    encode_block,
    encode_values,
    format_channel_list,
    format_number,
    parse_channel_list,
    parse_error,
    parse_values,
    ramp_path,
    read_block,
)
from pnn.errors import ConfigError, InstrumentError, LimitError, MeasurementError


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("text", ["9.9E37", "+9.9E+37", "-9.9E37", "9.91E37", "nan", "NaN", "inf", "-INF", "1e38"])
def test_overrange_reading_becomes_nan(text):
    values = parse_values(f"1.5,{text},-0.25", where="meter")
    assert values[0] == 1.5
    assert np.isnan(values[1])
    assert values[2] == -0.25


def test_parse_values_rejects_garbled_reply():
    with pytest.raises(MeasurementError, match="not a number"):
        parse_values("1.5,2.?5,3", where="meter")


def test_parse_values_checks_count():
    with pytest.raises(MeasurementError, match="expected 4 value"):
        parse_values("1,2,3", where="meter", expected=4)


def test_parse_values_empty_reply_has_no_values():
    assert parse_values("", where="meter").size == 0


@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_format_number_round_trips(value):
    assert float(format_number(value)) == value


def test_decode_values_marks_overrange_in_binary():
    payload = encode_values(np.array([1.0, 9.9e37, -2.0]), "REAL,32")
    values = decode_values(payload, "REAL,32", where="meter")
    assert values[0] == 1.0
    assert np.isnan(values[1])
    assert values[2] == -2.0


def test_decode_values_little_endian():
    data = np.array([0.5, -1.25])
    payload = encode_values(data, "REAL,64", little_endian=True)
    assert payload == data.astype("<f8").tobytes()
    np.testing.assert_array_equal(decode_values(payload, "REAL,64", where="m", little_endian=True), data)


def test_decode_values_rejects_partial_value():
    with pytest.raises(MeasurementError, match="whole number"):
        decode_values(b"\x00" * 6, "REAL,32", where="meter")


def test_parse_error_splits_code_and_message():
    assert parse_error('-222,"Data out of range"') == (-222, "Data out of range")
    assert parse_error('0,"No error"') == (0, "No error")
    with pytest.raises(InstrumentError, match="error code"):
        parse_error("garbage")


# ---------------------------------------------------------------------------- blocks
def test_encode_block_header():
    assert encode_block(b"abc") == b"#13abc"
    assert encode_block(b"x" * 1234) == b"#41234" + b"x" * 1234
    assert encode_block(b"") == b"#10"


def test_read_block_across_fragmented_reads():
    # The payload contains the terminator and '#' bytes; the replay serves it in the small
    # chunks a transport asks for, so the block crosses many reads.
    payload = bytes(range(256)) * 8
    transport = ReplayTransport([Exchange(b"FETC?\n", encode_block(payload) + b"\n")])
    transport.open()
    transport.write("FETC?")
    assert read_block(transport, where="test") == payload
    transport.assert_all_used()


def test_read_block_error_reply_keeps_link_in_step():
    transport = ReplayTransport.from_pairs([("FETC?", '-230,"Data stale"'), ("*OPC?", "1")])
    transport.open()
    transport.write("FETC?")
    with pytest.raises(InstrumentError, match="expected a binary block"):
        read_block(transport, where="test")
    assert transport.query("*OPC?") == "1"
    transport.assert_all_used()


def test_read_block_indefinite_length():
    transport = ReplayTransport([Exchange(b"Q\n", b"#0abc\n")])
    transport.open()
    transport.write("Q")
    assert read_block(transport, where="test") == b"abc"


def test_read_block_rejects_trailing_bytes():
    transport = ReplayTransport([Exchange(b"Q\n", b"#13abcXY\n")])
    transport.open()
    transport.write("Q")
    with pytest.raises(InstrumentError, match="unexpected byte"):
        read_block(transport, where="test")


def test_block_checksum_is_crc32():
    # The standard CRC-32 check value: the nine ASCII digits 1 to 9 give CBF43926.
    assert block_checksum(b"123456789") == b"CBF43926"


def test_read_block_accepts_matching_checksum():
    payload = b"\x00\n#\xff" * 4
    transport = ReplayTransport([Exchange(b"Q\n", encode_block(payload) + block_checksum(payload) + b"\n")])
    transport.open()
    transport.write("Q")
    assert read_block(transport, where="test", checksum=True) == payload


def test_read_block_checksum_mismatch():
    payload = b"abcd"
    transport = ReplayTransport([
        Exchange(b"Q\n", encode_block(b"abce") + block_checksum(payload) + b"\n"),
        Exchange(b"*OPC?\n", b"1\n"),
    ])
    transport.open()
    transport.write("Q")
    with pytest.raises(MeasurementError, match="checksum .* does not match"):
        read_block(transport, where="test", checksum=True)
    # The whole line was read, so the next query gets its own reply.
    assert transport.query("*OPC?") == "1"


def test_read_block_missing_checksum_is_named():
    transport = ReplayTransport([Exchange(b"Q\n", encode_block(b"abcd") + b"\n")])
    transport.open()
    transport.write("Q")
    with pytest.raises(InstrumentError, match="expected an 8-digit checksum"):
        read_block(transport, where="test", checksum=True)


# --------------------------------------------------------------------- channel lists
def test_channel_list_formats_runs():
    assert format_channel_list([1, 2, 3, 4, 7, 9, 10]) == "(@1:4,7,9:10)"


@pytest.mark.parametrize(
    "text, expected",
    [("(@1:4,7)", [1, 2, 3, 4, 7]), ("1-3, 5", [1, 2, 3, 5]), ("12", [12]), ("3:3", [3])],
)
def test_channel_list_parses(text, expected):
    assert parse_channel_list(text) == expected


@pytest.mark.parametrize("text", ["1:x", "4:2", "a"])
def test_channel_list_rejects_bad_text(text):
    with pytest.raises(ConfigError):
        parse_channel_list(text)


@given(st.lists(st.integers(0, 500), min_size=1, max_size=40, unique=True))
def test_channel_list_round_trips(channels):
    assert parse_channel_list(format_channel_list(channels)) == channels


# ------------------------------------------------------------------------ validators
def test_range_validator_messages():
    voltage = Range(-10.0, 10.0)
    assert voltage(2.5, "v") == 2.5
    with pytest.raises(LimitError, match=r"outside the allowed range \[-10, 10\]"):
        voltage(10.5, "setting 'voltage'")
    with pytest.raises(ConfigError, match="expected a number"):
        voltage("high", "v")
    with pytest.raises(ConfigError, match="expected a number"):
        voltage(True, "v")
    count = Range(1, 100, integer=True)
    assert count(4.0, "n") == 4
    with pytest.raises(ConfigError, match="whole number"):
        count(2.5, "n")


def test_choice_validator_is_case_insensitive():
    formats = Choice(("ASC", "REAL,32"))
    assert formats("asc", "f") == "ASC"
    with pytest.raises(ConfigError, match="is not one of"):
        formats("REAL,16", "f")


# ----------------------------------------------------------------------------- ramps
def test_ramp_path_steps_and_grid():
    path = ramp_path(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.3, resolution=0.1, origin=-2.0)
    steps = np.diff(np.vstack([[0.0, 1.0], *path]), axis=0)
    assert np.all(np.abs(steps) <= 0.3 + 1e-12)
    np.testing.assert_array_equal(path[-1], [1.0, 0.0])
    grid = (np.vstack(path) + 2.0) / 0.1
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-9)


def test_ramp_path_nothing_to_do():
    assert ramp_path(np.ones(3), np.ones(3), 0.1) == []


def test_ramp_path_refuses_unknown_start():
    with pytest.raises(LimitError, match="unknown start"):
        ramp_path(np.array([np.nan]), np.array([1.0]), 0.1)


def test_ramp_path_rejects_step_below_resolution():
    with pytest.raises(ConfigError, match="not larger than the resolution"):
        ramp_path(np.array([0.0]), np.array([1.0]), 0.05, resolution=0.1)


@settings(max_examples=200, deadline=None)
@given(
    start=st.lists(st.integers(-100, 100), min_size=1, max_size=6),
    target_offsets=st.lists(st.integers(-200, 200), min_size=6, max_size=6),
    resolution=st.sampled_from([0.0, 0.01, 0.037]),
    max_levels=st.integers(2, 30),
)
def test_ramp_path_never_exceeds_max_step(start, target_offsets, resolution, max_levels):
    step = resolution if resolution else 0.01
    origin = -5.0
    start_values = origin + step * (np.array(start) + 150)
    target = origin + step * np.clip(np.array(start) + 150 + np.array(target_offsets[: len(start)]), 0, 400)
    max_step = max_levels * step
    path = ramp_path(start_values, target, max_step, resolution=resolution, origin=origin)
    values = np.vstack([start_values, *path]) if path else start_values[None, :]
    assert np.all(np.abs(np.diff(values, axis=0)) <= max_step * (1 + 1e-9))
    np.testing.assert_array_equal(values[-1], target)
    lower = np.minimum(start_values, target)
    upper = np.maximum(start_values, target)
    assert np.all(values >= lower - 1e-9)
    assert np.all(values <= upper + 1e-9)
    if resolution:
        levels = (values - origin) / resolution
        assert np.all(np.abs(levels - np.round(levels)) < 1e-6)
    assert math.isfinite(float(values.sum()))


def test_parse_values_rejects_digit_group_underscores():
    # float() accepts "1_0" as 10; no instrument sends that, so it is a garbled reply.
    with pytest.raises(MeasurementError, match="'1_0'"):
        parse_values("0.5,1_0", where="meter")
