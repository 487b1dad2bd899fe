"""Parts shared by both emulators: the command record, faulty replies, framing and station files.

An emulator runs in background threads (:meth:`Emulator.start`, :meth:`Emulator.stop`), so
tests use it in-process; the ``pnn emulate`` command runs the same class until Ctrl-C.
Every command received is recorded with its time (:attr:`Emulator.record`), so a test can check
afterwards that no command left the limits and no ramp step was too large.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError
from .faults import FaultConfig, FaultInjector
from .hardware import EmulatedHardware

__all__ = ["Emulator", "CommandRecord", "split_messages", "split_commands", "Link"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandRecord:
    """One command the emulator received."""

    t: float
    """Time since the emulator started, in seconds."""
    connection: int
    """Number of the connection (or port incarnation) it came in on."""
    command: str
    """Command text; a binary block shows as ``#<N bytes>``."""
    payload: bytes = b""
    """The binary block's payload, if the command carried one."""


def _block_end(buffer: bytes | bytearray, pos: int) -> int | None:
    """Return the index after a definite-length block starting at ``pos``, -1 if it is incomplete,
    or None if ``pos`` does not start a block."""
    if pos + 1 >= len(buffer):
        return -1 if pos + 1 == len(buffer) else None
    digit = buffer[pos + 1]
    if not 0x31 <= digit <= 0x39:
        return None
    digits = digit - 0x30
    if pos + 2 + digits > len(buffer):
        return -1
    length_text = bytes(buffer[pos + 2 : pos + 2 + digits])
    if not length_text.isdigit():
        return None
    end = pos + 2 + digits + int(length_text)
    return end if end <= len(buffer) else -1


def split_messages(buffer: bytearray, terminator: bytes = b"\n") -> list[bytes]:
    """Remove and return the complete messages at the start of ``buffer``.

    A message ends with ``terminator``, except inside an IEEE 488.2 definite-length block,
    whose payload may contain any byte.
    """
    messages = []
    start = pos = 0
    while True:
        term = buffer.find(terminator, pos)
        block = buffer.find(b"#", pos)
        if term < 0 and block < 0:
            break
        if block >= 0 and (term < 0 or block < term):
            end = _block_end(buffer, block)
            if end == -1:
                break
            pos = block + 1 if end is None else end
            continue
        messages.append(bytes(buffer[start:term]))
        start = pos = term + len(terminator)
    del buffer[:start]
    return messages


def split_commands(message: bytes) -> list[bytes]:
    """Split a compound SCPI message at ``;`` (outside binary blocks), dropping leading colons.

    Surrounding whitespace (and a trailing carriage return) is removed, except after a binary
    block, whose last payload bytes may be whitespace values.
    """
    parts = []
    start = pos = 0
    block_ends = set()
    while True:
        semicolon = message.find(b";", pos)
        block = message.find(b"#", pos)
        if semicolon < 0 and block < 0:
            break
        if block >= 0 and (semicolon < 0 or block < semicolon):
            end = _block_end(message, block)
            if end is None or end == -1:
                pos = block + 1
            else:
                block_ends.add(end)
                pos = end
            continue
        parts.append((message[start:semicolon], semicolon in block_ends))
        start = pos = semicolon + 1
    parts.append((message[start:], len(message) in block_ends))
    commands = []
    for part, ends_in_block in parts:
        part = part.lstrip().lstrip(b":").lstrip()
        if not ends_in_block:
            part = part.rstrip()
        if part:
            commands.append(part)
    return commands


class Link(ABC):
    """One connection to the host: send bytes, or drop the connection for a fault."""

    number: int = 0

    @abstractmethod
    def send(self, data: bytes) -> None:
        """Send bytes; raise OSError when the host has gone."""

    @abstractmethod
    def drop(self) -> None:
        """Break the connection (the ``disconnect`` fault)."""


