"""Base class of instrument drivers, the capabilities a node needs, and the driver registry.

A driver owns one :class:`~pnn.devices.transport.Transport` and turns requests ("set these
channels", "measure those", "run this batch") into commands. Nodes use drivers only through
three capabilities:

- :class:`Source`: output channels (DAC, AWG or source-measure unit levels) that set node inputs
  and parameters; each channel reports its range and resolution.
- :class:`Meter`: input channels (DAQ, multimeter or oscilloscope) that read node outputs.
- :class:`BatchRunner`: an instrument that applies a whole batch of input vectors and buffers
  the readings, so one forward pass of a batch takes a few exchanges, not one per example.

Connecting identifies the instrument and checks the identity against the station file before
any output changes; reconnecting does the same and never writes an output.
"""

from __future__ import annotations

import importlib
import logging
import math
import string
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, InstrumentError
from .scpi import OVERRANGE, parse_error
from .transport import ConnectionLost, Transport

__all__ = [
    "Instrument",
    "IdentityMismatch",
    "Source",
    "Meter",
    "BatchRunner",
    "ChannelRanges",
    "DRIVERS",
    "register_driver",
    "get_driver",
    "identity_matches",
    "format_errors",
]

log = logging.getLogger(__name__)

#: Maximum pause between two reconnection attempts, in seconds, however many attempts are made.
MAX_RECONNECT_BACKOFF_S = 30.0


class IdentityMismatch(InstrumentError):
    """An instrument other than the one the station file names replies at the address.

    Retrying cannot fix this, so the training loop stops at once instead of retrying.
    """

    retryable = False


@dataclass(frozen=True)
class ChannelRanges:
    """Range and resolution of a list of output channels, as the instrument reports them."""

    channels: tuple[int, ...]
    lower: np.ndarray
    """Lowest settable level per channel, in the channel's unit."""
    upper: np.ndarray
    """Highest settable level per channel."""
    resolution: np.ndarray
    """Smallest step per channel (DAC step); 0 where the instrument does not report one."""
    unit: str = "V"


#: Fields a command template may contain, for keys whose default template is empty.
_TEMPLATE_FIELDS = frozenset({"channel", "channels", "value", "data", "rows", "assignments"})
#: Fields that carry the data of a command; an override must keep those its default has.
_DATA_FIELDS = frozenset({"value", "data", "assignments"})


