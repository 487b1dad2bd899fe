"""SCPI helpers: binary blocks, numeric replies, the error queue, declared settings and ramps.

- IEEE 488.2 definite-length blocks (``#<d><length><payload>``) are read header first and then
  exactly ``length`` bytes, however the link fragments them (:func:`read_block`).
- Numeric replies are parsed strictly; the SCPI overrange and not-a-number codes (9.9E37 and
  9.91E37, and their negatives) become NaN, so an overrange reading marks the node's
  measurement invalid and never reaches a loss or an update (:func:`parse_values`).
- :class:`Setting` declares an instrument setting the way a datasheet states it: commands, a
  strict validator, a unit and, for outputs, ramp limits.
- :func:`ramp_path` plans the steps from a known value to a target so that no step exceeds the
  ramp limit and every step lies on the instrument's grid.
"""

from __future__ import annotations

import functools
import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, InstrumentError, LimitError, MeasurementError

if TYPE_CHECKING:
    from .transport import Transport

__all__ = [
    "OVERRANGE",
    "encode_block",
    "block_checksum",
    "read_block",
    "parse_values",
    "decode_values",
    "encode_values",
    "parse_error",
    "Validator",
    "Range",
    "Choice",
    "Setting",
    "ramp_path",
    "format_number",
    "format_numbers",
    "format_channel_list",
    "parse_channel_list",
    "BINARY_FORMATS",
]

#: Magnitude from which a reading counts as overrange: SCPI reports an overload as +-9.9E37 and
#: "not a number" as 9.91E37 (SCPI-99, volume 1, section 7.2.1.5).
OVERRANGE = 9.9e37

#: Binary number formats as SCPI names them (``FORM REAL,32``), with their NumPy dtypes in the
#: standard big-endian byte order (``FORM:BORD NORM``).
BINARY_FORMATS = {"REAL,32": ">f4", "REAL,64": ">f8"}

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf|infinity)$", re.IGNORECASE)


# ------------------------------------------------------------------------------ numbers
def format_numbers(values: np.ndarray) -> str:
    """Format many floats as comma-separated text that round-trips (``1.0`` keeps its ``.0``)."""
    return ",".join(map(repr, np.asarray(values, dtype=np.float64).ravel().tolist()))


def format_number(value: float) -> str:
    """Format a float for a command: shortest text that round-trips, no exponent for common sizes."""
    value = float(value)
    if value == 0:
        return "0"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def parse_values(text: str, *, where: str, overrange: float = OVERRANGE, expected: int | None = None) -> np.ndarray:
    """Parse comma-separated numbers; overrange and non-finite values become NaN.

    Parameters
    ----------
    text
        Reply text such as ``"1.25,-0.5,+9.9E37"``.
    where
        What was being read, for error messages.
    overrange
        Magnitude from which a value counts as overrange.
    expected
        Number of values the reply must contain, if known.

    Raises
    ------
    MeasurementError
        If a field is not a number or the count is wrong (a garbled or cut-off reply).
    """
    stripped = text.strip()
    fields = stripped.split(",") if stripped else []
    try:
        # Fast path: NumPy converts the fields the way float() does. float() also accepts
        # digit-group underscores, which no instrument sends, so text with one takes the
        # strict path below.
        if "_" in stripped:
            raise ValueError(stripped)
        values = np.array(fields, dtype=np.float64)
    except ValueError:
        for item in fields:
            if not _NUMBER.match(item.strip()):
                raise MeasurementError(
                    f"{where}: reply {text[:80]!r} contains {item.strip()[:20]!r}, which is not a number"
                ) from None
        values = np.array([float(item) for item in fields], dtype=np.float64)
    if expected is not None and values.size != expected:
        raise MeasurementError(f"{where}: expected {expected} value(s), got {values.size} in {text[:80]!r}")
    return mark_overrange(values, overrange)


