"""Raw instrument traffic: DEBUG logging and an optional JSON-lines recording.

Every byte string a transport writes or reads is logged at DEBUG level on the logger
``pnn.devices.traffic`` (shortened for long binary transfers), and, when a recording file is
given, appended to it as one JSON object per line::

    {"t": 0.013412, "instrument": "daq", "event": "write", "data": "SOUR1:VOLT 0.5\\n"}

``t`` is the time in seconds since the recorder was opened, ``event`` is one of
:data:`EVENTS`, and ``data`` holds the bytes decoded as Latin-1, so that any byte value
round-trips exactly (``data.encode("latin-1")``) while ASCII traffic stays readable. A
recording can be replayed by :class:`pnn.devices.replay.ReplayTransport`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError

__all__ = ["TrafficRecorder", "TrafficEvent", "read_recording", "log_traffic", "EVENTS"]

traffic_log = logging.getLogger("pnn.devices.traffic")

#: Kinds of recorded events: bytes written, a complete reply read, a read that timed out,
#: stale bytes discarded while resynchronising, and connection changes.
EVENTS = ("write", "read", "timeout", "discard", "open", "close")

# Longest byte string shown in one DEBUG line; longer transfers show their start and length.
_LOG_PREVIEW_BYTES = 160


def log_traffic(instrument: str, direction: str, data: bytes) -> None:
    """Log one transfer at DEBUG level, shortening long binary payloads."""
    if not traffic_log.isEnabledFor(logging.DEBUG):
        return
    if len(data) > _LOG_PREVIEW_BYTES:
        traffic_log.debug("%s %s %r... (%d bytes)", instrument, direction, data[:_LOG_PREVIEW_BYTES], len(data))
    else:
        traffic_log.debug("%s %s %r", instrument, direction, data)


@dataclass(frozen=True)
class TrafficEvent:
    """One recorded event."""

    t: float
    """Time since the recording started, in seconds."""
    instrument: str
    """Name of the instrument in the station file (or the resource string)."""
    event: str
    """One of :data:`EVENTS`."""
    data: bytes
    """Bytes written or read (empty for ``open`` and ``close``)."""


class TrafficRecorder:
    """Appends traffic events to a JSON-lines file, one flushed line per event.

    One recorder may be shared by several transports; writes are serialised by a lock, so
    events from different instruments interleave in time order.

    Parameters
    ----------
    path
        File to append to; its folder must exist.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot open traffic recording file {self.path} ({exc.strerror}); "
                "choose a writable path in an existing folder"
            ) from None
        self._start = time.monotonic()
        self._lock = threading.Lock()

    def record(self, instrument: str, event: str, data: bytes = b"") -> None:
        """Append one event; the line is flushed at once so a crash keeps it."""
        line = json.dumps(
            {
                "t": round(time.monotonic() - self._start, 6),
                "instrument": instrument,
                "event": event,
                "data": data.decode("latin-1"),
            }
        )
        with self._lock:
            if self._file is None:
                return
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the file; later events are dropped."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> TrafficRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_recording(path: str | Path, instrument: str | None = None) -> Iterator[TrafficEvent]:
    """Yield the events of a recording, optionally only those of one instrument.

    Raises
    ------
    ConfigError
        If the file is missing or a line is not a valid event.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read traffic recording {path} ({exc.strerror})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw: dict[str, Any] = json.loads(line)
            event = TrafficEvent(
                t=float(raw["t"]),
                instrument=str(raw["instrument"]),
                event=str(raw["event"]),
                data=str(raw.get("data", "")).encode("latin-1"),
            )
        except (ValueError, KeyError, TypeError, UnicodeEncodeError) as exc:
            raise ConfigError(f"{path}:{number}: not a traffic event ({exc}); the file may be truncated") from None
        if event.event not in EVENTS:
            raise ConfigError(f"{path}:{number}: unknown event {event.event!r}; expected one of {', '.join(EVENTS)}")
        if instrument is None or event.instrument == instrument:
            yield event