def _template_fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def _checked_template(instrument: str, key: str, template: str, default: str) -> str:
    """Return a command override if its ``{fields}`` fit the command, else raise ConfigError."""
    where = f"instrument {instrument!r}: commands.{key} = {template!r}"
    try:
        fields = _template_fields(template)
    except ValueError as exc:
        raise ConfigError(f"{where} is not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    allowed = _template_fields(default) if default else set(_TEMPLATE_FIELDS)
    unknown = sorted(fields - allowed)
    if unknown:
        raise ConfigError(
            f"{where} uses {', '.join('{' + f + '}' for f in unknown)}, which this command does not fill; "
            f"it may use {', '.join('{' + f + '}' for f in sorted(allowed)) or 'no fields'}"
        )
    for field in sorted(allowed & _DATA_FIELDS) if template else []:
        count = [name for _, name, _, _ in string.Formatter().parse(template)].count(field)
        if count != 1:
            raise ConfigError(f"{where} must contain {{{field}}} once, where the data goes; it contains it {count} times")
    return template


def format_errors(errors: Sequence[tuple[int, str]], limit: int = 3) -> str:
    """Return queued instrument errors as text: repeats counted, at most ``limit`` kinds shown."""
    counts: dict[tuple[int, str], int] = {}
    for error in errors:
        counts[error] = counts.get(error, 0) + 1
    shown = [f"{code} {message}" + (f" (x{n})" if n > 1 else "") for (code, message), n in list(counts.items())[:limit]]
    if len(counts) > limit:
        shown.append(f"and {len(counts) - limit} other error(s)")
    return "; ".join(shown)


def identity_matches(expected: str, reply: str) -> bool:
    """True when every non-empty comma-separated field of ``expected`` equals the reply's field.

    ``"ACME,DAQ-8"`` matches any serial number and firmware of that model; ``"ACME,DAQ-8,SN42"``
    matches only that unit. Fields compare case-insensitively with surrounding spaces removed.
    """
    want = [field.strip().upper() for field in expected.split(",")]
    have = [field.strip().upper() for field in reply.split(",")]
    for index, field in enumerate(want):
        if not field:
            continue
        if index >= len(have) or have[index] != field:
            return False
    return True


class Instrument(ABC):
    """A driver: commands on top of a transport, identity checks and the error queue.

    Parameters
    ----------
    transport
        The link; opened by :meth:`connect`.
    name
        Name of the instrument in the station file.
    expected_identity
        Fields the identification reply must match (see :func:`identity_matches`); None skips
        the check.
    commands
        Overrides of entries of :attr:`COMMANDS`, to adapt the driver to another dialect.
    overrange
        Magnitude from which a reading counts as overrange and becomes NaN.
    reconnect_attempts
        How many times an exchange that finds the link broken reconnects before giving up;
        0 turns automatic reconnection off.
    reconnect_backoff_s
        Pause after the first failed reconnection attempt, doubled after each further one up to
        :data:`MAX_RECONNECT_BACKOFF_S`, in seconds.
    """

    #: Name of the driver in station files.
    driver_name: ClassVar[str] = ""
    #: Command templates by key; ``{channel}``, ``{channels}``, ``{value}`` and ``{data}`` are
    #: filled in. An empty template means the instrument lacks that command.
    COMMANDS: ClassVar[dict[str, str]] = {
        "identify": "*IDN?",
        "clear_status": "*CLS",
        "error": "SYST:ERR?",
    }

    def __init__(
        self,
        transport: Transport,
        *,
        name: str,
        expected_identity: str | None = None,
        commands: Mapping[str, str] | None = None,
        overrange: float = OVERRANGE,
        reconnect_attempts: int = 1,
        reconnect_backoff_s: float = 0.5,
    ) -> None:
        self.transport = transport
        self.name = name
        self.expected_identity = expected_identity
        self.commands = dict(self.COMMANDS)
        for key, template in (commands or {}).items():
            if key not in self.commands:
                raise ConfigError(
                    f"instrument {name!r}: unknown command key {key!r} for driver {self.driver_name!r}; "
                    f"the keys are {', '.join(sorted(self.commands))}"
                )
            self.commands[key] = _checked_template(name, key, str(template), self.COMMANDS[key])
        self.overrange = float(overrange)
        if int(reconnect_attempts) < 0:
            raise ConfigError(f"instrument {name!r}: reconnect_attempts must be >= 0, got {reconnect_attempts}")
        self.reconnect_attempts = int(reconnect_attempts)
        if not (math.isfinite(float(reconnect_backoff_s)) and float(reconnect_backoff_s) >= 0):
            raise ConfigError(
                f"instrument {name!r}: reconnect_backoff_s must be a number of seconds >= 0, got {reconnect_backoff_s}"
            )
        self.reconnect_backoff_s = float(reconnect_backoff_s)
        #: The identification reply of the connected instrument.
        self.identity_: str | None = None
        #: Incremented on every (re)connection, which tells nodes to read their levels back.
        self.epoch = 0
        self.reconnects = 0

    # -------------------------------------------------------------------------- commands
    def command(self, key: str, **fields: Any) -> str:
        """Return the command for ``key`` with its fields filled in."""
        template = self.commands.get(key, "")
        if not template:
            raise InstrumentError(
                f"instrument {self.name!r} ({self.driver_name}) has no {key!r} command; "
                f"set commands.{key} in the station file"
            )
        return template.format(**fields)

    def has_command(self, key: str) -> bool:
        """True when the command table has a non-empty template for ``key``."""
        return bool(self.commands.get(key))

    # ------------------------------------------------------------------------ connection
    def connect(self) -> str:
        """Open the link, identify the instrument and check its identity; change no output.

        Returns
        -------
        str
            The identification reply.

        Raises
        ------
        InstrumentError
            If the resource cannot be reached, the reply ends with another terminator, or the
            identity does not match the station file; the link is closed again.
        """
        transport = self.transport
        try:
            transport.open()
            transport.drain()
            identity = self._identify_raw()
        except ConnectionLost as exc:
            transport.close()
            raise ConnectionLost(
                f"instrument {self.name!r} at {transport.resource} is unreachable: {exc}"
            ) from None
        except InstrumentError as exc:
            transport.close()
            if exc.instrument is None:
                exc.instrument = self.name
            raise
        self._check_identity(identity)
        self.identity_ = identity
        transport.set_sync(self.commands["identify"], identity)
        self.epoch += 1
        self.after_connect()
        return identity

    def after_connect(self) -> None:
        """Hook for drivers: run after every (re)connection; must not change any output."""

    def _identify_raw(self) -> str:
        with self.transport.exchange():
            self.transport.write(self.command("identify"))
            return self.transport.read_line().decode(self.transport.settings.encoding, errors="replace").strip()

    def _check_identity(self, identity: str) -> None:
        if self.expected_identity and not identity_matches(self.expected_identity, identity):
            self.transport.close()
            raise IdentityMismatch(
                f"instrument {self.name!r} at {self.transport.resource} identifies as {identity!r}, "
                f"but the station file expects {self.expected_identity!r}; check the address, or "
                "update the identity key if the instrument was replaced",
                instrument=self.name,
            )

    def identify(self) -> str:
        """Query and return the identification reply (changes no output)."""
        with self.exchange():
            return self._identify_raw()

    def reconnect(self) -> None:
        """Reopen the link and check that the same instrument replies; change no output.

        Raises
        ------
        InstrumentError
            If another instrument replies (the link is then closed).
        """
        transport = self.transport
        with transport.lock:
            transport.reopen()
            transport.drain()
            identity = self._identify_raw()
            if self.identity_ is not None and identity != self.identity_:
                transport.close()
                raise IdentityMismatch(
                    f"instrument {self.name!r}: after reconnecting, {transport.resource} identifies as "
                    f"{identity!r} instead of {self.identity_!r}; refusing to continue with another device",
                    instrument=self.name,
                )
            self._check_identity(identity)
            self.identity_ = identity
            transport.set_sync(self.commands["identify"], identity)
            self.epoch += 1
            self.reconnects += 1
            log.warning("instrument %r: reconnected to %s (%s)", self.name, transport.resource, identity)
            self.after_connect()

    @contextmanager
    def exchange(self) -> Iterator[Transport]:
        """Hold the instrument for one exchange; reconnect first if the link broke earlier.

        Instrument errors leave with this instrument's name as their ``instrument``.
        """
        transport = self.transport
        with transport.lock:
            try:
                if not transport.is_open and self.identity_ is not None:
                    self._reconnect_with_backoff()
                with transport.exchange() as link:
                    yield link
            except InstrumentError as exc:
                if exc.instrument is None:
                    exc.instrument = self.name
                raise

    def _reconnect_with_backoff(self) -> None:
        if self.reconnect_attempts == 0:
            raise ConnectionLost(
                f"instrument {self.name!r}: the link to {self.transport.resource} is closed and "
                "automatic reconnection is off; call reconnect()",
                instrument=self.name,
            )
        delay = self.reconnect_backoff_s
        for attempt in range(1, self.reconnect_attempts + 1):
            try:
                self.reconnect()
                return
            except ConnectionLost as exc:
                log.warning("instrument %r: reconnection attempt %d of %d failed: %s",
                            self.name, attempt, self.reconnect_attempts, exc)
                if attempt == self.reconnect_attempts:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, MAX_RECONNECT_BACKOFF_S)

    def close(self) -> None:
        """Close the link (outputs keep their levels)."""
        self.transport.close()

    # ------------------------------------------------------------------------ exchanges
    def write(self, key: str, **fields: Any) -> None:
        """Write one command from the table."""
        with self.exchange() as link:
            link.write(self.command(key, **fields))

    def query(self, key: str, **fields: Any) -> str:
        """Send one query from the table and return the reply line."""
        with self.exchange() as link:
            link.write(self.command(key, **fields))
            return link.read_line().decode(link.settings.encoding, errors="replace").strip()

    def read_errors(self, limit: int = 50) -> list[tuple[int, str]]:
        """Read the error queue until it reports no error; return the errors in order."""
        if not self.has_command("error"):
            return []
        errors = []
        for _ in range(limit):
            code, message = parse_error(self.query("error"))
            if code == 0:
                break
            errors.append((code, message))
        return errors

    def check_errors(self, context: str) -> None:
        """Raise InstrumentError listing the queued errors, if any, after ``context``."""
        errors = self.read_errors()
        if errors:
            listed = format_errors(errors)
            raise InstrumentError(f"instrument {self.name!r} reported error(s) after {context}: {listed}")

    # ----------------------------------------------------------------------------- info
    def describe(self) -> dict[str, Any]:
        """Return what identifies this instrument in a run record."""
        return {
            "name": self.name,
            "driver": self.driver_name,
            "resource": self.transport.resource,
            "identity": self.identity_,
            "reconnects": self.reconnects,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} at {self.transport.resource}>"