def mark_overrange(values: np.ndarray, overrange: float = OVERRANGE) -> np.ndarray:
    """Replace overrange and non-finite readings with NaN, in place, and return the array."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (np.abs(values) >= overrange * (1 - 1e-6))
    values[bad] = np.nan
    return values


def decode_values(payload: bytes, fmt: str, *, where: str, overrange: float = OVERRANGE,
                  little_endian: bool = False, expected: int | None = None) -> np.ndarray:
    """Decode a binary block payload of ``REAL,32`` or ``REAL,64`` numbers into float64.

    Raises
    ------
    MeasurementError
        If the payload length is not a whole number of values or the count is wrong.
    """
    dtype = np.dtype(BINARY_FORMATS[fmt])
    if little_endian:
        dtype = dtype.newbyteorder("<")
    if len(payload) % dtype.itemsize:
        raise MeasurementError(
            f"{where}: binary block of {len(payload)} bytes is not a whole number of {dtype.itemsize}-byte values"
        )
    values = np.frombuffer(payload, dtype=dtype).astype(np.float64)
    if expected is not None and values.size != expected:
        raise MeasurementError(f"{where}: expected {expected} value(s), got {values.size} in the binary block")
    return mark_overrange(values, overrange)


def encode_values(values: np.ndarray, fmt: str, *, little_endian: bool = False) -> bytes:
    """Encode numbers as a binary payload of ``REAL,32`` or ``REAL,64``."""
    dtype = np.dtype(BINARY_FORMATS[fmt])
    if little_endian:
        dtype = dtype.newbyteorder("<")
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


# ------------------------------------------------------------------------------- blocks
def encode_block(payload: bytes) -> bytes:
    """Return an IEEE 488.2 definite-length block: ``#``, digit count, length, payload."""
    length = str(len(payload)).encode("ascii")
    if len(length) > 9:
        raise ConfigError(f"a definite-length block can carry at most 999999999 bytes, got {len(payload)}")
    return b"#" + str(len(length)).encode("ascii") + length + payload


def block_checksum(payload: bytes) -> bytes:
    """Return the CRC-32 of ``payload`` (the zlib, Ethernet and PNG one) as 8 upper-case hex digits."""
    return f"{zlib.crc32(payload):08X}".encode("ascii")


def read_block(transport: Transport, *, where: str, head: bytes | None = None, checksum: bool = False) -> bytes:
    """Read one definite-length block and the terminator after it; return the payload.

    The header is read first (two bytes, then the length digits), then exactly that many
    payload bytes, however the link fragments them, then the rest of the line. That rest must
    be empty, or with ``checksum`` the payload's :func:`block_checksum`. ``head`` passes the
    first two bytes when the caller has already read them.

    Raises
    ------
    InstrumentError
        If the reply is not a block (an error message, say), or a checksum is missing; the rest
        of that line is consumed so that the link stays in step.
    InstrumentTimeout
        If the block stops arriving.
    MeasurementError
        If the checksum does not match the payload: the block was corrupted on the way.
    """
    if head is None:
        head = transport.read_exact(2)
    if head[:1] != b"#" or not head[1:2].isdigit():
        rest = transport.read_line()
        raise InstrumentError(f"{where}: expected a binary block starting with '#', got {(head + rest)[:80]!r}")
    digits = int(head[1:2])
    if digits == 0:
        # Indefinite-length block: the payload runs to the end of the message.
        return transport.read_line()
    length_text = transport.read_exact(digits)
    if not length_text.isdigit():
        rest = transport.read_line()
        raise InstrumentError(f"{where}: binary block header {(head + length_text)!r} has a non-numeric length ({rest[:40]!r} followed)")
    payload = transport.read_exact(int(length_text))
    trailer = transport.read_line().strip()
    if not checksum:
        if trailer:
            raise InstrumentError(f"{where}: {len(trailer)} unexpected byte(s) after a binary block: {trailer[:40]!r}")
        return payload
    if len(trailer) != 8:
        raise InstrumentError(
            f"{where}: expected an 8-digit checksum after the binary block, got {trailer[:40]!r}; "
            "check that the instrument has checksums switched on"
        )
    expected = block_checksum(payload)
    if trailer.upper() != expected:
        raise MeasurementError(
            f"{where}: the binary block's checksum {trailer.decode('ascii', 'replace')} does not match its "
            f"payload ({expected.decode()}), so the reply was corrupted on the way and is discarded"
        )
    return payload


