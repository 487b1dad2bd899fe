"""A SCPI source-meter on 127.0.0.1 whose readings come from simulated crossbar layers.

It speaks the default dialect of :class:`pnn.devices.ScpiSourceMeter` over a raw TCP socket, so
a station file with ``resource = "TCPIP::127.0.0.1::PORT::SOCKET"`` drives it through pyvisa
and pyvisa-py exactly as it would drive a LAN instrument. Commands (short or long forms,
case-insensitive, compound with ``;``):

=========================================  ===================================================
``*IDN?``, ``*CLS``, ``*RST``, ``*OPC?``   identity, clear errors, all levels to 0, "1"
``SYSTem:ERRor[:NEXT]?``                   oldest error, ``0,"No error"`` when empty
``SOURce<n>:VOLTage <v>``                  set a level; out of range gives error -222
``SOURce<n>:VOLTage? [MIN|MAX]``           level, or the channel's range
``SOURce<n>:VOLTage:RESolution?``          the channel's step (0 when continuous)
``SOURce:SEQuence:CHANnel <list>``         source channels a batch row sets, ``(@1:12)``
``SOURce:SEQuence:DWELl <s>``              wait per row before reading
``SOURce:SEQuence:DATA <values|block>``    batch rows, row-major, in the FORMat below
``SENSe:CHANnel <list>``                   meter channels read per row
``SENSe:AVERage:COUNt <n>``                readings averaged per row
``INITiate``                               run the batch into the buffer
``FETCh?``                                 the buffer, rows x channels
``MEASure:VOLTage? <list>``                one reading of each channel now (always ASCII)
``FORMat ASCii|REAL,32|REAL,64``           number format of DATA and FETCh?
``FORMat:BORDer NORMal|SWAPped``           byte order of binary blocks (big or little endian)
=========================================  ===================================================

A query that fails puts its error in the queue and sends no reply, as SCPI instruments do.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..devices.scpi import BINARY_FORMATS, encode_block, parse_channel_list
from ..errors import ConfigError
from .base import Emulator, Link, split_commands, split_messages
from .faults import FaultConfig
from .hardware import ChannelError, EmulatedHardware

__all__ = ["ScpiEmulator"]

log = logging.getLogger(__name__)

_ERRORS = {
    -100: "Command error",
    -104: "Data type error",
    -113: "Undefined header",
    -114: "Header suffix out of range",
    -222: "Data out of range",
    -224: "Illegal parameter value",
    -230: "Data corrupt or stale",
    -350: "Queue overflow",
}


class _ScpiError(Exception):
    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _pattern(spec: str) -> re.Pattern[bytes]:
    """Compile a SCPI header like ``SOURce#:VOLTage?`` into a regex for short and long forms."""
    parts = []
    for node in spec.split(":"):
        query = node.endswith("?")
        node = node.rstrip("?")
        numbered = node.endswith("#")
        node = node.rstrip("#")
        optional = node.startswith("[")
        node = node.strip("[]")
        short = "".join(ch for ch in node if ch.isupper() or ch == "*")
        rest = node[len(short):].upper()
        piece = re.escape(short) + (f"(?:{re.escape(rest)})?" if rest else "")
        if numbered:
            piece += r"(\d*)"
        if query:
            piece += r"\?"
        parts.append((piece, optional))
    regex = ""
    for index, (piece, optional) in enumerate(parts):
        sep = ":" if index else ""
        regex += f"(?:{sep}{piece})?" if optional else f"{sep}{piece}"
    return re.compile(("^" + regex + "$").encode(), re.IGNORECASE)


def _number(text: bytes) -> float:
    try:
        return float(text)
    except ValueError:
        raise _ScpiError(-104, f"{text[:20]!r} is not a number") from None


def _channels(text: bytes) -> list[int]:
    try:
        channels = parse_channel_list(text.decode("ascii", errors="replace"))
    except ConfigError as exc:
        raise _ScpiError(-224, str(exc)) from None
    if not channels:
        raise _ScpiError(-224, "empty channel list")
    return channels