class Source(ABC):
    """Output channels whose levels set node inputs and parameters."""

    #: True when the levels can be read back (otherwise the start of a ramp is unknown until
    #: the first write).
    can_read_levels: bool = True

    @abstractmethod
    def channel_ranges(self, channels: Sequence[int]) -> ChannelRanges:
        """Return the settable range and resolution of each channel (changes no output)."""

    @abstractmethod
    def read_levels(self, channels: Sequence[int]) -> np.ndarray:
        """Return the present level of each channel (changes no output)."""

    @abstractmethod
    def write_levels(self, channels: Sequence[int], values: np.ndarray) -> None:
        """Set channel levels (already validated, ramped and quantized by the caller)."""


class Meter(ABC):
    """Input channels that read node outputs."""

    @abstractmethod
    def measure(self, channels: Sequence[int], averages: int = 1) -> np.ndarray:
        """Return one reading per channel, averaged over ``averages`` readings; NaN if overrange."""


class BatchRunner(ABC):
    """An instrument that applies a batch of input vectors and buffers the readings."""

    @property
    def sends_float32(self) -> bool:
        """True when batch rows travel as 32-bit floats, which round values to 24-bit mantissas."""
        return False

    @abstractmethod
    def run_batch(
        self,
        input_channels: Sequence[int],
        inputs: np.ndarray,
        output_channels: Sequence[int],
        *,
        settle_s: float,
        averages: int,
    ) -> np.ndarray:
        """Apply each row of ``inputs`` (batch, n_in) and return readings of shape (batch, n_out)."""


DRIVERS: dict[str, type[Instrument]] = {}


def register_driver(cls: type[Instrument]) -> type[Instrument]:
    """Class decorator adding a driver to :data:`DRIVERS` under its ``driver_name``."""
    if not cls.driver_name or cls.driver_name in DRIVERS:
        raise ValueError(f"driver name {cls.driver_name!r} is empty or already registered")
    DRIVERS[cls.driver_name] = cls
    return cls


def get_driver(name: str) -> type[Instrument]:
    """Return a driver class by registered name or by ``"package.module:ClassName"``."""
    if name in DRIVERS:
        return DRIVERS[name]
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, class_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load driver {name!r} ({exc}); check the module path and class name") from None
        if not (isinstance(cls, type) and issubclass(cls, Instrument)):
            raise ConfigError(f"driver {name!r} is not a subclass of pnn.devices.Instrument")
        return cls
    raise ConfigError(
        f"unknown driver {name!r}; choose one of {', '.join(sorted(DRIVERS))}, or give "
        "'package.module:ClassName' for a driver of your own"
    )