# -------------------------------------------------------------------------- error queue
def parse_error(reply: str) -> tuple[int, str]:
    """Split an error-queue reply such as ``-222,"Data out of range"`` into (code, message)."""
    code_text, _, message = reply.strip().partition(",")
    try:
        code = int(code_text.strip())
    except ValueError:
        raise InstrumentError(f"error queue reply {reply[:80]!r} does not start with an error code") from None
    return code, message.strip().strip('"')


# ------------------------------------------------------------------------ channel lists
def format_channel_list(channels: Sequence[int]) -> str:
    """Return a SCPI channel list, ``(@1:4,7)``, with runs of consecutive channels as ranges."""
    return _format_channel_list(tuple(int(c) for c in channels))


@functools.lru_cache(maxsize=256)
def _format_channel_list(chans: tuple[int, ...]) -> str:
    # Cached: nodes send the same few channel lists with every batch.
    parts = []
    start = 0
    while start < len(chans):
        end = start
        while end + 1 < len(chans) and chans[end + 1] == chans[end] + 1:
            end += 1
        parts.append(str(chans[start]) if end == start else f"{chans[start]}:{chans[end]}")
        start = end + 1
    return "(@" + ",".join(parts) + ")"


def parse_channel_list(text: str) -> list[int]:
    """Parse a channel list: ``(@1:4,7)``, ``"1:4,7"``, ``"1-4, 7"``; ranges are inclusive."""
    body = text.strip()
    if body.startswith("(@") and body.endswith(")"):
        body = body[2:-1]
    channels: list[int] = []
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*[:-]\s*(\d+)|(\d+)", part)
        if match is None:
            raise ConfigError(f"channel list {text!r}: {part!r} is not a channel number or a range like 1:4")
        if match.group(3) is not None:
            channels.append(int(match.group(3)))
            continue
        first, last = int(match.group(1)), int(match.group(2))
        if last < first:
            raise ConfigError(f"channel list {text!r}: range {part!r} runs backwards; write {last}:{first}")
        channels.extend(range(first, last + 1))
    return channels


# ---------------------------------------------------------------------------- settings
class Validator:
    """Checks and coerces a value for a setting; raises with the allowed values."""

    def __call__(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        """Return the allowed values as text."""
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Validator):
    """A number in [lower, upper]; ``integer`` requires a whole number."""

    lower: float
    upper: float
    integer: bool = False

    def __call__(self, value: Any, where: str) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{where}: expected a number in {self.describe()}, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise LimitError(f"{where}: {value!r} is not finite; allowed {self.describe()}")
        if self.integer and number != round(number):
            raise ConfigError(f"{where}: expected a whole number in {self.describe()}, got {value!r}")
        if not self.lower <= number <= self.upper:
            raise LimitError(f"{where}: {value!r} is outside the allowed range {self.describe()}")
        return int(round(number)) if self.integer else number

    def describe(self) -> str:
        return f"[{self.lower:g}, {self.upper:g}]"


