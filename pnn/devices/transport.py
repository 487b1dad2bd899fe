"""Byte transports to instruments: VISA through pyvisa, serial through pyserial.

A transport moves bytes and nothing else; drivers build commands on top of it. Every transport
gives the same guarantees, whatever the link underneath:

- One re-entrant lock per instrument (:attr:`Transport.lock`) is held around every
  write-and-read exchange, so two threads sharing an instrument never read each other's replies.
  A driver that needs several exchanges in a row wraps them in :meth:`Transport.exchange`.
- Every read has a timeout (``timeout_s``: the longest silence while waiting for bytes), and a
  line read also has an overall deadline (``deadline_s``), so an instrument that keeps sending
  bytes without ever sending the terminator cannot hang the run.
- Bytes that arrived without the terminator are reported as a likely terminator mismatch, not as
  a bare timeout.
- After a timeout or an interrupted exchange the link is resynchronised before the next
  exchange: stale bytes are drained, and, once the instrument's identity is known, the
  identification query is sent and every line before its reply is discarded. A late reply to
  an earlier query is therefore never taken as the answer to the next one.
- All traffic is logged at DEBUG level and optionally recorded (:mod:`pnn.devices.traffic`).

Reads are done in chunks whose size starts at one byte and grows eightfold while bytes arrive
quickly, but is capped so that one chunk at the observed byte rate fits in the time left before
the deadline. A fast instrument therefore needs only a few calls per reply, and a trickling one
overruns the deadline by at most about one chunk of a few bytes. Bytes that have already
arrived (where the link can tell how many) are taken in one call whatever the chunk size,
because reading them cannot wait.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, InstrumentError, InstrumentTimeout
from .traffic import TrafficRecorder, log_traffic

__all__ = [
    "Transport",
    "TransportSettings",
    "TransportStats",
    "VisaTransport",
    "SerialTransport",
    "ConnectionLost",
    "open_transport",
    "is_visa_resource",
    "VISA_PREFIXES",
]

log = logging.getLogger(__name__)

try:  # Counting the bytes waiting on a socket needs the POSIX ioctl.
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # pragma: no cover - Windows
    _FIONREAD = None

#: Interface prefixes of VISA resource strings; any other resource is a pyserial URL or path.
VISA_PREFIXES = ("TCPIP", "ASRL", "USB", "GPIB", "VXI", "PXI", "VICP")

# Largest chunk requested from the link in one call, in bytes.
_MAX_CHUNK = 1 << 20
# Growth of the chunk size from one read call to the next while bytes arrive quickly: a
# 4 kB reply takes five calls (1, 8, 64, 512, then the rest).
_GROWTH = 8


class ConnectionLost(InstrumentError):
    """The link to an instrument broke (closed socket, unplugged serial adapter)."""


@dataclass(frozen=True)
class TransportSettings:
    """Timing and framing of one instrument link."""

    timeout_s: float = 2.0
    """Maximum silence while waiting for bytes of a reply, in seconds."""
    deadline_s: float = 10.0
    """Maximum total time of one line read, even while bytes keep arriving, in seconds."""
    min_rate: float = 1000.0
    """Slowest transfer rate accepted for a fixed-length read, in bytes per second; reading n
    bytes may take ``deadline_s + n / min_rate`` seconds."""
    write_termination: str = "\n"
    """Appended to every command written."""
    read_termination: str = "\n"
    """Ends every reply line."""
    drain_quiet_s: float = 0.05
    """Silence that ends the draining of stale bytes after a timeout, in seconds."""
    drain_max_s: float = 2.0
    """Maximum time spent draining stale bytes, in seconds."""
    encoding: str = "ascii"
    """Text encoding of commands and replies."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "deadline_s", "min_rate", "drain_quiet_s", "drain_max_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"transport setting {name} must be a positive number, got {value!r}")
        if self.deadline_s < self.timeout_s:
            raise ConfigError(
                f"transport deadline_s ({self.deadline_s:g} s) is shorter than timeout_s "
                f"({self.timeout_s:g} s); make the deadline at least as long as the timeout"
            )
        if not self.read_termination:
            raise ConfigError("read_termination must not be empty; instruments end replies with '\\n' or '\\r\\n'")
        try:
            self.read_termination.encode(self.encoding)
            self.write_termination.encode(self.encoding)
        except (UnicodeEncodeError, LookupError) as exc:
            raise ConfigError(f"terminators cannot be encoded as {self.encoding!r} ({exc})") from None

    @property
    def read_term_bytes(self) -> bytes:
        """The read terminator as bytes."""
        return self.read_termination.encode(self.encoding)

    @property
    def write_term_bytes(self) -> bytes:
        """The write terminator as bytes."""
        return self.write_termination.encode(self.encoding)