class Emulator(ABC):
    """Base of the emulators: hardware, faults, record, threads.

    Parameters
    ----------
    hardware
        The emulated channels and crossbars.
    faults
        Latency, noise and fault settings.
    identity
        Reply to ``*IDN?``.
    record_path
        Optional JSON-lines file that receives every command as it arrives.
    """

    def __init__(self, hardware: EmulatedHardware, *, faults: FaultConfig | None = None, identity: str,
                 record_path: str | Path | None = None) -> None:
        self.hardware = hardware
        self.fault_config = faults or FaultConfig()
        self.faults = FaultInjector(self.fault_config)
        self.identity = identity
        self.record: list[CommandRecord] = []
        self._record_lock = threading.Lock()
        self._record_file: IO[str] | None = None
        if record_path:
            try:
                self._record_file = open(record_path, "a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"cannot open the command record {record_path} ({exc.strerror}); choose a writable path"
                ) from None
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.running = False
        self._stopped = False

    # --------------------------------------------------------------------------- record
    def record_command(self, link: Link, command: bytes) -> CommandRecord:
        """Record one received command (binary blocks summarised) and return the entry."""
        payload = b""
        hash_at = command.find(b"#")
        text_bytes = command
        if hash_at >= 0:
            end = _block_end(command, hash_at)
            if end is not None and end > 0:
                digits = command[hash_at + 1] - 0x30
                payload = bytes(command[hash_at + 2 + digits : end])
                text_bytes = command[:hash_at] + f"#<{len(payload)} bytes>".encode() + command[end:]
        entry = CommandRecord(self.now(), link.number, text_bytes.decode("latin-1"), payload)
        with self._record_lock:
            self.record.append(entry)
            if self._record_file is not None:
                self._record_file.write(json.dumps({"t": round(entry.t, 6), "connection": entry.connection,
                                                    "command": entry.command}) + "\n")
                self._record_file.flush()
        return entry

    def commands(self, startswith: str | None = None) -> list[CommandRecord]:
        """Return the recorded commands, optionally only those starting with a prefix (case-insensitive)."""
        with self._record_lock:
            entries = list(self.record)
        if startswith is None:
            return entries
        prefix = startswith.upper()
        return [entry for entry in entries if entry.command.upper().startswith(prefix)]

    def clear_record(self) -> None:
        """Forget the recorded commands."""
        with self._record_lock:
            self.record.clear()

    @abstractmethod
    def level_writes(self) -> list[tuple[float, int, float]]:
        """Return every level the host asked for: (time, channel, value), in order received."""

    def inject(self, kind: str, count: int = 1, **options: Any) -> None:
        """Queue faults for the next replies or measurements (see :mod:`pnn.emulators.faults`)."""
        self.faults.inject(kind, count, **options)

    # ----------------------------------------------------------------------------- reply
    def send_reply(self, link: Link, reply: bytes, terminator: bytes = b"\n") -> bool:
        """Send a reply, applying latency and any fault; return False if the link was dropped."""
        header = re.match(rb"#([1-9])", reply)
        kind, options = self.faults.next_reply_fault(block=header is not None)
        delay = self.faults.reply_delay()
        if delay > 0:
            self._sleep(delay)
        option = self.faults.option
        if kind is not None:
            log.info("emulator: injecting %s into the reply %r", kind, reply[:40])
        if kind is None:
            link.send(reply + terminator)
        elif kind == "no_reply":
            pass
        elif kind == "late":
            self._sleep(float(option(options, "late_s")))
            link.send(reply + terminator)
        elif kind == "split":
            data = reply + terminator
            pieces = int(option(options, "split_pieces"))
            size = max(1, math.ceil(len(data) / pieces))
            for offset in range(0, len(data), size):
                if offset:
                    self._sleep(float(option(options, "split_pause_s")))
                link.send(data[offset : offset + size])
        elif kind == "partial":
            link.send(reply[: max(1, len(reply) // 2)])
        elif kind == "garbled":
            data = bytearray(reply)
            for index in self.faults.rng.integers(0, max(1, len(data)), size=max(1, len(data) // 8)):
                if data:
                    data[int(index)] = b"?@~%"[int(index) % 4]
            link.send(bytes(data) + terminator)
        elif kind == "wrong_terminator":
            link.send(reply + b"\r")
        elif kind == "bitflip":
            data = bytearray(reply)
            start = 2 + int(header.group(1))
            end = start + int(data[2:start])
            if end > start:
                index = int(self.faults.rng.integers(start, end))
                data[index] ^= 1 << int(self.faults.rng.integers(8))
            link.send(bytes(data) + terminator)
        elif kind == "trickle":
            stop = time.monotonic() + float(option(options, "trickle_s"))
            interval = float(option(options, "trickle_interval_s"))
            while time.monotonic() < stop and not self._stop.is_set():
                link.send(b".")
                self._sleep(interval)
            link.send(reply + terminator)
        elif kind == "disconnect":
            link.send(reply[: len(reply) // 2])
            link.drop()
            return False
        return True

    def now(self) -> float:
        """Seconds since the emulator started."""
        return time.monotonic() - self._start

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # ------------------------------------------------------------------------ threads
    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        # Forget finished connection threads, so a host that reconnects often does not grow the list.
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()
        return thread

    @abstractmethod
    def start(self) -> Emulator:
        """Start serving in background threads and return self."""

    def stop(self) -> None:
        """Stop serving, close every connection and wait for the threads (at most 5 s).

        Stopping twice is allowed.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._close_links()
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(timeout=5.0)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None
        self.running = False

    @abstractmethod
    def _close_links(self) -> None:
        """Close listening sockets, connections or the pseudo-terminal."""

    def serve_forever(self) -> None:
        """Block until :meth:`stop` is called from another thread or Ctrl-C; then stop."""
        try:
            while not self._stop.wait(0.2):
                pass
        finally:
            self.stop()

    def __enter__(self) -> Emulator:
        return self.start() if not self.running else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------- station file
    @property
    @abstractmethod
    def resource(self) -> str:
        """The address a station file gives for this emulator."""

    #: Driver name for station files.
    driver = ""

    def station_toml(
        self,
        *,
        instrument: str = "emulator",
        mode: str = "buffered",
        transfer: str = "binary",
        timeout_s: float = 2.0,
        deadline_s: float = 10.0,
        max_step_levels: int = 16,
        gradient: str = "outer-product",
        record: str | None = None,
        probes: bool = True,
        extra_instrument_lines: tuple[str, ...] = (),
    ) -> str:
        """Return a station file that drives every emulated layer as one node.

        Parameters
        ----------
        instrument
            Name of the instrument in the file.
        mode
            ``"buffered"`` or ``"point"``.
        transfer
            ``"binary"`` or ``"ascii"``.
        timeout_s, deadline_s
            Read timeout and line deadline, in seconds.
        max_step_levels
            Ramp step of weights and biases, in instrument steps (resolution); with a
            continuous preset, in 1/64 of the range.
        gradient
            ``"outer-product"`` or ``"perturbation"``.
        record
            Optional traffic recording file, relative to the station file.
        probes
            Map each layer's pre-activation channels as a probe (read with every batch).
        extra_instrument_lines
            More ``key = value`` lines for the instrument table.
        """
        hw = self.hardware
        lines = ["# Station file for the pnn emulator; generated by pnn.", "[station]",
                 f'name = "{type(self).__name__}"']
        if record:
            lines.append(f'record = "{record}"')
        lines += [
            "",
            f"[instruments.{instrument}]",
            f'resource = "{self.resource}"',
            f'driver = "{self.driver}"',
            f'identity = "{",".join(self.identity.split(",")[:2])}"',
            f"timeout_s = {timeout_s!r}",
            f"deadline_s = {deadline_s!r}",
            f'transfer = "{transfer}"',
            *extra_instrument_lines,
        ]
        for i, spec in enumerate(hw.layer_specs):
            ch = hw.channels[i]
            w_lo, w_hi, w_res = hw.weight_range(i)
            b_lo, b_hi, b_res = hw.bias_range(i)
            w_step = max_step_levels * w_res if w_res > 0 else (w_hi - w_lo) / 64
            b_step = max_step_levels * b_res if b_res > 0 else (b_hi - b_lo) / 64
            lines += [
                "",
                "[[nodes]]",
                f'name = "layer{i + 1}"',
                f'activation = "{spec.activation}"',
                f'gradient = "{gradient}"',
                f'mode = "{mode}"',
                f"seed = {i}",
                "",
                "[nodes.inputs]",
                f'instrument = "{instrument}"',
                f'channels = "{ch.first_input}:{ch.first_weight - 1}"',
                "safe = 0.0",
                "",
                "[nodes.outputs]",
                f'instrument = "{instrument}"',
                f'channels = "{ch.first_output}:{ch.first_preactivation - 1}"',
                "",
            ]
            if probes:
                lines += [
                    "[nodes.probes.preactivation]",
                    f'instrument = "{instrument}"',
                    f'channels = "{ch.first_preactivation}:{ch.first_preactivation + spec.n_out - 1}"',
                    "",
                ]
            lines += [
                "[nodes.parameters.weight]",
                f'instrument = "{instrument}"',
                f'channels = "{ch.first_weight}:{ch.first_bias - 1}"',
                f"shape = [{spec.n_out}, {spec.n_in}]",
                f"max_step = {w_step!r}",
                "safe = 0.0",
                "",
                "[nodes.parameters.bias]",
                f'instrument = "{instrument}"',
                f'channels = "{ch.first_bias}:{ch.first_bias + spec.n_out - 1}"',
                f"max_step = {b_step!r}",
                "safe = 0.0",
            ]
        return "\n".join(lines) + "\n"

    def write_station(self, path: str | Path, **options: Any) -> Path:
        """Write :meth:`station_toml` to ``path`` and return the path."""
        path = Path(path)
        try:
            path.write_text(self.station_toml(**options), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write the station file {path} ({exc.strerror}); choose a writable path") from None
        return path