@dataclass(frozen=True)
class Choice(Validator):
    """One of a fixed set of values (compared case-insensitively for strings)."""

    values: tuple[Any, ...]

    def __call__(self, value: Any, where: str) -> Any:
        for allowed in self.values:
            if value == allowed or (isinstance(value, str) and isinstance(allowed, str) and value.upper() == allowed.upper()):
                return allowed
        raise ConfigError(f"{where}: {value!r} is not one of {self.describe()}")

    def describe(self) -> str:
        return ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class Setting:
    """An instrument setting declared with its commands, validator, unit and ramp limits.

    Drivers declare their settings as class attributes, so that a driver reads like the
    instrument's datasheet. Command templates are keys of the driver's command table, so a
    station file can adapt them to another instrument's dialect.

    Attributes
    ----------
    set_command, get_command
        Keys of the driver's command table: the template that writes ``{value}`` (and
        ``{channel}`` for a channel setting) and the query that reads the value back; None when
        the setting cannot be written or read.
    validator
        Checks every value before it is sent.
    unit
        Unit of the value, ``""`` for none.
    description
        One line naming what the setting does.
    max_step
        Largest change of an output in one step, in ``unit``; ``inf`` for a setting that may
        jump (a format or a count).
    step_delay_s
        Pause after each ramp step, in seconds.
    safe_value
        Value a ramp may start from when the current value cannot be read (only with
        ``unknown_start="safe"``).
    unknown_start
        What to do when the current value is unknown: ``"refuse"`` raises, ``"safe"`` first
        sets ``safe_value`` and ramps from there.
    """

    set_command: str | None
    get_command: str | None
    validator: Validator
    unit: str = ""
    description: str = ""
    max_step: float = math.inf
    step_delay_s: float = 0.0
    safe_value: float | None = None
    unknown_start: str = "refuse"

    def __post_init__(self) -> None:
        if self.unknown_start not in ("refuse", "safe"):
            raise ConfigError(f"unknown_start must be 'refuse' or 'safe', got {self.unknown_start!r}")
        if self.unknown_start == "safe" and self.safe_value is None:
            raise ConfigError("a setting with unknown_start='safe' needs a safe_value")
        if not self.max_step > 0:
            raise ConfigError(f"max_step must be positive, got {self.max_step}")

    @property
    def ramped(self) -> bool:
        """True when writes must ramp in steps no larger than ``max_step``."""
        return math.isfinite(self.max_step)


def ramp_path(
    start: np.ndarray,
    target: np.ndarray,
    max_step: float | np.ndarray,
    *,
    resolution: float | np.ndarray = 0.0,
    origin: float | np.ndarray = 0.0,
) -> list[np.ndarray]:
    """Plan the steps from ``start`` to ``target``, ending exactly on ``target``.

    Every element moves along a straight line in the same number of steps, and every
    intermediate value is rounded to the grid ``origin + k * resolution``, so no element moves
    by more than ``max_step`` in one step even after rounding.

    Parameters
    ----------
    start, target
        Arrays of the same shape; ``target`` on the grid. ``start`` may lie off the grid (a
        level read back from the instrument), and the first step is measured from it.
    max_step
        Largest change per step (scalar or per element); must exceed ``resolution``.
    resolution, origin
        The grid; zero resolution means continuous values.

    Returns
    -------
    list of numpy.ndarray
        The values to write in order, excluding ``start``; empty when nothing changes.
    """
    start = np.asarray(start, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if np.any(~np.isfinite(start)):
        raise LimitError("cannot ramp from an unknown start value; read the value back or set a safe start first")
    delta = target - start
    if not np.any(delta != 0):
        return []
    max_step = np.broadcast_to(np.asarray(max_step, dtype=np.float64), start.shape)
    resolution = np.broadcast_to(np.asarray(resolution, dtype=np.float64), start.shape)
    if np.any(max_step <= resolution) and np.any(np.isfinite(max_step)):
        raise ConfigError(
            f"ramp step {float(np.min(max_step)):g} is not larger than the resolution "
            f"{float(np.max(resolution)):g}; raise max_step above the instrument's step"
        )
    # Each rounded intermediate value may land up to resolution/2 off the straight line, so a
    # step of (max_step - resolution) along the line keeps every rounded step within max_step.
    usable = np.where(np.isfinite(max_step), max_step - resolution, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = np.where(delta != 0, np.ceil(np.abs(delta) / usable - 1e-9), 0)
    n_steps = int(max(1, np.max(needed)))
    path = []
    for k in range(1, n_steps + 1):
        value = start + delta * (k / n_steps)
        if k < n_steps:
            with np.errstate(divide="ignore", invalid="ignore"):
                snapped = origin + np.round((value - origin) / resolution) * resolution
            value = np.where(resolution > 0, snapped, value)
        else:
            value = target.copy()
        path.append(value)
    return path


def run_ramp(path: Sequence[np.ndarray], write: Callable[[np.ndarray], None], step_delay_s: float) -> None:
    """Write each value of a ramp path in order, pausing ``step_delay_s`` between steps."""
    for index, value in enumerate(path):
        if index and step_delay_s > 0:
            time.sleep(step_delay_s)
        write(value)