@dataclass
class TransportStats:
    """Counters of one transport, for logs, run records and benchmarks."""

    exchanges: int = 0
    """Exchanges started with :meth:`Transport.exchange` (or :meth:`Transport.query`)."""
    writes: int = 0
    """Calls that wrote to the link."""
    reads: int = 0
    """Calls that read from the link (each may return part of a reply)."""
    bytes_written: int = 0
    bytes_read: int = 0
    timeouts: int = 0
    """Reads that ended by timeout or deadline."""
    resyncs: int = 0
    """Resynchronisations after a timeout or an interrupted exchange."""
    discarded_bytes: int = 0
    """Stale bytes thrown away while resynchronising."""
    reopens: int = 0
    """Times the link was closed and opened again."""
    io_s: float = 0.0
    """Time spent inside the link's read and write calls, in seconds."""

    def as_dict(self) -> dict[str, Any]:
        """Return the counters as a plain dict."""
        return dict(self.__dict__)


def is_visa_resource(resource: str) -> bool:
    """Return True when ``resource`` is a VISA resource string (``TCPIP::...``, ``ASRL...``)."""
    head = resource.strip().upper()
    return any(head.startswith(prefix) for prefix in VISA_PREFIXES)


def _show(data: bytes, limit: int = 60) -> str:
    """Return a short printable form of reply bytes for error messages."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"


class Transport(ABC):
    """A byte link to one instrument with locking, timeouts, deadlines and resynchronisation.

    Subclasses implement the link primitives :meth:`_open`, :meth:`_close`, :meth:`_write_raw`
    and :meth:`_read_chunk`.

    Parameters
    ----------
    resource
        The address: a VISA resource string or a pyserial URL.
    settings
        Timeouts and terminators.
    name
        Instrument name used in messages, logs and the traffic recording.
    recorder
        Optional traffic recorder.
    """

    #: Short name of the link kind, for messages ("visa", "serial").
    kind = "link"

    def __init__(
        self,
        resource: str,
        settings: TransportSettings | None = None,
        *,
        name: str | None = None,
        recorder: TrafficRecorder | None = None,
    ) -> None:
        self.resource = str(resource)
        self.settings = settings or TransportSettings()
        self.name = name or self.resource
        self.recorder = recorder
        self.lock = threading.RLock()
        self.stats = TransportStats()
        self._rx = bytearray()
        self._is_open = False
        # Whether any byte arrived since the link was opened: a failure before that is a failed
        # connection, not a lost one.
        self._received_data = False
        self._needs_resync = False
        self._sync_query: bytes | None = None
        self._sync_reply: bytes | None = None

    # ------------------------------------------------------------------------ primitives
    @abstractmethod
    def _open(self) -> None:
        """Open the link; raise InstrumentError (or ConnectionLost) if it cannot be reached."""

    @abstractmethod
    def _close(self) -> None:
        """Close the link; must not raise."""

    @abstractmethod
    def _write_raw(self, data: bytes) -> None:
        """Write all of ``data``; raise ConnectionLost if the link is gone."""

    @abstractmethod
    def _read_chunk(self, count: int, *, stop_at_terminator: bool) -> bytes:
        """Return between 1 and ``count`` bytes, or ``b""`` after ``timeout_s`` of silence.

        May return fewer bytes than available; with ``stop_at_terminator`` the link may stop at
        the last byte of the read terminator. Raises ConnectionLost if the link is gone.
        """

    def _set_read_timeout(self, seconds: float) -> None:
        """Change the silence timeout of :meth:`_read_chunk` (used briefly while draining)."""

    def _available(self) -> int:
        """Return how many bytes have arrived and can be read without waiting; 0 when unknown."""
        return 0

    # -------------------------------------------------------------------------- lifecycle
    @property
    def is_open(self) -> bool:
        """True while the link is open."""
        return self._is_open

    def open(self) -> None:
        """Open the link (no bytes are sent)."""
        with self.lock:
            if self._is_open:
                return
            self._open()
            self._is_open = True
            self._received_data = False
            self._rx.clear()
            self._needs_resync = False
            log.info("%s: connected to %s over %s", self.name, self.resource, self.kind)
            self._record("open")

    def close(self) -> None:
        """Close the link; closing twice is allowed."""
        with self.lock:
            if not self._is_open:
                return
            self._is_open = False
            self._close()
            log.info("%s: disconnected from %s", self.name, self.resource)
            self._record("close")

    def reopen(self) -> None:
        """Close and open the link again, sending nothing; identity checks belong to the driver."""
        with self.lock:
            self.close()
            self.stats.reopens += 1
            self.open()

    def __enter__(self) -> Transport:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def set_sync(self, query: str, reply: str) -> None:
        """Set the query used to resynchronise the link and the start of its known reply.

        Drivers call this after identifying the instrument, typically with ``*IDN?`` and the
        identity string just received.
        """
        encoding = self.settings.encoding
        self._sync_query = query.encode(encoding) + self.settings.write_term_bytes
        self._sync_reply = reply.encode(encoding)

    @property
    def needs_resync(self) -> bool:
        """True when the next exchange must first resynchronise the link."""
        return self._needs_resync

    def mark_out_of_sync(self) -> None:
        """Mark the link as out of step, so the next exchange resynchronises it first."""
        self._needs_resync = True

    # ---------------------------------------------------------------------------- exchange
    @contextmanager
    def exchange(self) -> Iterator[Transport]:
        """Hold the lock around one exchange, resynchronising first when needed.

        Any exception inside the block (a timeout, a parse error, Ctrl-C) marks the link as
        out of step, because a reply may still be on its way. Instrument errors leave with
        this link's name as their ``instrument``.
        """
        with self.lock:
            try:
                self._check_open()
                if self._needs_resync:
                    self.resync()
                self.stats.exchanges += 1
                yield self
            except InstrumentError as exc:
                self._needs_resync = True
                if exc.instrument is None:
                    exc.instrument = self.name
                raise
            except BaseException:
                self._needs_resync = True
                raise

    def query(self, message: str) -> str:
        """Write one command and return its reply line, decoded, without the terminator."""
        with self.exchange():
            self.write(message)
            return self.read_line().decode(self.settings.encoding, errors="replace")

    def write(self, message: str | bytes) -> None:
        """Write one command; the write terminator is appended."""
        data = message.encode(self.settings.encoding) if isinstance(message, str) else bytes(message)
        self.write_bytes(data + self.settings.write_term_bytes)

    def write_bytes(self, data: bytes) -> None:
        """Write bytes exactly as given (no terminator is appended)."""
        with self.lock:
            self._check_open()
            log_traffic(self.name, ">", data)
            self._record("write", data)
            start = time.perf_counter()
            try:
                self._write_raw(data)
            finally:
                self.stats.io_s += time.perf_counter() - start
            self.stats.writes += 1
            self.stats.bytes_written += len(data)

    # ------------------------------------------------------------------------------ reads
    def _timed_chunk(self, count: int, stop_at_terminator: bool, limit: int = 0) -> tuple[bytes, float]:
        """Read one chunk of ``count`` bytes, or of up to ``limit`` bytes that have already arrived."""
        start = time.perf_counter()
        try:
            if limit > count:
                count = max(count, min(self._available(), limit))
            chunk = self._read_chunk(count, stop_at_terminator=stop_at_terminator)
            if chunk:
                self._received_data = True
        finally:
            elapsed = time.perf_counter() - start
            self.stats.io_s += elapsed
            self.stats.reads += 1
        return chunk, elapsed

    @staticmethod
    def _next_count(count: int, got: int, elapsed: float, remaining: float, limit: int) -> int:
        """Size of the next chunk: grow it eightfold while bytes come fast, fit the time left."""
        rate = got / max(elapsed, 1e-6)
        by_time = int(rate * remaining / 2)
        return max(1, min(_GROWTH * count, by_time, limit, _MAX_CHUNK))

    def read_line(self, *, deadline_s: float | None = None) -> bytes:
        """Read one reply line and return it without the terminator.

        Raises
        ------
        InstrumentTimeout
            If no byte arrives for ``timeout_s``, or the line does not end within the deadline.
            When bytes arrived but no terminator, the message states that the terminator
            looks wrong and shows the bytes.
        ConnectionLost
            If the link broke.
        """
        with self.lock:
            self._check_open()
            term = self.settings.read_term_bytes
            deadline_s = self.settings.deadline_s if deadline_s is None else deadline_s
            start = time.monotonic()
            count = 1
            searched = 0
            while True:
                index = self._rx.find(term, max(0, searched - len(term) + 1))
                if index >= 0:
                    line = bytes(self._rx[:index])
                    del self._rx[: index + len(term)]
                    log_traffic(self.name, "<", line + term)
                    self._record("read", line + term)
                    self.stats.bytes_read += len(line) + len(term)
                    return line
                searched = len(self._rx)
                remaining = start + deadline_s - time.monotonic()
                if remaining <= 0:
                    raise self._line_failure(time.monotonic() - start, deadline=True)
                chunk, elapsed = self._timed_chunk(count, True, _MAX_CHUNK)
                if not chunk:
                    raise self._line_failure(time.monotonic() - start, deadline=False)
                self._rx += chunk
                count = self._next_count(count, len(chunk), elapsed, remaining - elapsed, _MAX_CHUNK)

    def read_exact(self, n_bytes: int, *, deadline_s: float | None = None) -> bytes:
        """Read exactly ``n_bytes`` bytes (a binary payload), however the link splits them.

        The deadline defaults to ``deadline_s + n_bytes / min_rate``.
        """
        with self.lock:
            self._check_open()
            if n_bytes < 0:
                raise InstrumentError(f"{self.name}: cannot read {n_bytes} bytes")
            if deadline_s is None:
                deadline_s = self.settings.deadline_s + n_bytes / self.settings.min_rate
            start = time.monotonic()
            count = 1
            while len(self._rx) < n_bytes:
                remaining = start + deadline_s - time.monotonic()
                missing = n_bytes - len(self._rx)
                if remaining <= 0:
                    raise self._exact_failure(n_bytes, time.monotonic() - start, deadline=True)
                chunk, elapsed = self._timed_chunk(min(count, missing), False, missing)
                if not chunk:
                    raise self._exact_failure(n_bytes, time.monotonic() - start, deadline=False)
                self._rx += chunk
                count = self._next_count(count, len(chunk), elapsed, remaining - elapsed, missing)
            data = bytes(self._rx[:n_bytes])
            del self._rx[:n_bytes]
            log_traffic(self.name, "<", data)
            self._record("read", data)
            self.stats.bytes_read += n_bytes
            return data

    def _line_failure(self, waited: float, *, deadline: bool) -> InstrumentTimeout:
        self.stats.timeouts += 1
        self._needs_resync = True
        partial = bytes(self._rx)
        self._rx.clear()
        self._record("timeout", partial)
        term = self.settings.read_termination
        if deadline:
            message = (
                f"{self.name}: the reply did not end within the {waited:.3g} s deadline although "
                f"bytes kept arriving ({len(partial)} bytes, last {_show(partial[-40:])}); the "
                f"instrument may be streaming, or it ends replies with a terminator other than "
                f"{term!r}; check read_termination, or raise deadline_s for long transfers"
            )
        elif partial:
            message = (
                f"{self.name}: received {_show(partial)} but no terminator {term!r} within "
                f"{self.settings.timeout_s:g} s; this looks like a terminator mismatch: set "
                f"read_termination to the characters the instrument ends its replies with"
            )
            tail = partial[-2:]
            for candidate in ("\r\n", "\r", "\n", "\x00", ";"):
                if tail.endswith(candidate.encode()) and candidate != term:
                    message += f" (this reply ends with {candidate!r})"
                    break
        else:
            message = (
                f"{self.name}: no reply within {self.settings.timeout_s:g} s; check that the "
                "instrument is on and connected, and that the command is a query it supports"
            )
        log.warning("%s", message)
        return InstrumentTimeout(message)

    def _exact_failure(self, n_bytes: int, waited: float, *, deadline: bool) -> InstrumentTimeout:
        self.stats.timeouts += 1
        self._needs_resync = True
        got = len(self._rx)
        self._record("timeout", bytes(self._rx))
        self._rx.clear()
        cause = f"within the {waited:.3g} s deadline" if deadline else f"after {self.settings.timeout_s:g} s of silence"
        message = (
            f"{self.name}: a binary transfer stopped at {got} of {n_bytes} bytes {cause}; "
            "check the connection, or lower the amount of data per transfer"
        )
        log.warning("%s", message)
        return InstrumentTimeout(message)

    # ---------------------------------------------------------------------- resynchronise
    def drain(self) -> bytes:
        """Read and discard bytes until the link stays quiet for ``drain_quiet_s``.

        Returns the discarded bytes (also counted in :attr:`stats` and logged at WARNING).
        """
        with self.lock:
            self._check_open()
            discarded = bytearray(self._rx)
            self._rx.clear()
            settings = self.settings
            stop = time.monotonic() + settings.drain_max_s
            self._set_read_timeout(settings.drain_quiet_s)
            try:
                while time.monotonic() < stop:
                    chunk, _ = self._timed_chunk(4096, False)
                    if not chunk:
                        break
                    discarded += chunk
            finally:
                self._set_read_timeout(settings.timeout_s)
            if discarded:
                self.stats.discarded_bytes += len(discarded)
                self._record("discard", bytes(discarded))
                log.warning("%s: discarded %d stale byte(s): %s", self.name, len(discarded), _show(bytes(discarded)))
            return bytes(discarded)

    def resync(self) -> None:
        """Bring the link back in step after a timeout or an interrupted exchange.

        Drains stale bytes, then, when a sync query is set, sends it and discards every line
        before its reply. Any late reply to an earlier query arrives before that reply, because
        an instrument replies to queries in order.

        Raises
        ------
        InstrumentTimeout
            If the sync reply does not come; the link stays marked as out of step.
        """
        with self.lock:
            self._check_open()
            self.stats.resyncs += 1
            self._needs_resync = True
            self.drain()
            if self._sync_query is not None and self._sync_reply is not None:
                self._send_sync()
            self._needs_resync = False
            log.info("%s: link resynchronised", self.name)

    def _send_sync(self, attempts: int = 2) -> None:
        """Send the sync query and discard lines until its reply; retry once if it got lost."""
        for attempt in range(1, attempts + 1):
            self.write_bytes(self._sync_query)
            stop = time.monotonic() + self.settings.deadline_s
            try:
                while True:
                    remaining = stop - time.monotonic()
                    if remaining <= 0:
                        raise InstrumentTimeout(f"{self.name}: the resynchronisation reply did not come")
                    line = self.read_line(deadline_s=remaining)
                    if line.startswith(self._sync_reply):
                        if attempt > 1:
                            self._discard_extra_sync_replies(attempt - 1)
                        return
                    self._discard_line(line)
            except InstrumentTimeout:
                if attempt == attempts:
                    raise InstrumentTimeout(
                        f"{self.name}: no reply to the resynchronisation query "
                        f"{self._sync_query.strip().decode(self.settings.encoding, errors='replace')!r} "
                        f"after {attempts} attempts; the instrument is not answering"
                    ) from None
                log.warning("%s: resynchronisation attempt %d got no reply; trying again", self.name, attempt)

    def _discard_line(self, line: bytes) -> None:
        self.stats.discarded_bytes += len(line)
        self._record("discard", line)
        log.warning("%s: discarded a late or garbled reply %s while resynchronising", self.name, _show(line))

    def _discard_extra_sync_replies(self, extra: int) -> None:
        """Consume replies to sync queries sent by earlier attempts, once a sync reply has come.

        Replies come in order, so the sync reply just read may answer an earlier attempt whose
        reply was only late, and the reply to the last attempt is then still on its way; taken
        for the reply to the next query, it would put the link out of step again. Each missing
        reply is awaited for up to ``timeout_s`` of silence, because a lost or garbled one never
        comes.

        NOTE: a sync reply later than that still reaches the next exchange. Drivers parse every
        reply strictly, and an identity string is no reading, level, block or error code, so
        that exchange fails and the link resynchronises again.
        """
        term = self.settings.read_term_bytes
        stop = time.monotonic() + self.settings.deadline_s
        while extra > 0 and time.monotonic() < stop:
            index = self._rx.find(term)
            if index >= 0:
                line = bytes(self._rx[:index])
                del self._rx[: index + len(term)]
                self._record("read", line + term)
                if line.startswith(self._sync_reply):
                    extra -= 1
                    continue
                self._discard_line(line)
                continue
            chunk, _ = self._timed_chunk(1, True, _MAX_CHUNK)
            if not chunk:
                return
            self._rx += chunk

    # ----------------------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if not self._is_open:
            raise ConnectionLost(f"{self.name}: the link to {self.resource} is closed; reconnect first")

    def _record(self, event: str, data: bytes = b"") -> None:
        if self.recorder is not None:
            self.recorder.record(self.name, event, data)

    def _lost(self, exc: BaseException) -> ConnectionLost:
        """Close the link after a fatal I/O error and return the exception to raise."""
        self._is_open = False
        try:
            self._close()
        except Exception:  # noqa: BLE001 - the link is already broken; closing is best effort
            pass
        self._record("close")
        if self._received_data:
            message = f"{self.name}: the connection to {self.resource} was lost ({exc}); reconnect to continue"
        else:
            message = (
                f"{self.name}: cannot reach {self.resource} ({exc}); check that the instrument (or emulator) "
                "is running and connected, and the resource string"
            )
        log.warning("%s", message)
        return ConnectionLost(message)

    def __repr__(self) -> str:
        state = "open" if self._is_open else "closed"
        return f"<{type(self).__name__} {self.name!r} {self.resource} ({state})>"


class VisaTransport(Transport):
    """A link through pyvisa, by default with the pure-Python pyvisa-py backend (``"@py"``).

    Parameters
    ----------
    resource
        VISA resource string, for example ``"TCPIP::127.0.0.1::5025::SOCKET"`` or
        ``"ASRL/dev/ttyUSB0::INSTR"``.
    visa_library
        pyvisa backend: ``"@py"`` (pyvisa-py), ``"@sim"`` or ``"FILE.yaml@sim"`` (pyvisa-sim),
        or the path of a vendor VISA library.
    """

    kind = "visa"

    def __init__(
        self,
        resource: str,
        settings: TransportSettings | None = None,
        *,
        name: str | None = None,
        recorder: TrafficRecorder | None = None,
        visa_library: str = "@py",
    ) -> None:
        super().__init__(resource, settings, name=name, recorder=recorder)
        self.visa_library = visa_library
        self._resource_manager: Any = None
        self._instrument: Any = None
        self._socket_session: Any = None

    def _open(self) -> None:
        import pyvisa
        from pyvisa import constants

        settings = self.settings
        try:
            self._resource_manager = pyvisa.ResourceManager(self.visa_library)
        except (OSError, ValueError, pyvisa.errors.Error) as exc:
            raise ConfigError(
                f"{self.name}: cannot load the VISA library {self.visa_library!r} ({exc}); "
                "use '@py' for pyvisa-py"
            ) from None
        try:
            instrument = self._resource_manager.open_resource(
                self.resource, open_timeout=int(settings.timeout_s * 1000)
            )
        except Exception as exc:  # noqa: BLE001 - backends raise many kinds for a missing device
            raise ConnectionLost(
                f"{self.name}: cannot reach {self.resource} ({type(exc).__name__}: {exc}); check that "
                "the instrument is on and connected, and the resource string"
            ) from None
        self._instrument = instrument
        instrument.timeout = int(settings.timeout_s * 1000)
        term = settings.read_term_bytes
        instrument.set_visa_attribute(constants.VI_ATTR_TERMCHAR, term[-1])
        instrument.set_visa_attribute(constants.VI_ATTR_TERMCHAR_EN, True)
        try:
            # Return bytes that arrived as soon as the link falls quiet, rather than holding
            # them until the timeout; timeouts then lose no bytes.
            instrument.set_visa_attribute(constants.VI_ATTR_SUPPRESS_END_EN, False)
        except Exception:  # noqa: BLE001 - not every session type has this attribute
            pass
        self._termchar_enabled = True
        self._disable_nagle(instrument)
        self._socket_session = self._find_socket_session(instrument)

    @staticmethod
    def _find_socket_session(instrument: Any) -> Any:
        """Return pyvisa-py's session object of a raw TCP socket resource, or None.

        NOTE: this reads pyvisa-py 0.8.1 internals (``visalib.sessions``, a session's
        ``interface`` socket and ``_pending_buffer``); other backends and session types return
        None, and their reads then only grow chunk by chunk.
        """
        import socket

        session = getattr(instrument.visalib, "sessions", {}).get(instrument.session)
        interface = getattr(session, "interface", None)
        if isinstance(interface, socket.socket) and isinstance(getattr(session, "_pending_buffer", None), bytearray):
            return session
        return None

    def _available(self) -> int:
        session = self._socket_session
        if session is None or _FIONREAD is None:
            return 0
        try:
            waiting = struct.unpack("i", fcntl.ioctl(session.interface.fileno(), _FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError, AttributeError):
            return 0
        return len(session._pending_buffer) + waiting

    def _disable_nagle(self, instrument: Any) -> None:
        """Send small commands at once instead of waiting for the peer's acknowledgement.

        With Nagle's algorithm on, the last segment of a multi-segment command waits for the
        instrument's delayed acknowledgement (about 40 ms on Linux), which made a 1,000-value
        ASCII upload ten times slower on loopback.
        """
        from pyvisa import constants

        if not self.resource.upper().startswith("TCPIP"):
            return
        try:
            instrument.set_visa_attribute(constants.VI_ATTR_TCPIP_NODELAY, True)
            return
        except Exception:  # noqa: BLE001 - fall back below when the backend rejects it
            pass
        # NOTE: pyvisa-py 0.8.1 lists VI_ATTR_TCPIP_NODELAY for SOCKET sessions but rejects
        # setting it, so the option is set on its socket directly; other backends skip this.
        import socket

        sessions = getattr(instrument.visalib, "sessions", {})
        sock = getattr(sessions.get(instrument.session), "interface", None)
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            log.debug("%s: cannot switch Nagle's algorithm off for %s", self.name, self.resource)

    def _close(self) -> None:
        self._socket_session = None
        instrument, self._instrument = self._instrument, None
        if instrument is not None:
            try:
                instrument.close()
            except Exception:  # noqa: BLE001 - a broken link may fail to close cleanly
                log.debug("%s: closing the VISA session failed", self.name, exc_info=True)

    def _write_raw(self, data: bytes) -> None:
        import pyvisa

        try:
            self._instrument.write_raw(data)
        except pyvisa.errors.VisaIOError as exc:
            raise self._lost(exc) from None
        except OSError as exc:
            raise self._lost(exc) from None

    def _read_chunk(self, count: int, *, stop_at_terminator: bool) -> bytes:
        import pyvisa
        from pyvisa import constants

        instrument = self._instrument
        if stop_at_terminator != self._termchar_enabled:
            instrument.set_visa_attribute(constants.VI_ATTR_TERMCHAR_EN, stop_at_terminator)
            self._termchar_enabled = stop_at_terminator
        library = instrument.visalib
        try:
            with library.ignore_warning(
                instrument.session,
                constants.StatusCode.success_max_count_read,
                constants.StatusCode.success_termination_character_read,
            ):
                data, _status = library.read(instrument.session, count)
        except pyvisa.errors.VisaIOError as exc:
            if exc.error_code == constants.StatusCode.error_timeout:
                return b""
            raise self._lost(exc) from None
        except (OSError, ValueError, TypeError) as exc:
            # pyvisa-py raises plain socket errors when the peer went away mid-read.
            raise self._lost(exc) from None
        return bytes(data)

    def _set_read_timeout(self, seconds: float) -> None:
        if self._instrument is not None:
            self._instrument.timeout = max(1, int(seconds * 1000))


@dataclass(frozen=True)
class UsbIdentity:
    """USB identity of a serial adapter, used to find it again after it re-enumerates."""

    vid: int | None = None
    """USB vendor id."""
    pid: int | None = None
    """USB product id."""
    serial_number: str | None = None
    """USB serial number string."""

    def matches(self, port: Any) -> bool:
        """True when a pyserial ``ListPortInfo`` has this identity."""
        return (
            (self.vid is None or port.vid == self.vid)
            and (self.pid is None or port.pid == self.pid)
            and (self.serial_number is None or port.serial_number == self.serial_number)
        )


@dataclass(frozen=True)
class SerialOptions:
    """Line settings of a serial port."""

    baud_rate: int = 115200
    """Bits per second."""
    data_bits: int = 8
    parity: str = "N"
    """``"N"``, ``"E"``, ``"O"``, ``"M"`` or ``"S"``."""
    stop_bits: float = 1
    rtscts: bool = False
    """Hardware flow control."""
    usb: UsbIdentity | None = field(default=None)
    """USB identity to find the port by when its device path changes."""


class SerialTransport(Transport):
    """A link through pyserial: a device path or a URL (``loop://``, ``socket://``, ``rfc2217://``).

    When ``options.usb`` is set, opening finds the port by USB vendor, product and serial number
    if the given path is missing or belongs to another device, so a re-enumerated adapter is
    found again.
    """

    kind = "serial"

    def __init__(
        self,
        resource: str,
        settings: TransportSettings | None = None,
        *,
        name: str | None = None,
        recorder: TrafficRecorder | None = None,
        options: SerialOptions | None = None,
    ) -> None:
        super().__init__(resource, settings, name=name, recorder=recorder)
        self.options = options or SerialOptions()
        self._port: Any = None

    def _find_by_usb(self) -> str | None:
        from serial.tools import list_ports

        usb = self.options.usb
        if usb is None:
            return None
        for port in list_ports.comports():
            if usb.matches(port):
                return port.device
        return None

    def _open(self) -> None:
        import serial

        url = self.resource
        usb_path = self._find_by_usb()
        if usb_path is not None and usb_path != url:
            log.info("%s: found the USB adapter %s at %s", self.name, self.options.usb, usb_path)
            url = usb_path
        elif self.options.usb is not None and usb_path is None:
            raise ConnectionLost(
                f"{self.name}: no serial port with USB identity {self.options.usb} is connected; "
                "plug the adapter in, or check the usb keys in the station file"
            )
        options = self.options
        try:
            self._port = serial.serial_for_url(
                url,
                baudrate=options.baud_rate,
                bytesize=options.data_bits,
                parity=options.parity,
                stopbits=options.stop_bits,
                rtscts=options.rtscts,
                timeout=self.settings.timeout_s,
                # pyserial 3.5 reports a write timeout whenever one write call took longer than
                # this, even after every byte went out (a busy machine can pause a process that
                # long), so the longer line deadline is used.
                write_timeout=self.settings.deadline_s,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ConnectionLost(
                f"{self.name}: cannot open serial port {url} ({exc}); check the path or URL and "
                "that no other program holds the port"
            ) from None

    def _close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:  # noqa: BLE001 - a vanished device may fail to close cleanly
                log.debug("%s: closing the serial port failed", self.name, exc_info=True)

    def _write_raw(self, data: bytes) -> None:
        import serial

        try:
            self._port.write(data)
        except serial.SerialTimeoutException as exc:
            raise InstrumentTimeout(f"{self.name}: writing to the serial port timed out ({exc})") from None
        except (serial.SerialException, OSError) as exc:
            raise self._lost(exc) from None

    def _read_chunk(self, count: int, *, stop_at_terminator: bool) -> bytes:
        import serial

        port = self._port
        try:
            waiting = port.in_waiting
            # Take what is already there without blocking; otherwise wait up to the timeout
            # for the first byte.
            return bytes(port.read(max(1, min(waiting, count))))
        except (serial.SerialException, OSError) as exc:
            raise self._lost(exc) from None

    def _set_read_timeout(self, seconds: float) -> None:
        if self._port is not None:
            self._port.timeout = seconds

    def _available(self) -> int:
        import serial

        try:
            return int(self._port.in_waiting) if self._port is not None else 0
        except (serial.SerialException, OSError):
            return 0


def open_transport(
    resource: str,
    settings: TransportSettings | None = None,
    *,
    name: str | None = None,
    recorder: TrafficRecorder | None = None,
    kind: str | None = None,
    visa_library: str = "@py",
    serial_options: SerialOptions | None = None,
) -> Transport:
    """Return an (unopened) transport for ``resource``.

    ``kind`` is ``"visa"`` or ``"serial"``; by default VISA resource strings (``TCPIP::...``,
    ``ASRL...::INSTR``, ``USB...``, ``GPIB...``) go through pyvisa and anything else (a device
    path, ``loop://``, ``socket://``, ``rfc2217://``) through pyserial.
    """
    if kind is None:
        kind = "visa" if is_visa_resource(resource) else "serial"
    if kind == "visa":
        return VisaTransport(resource, settings, name=name, recorder=recorder, visa_library=visa_library)
    if kind == "serial":
        return SerialTransport(resource, settings, name=name, recorder=recorder, options=serial_options)
    raise ConfigError(f"unknown transport {kind!r}; choose 'visa' or 'serial'")
