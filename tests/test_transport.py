"""Transports over the real pyvisa-py and pyserial code paths, against the emulators.

Every test here talks to an emulator over loopback TCP or a pseudo-terminal; faults are
injected at exact points through the emulator's fault queue.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pnn.devices import ConnectionLost, ScpiSourceMeter, SerialBoard, SerialTransport, TransportSettings, VisaTransport
from pnn.devices.replay import ReplayTransport
from pnn.devices.traffic import TrafficRecorder, read_recording
from pnn.emulators import EmulatedHardware, LayerSpec, ScpiEmulator, SerialBoardEmulator
from pnn.devices.scpi import encode_block
from pnn.errors import ConfigError, InstrumentError, InstrumentTimeout, MeasurementError

FAST = TransportSettings(timeout_s=0.3, deadline_s=0.8, drain_quiet_s=0.05, drain_max_s=1.0)


@pytest.fixture
def emulator():
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], preset="ideal", seed=0)
    with ScpiEmulator(hardware) as emu:
        yield emu


@pytest.fixture
def instrument(emulator):
    transport = VisaTransport(emulator.resource, FAST, name="daq")
    driver = ScpiSourceMeter(transport, name="daq", expected_identity="PNN,EMULATED-SCPI")
    driver.connect()
    yield driver
    driver.close()


def _upper(instrument, channel):
    return float(instrument.query("level_max", channel=channel))


# ------------------------------------------------------------------------ timeouts
def test_late_reply_goes_to_its_own_query(emulator, instrument):
    emulator.inject("late", late_s=0.6)
    with pytest.raises(InstrumentTimeout, match="no reply within 0.3 s"):
        instrument.query("level_min", channel=4)
    # The late reply (the range minimum) arrives while the link resynchronises; the next
    # query must get its own reply, the maximum, not the stale minimum.
    assert _upper(instrument, 4) == pytest.approx(emulator.hardware.upper[3])
    assert instrument.transport.stats.resyncs == 1
    assert instrument.transport.stats.discarded_bytes > 0


def test_late_resync_reply_is_not_taken_for_the_next(emulator, instrument):
    # The query gets no reply; the first resynchronisation reply comes after the timeout, so a
    # second resynchronisation query is sent, and its reply is still on the way after the first.
    emulator.inject("no_reply")
    emulator.inject("late", late_s=0.5)
    with pytest.raises(InstrumentTimeout):
        instrument.query("level_min", channel=4)
    assert _upper(instrument, 4) == pytest.approx(emulator.hardware.upper[3])
    assert _upper(instrument, 5) == pytest.approx(emulator.hardware.upper[4])


def test_line_in_pieces_is_joined(emulator, instrument):
    emulator.inject("split", split_pieces=4, split_pause_s=0.1)
    assert instrument.identify() == emulator.identity
    assert instrument.transport.stats.timeouts == 0


def test_binary_block_in_fragments_with_pauses(emulator, instrument):
    x = np.linspace(-1, 1, 30).reshape(10, 3)
    expected = instrument.run_batch([1, 2, 3], x, [1, 2, 3, 4], settle_s=0.0, averages=1)
    # Fragment both replies of the next batch: the completion reply and the binary block.
    emulator.inject("split", count=2, split_pieces=5, split_pause_s=0.05)
    fragmented = instrument.run_batch([1, 2, 3], x, [1, 2, 3, 4], settle_s=0.0, averages=1)
    np.testing.assert_array_equal(fragmented, expected)
    assert emulator.faults.counts["split"] == 2


def test_trickling_reply_stops_at_deadline(emulator, instrument):
    emulator.inject("trickle", trickle_s=1.5, trickle_interval_s=0.01)
    start = time.monotonic()
    with pytest.raises(InstrumentTimeout, match="deadline"):
        instrument.identify()
    assert time.monotonic() - start < FAST.deadline_s + 0.3
    # After the trickle ends, the link resynchronises and answers correctly.
    time.sleep(0.8)
    assert instrument.identify() == emulator.identity


def test_wrong_terminator_is_named(emulator, instrument):
    emulator.inject("wrong_terminator")
    with pytest.raises(InstrumentTimeout) as info:
        instrument.identify()
    message = str(info.value)
    assert "terminator mismatch" in message
    assert "'\\r'" in message
    assert "EMULATED-SCPI" in message


def test_silence_is_a_bare_timeout(emulator, instrument):
    emulator.inject("no_reply")
    with pytest.raises(InstrumentTimeout) as info:
        instrument.identify()
    assert "no reply within" in str(info.value)
    assert "terminator" not in str(info.value)
    assert instrument.identify() == emulator.identity


def test_partial_reply_then_recovery(emulator, instrument):
    emulator.inject("partial")
    with pytest.raises(InstrumentTimeout, match="terminator"):
        instrument.identify()
    assert _upper(instrument, 1) == 1.0


# ---------------------------------------------------------------------------- threads
def test_two_threads_get_their_own_replies(emulator, instrument):
    levels = {1: -0.5, 2: 0.25, 3: 0.75}
    instrument.write_levels(list(levels), np.array(list(levels.values())))
    mismatches = []

    def ask(channel: int) -> None:
        for _ in range(60):
            value = float(instrument.read_levels([channel])[0])
            if value != levels[channel]:
                mismatches.append((channel, value))

    threads = [threading.Thread(target=ask, args=(channel,)) for channel in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not mismatches
    assert instrument.transport.stats.exchanges >= 180


# ------------------------------------------------------------------------ recording
def test_traffic_recording_replays(emulator, tmp_path):
    path = tmp_path / "traffic.jsonl"
    with TrafficRecorder(path) as recorder:
        transport = VisaTransport(emulator.resource, FAST, name="daq", recorder=recorder)
        driver = ScpiSourceMeter(transport, name="daq")
        driver.connect()
        recorded = driver.channel_ranges([1, 2, 4])
        driver.close()
    events = list(read_recording(path))
    assert events[0].event == "open"
    assert any(event.event == "write" and event.data == b"*IDN?\n" for event in events)

    replay = ReplayTransport.from_recording(path, instrument="daq", settings=FAST)
    again = ScpiSourceMeter(replay, name="daq")
    again.connect()
    replayed = again.channel_ranges([1, 2, 4])
    replay.assert_all_used()
    np.testing.assert_array_equal(replayed.upper, recorded.upper)
    np.testing.assert_array_equal(replayed.resolution, recorded.resolution)


# ---------------------------------------------------------------------------- serial
@pytest.fixture
def board_emulator(tmp_path):
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], preset="ideal", seed=0)
    with SerialBoardEmulator(hardware, link=tmp_path / "board") as emu:
        yield emu


def test_serial_line_in_pieces(board_emulator):
    transport = SerialTransport(board_emulator.resource, FAST, name="board")
    board = SerialBoard(transport, name="board", expected_identity="PNN,EMULATED-BOARD")
    board.connect()
    board_emulator.inject("split", split_pieces=3, split_pause_s=0.1)
    assert board.identify() == board_emulator.identity
    board.close()


def test_serial_port_disappears_and_comes_back(board_emulator):
    transport = SerialTransport(board_emulator.resource, FAST, name="board")
    board = SerialBoard(transport, name="board", reconnect_attempts=3, reconnect_backoff_s=0.3)
    board.connect()
    board.write_levels([4], np.array([0.5]))
    board_emulator.disconnect(reappear_s=0.4)
    time.sleep(0.05)
    # The next exchange finds the link broken, reconnects by the same path once the port is
    # back, checks the identity, and reads the level that was set before.
    with pytest.raises(ConnectionLost, match="lost"):
        board.read_levels([4])
    assert float(board.read_levels([4])[0]) == 0.5
    assert board.reconnects == 1
    board.close()


def _board(emulator, **options):
    transport = SerialTransport(emulator.resource, FAST, name="board")
    board = SerialBoard(transport, name="board", **options)
    board.connect()
    return board


BATCH = np.array([[0.5, -0.25, 0.125], [0.0, 0.75, -0.5]])


def _run(board):
    return board.run_batch([1, 2, 3], BATCH, [1, 2], settle_s=0.0, averages=1)


def test_serial_checksum_gives_the_same_batch(board_emulator):
    plain = _board(board_emulator)
    expected = _run(plain)
    plain.close()
    board = _board(board_emulator, checksum=True)
    np.testing.assert_array_equal(_run(board), expected)
    assert board_emulator.checksum
    board.close()


def test_serial_bitflip_unnoticed_without_checksum(board_emulator):
    # Why the checksum exists: a flipped payload bit becomes a wrong but plausible reading.
    board = _board(board_emulator)
    expected = _run(board)
    board_emulator.inject("bitflip")
    corrupted = _run(board)
    assert board_emulator.faults.counts["bitflip"] == 1
    assert not np.array_equal(corrupted, expected, equal_nan=True)
    board.close()


def test_serial_bitflip_with_checksum_is_invalid(board_emulator):
    board = _board(board_emulator, checksum=True)
    expected = _run(board)
    board_emulator.inject("bitflip")
    with pytest.raises(MeasurementError, match="checksum .* does not match its payload"):
        _run(board)
    np.testing.assert_array_equal(_run(board), expected)
    board.close()


def test_serial_board_rejects_corrupted_batch(board_emulator):
    board = _board(board_emulator, checksum=True)
    board.configure_batch([1, 2, 3], [1, 2], settle_s=0.0, averages=1)
    batches_before = len(board_emulator.sequences)
    data = np.asarray(BATCH, dtype="<f4").tobytes()
    with board.exchange() as link:
        link.write(b"RUNB 2 " + encode_block(data) + b"00000000")
        reply = link.read_line()
    assert reply.startswith(b"ERR 6")
    assert len(board_emulator.sequences) == batches_before
    board.close()


def test_serial_reconnect_restores_checksum(board_emulator):
    board = _board(board_emulator, checksum=True, reconnect_attempts=3, reconnect_backoff_s=0.3)
    expected = _run(board)
    board_emulator.disconnect(reappear_s=0.4)
    time.sleep(0.05)
    with pytest.raises(InstrumentError, match="lost"):
        _run(board)
    # The board comes back with checksums off; the reconnect switches them on before the batch.
    np.testing.assert_array_equal(_run(board), expected)
    assert board_emulator.checksum
    board.close()


def test_serial_checksum_needs_firmware_support(tmp_path):
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], preset="ideal", seed=0)
    with SerialBoardEmulator(hardware, link=tmp_path / "board", crc_command=False) as emulator:
        with pytest.raises(InstrumentError, match="does not support the CRC command.*remove checksum"):
            _board(emulator, checksum=True)


def test_serial_checksum_needs_binary_transfer():
    transport = SerialTransport("loop://", FAST, name="loop")
    with pytest.raises(ConfigError, match='checksum covers binary batches only; set transfer = "binary"'):
        SerialBoard(transport, name="board", transfer="ascii", checksum=True)


def test_serial_loop_url_echoes():
    transport = SerialTransport("loop://", FAST, name="loop")
    transport.open()
    transport.write("hello")
    assert transport.read_line() == b"hello"
    transport.close()
