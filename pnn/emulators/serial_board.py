"""A serial analog board on a pseudo-terminal, speaking the pnn board protocol.

The emulator opens a pseudo-terminal pair (:func:`os.openpty`), serves the protocol of
``docs/serial-board.md`` on the master side and gives the slave's device path to the host, which
opens it with pyserial like a USB serial adapter. With ``link``, a symbolic link at that path
points at the current device, so that after a ``disconnect`` fault (the port disappears and
comes back as a new device ``reappear_s`` later) the host finds it again at the same path.

DAC and ADC channels are the source and meter channels of the emulated hardware.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import threading
import time
import tty
from pathlib import Path

import numpy as np

from ..devices.scpi import block_checksum, encode_block
from ..errors import ConfigError
from .base import Emulator, Link, split_messages
from .faults import FaultConfig
from .hardware import ChannelError, EmulatedHardware

__all__ = ["SerialBoardEmulator"]

log = logging.getLogger(__name__)

# Maximum time a reply waits for the host to read it before it is dropped, in seconds.
_WRITE_STALL_S = 2.0


class _BoardError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise _BoardError(4, f"bad channel list {text[:30]!r}") from None
    if not values:
        raise _BoardError(4, "empty channel list")
    return values


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _BoardError(4, f"bad number {text[:20]!r}") from None


def _format(values: np.ndarray) -> str:
    return ",".join(f"{v:.9g}" if abs(v) < 9.9e37 else "9.9E+37" for v in np.ravel(values))


class _PtyLink(Link):
    """The master side of the current pseudo-terminal."""

    def __init__(self, emulator: SerialBoardEmulator, master: int, number: int) -> None:
        self.emulator = emulator
        self.master = master
        self.number = number
        self.closed = False

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        stall_until = time.monotonic() + _WRITE_STALL_S
        while view and not self.closed:
            _, ready, _ = select.select([], [self.master], [], 0.05)
            if not ready:
                if time.monotonic() > stall_until:
                    log.warning("serial emulator: the host stopped reading; dropped %d byte(s)", len(view))
                    return
                continue
            try:
                written = os.write(self.master, view)
            except BlockingIOError:
                continue
            view = view[written:]
            stall_until = time.monotonic() + _WRITE_STALL_S

    def drop(self) -> None:
        if not self.closed:
            self.closed = True
            self.emulator._port_dropped()


class SerialBoardEmulator(Emulator):
    """The board protocol on a pseudo-terminal.

    Parameters
    ----------
    hardware
        The emulated layers; DAC channels are its source channels, ADC channels its meter ones.
    faults
        Latency, noise and fault settings.
    link
        Optional path of a symbolic link to the device, kept pointing at the current device.
    serial_number
        Third field of the identity.
    max_rows
        Largest batch a ``RUN`` accepts (a microcontroller's buffer); larger ones get error 5.
    crc_command
        Whether the firmware has the ``CRC`` command. Without it the board replies to ``CRC``
        with error 1, as an older board would.
    record_path
        Optional JSON-lines file receiving every command.
    """

    driver = "serial-board"

    def __init__(self, hardware: EmulatedHardware, *, faults: FaultConfig | None = None,
                 link: str | Path | None = None, serial_number: str = "SN0001", max_rows: int = 4096,
                 crc_command: bool = True, record_path: str | Path | None = None) -> None:
        super().__init__(hardware, faults=faults, identity=f"PNN,EMULATED-BOARD,{serial_number},1.0",
                         record_path=record_path)
        self.link_path = Path(link) if link is not None else None
        if int(max_rows) < 1:
            raise ConfigError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = int(max_rows)
        self.crc_command = bool(crc_command)
        self.checksum = False
        self.sequences: list[tuple[float, tuple[int, ...], np.ndarray]] = []
        self._inputs: list[int] = []
        self._outputs: list[int] = []
        self._averages = 1
        self._settle_s = 0.0
        self._master: int | None = None
        self._slave: int | None = None
        self._link: _PtyLink | None = None
        self._incarnation = 0
        self._device_path: str | None = None
        self._reopen_at: float | None = None
        self._wake_read, self._wake_write = os.pipe()
        self._state_lock = threading.Lock()

    # ------------------------------------------------------------------------------ pty
    @property
    def device_path(self) -> str:
        """Path of the current pseudo-terminal device."""
        if self._device_path is None:
            raise ConfigError("the serial emulator has no device until it is started")
        return self._device_path

    @property
    def resource(self) -> str:
        return str(self.link_path) if self.link_path is not None else self.device_path

    def _open_port(self) -> None:
        master, slave = os.openpty()
        # Raw mode before the host opens the device: no echo, no line editing.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._device_path = os.ttyname(slave)
        self._incarnation += 1
        # A board that was unplugged starts again with checksums off.
        self.checksum = False
        self._link = _PtyLink(self, master, self._incarnation)
        if self.link_path is not None:
            temporary = self.link_path.with_name(self.link_path.name + ".new")
            try:
                if temporary.is_symlink() or temporary.exists():
                    temporary.unlink()
                os.symlink(self._device_path, temporary)
                os.replace(temporary, self.link_path)
            except OSError as exc:
                self._close_port()
                raise ConfigError(
                    f"cannot create the link {self.link_path} to the serial device ({exc.strerror}); "
                    "choose a path in a folder you can write"
                ) from None
        log.info("serial emulator: board on %s", self.resource)

    def _close_port(self) -> None:
        for fd in (self._master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = None

    def _port_dropped(self) -> None:
        """Close the device now and bring a new one back after ``reappear_s``."""
        with self._state_lock:
            self._close_port()
            if self.link_path is not None and self.link_path.is_symlink():
                self.link_path.unlink()
            self._reopen_at = time.monotonic() + self.fault_config.reappear_s
        os.write(self._wake_write, b"x")

    def disconnect(self, reappear_s: float | None = None) -> None:
        """Make the port disappear now; it comes back after ``reappear_s`` (default from the faults)."""
        with self._state_lock:
            self._close_port()
            if self.link_path is not None and self.link_path.is_symlink():
                self.link_path.unlink()
            delay = self.fault_config.reappear_s if reappear_s is None else reappear_s
            self._reopen_at = time.monotonic() + delay
            if self._link is not None:
                self._link.closed = True
        os.write(self._wake_write, b"x")

    # ---------------------------------------------------------------------------- serve
    def start(self) -> SerialBoardEmulator:
        self._open_port()
        self.running = True
        self._spawn(self._serve, name="serial-board-emulator")
        return self

    def _serve(self) -> None:
        buffer = bytearray()
        while not self._stop.is_set():
            with self._state_lock:
                if self._master is None and self._reopen_at is not None and time.monotonic() >= self._reopen_at:
                    self._reopen_at = None
                    buffer.clear()
                    self._open_port()
                master, link = self._master, self._link
            watch = [self._wake_read] + ([master] if master is not None else [])
            try:
                ready, _, _ = select.select(watch, [], [], 0.05)
            except (OSError, ValueError):
                continue
            if self._wake_read in ready:
                os.read(self._wake_read, 64)
            if master is None or master not in ready:
                continue
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF):
                    continue
                raise
            buffer += data
            for message in split_messages(buffer):
                if link is None or link.closed:
                    break
                self._handle(link, message)

    def _handle(self, link: _PtyLink, message: bytes) -> None:
        command = message[:-1] if message.endswith(b"\r") and b"#" not in message else message
        self.record_command(link, command)
        try:
            reply = self._execute(command)
        except _BoardError as exc:
            reply = f"ERR {exc.code} {exc}".encode()
        except ChannelError as exc:
            reply = f"ERR {2 if exc.code == -222 else 3} {exc}".encode()
        try:
            self.send_reply(link, reply)
        except OSError:
            pass

    def _close_links(self) -> None:
        with self._state_lock:
            self._close_port()
            self._reopen_at = None
        os.write(self._wake_write, b"x")

    def stop(self) -> None:
        if self._stopped:
            return
        super().stop()
        if self.link_path is not None and self.link_path.is_symlink():
            self.link_path.unlink()
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------------ protocol
    def _execute(self, command: bytes) -> bytes:
        verb, _, rest = command.partition(b" ")
        verb_text = verb.decode("latin-1").upper()
        if verb_text == "RUNB":
            return self._run_binary(rest)
        args = rest.decode("latin-1").strip()
        hw = self.hardware
        if verb_text == "*IDN?":
            return self.identity.encode()
        if verb_text == "CHAN?":
            return f"{hw.n_source},{hw.n_meter}".encode()
        if verb_text == "RANGE?":
            index = hw.check_source([int(_float(args))])[0]
            return ",".join(repr(float(v)) for v in (hw.lower[index], hw.upper[index], hw.resolution[index])).encode()
        if verb_text == "SET":
            channels, values = [], []
            for item in args.split(","):
                channel, sep, value = item.partition("=")
                if not sep:
                    raise _BoardError(4, f"expected CHANNEL=VALUE, got {item[:30]!r}")
                channels.append(int(_float(channel)))
                values.append(_float(value))
            hw.set_levels(channels, values)
            return b"OK"
        if verb_text == "GET":
            return ",".join(repr(float(v)) for v in hw.get_levels(_int_list(args))).encode()
        if verb_text == "READ":
            readings = hw.run([], np.zeros((1, 0)), _int_list(args), self._averages)
            return _format(self.faults.corrupt_readings(readings)).encode()
        if verb_text == "AVG":
            value = _float(args)
            if value != int(value) or not 1 <= value <= 1_000_000:
                raise _BoardError(2, f"averages {args!r} outside 1..1000000")
            self._averages = int(value)
            return b"OK"
        if verb_text == "SETTLE":
            value = _float(args)
            if not 0 <= value <= 3.6e9:
                raise _BoardError(2, f"settling time {args!r} us outside 0..3.6e9")
            self._settle_s = value * 1e-6
            return b"OK"
        if verb_text == "INPUTS":
            channels = _int_list(args)
            hw.check_source(channels)
            self._inputs = channels
            return b"OK"
        if verb_text == "OUTPUTS":
            channels = _int_list(args)
            hw.check_meter(channels)
            self._outputs = channels
            return b"OK"
        if verb_text == "CRC" and self.crc_command:
            if args not in ("0", "1"):
                raise _BoardError(4, f"CRC takes 0 or 1, got {args[:20]!r}")
            self.checksum = args == "1"
            return b"OK"
        if verb_text == "RUN":
            rows_text, _, data = args.partition(" ")
            values = np.array([_float(item) for item in data.split(",") if item.strip()])
            return _format(self._run(int(_float(rows_text)), values)).encode()
        raise _BoardError(1, f"unknown command {verb_text[:20]!r}")

    def _run(self, rows: int, values: np.ndarray) -> np.ndarray:
        if not self._inputs or not self._outputs:
            raise _BoardError(4, "set INPUTS and OUTPUTS before RUN")
        if not 1 <= rows <= self.max_rows:
            raise _BoardError(5, f"{rows} rows; this board takes 1..{self.max_rows}")
        if values.size != rows * len(self._inputs):
            raise _BoardError(4, f"{values.size} values for {rows} rows of {len(self._inputs)} inputs")
        data = values.reshape(rows, len(self._inputs))
        self.sequences.append((self.now(), tuple(self._inputs), data.copy()))
        readings = self.hardware.run(self._inputs, data, self._outputs, self._averages, self._settle_s)
        return self.faults.corrupt_readings(readings)

    def _run_binary(self, rest: bytes) -> bytes:
        match = re.match(rb"\s*(\d+)\s+#(\d)", rest)
        if match is None:
            raise _BoardError(4, "expected RUNB <rows> #<block>")
        rows = int(match.group(1))
        digits = int(match.group(2))
        start = match.end()
        length = int(rest[start : start + digits])
        payload = rest[start + digits : start + digits + length]
        if len(payload) != length or len(payload) % 4:
            raise _BoardError(4, "binary block length is not a whole number of float32 values")
        if self.checksum:
            trailer = rest[start + digits + length :].strip()
            if trailer.upper() != block_checksum(payload):
                raise _BoardError(6, f"checksum {trailer[:8].decode('latin-1')!r} does not match the batch; nothing was applied")
        values = np.frombuffer(payload, dtype="<f4").astype(np.float64)
        readings = self._run(rows, values)
        reply = np.ascontiguousarray(readings.ravel(), dtype="<f4").tobytes()
        return encode_block(reply) + (block_checksum(reply) if self.checksum else b"")

    def level_writes(self) -> list[tuple[float, int, float]]:
        writes = []
        for entry in self.commands("SET "):
            for item in entry.command[4:].split(","):
                channel, _, value = item.partition("=")
                try:
                    writes.append((entry.t, int(channel), float(value)))
                except ValueError:
                    writes.append((entry.t, -1, float("nan")))
        return writes