class _ScpiDevice:
    """Instrument state shared by every connection, and the command table."""

    def __init__(self, emulator: ScpiEmulator) -> None:
        self.emulator = emulator
        self.hardware = emulator.hardware
        self.lock = threading.RLock()
        self.errors: deque[tuple[int, str]] = deque()
        self.format = "ASC"
        self.little_endian = False
        self.sequence_channels: list[int] = []
        self.sense_channels: list[int] = []
        self.sequence_rows: np.ndarray | None = None
        self.dwell_s = 0.0
        self.averages = 1
        self.buffer: np.ndarray | None = None
        # The level command comes first: hosts send it most often.
        self.table: list[tuple[re.Pattern[bytes], Callable[[tuple[bytes, ...], bytes], bytes | None]]] = [
            (_pattern("SOURce#:VOLTage"), self._set_level),
            (_pattern("*IDN?"), lambda g, a: self.emulator.identity.encode()),
            (_pattern("*CLS"), self._clear),
            (_pattern("*RST"), self._reset),
            (_pattern("*OPC?"), lambda g, a: b"1"),
            (_pattern("SYSTem:ERRor?"), self._error),
            (_pattern("SYSTem:ERRor:NEXT?"), self._error),
            (_pattern("SOURce#:VOLTage?"), self._get_level),
            (_pattern("SOURce#:VOLTage:RESolution?"), self._get_resolution),
            (_pattern("SOURce:SEQuence:CHANnel"), self._set_sequence_channels),
            (_pattern("SOURce:SEQuence:DWELl"), self._set_dwell),
            (_pattern("SOURce:SEQuence:DATA"), self._set_sequence_data),
            (_pattern("SENSe:CHANnel"), self._set_sense_channels),
            (_pattern("SENSe:AVERage:COUNt"), self._set_averages),
            (_pattern("SENSe:AVERage:COUNt?"), lambda g, a: str(self.averages).encode()),
            (_pattern("INITiate"), self._initiate),
            (_pattern("FETCh?"), self._fetch),
            (_pattern("MEASure:VOLTage?"), self._measure),
            (_pattern("FORMat"), self._set_format),
            (_pattern("FORMat?"), lambda g, a: (self.format if self.format == "ASC" else f"REAL,{self.format[5:]}").encode()),
            (_pattern("FORMat:BORDer"), self._set_border),
        ]

    # ------------------------------------------------------------------------ dispatch
    def execute(self, command: bytes) -> bytes | None:
        """Run one command; return its reply (queries) or None. Errors go to the queue."""
        header, _, args = command.partition(b" ")
        args = args.lstrip()
        if not args.startswith(b"#"):
            args = args.rstrip()
        with self.lock:
            for pattern, handler in self.table:
                match = pattern.match(header)
                if match:
                    try:
                        return handler(match.groups(), args)
                    except _ScpiError as exc:
                        self.push_error(exc.code, exc.detail)
                        return None
                    except ChannelError as exc:
                        self.push_error(exc.code, str(exc))
                        return None
            self.push_error(-113, header[:30].decode("latin-1"))
            return None

    def push_error(self, code: int, detail: str) -> None:
        if len(self.errors) >= 32:
            self.errors[-1] = (-350, _ERRORS[-350])
            return
        message = _ERRORS.get(code, "Error")
        self.errors.append((code, f"{message}; {detail}" if detail else message))

    # ------------------------------------------------------------------------ handlers
    def _clear(self, groups: tuple[bytes, ...], args: bytes) -> None:
        self.errors.clear()

    def _reset(self, groups: tuple[bytes, ...], args: bytes) -> None:
        self.hardware.reset()

    def _error(self, groups: tuple[bytes, ...], args: bytes) -> bytes:
        if not self.errors:
            return b'0,"No error"'
        code, message = self.errors.popleft()
        return f'{code},"{message}"'.encode()

    @staticmethod
    def _channel(groups: tuple[bytes, ...]) -> int:
        return int(groups[0]) if groups and groups[0] else 1

    def _set_level(self, groups: tuple[bytes, ...], args: bytes) -> None:
        self.hardware.set_levels([self._channel(groups)], [_number(args)])

    def _get_level(self, groups: tuple[bytes, ...], args: bytes) -> bytes:
        channel = self._channel(groups)
        index = self.hardware.check_source([channel])[0]
        which = args.strip().upper()
        if which in (b"MIN", b"MINIMUM"):
            value = self.hardware.lower[index]
        elif which in (b"MAX", b"MAXIMUM"):
            value = self.hardware.upper[index]
        elif which:
            raise _ScpiError(-224, f"{which!r} is not MIN or MAX")
        else:
            value = self.hardware.get_levels([channel])[0]
        return repr(float(value)).encode()

    def _get_resolution(self, groups: tuple[bytes, ...], args: bytes) -> bytes:
        index = self.hardware.check_source([self._channel(groups)])[0]
        return repr(float(self.hardware.resolution[index])).encode()

    def _set_sequence_channels(self, groups: tuple[bytes, ...], args: bytes) -> None:
        channels = _channels(args)
        self.hardware.check_source(channels)
        self.sequence_channels = channels
        self.sequence_rows = None

    def _set_sense_channels(self, groups: tuple[bytes, ...], args: bytes) -> None:
        channels = _channels(args)
        self.hardware.check_meter(channels)
        self.sense_channels = channels

    def _set_dwell(self, groups: tuple[bytes, ...], args: bytes) -> None:
        value = _number(args)
        if not 0 <= value <= 3600:
            raise _ScpiError(-222, f"dwell {value!r} s outside [0, 3600]")
        self.dwell_s = value

    def _set_averages(self, groups: tuple[bytes, ...], args: bytes) -> None:
        value = _number(args)
        if value != int(value) or not 1 <= value <= 1_000_000:
            raise _ScpiError(-222, f"average count {value!r} outside 1..1000000")
        self.averages = int(value)

    def _decode(self, args: bytes) -> np.ndarray:
        if args.startswith(b"#"):
            if self.format == "ASC":
                raise _ScpiError(-104, "binary block received while FORMat is ASCii")
            digits = args[1] - 0x30
            payload = args[2 + digits :]
            dtype = np.dtype(BINARY_FORMATS[self.format])
            if self.little_endian:
                dtype = dtype.newbyteorder("<")
            if len(payload) % dtype.itemsize:
                raise _ScpiError(-104, "block length is not a whole number of values")
            return np.frombuffer(payload, dtype=dtype).astype(np.float64)
        try:
            return np.array([float(item) for item in args.split(b",") if item.strip()])
        except ValueError:
            raise _ScpiError(-104, "sequence data must be numbers") from None

    def _set_sequence_data(self, groups: tuple[bytes, ...], args: bytes) -> None:
        if not self.sequence_channels:
            raise _ScpiError(-224, "set SOURce:SEQuence:CHANnel first")
        values = self._decode(args)
        width = len(self.sequence_channels)
        if values.size == 0 or values.size % width:
            raise _ScpiError(-224, f"{values.size} values do not fill rows of {width} channels")
        self.sequence_rows = values.reshape(-1, width)
        self.emulator.sequences.append((self.emulator.now(), tuple(self.sequence_channels), self.sequence_rows.copy()))

    def _initiate(self, groups: tuple[bytes, ...], args: bytes) -> None:
        if self.sequence_rows is None or not self.sense_channels:
            raise _ScpiError(-224, "load SOURce:SEQuence:DATA and set SENSe:CHANnel before INITiate")
        self.buffer = None
        readings = self.hardware.run(self.sequence_channels, self.sequence_rows, self.sense_channels,
                                     self.averages, self.dwell_s)
        self.buffer = self.emulator.faults.corrupt_readings(readings)

    def _format_readings(self, values: np.ndarray) -> bytes:
        if self.format == "ASC":
            return ",".join(f"{v:.9g}" if abs(v) < 9.9e37 else "9.9E+37" for v in values.ravel()).encode()
        dtype = np.dtype(BINARY_FORMATS[self.format])
        if self.little_endian:
            dtype = dtype.newbyteorder("<")
        return encode_block(np.ascontiguousarray(values.ravel(), dtype=dtype).tobytes())

    def _fetch(self, groups: tuple[bytes, ...], args: bytes) -> bytes:
        if self.buffer is None:
            raise _ScpiError(-230, "no readings; run INITiate first")
        return self._format_readings(self.buffer)

    def _measure(self, groups: tuple[bytes, ...], args: bytes) -> bytes:
        channels = _channels(args) if args else self.sense_channels
        readings = self.hardware.run([], np.zeros((1, 0)), channels, self.averages)
        values = self.emulator.faults.corrupt_readings(readings)
        return ",".join(f"{v:.9g}" if abs(v) < 9.9e37 else "9.9E+37" for v in values.ravel()).encode()

    def _set_format(self, groups: tuple[bytes, ...], args: bytes) -> None:
        text = args.replace(b" ", b"").upper()
        if text in (b"ASC", b"ASCII"):
            self.format = "ASC"
        elif text in (b"REAL,32", b"REAL,64"):
            self.format = text.decode()
        elif text == b"REAL":
            self.format = "REAL,64"
        else:
            raise _ScpiError(-224, f"format {text!r}")

    def _set_border(self, groups: tuple[bytes, ...], args: bytes) -> None:
        text = args.strip().upper()
        if text in (b"NORM", b"NORMAL"):
            self.little_endian = False
        elif text in (b"SWAP", b"SWAPPED"):
            self.little_endian = True
        else:
            raise _ScpiError(-224, f"byte order {text!r}")


