"""Replay of command/reply exchanges, for driver tests without an instrument.

A :class:`ReplayTransport` is given the exact exchanges a driver must produce: each expected
write and the bytes the instrument sends back. A write that differs from the next expected one
raises at once, showing both; a read with nothing left to serve times out at once, like a
silent instrument. :meth:`ReplayTransport.assert_all_used` fails if the driver skipped any
expected exchange. Exchanges come from a list in the test or from a traffic recording made
against a real instrument (:mod:`pnn.devices.traffic`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InstrumentError
from .traffic import read_recording
from .transport import Transport, TransportSettings

__all__ = ["Exchange", "ReplayTransport", "ReplayMismatch"]


class ReplayMismatch(InstrumentError, AssertionError):
    """A driver wrote something other than the next expected command."""


@dataclass(frozen=True)
class Exchange:
    """One expected write and the reply bytes the instrument sends after it."""

    write: bytes
    """Exact bytes the driver must write, terminator included."""
    reply: bytes = b""
    """Bytes served to the reads that follow (empty for a command without a reply)."""


class ReplayTransport(Transport):
    """A transport that serves scripted replies and checks every write against a script.

    Parameters
    ----------
    exchanges
        The expected exchanges in order.
    settings
        Terminators and timeouts (reads never wait: a missing reply times out at once).
    name
        Name in messages.
    """

    kind = "replay"

    def __init__(self, exchanges: Iterable[Exchange], settings: TransportSettings | None = None, *,
                 name: str = "replay") -> None:
        super().__init__("replay", settings, name=name)
        self.exchanges = list(exchanges)
        self.used = 0
        self._incoming = bytearray()

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str | bytes | None]], settings: TransportSettings | None = None,
                   *, name: str = "replay") -> ReplayTransport:
        """Build from (command, reply) pairs; terminators are appended to both, a None reply sends nothing.

        A bytes reply is served exactly as given (for binary blocks, add the terminator yourself).
        """
        settings = settings or TransportSettings()
        exchanges = []
        for command, reply in pairs:
            write = command.encode(settings.encoding) + settings.write_term_bytes
            if reply is None:
                data = b""
            elif isinstance(reply, bytes):
                data = reply
            else:
                data = reply.encode(settings.encoding) + settings.read_term_bytes
            exchanges.append(Exchange(write, data))
        return cls(exchanges, settings, name=name)

    @classmethod
    def from_recording(cls, path: str | Path, instrument: str | None = None,
                       settings: TransportSettings | None = None) -> ReplayTransport:
        """Build from a JSON-lines traffic recording: each write with the reads that followed it."""
        exchanges: list[Exchange] = []
        write: bytes | None = None
        reply = bytearray()
        for event in read_recording(path, instrument):
            if event.event == "write":
                if write is not None:
                    exchanges.append(Exchange(write, bytes(reply)))
                write, reply = event.data, bytearray()
            elif event.event == "read" and write is not None:
                reply += event.data
        if write is not None:
            exchanges.append(Exchange(write, bytes(reply)))
        return cls(exchanges, settings, name=instrument or "replay")

    # ------------------------------------------------------------------------- link
    def _open(self) -> None:
        self._incoming.clear()

    def _close(self) -> None:
        pass

    def _write_raw(self, data: bytes) -> None:
        if self.used >= len(self.exchanges):
            raise ReplayMismatch(f"{self.name}: unexpected write {data!r} after all {len(self.exchanges)} exchanges were used")
        expected = self.exchanges[self.used]
        if data != expected.write:
            raise ReplayMismatch(
                f"{self.name}: exchange {self.used + 1} of {len(self.exchanges)}: expected the write "
                f"{expected.write!r}, got {data!r}"
            )
        self.used += 1
        self._incoming += expected.reply

    def _read_chunk(self, count: int, *, stop_at_terminator: bool) -> bytes:
        if not self._incoming:
            return b""
        end = min(count, len(self._incoming))
        if stop_at_terminator:
            index = self._incoming.find(self.settings.read_term_bytes[-1:], 0, end)
            if index >= 0:
                end = index + 1
        chunk = bytes(self._incoming[:end])
        del self._incoming[:end]
        return chunk

    # --------------------------------------------------------------------------- checks
    def assert_all_used(self) -> None:
        """Raise ReplayMismatch if an expected exchange was not used or a reply was not read."""
        if self.used < len(self.exchanges):
            missing = [exchange.write for exchange in self.exchanges[self.used : self.used + 3]]
            raise ReplayMismatch(
                f"{self.name}: {len(self.exchanges) - self.used} expected exchange(s) were not used, "
                f"starting with {missing}"
            )
        if self._incoming or self._rx:
            raise ReplayMismatch(f"{self.name}: reply bytes were never read: {bytes(self._rx + self._incoming)[:60]!r}")
