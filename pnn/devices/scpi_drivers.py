"""Generic multi-channel SCPI drivers: a source, a meter, and a source-meter with batch mode.

The default command table is the dialect of ``pnn emulate scpi`` (documented in
``docs/hardware.md``); a station file adapts it to another instrument by overriding entries
under ``[instruments.NAME.commands]``. Channel levels are read and written with compound
commands (``SOUR1:VOLT 0.5;:SOUR2:VOLT 0.25``), up to ``max_commands_per_line`` per line.

Writes end with the error query, so the instrument has processed every level before the
next measurement and a rejected level raises at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, InstrumentError, InstrumentTimeout, MeasurementError
from .instrument import BatchRunner, ChannelRanges, Instrument, Meter, Source, format_errors, register_driver
from .scpi import (
    BINARY_FORMATS,
    Choice,
    Range,
    Setting,
    decode_values,
    encode_block,
    encode_values,
    format_channel_list,
    format_number,
    format_numbers,
    parse_error,
    parse_values,
    read_block,
)
from .transport import Transport

__all__ = ["ScpiInstrument", "ScpiSource", "ScpiMeter", "ScpiSourceMeter", "TRANSFERS"]

log = logging.getLogger(__name__)

#: Transfer formats of bulk data: ``"binary"`` as IEEE 488.2 blocks of REAL,32 or REAL,64 numbers, or
#: ``"ascii"`` as comma-separated text.
TRANSFERS = ("binary", "ascii")


class ScpiInstrument(Instrument):
    """A SCPI instrument: compound commands, declared settings and binary or ASCII transfers.

    Parameters
    ----------
    transport, name, expected_identity, commands, overrange, reconnect_attempts, reconnect_backoff_s
        See :class:`~pnn.devices.instrument.Instrument`.
    max_commands_per_line
        Most commands joined into one line with ``;:``; 1 sends one command per line.
    transfer
        ``"binary"`` or ``"ascii"`` for bulk data.
    binary_format
        ``"REAL,32"`` or ``"REAL,64"``.
    """

    driver_name = ""
    COMMANDS: ClassVar[dict[str, str]] = {
        **Instrument.COMMANDS,
        "wait": "*OPC?",
        "format_set": "FORM {value}",
        "byte_order_set": "FORM:BORD NORM",
    }

    #: Settings of the whole instrument, by name.
    SETTINGS: ClassVar[dict[str, Setting]] = {}

    def __init__(
        self,
        transport: Transport,
        *,
        name: str,
        max_commands_per_line: int = 32,
        transfer: str = "binary",
        binary_format: str = "REAL,32",
        **options: Any,
    ) -> None:
        super().__init__(transport, name=name, **options)
        if int(max_commands_per_line) < 1:
            raise ConfigError(f"instrument {name!r}: max_commands_per_line must be >= 1, got {max_commands_per_line}")
        if transfer not in TRANSFERS:
            raise ConfigError(f"instrument {name!r}: transfer must be one of {TRANSFERS}, got {transfer!r}")
        if binary_format not in BINARY_FORMATS:
            raise ConfigError(
                f"instrument {name!r}: binary_format must be one of {', '.join(BINARY_FORMATS)}, got {binary_format!r}"
            )
        self.max_commands_per_line = int(max_commands_per_line)
        self.transfer = transfer
        self.binary_format = binary_format
        # Settings sent since the last connection, so unchanged ones are not sent again.
        self._sent: dict[str, Any] = {}
        self._level_parts: dict[int, tuple[str, str]] = {}

    def after_connect(self) -> None:
        self._sent.clear()
        # Errors queued before this connection (by another program, or by a session that ended
        # in the middle of a command) would otherwise be reported after the first configuration.
        if self.has_command("error"):
            stale = self.read_errors()
            if stale:
                listed = format_errors(stale)
                log.warning("instrument %r: cleared %d error(s) queued before connecting: %s", self.name, len(stale), listed)

    # ---------------------------------------------------------------------- settings
    def set_setting(self, name: str, value: Any) -> Any:
        """Validate and write one declared setting; return the value sent."""
        setting = self.SETTINGS[name]
        where = f"instrument {self.name!r} setting {name!r}"
        checked = setting.validator(value, where)
        if setting.set_command is None:
            raise InstrumentError(f"{where} cannot be written")
        if setting.ramped:
            raise InstrumentError(f"{where} is ramped; write it through a node parameter")
        self.write(setting.set_command, value=checked)
        self._sent[name] = checked
        return checked

    def get_setting(self, name: str) -> str:
        """Query one declared setting and return the reply text."""
        setting = self.SETTINGS[name]
        if setting.get_command is None:
            raise InstrumentError(f"instrument {self.name!r} setting {name!r} cannot be read back")
        return self.query(setting.get_command)

    def _setting_command(self, name: str, value: Any) -> str | None:
        """Return the command that sets ``name`` if its value changed since the last send."""
        if self._sent.get(name) == value:
            return None
        setting = self.SETTINGS[name]
        checked = setting.validator(value, f"instrument {self.name!r} setting {name!r}")
        self._sent[name] = checked
        return self.command(setting.set_command, value=checked)

    # ------------------------------------------------------------------ compound lines
    def _lines(self, commands: Sequence[str]) -> list[str]:
        """Join commands into lines of at most ``max_commands_per_line``."""
        size = self.max_commands_per_line
        return [";:".join(commands[i : i + size]) for i in range(0, len(commands), size)]

    def _compound_query(self, commands: Sequence[str], *, where: str) -> list[str]:
        """Send queries joined per line and return one reply field per query."""
        replies: list[str] = []
        try:
            with self.exchange() as link:
                for line in self._lines(commands):
                    link.write(line)
                    text = link.read_line().decode(link.settings.encoding, errors="replace").strip()
                    replies.extend(part.strip() for part in text.split(";"))
        except InstrumentTimeout as exc:
            # A SCPI instrument meets a query it rejects with silence and an error in its
            # queue (a channel that does not exist, say); that error says more than the timeout.
            errors = self.read_errors() if self.has_command("error") else []
            if not errors:
                raise
            listed = format_errors(errors)
            raise InstrumentError(f"{where}: the instrument rejected the query: {listed}", instrument=self.name) from exc
        if len(replies) != len(commands):
            raise InstrumentError(
                f"{where}: sent {len(commands)} queries but got {len(replies)} replies; lower "
                "max_commands_per_line if the instrument does not answer compound queries"
            )
        return replies

    def _write_then_check(self, commands: Sequence[str], *, context: str | Callable[[], str]) -> None:
        """Write commands and end with the error query; raise if the instrument reports errors.

        The error reply also confirms that every command before it was processed. ``context``
        (text, or a function returning it) names what was being done, for the error message.
        """
        with self.exchange() as link:
            error_query = self.command("error")
            lines = self._lines(list(commands))
            if lines and self.max_commands_per_line > 1:
                lines[-1] = f"{lines[-1]};:{error_query}"
            else:
                lines.append(error_query)
            # One write per line: message-based links (GPIB, USBTMC, pyvisa-sim) take each write
            # as one program message.
            for line in lines:
                link.write(line)
            code, message = parse_error(link.read_line().decode(link.settings.encoding, errors="replace"))
        if code != 0:
            remaining = self.read_errors()
            listed = format_errors([(code, message), *remaining])
            what = context() if callable(context) else context
            raise InstrumentError(f"instrument {self.name!r} reported error(s) after {what}: {listed}")

    # ------------------------------------------------------------------ bulk transfer
    def configure_transfer(self) -> None:
        """Set the data format for bulk transfers and check the error queue."""
        commands = []
        if self.transfer == "binary":
            commands.append(self.command("format_set", value=self.binary_format))
            if self.has_command("byte_order_set"):
                commands.append(self.command("byte_order_set"))
        else:
            commands.append(self.command("format_set", value="ASC"))
        self._write_then_check(commands, context="setting the transfer format")
        self._sent["transfer"] = self.transfer

    def _ensure_transfer(self) -> list[str]:
        if self._sent.get("transfer") == self.transfer:
            return []
        self._sent["transfer"] = self.transfer
        if self.transfer == "binary":
            commands = [self.command("format_set", value=self.binary_format)]
            if self.has_command("byte_order_set"):
                commands.append(self.command("byte_order_set"))
            return commands
        return [self.command("format_set", value="ASC")]

    def _encode_data(self, values: np.ndarray) -> str | bytes:
        if self.transfer == "binary":
            return encode_block(encode_values(values.ravel(), self.binary_format))
        return format_numbers(values)

    def _read_data(self, link: Transport, *, where: str, expected: int) -> np.ndarray:
        if self.transfer == "binary":
            payload = read_block(link, where=where)
            return decode_values(payload, self.binary_format, where=where, overrange=self.overrange, expected=expected)
        text = link.read_line().decode(link.settings.encoding, errors="replace")
        return parse_values(text, where=where, overrange=self.overrange, expected=expected)


class ScpiSource(ScpiInstrument, Source):
    """Generic multi-channel SCPI source: DAC, AWG or SMU channels with read-back and ranges."""

    driver_name = "scpi-source"
    COMMANDS: ClassVar[dict[str, str]] = {
        **ScpiInstrument.COMMANDS,
        "level_set": "SOUR{channel}:VOLT {value}",
        "level_get": "SOUR{channel}:VOLT?",
        "level_min": "SOUR{channel}:VOLT? MIN",
        "level_max": "SOUR{channel}:VOLT? MAX",
        "level_resolution": "SOUR{channel}:VOLT:RES?",
    }

    @property
    def can_read_levels(self) -> bool:  # type: ignore[override]
        return self.has_command("level_get")

    def channel_ranges(self, channels: Sequence[int]) -> ChannelRanges:
        where = f"instrument {self.name!r} channel ranges"
        queries = []
        for channel in channels:
            queries.append(self.command("level_min", channel=channel))
            queries.append(self.command("level_max", channel=channel))
            if self.has_command("level_resolution"):
                queries.append(self.command("level_resolution", channel=channel))
        replies = self._compound_query(queries, where=where)
        per = 3 if self.has_command("level_resolution") else 2
        numbers = parse_values(",".join(replies), where=where, overrange=np.inf).reshape(len(channels), per)
        if np.any(~np.isfinite(numbers)):
            raise InstrumentError(f"{where}: the instrument reported a non-numeric range ({replies[:6]})")
        resolution = numbers[:, 2] if per == 3 else np.zeros(len(channels))
        return ChannelRanges(tuple(int(c) for c in channels), numbers[:, 0], numbers[:, 1], resolution)

    def read_levels(self, channels: Sequence[int]) -> np.ndarray:
        where = f"instrument {self.name!r} read-back of channels {format_channel_list(channels)}"
        queries = [self.command("level_get", channel=channel) for channel in channels]
        replies = self._compound_query(queries, where=where)
        return parse_values(",".join(replies), where=where, overrange=np.inf, expected=len(channels))

    def write_levels(self, channels: Sequence[int], values: np.ndarray) -> None:
        parts = self._level_parts
        commands = []
        for channel, value in zip(channels, np.asarray(values, dtype=np.float64).ravel().tolist()):
            head, tail = parts.get(channel) or self._level_command_parts(channel)
            commands.append(head + format_number(value) + tail)
        self._write_then_check(commands, context=lambda: f"setting channels {format_channel_list(channels)}")

    def _level_command_parts(self, channel: int) -> tuple[str, str]:
        """Split the level command of one channel around its value, once per channel.

        A training step sets about a hundred channels, and filling the template for each was
        most of the host's time per update.
        """
        marker = "\x00"
        head, _, tail = self.command("level_set", channel=channel, value=marker).partition(marker)
        self._level_parts[channel] = (head, tail)
        return head, tail


class ScpiMeter(ScpiInstrument, Meter):
    """Generic multi-channel SCPI meter: one reading per channel, averaged on the instrument."""

    driver_name = "scpi-meter"
    COMMANDS: ClassVar[dict[str, str]] = {
        **ScpiInstrument.COMMANDS,
        "measure": "MEAS:VOLT? {channels}",
        "averages_set": "SENS:AVER:COUN {value}",
    }
    SETTINGS: ClassVar[dict[str, Setting]] = {
        "averages": Setting(
            "averages_set", None, Range(1, 1_000_000, integer=True), unit="1",
            description="readings the instrument averages into one",
        ),
    }

    def measure(self, channels: Sequence[int], averages: int = 1) -> np.ndarray:
        where = f"instrument {self.name!r} measurement of channels {format_channel_list(channels)}"
        with self.exchange() as link:
            commands = []
            if self.has_command("averages_set"):
                command = self._setting_command("averages", int(averages))
                if command:
                    commands.append(command)
            commands.append(self.command("measure", channels=format_channel_list(channels)))
            link.write(";:".join(commands))
            text = link.read_line().decode(link.settings.encoding, errors="replace")
            values = parse_values(text, where=where, overrange=self.overrange, expected=len(channels))
        if averages > 1 and not self.has_command("averages_set"):
            readings = [values] + [self.measure(channels, 1) for _ in range(int(averages) - 1)]
            values = np.mean(readings, axis=0)
        return values


@register_driver
class ScpiSourceMeter(ScpiSource, ScpiMeter, BatchRunner):
    """A SCPI instrument with source and meter channels and a buffered sequence mode.

    A batch runs as a sequence: the input values are loaded into the sequence memory, ``INIT``
    applies each row to the sequence channels, waits the dwell time, reads the sense channels
    (averaged) into the buffer, and ``FETC?`` returns the buffer. One forward pass of a batch
    is two exchanges.
    """

    driver_name = "scpi-source-meter"
    COMMANDS: ClassVar[dict[str, str]] = {
        **ScpiSource.COMMANDS,
        **ScpiMeter.COMMANDS,
        "sequence_channels": "SOUR:SEQ:CHAN {channels}",
        "sequence_dwell": "SOUR:SEQ:DWEL {value}",
        "sequence_data": "SOUR:SEQ:DATA {data}",
        "sense_channels": "SENS:CHAN {channels}",
        "run": "INIT;*OPC?",
        "fetch": "FETC?",
    }
    SETTINGS: ClassVar[dict[str, Setting]] = {
        **ScpiMeter.SETTINGS,
        "sequence_dwell": Setting(
            "sequence_dwell", None, Range(0.0, 3600.0), unit="s",
            description="wait after applying each row before reading",
        ),
    }

    @property
    def sends_float32(self) -> bool:  # type: ignore[override]
        return self.transfer == "binary" and self.binary_format == "REAL,32"

    def configure_batch(self, input_channels: Sequence[int], output_channels: Sequence[int], *,
                        settle_s: float, averages: int) -> None:
        """Send the sequence configuration and check the error queue (changes no output)."""
        commands = self._ensure_transfer() + self._batch_settings(input_channels, output_channels, settle_s, averages)
        if commands:
            self._write_then_check(commands, context="configuring the batch sequence")

    def _batch_settings(self, input_channels: Sequence[int], output_channels: Sequence[int],
                        settle_s: float, averages: int) -> list[str]:
        commands = []
        inputs = format_channel_list(input_channels)
        outputs = format_channel_list(output_channels)
        if self._sent.get("sequence_channels") != inputs:
            commands.append(self.command("sequence_channels", channels=inputs))
            self._sent["sequence_channels"] = inputs
        if self._sent.get("sense_channels") != outputs:
            commands.append(self.command("sense_channels", channels=outputs))
            self._sent["sense_channels"] = outputs
        for name, value in (("sequence_dwell", float(settle_s)), ("averages", int(averages))):
            command = self._setting_command(name, value)
            if command:
                commands.append(command)
        return commands

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
        where = f"instrument {self.name!r} batch of {rows} on {format_channel_list(output_channels)}"
        with self.exchange() as link:
            settings = self._ensure_transfer() + self._batch_settings(input_channels, output_channels, settle_s, averages)
            data = self._encode_data(inputs)
            load = self.commands["sequence_data"].split("{data}")
            if len(load) != 2:
                raise ConfigError(f"instrument {self.name!r}: the sequence_data command must contain {{data}} once")
            head = ";:".join([*settings, load[0]]) if settings else load[0]
            encoding = link.settings.encoding
            if isinstance(data, bytes):
                message = head.encode(encoding) + data + load[1].encode(encoding)
            else:
                message = (head + data + load[1]).encode(encoding)
            link.write(message + b";:" + self.command("run").encode(encoding))
            done = link.read_line().decode(encoding, errors="replace").strip()
            if done != "1":
                raise MeasurementError(f"{where}: the sequence did not complete (reply {done[:60]!r})")
            link.write(self.command("fetch"))
            values = self._read_data(link, where=where, expected=rows * len(output_channels))
        return values.reshape(rows, len(output_channels))


register_driver(ScpiSource)
register_driver(ScpiMeter)