class _TcpLink(Link):
    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.closed = False

    def send(self, data: bytes) -> None:
        if not self.closed and data:
            self.sock.sendall(data)

    def drop(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ScpiEmulator(Emulator):
    """SCPI source-meter emulator on a TCP port of 127.0.0.1 (it binds nowhere else).

    Parameters
    ----------
    hardware
        The emulated layers.
    port
        TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
    faults
        Latency, noise and fault settings.
    serial_number
        Third field of the identity.
    record_path
        Optional JSON-lines file receiving every command.
    """

    driver = "scpi-source-meter"

    def __init__(self, hardware: EmulatedHardware, *, port: int = 0, faults: FaultConfig | None = None,
                 serial_number: str = "SN0001", record_path: str | Path | None = None) -> None:
        super().__init__(hardware, faults=faults, identity=f"PNN,EMULATED-SCPI,{serial_number},1.0",
                         record_path=record_path)
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {port}")
        self.requested_port = int(port)
        self.port: int | None = None
        self.device = _ScpiDevice(self)
        #: Every batch loaded: (time, sequence channels, rows), for checking input limits.
        self.sequences: list[tuple[float, tuple[int, ...], np.ndarray]] = []
        self._server: socket.socket | None = None
        self._links: list[_TcpLink] = []
        self._links_lock = threading.Lock()
        self._connections = 0

    @property
    def resource(self) -> str:
        if self.port is None:
            raise ConfigError("the emulator has no port until it is started")
        return f"TCPIP::127.0.0.1::{self.port}::SOCKET"

    def start(self) -> ScpiEmulator:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("127.0.0.1", self.requested_port))
        except OSError as exc:
            server.close()
            raise ConfigError(f"cannot listen on 127.0.0.1:{self.requested_port} ({exc.strerror}); choose another port or 0") from None
        server.listen(8)
        self._server = server
        self.port = server.getsockname()[1]
        self.running = True
        self._spawn(self._accept_loop, name=f"scpi-emulator-{self.port}")
        log.info("SCPI emulator listening on %s", self.resource)
        return self

    def _accept_loop(self) -> None:
        server = self._server
        while not self._stop.is_set() and server is not None:
            try:
                ready, _, _ = select.select([server], [], [], 0.1)
            except (OSError, ValueError):
                break
            if not ready:
                continue
            try:
                sock, _ = server.accept()
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections += 1
            link = _TcpLink(sock, self._connections)
            with self._links_lock:
                self._links.append(link)
            self._spawn(self._serve, link, name=f"scpi-emulator-{self.port}-conn{link.number}")

    def _serve(self, link: _TcpLink) -> None:
        buffer = bytearray()
        try:
            while not self._stop.is_set() and not link.closed:
                ready, _, _ = select.select([link.sock], [], [], 0.1)
                if not ready:
                    continue
                data = link.sock.recv(65536)
                if not data:
                    break
                buffer += data
                for message in split_messages(buffer):
                    if not self._handle(link, message):
                        return
        except (OSError, ValueError):
            pass
        finally:
            link.drop()
            with self._links_lock:
                if link in self._links:
                    self._links.remove(link)

    def _handle(self, link: _TcpLink, message: bytes) -> bool:
        replies = []
        for command in split_commands(message):
            self.record_command(link, command)
            reply = self.device.execute(command)
            if reply is not None:
                replies.append(reply)
        if replies:
            return self.send_reply(link, b";".join(replies))
        return True

    def _close_links(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.drop()

    def drop_connections(self) -> None:
        """Close every open connection now, so the host gets a lost connection."""
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.drop()

    def level_writes(self) -> list[tuple[float, int, float]]:
        pattern = re.compile(r"^SOUR(?:CE)?(\d*):VOLT(?:AGE)?\s+(\S+)$", re.IGNORECASE)
        writes = []
        for entry in self.commands():
            match = pattern.match(entry.command)
            if match:
                channel = int(match.group(1) or 1)
                try:
                    writes.append((entry.t, channel, float(match.group(2))))
                except ValueError:
                    writes.append((entry.t, channel, float("nan")))
        return writes
