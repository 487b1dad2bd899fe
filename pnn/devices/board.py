"""Driver for a serial analog board that speaks the pnn board protocol.

The protocol is small enough for a microcontroller with a few DACs and ADCs; the full
specification, with an example session, is in ``docs/serial-board.md``. In short: every line
ends with ``\\n``, every command gets exactly one reply line (``OK``, values, or
``ERR <code> <text>``), and a forward pass of a batch is one ``RUN`` (ASCII) or ``RUNB``
(binary, little-endian float32 in an IEEE 488.2 block) exchange. With ``checksum`` on, each
binary block carries its CRC-32, so a corrupted batch is discarded instead of read as data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, InstrumentError
from .instrument import BatchRunner, ChannelRanges, Instrument, Meter, Source, register_driver
from .scpi import (
    block_checksum,
    decode_values,
    encode_block,
    encode_values,
    format_number,
    format_numbers,
    parse_values,
    read_block,
)
from .transport import Transport

__all__ = ["SerialBoard", "BOARD_ERRORS", "BOARD_BINARY_FORMAT"]

log = logging.getLogger(__name__)

#: Error codes of the board protocol, as ``ERR <code> <text>`` replies carry them.
BOARD_ERRORS = {
    1: "unknown command",
    2: "value out of range",
    3: "no such channel",
    4: "malformed number or data",
    5: "batch too large",
    6: "checksum mismatch",
}

#: Number format of binary bulk transfers: little-endian float32, the native float of common
#: microcontrollers, so the board can copy the payload without conversion.
BOARD_BINARY_FORMAT = "REAL,32"


@register_driver
class SerialBoard(Instrument, Source, Meter, BatchRunner):
    """A board with DAC outputs and ADC inputs behind the pnn board protocol.

    Parameters
    ----------
    transport, name, expected_identity, overrange, reconnect_attempts, reconnect_backoff_s
        See :class:`~pnn.devices.instrument.Instrument`.
    transfer
        ``"binary"`` (``RUNB``) or ``"ascii"`` (``RUN``) for batches.
    max_values_per_line
        Most channel values in one ``SET`` line, to keep lines short for small boards.
    checksum
        Switch on the board's CRC-32 on binary batches (``CRC 1``), in both directions: the
        board rejects a corrupted batch, and a corrupted reply raises
        :class:`~pnn.errors.MeasurementError`, so the controller discards that batch.
    """

    driver_name = "serial-board"
    COMMANDS: ClassVar[dict[str, str]] = {
        "identify": "*IDN?",
        "channels": "CHAN?",
        "range": "RANGE? {channel}",
        "set": "SET {assignments}",
        "get": "GET {channels}",
        "read": "READ {channels}",
        "averages": "AVG {value}",
        "settle": "SETTLE {value}",
        "inputs": "INPUTS {channels}",
        "outputs": "OUTPUTS {channels}",
        "run_ascii": "RUN {rows} {data}",
        "run_binary": "RUNB {rows} ",
        "checksum": "CRC {value}",
        "error": "",
    }

    def __init__(
        self,
        transport: Transport,
        *,
        name: str,
        transfer: str = "binary",
        max_values_per_line: int = 64,
        checksum: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(transport, name=name, **options)
        if transfer not in ("binary", "ascii"):
            raise ConfigError(f"instrument {name!r}: transfer must be 'binary' or 'ascii', got {transfer!r}")
        if int(max_values_per_line) < 1:
            raise ConfigError(f"instrument {name!r}: max_values_per_line must be >= 1, got {max_values_per_line}")
        if not isinstance(checksum, bool):
            raise ConfigError(f"instrument {name!r}: checksum must be true or false, got {checksum!r}")
        if checksum and transfer != "binary":
            raise ConfigError(
                f"instrument {name!r}: checksum covers binary batches only; set transfer = \"binary\" "
                "or remove checksum"
            )
        self.transfer = transfer
        self.checksum = checksum
        self.max_values_per_line = int(max_values_per_line)
        self._sent: dict[str, Any] = {}
        self.n_dac: int | None = None
        self.n_adc: int | None = None

    def after_connect(self) -> None:
        self._sent.clear()
        reply = self._ask(self.command("channels"), "reading the channel counts")
        try:
            n_dac, n_adc = (int(part) for part in reply.split(","))
        except ValueError:
            raise InstrumentError(f"board {self.name!r}: CHAN? reply {reply!r} is not '<dac>,<adc>'") from None
        self.n_dac, self.n_adc = n_dac, n_adc
        if self.checksum:
            # Sent after every connection, because a board that was unplugged starts with it off.
            reply = self._ask_raw(self.command("checksum", value=1))
            if reply.startswith("ERR 1"):
                raise InstrumentError(
                    f"board {self.name!r} does not support the CRC command ({reply[:60]!r}); update its firmware "
                    "or remove checksum from the station file"
                )
            if reply != "OK":
                self._reply(reply.encode(), "switching checksums on")
                raise InstrumentError(f"board {self.name!r}: switching checksums on: expected OK, got {reply[:60]!r}")

    # ------------------------------------------------------------------------- protocol
    def _reply(self, line: bytes, context: str) -> str:
        text = line.decode(self.transport.settings.encoding, errors="replace").strip()
        if text.startswith("ERR"):
            parts = text.split(None, 2)
            code = parts[1] if len(parts) > 1 else "?"
            detail = parts[2] if len(parts) > 2 else ""
            raise InstrumentError(f"board {self.name!r}: {context} failed with error {code} ({detail})")
        return text

    def _ask(self, command: str, context: str) -> str:
        with self.exchange() as link:
            link.write(command)
            return self._reply(link.read_line(), context)

    def _ask_raw(self, command: str) -> str:
        """Send ``command`` and return its reply line, an ``ERR`` reply included."""
        with self.exchange() as link:
            link.write(command)
            return link.read_line().decode(self.transport.settings.encoding, errors="replace").strip()

    def _expect_ok(self, command: str, context: str) -> None:
        reply = self._ask(command, context)
        if reply != "OK":
            raise InstrumentError(f"board {self.name!r}: {context}: expected OK, got {reply[:60]!r}")

    def _check_channels(self, channels: Sequence[int], count: int | None, kind: str) -> None:
        if count is None:
            return
        bad = [c for c in channels if not 1 <= int(c) <= count]
        if bad:
            raise ConfigError(f"board {self.name!r} has {kind} channels 1..{count}; channel(s) {bad} do not exist")

    @staticmethod
    def _list(channels: Sequence[int]) -> str:
        return ",".join(str(int(c)) for c in channels)

    def _configure(self, key: str, value: Any, context: str) -> None:
        if self._sent.get(key) == value:
            return
        self._expect_ok(self.command(key, **({"channels": value} if key in ("inputs", "outputs") else {"value": value})), context)
        self._sent[key] = value

    # --------------------------------------------------------------------------- source
    def channel_ranges(self, channels: Sequence[int]) -> ChannelRanges:
        self._check_channels(channels, self.n_dac, "DAC")
        rows = []
        for channel in channels:
            reply = self._ask(self.command("range", channel=channel), f"reading the range of channel {channel}")
            rows.append(parse_values(reply, where=f"board {self.name!r} range of channel {channel}", overrange=np.inf, expected=3))
        table = np.array(rows).reshape(len(channels), 3)
        return ChannelRanges(tuple(int(c) for c in channels), table[:, 0], table[:, 1], table[:, 2])

    def read_levels(self, channels: Sequence[int]) -> np.ndarray:
        self._check_channels(channels, self.n_dac, "DAC")
        values = []
        size = self.max_values_per_line
        for start in range(0, len(channels), size):
            part = list(channels)[start : start + size]
            reply = self._ask(self.command("get", channels=self._list(part)), "reading levels back")
            values.append(parse_values(reply, where=f"board {self.name!r} levels", overrange=np.inf, expected=len(part)))
        return np.concatenate(values) if values else np.zeros(0)

    def write_levels(self, channels: Sequence[int], values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        size = self.max_values_per_line
        channels = list(channels)
        for start in range(0, len(channels), size):
            assignments = ",".join(
                f"{int(c)}={format_number(v)}" for c, v in zip(channels[start : start + size], values[start : start + size])
            )
            self._expect_ok(self.command("set", assignments=assignments), f"setting channels {self._list(channels[start:start + size])}")

    # ---------------------------------------------------------------------------- meter
    def measure(self, channels: Sequence[int], averages: int = 1) -> np.ndarray:
        self._check_channels(channels, self.n_adc, "ADC")
        self._configure("averages", int(averages), "setting the averaging")
        reply = self._ask(self.command("read", channels=self._list(channels)), "reading the ADC")
        return parse_values(reply, where=f"board {self.name!r} reading", overrange=self.overrange, expected=len(channels))

    # ---------------------------------------------------------------------------- batch
    @property
    def sends_float32(self) -> bool:  # type: ignore[override]
        return self.transfer == "binary"

    def configure_batch(self, input_channels: Sequence[int], output_channels: Sequence[int], *,
                        settle_s: float, averages: int) -> None:
        """Send the batch configuration; every command is acknowledged (changes no output)."""
        self._check_channels(input_channels, self.n_dac, "DAC")
        self._check_channels(output_channels, self.n_adc, "ADC")
        with self.exchange():
            self._configure("inputs", self._list(input_channels), "selecting the batch inputs")
            self._configure("outputs", self._list(output_channels), "selecting the batch outputs")
            self._configure("settle", int(round(settle_s * 1e6)), "setting the settling time")
            self._configure("averages", int(averages), "setting the averaging")

    def run_batch(
        self,
        input_channels: Sequence[int],
        inputs: np.ndarray,
        output_channels: Sequence[int],
        *,
        settle_s: float,
        averages: int,
    ) -> np.ndarray:
        inputs = np.asarray(inputs, dtype=np.float64)
        rows = inputs.shape[0]
        expected = rows * len(output_channels)
        where = f"board {self.name!r} batch of {rows}"
        with self.exchange() as link:
            self.configure_batch(input_channels, output_channels, settle_s=settle_s, averages=averages)
            if self.transfer == "binary":
                data = encode_values(inputs.ravel(), BOARD_BINARY_FORMAT, little_endian=True)
                payload = encode_block(data) + (block_checksum(data) if self.checksum else b"")
                link.write(self.command("run_binary", rows=rows).encode(link.settings.encoding) + payload)
                head = link.read_exact(2)
                if not head.startswith(b"#"):
                    # An error reply instead of a block: read the rest of its line and raise.
                    self._reply(head + link.read_line(), "running the batch")
                    raise InstrumentError(f"{where}: expected a binary block, got {head!r}")
                block = read_block(link, where=where, head=head, checksum=self.checksum)
                values = decode_values(block, BOARD_BINARY_FORMAT, where=where, overrange=self.overrange,
                                       little_endian=True, expected=expected)
            else:
                data = format_numbers(inputs)
                link.write(self.command("run_ascii", rows=rows, data=data))
                text = self._reply(link.read_line(), "running the batch")
                values = parse_values(text, where=where, overrange=self.overrange, expected=expected)
        return values.reshape(rows, len(output_channels))
