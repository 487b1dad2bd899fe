"""Station files: which instruments a lab has, and which of their channels make up which node.

A station file is TOML (read with :mod:`tomllib`, or ``tomli`` on Python 3.10). It has three
parts, described key by key in ``docs/hardware.md``:

- ``[instruments.NAME]``: resource, driver, timeouts, terminators, expected identity, and
  optional command overrides.
- ``[[nodes]]``: in network order, each with its input, output, probe and parameter channels,
  limits, resolutions, ramp steps and safe values, activation and gradient method.
- ``[safe_state]``: when the safe state is applied (on exit, on error, on Ctrl-C) and extra
  outputs to set then.

:func:`load_station` parses and checks the whole file, connects to every instrument, checks
identities and reads channel ranges before anything is written, so an unreachable resource, a
wrong terminator, a wrong identity or a limit wider than the instrument allows stops the run
before any output changes. Unknown keys are errors that name the file, the table and the key.
"""

from __future__ import annotations

import atexit
import difflib
import logging
import math
import signal
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InstrumentError, PnnError
from ..nodes import ParameterSpec
from .instrument import ChannelRanges, Instrument, Source, get_driver
from .node import ChannelGroup, InstrumentNode, OutputBank, PerturbationSettings
from .scpi import parse_channel_list, ramp_path
from .traffic import TrafficRecorder
from .transport import SerialOptions, TransportSettings, UsbIdentity, open_transport

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "Station",
    "StationUnavailable",
    "load_station",
    "open_station",
    "parse_station",
    "build_station_layers",
    "StationConfig",
    "InstrumentConfig",
    "NodeConfig",
]

log = logging.getLogger(__name__)

SAFE_STATE_EVENTS = ("exit", "error", "interrupt")

_STATION_KEYS = {"name", "description", "record"}
_INSTRUMENT_KEYS = {
    "resource", "driver", "transport", "visa_library", "identity", "timeout_s", "deadline_s",
    "min_rate", "write_termination", "read_termination", "encoding", "overrange",
    "reconnect_attempts", "reconnect_backoff_s", "commands", "baud_rate", "data_bits", "parity",
    "stop_bits", "rtscts", "usb",
    # Driver options; each driver accepts the subset it names in DRIVER_OPTIONS.
    "transfer", "binary_format", "max_commands_per_line", "max_values_per_line", "checksum",
}
#: Station keys that become keyword arguments of a driver, by driver name.
DRIVER_OPTIONS = {
    "scpi-source": ("transfer", "binary_format", "max_commands_per_line"),
    "scpi-meter": ("transfer", "binary_format", "max_commands_per_line"),
    "scpi-source-meter": ("transfer", "binary_format", "max_commands_per_line"),
    "serial-board": ("transfer", "max_values_per_line", "checksum"),
}
_NODE_KEYS = {
    "name", "activation", "gradient", "mode", "settle_s", "averages", "update_mode", "seed",
    "perturbation_samples", "inputs", "outputs", "probes", "parameters",
}
_BANK_KEYS = {"instrument", "channels", "limits", "resolution", "max_step", "ramp_delay_s", "safe", "unknown_start", "unit"}
_PARAMETER_KEYS = _BANK_KEYS | {"shape", "perturbation"}
_READ_KEYS = {"instrument", "channels", "unit"}
_SAFE_STATE_KEYS = {"apply_on", "outputs"}
_SAFE_OUTPUT_KEYS = {"instrument", "channels", "value", "max_step", "ramp_delay_s", "unknown_start"}


# ----------------------------------------------------------------------------- parsing
class _Table:
    """A TOML table with its location, for messages that name the file and the key."""

    def __init__(self, data: Mapping[str, Any], where: str, path: Path) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: [{where}] must be a table, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.path = path

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.where}] {key}: {message}")

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{self.path}: unknown key {key!r} in [{self.where}]{hint} "
                    f"(allowed: {', '.join(sorted(allowed))})"
                )

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.path}: [{self.where}] is missing the key {key!r}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {self._names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {self._names(kinds)}, got {value!r}")
        return value

    def number(self, key: str, default: float | None = None, *, positive: bool = False, minimum: float | None = None,
               required: bool = False) -> float | None:
        value = self.get(key, float, default, required=required)
        if value is None:
            return None
        if not math.isfinite(value):
            raise self.error(key, f"{value!r} is not a finite number")
        if positive and not value > 0:
            raise self.error(key, f"must be positive, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum:g}, got {value!r}")
        return value

    def integer(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        value = self.get(key, int, default)
        if value is None:
            return None
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value!r}")
        return value

    def choice(self, key: str, choices: Sequence[str], default: str | None = None) -> str | None:
        value = self.get(key, str, default)
        if value is not None and value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value

    def sub(self, key: str) -> _Table:
        return _Table(self.data[key], f"{self.where}.{key}" if self.where else key, self.path)

    @staticmethod
    def _names(kinds: tuple[type, ...]) -> str:
        names = {str: "a string", float: "a number", int: "an integer", bool: "true or false",
                 list: "a list", dict: "a table"}
        return " or ".join(names.get(k, k.__name__) for k in kinds)


def _channels(table: _Table, key: str = "channels") -> tuple[int, ...]:
    raw = table.get(key, (str, list, int), required=True)
    if isinstance(raw, int):
        channels = [raw]
    elif isinstance(raw, str):
        try:
            channels = parse_channel_list(raw)
        except ConfigError as exc:
            raise table.error(key, str(exc)) from None
    else:
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in raw):
            raise table.error(key, "a channel list contains whole numbers, for example [1, 2, 3] or \"1:3\"")
        channels = list(raw)
    if not channels:
        raise table.error(key, "the channel list is empty")
    if any(c < 0 for c in channels):
        raise table.error(key, "channel numbers must be >= 0")
    duplicates = sorted({c for c in channels if channels.count(c) > 1})
    if duplicates:
        raise table.error(key, f"channel(s) {duplicates} appear more than once")
    return tuple(channels)


@dataclass(frozen=True)
class InstrumentConfig:
    """One ``[instruments.NAME]`` table, checked."""

    name: str
    resource: str
    driver: str
    where: str
    transport: str | None
    visa_library: str
    identity: str | None
    settings: TransportSettings
    serial: SerialOptions
    options: dict[str, Any]
    """Keyword arguments for the driver."""


@dataclass(frozen=True)
class BankConfig:
    """Channels and limits of the inputs or one parameter, before the instrument's ranges are known."""

    name: str
    where: str
    instrument: str
    channels: tuple[int, ...]
    shape: tuple[int, ...]
    limits: tuple[float, float] | None
    resolution: float | None
    max_step: float
    ramp_delay_s: float
    safe: float | None
    unknown_start: str
    unit: str | None
    perturbation: float | None = None


@dataclass(frozen=True)
class ReadConfig:
    """Meter channels of the outputs or one probe."""

    where: str
    instrument: str
    channels: tuple[int, ...]
    unit: str


@dataclass(frozen=True)
class NodeConfig:
    """One ``[[nodes]]`` entry, checked."""

    name: str
    where: str
    inputs: BankConfig
    outputs: ReadConfig
    parameters: dict[str, BankConfig]
    probes: dict[str, ReadConfig]
    activation: str | None
    gradient: str
    mode: str
    settle_s: float
    averages: int
    update_mode: str
    seed: int | None
    perturbation_samples: int


@dataclass(frozen=True)
class SafeOutputConfig:
    """An extra output set by the safe state."""

    where: str
    instrument: str
    channels: tuple[int, ...]
    value: float
    max_step: float
    ramp_delay_s: float
    unknown_start: str


@dataclass(frozen=True)
class StationConfig:
    """A whole station file, checked but not yet connected."""

    path: Path
    name: str
    description: str
    record: Path | None
    instruments: dict[str, InstrumentConfig]
    nodes: list[NodeConfig]
    apply_on: tuple[str, ...]
    safe_outputs: list[SafeOutputConfig] = field(default_factory=list)


def _parse_instrument(name: str, table: _Table) -> InstrumentConfig:
    table.check_keys(_INSTRUMENT_KEYS)
    driver = table.get("driver", str, required=True)
    try:
        get_driver(driver)
    except ConfigError as exc:
        raise table.error("driver", str(exc)) from None
    allowed = DRIVER_OPTIONS.get(driver)
    options: dict[str, Any] = {}
    for key in ("transfer", "binary_format", "max_commands_per_line", "max_values_per_line", "checksum"):
        if table.has(key):
            if allowed is not None and key not in allowed:
                raise table.error(key, f"driver {driver!r} has no such option; its options are {', '.join(allowed) or 'none'}")
            options[key] = table.get(key, bool if key == "checksum" else (str, int))
    if table.has("commands"):
        commands = table.get("commands", dict)
        for key, value in commands.items():
            if not isinstance(value, str):
                raise ConfigError(f"{table.path}: [{table.where}.commands] {key}: expected a command template string")
        options["commands"] = dict(commands)
    for key in ("reconnect_attempts",):
        if table.has(key):
            options[key] = table.integer(key, minimum=0)
    for key in ("reconnect_backoff_s",):
        if table.has(key):
            options[key] = table.number(key, minimum=0.0)
    if table.has("overrange"):
        options["overrange"] = table.number("overrange", positive=True)
    defaults = TransportSettings()
    timeout_s = table.number("timeout_s", defaults.timeout_s, positive=True)
    values = dict(
        timeout_s=timeout_s,
        deadline_s=table.number("deadline_s", max(defaults.deadline_s, timeout_s), positive=True),
        min_rate=table.number("min_rate", defaults.min_rate, positive=True),
        write_termination=table.get("write_termination", str, defaults.write_termination),
        read_termination=table.get("read_termination", str, defaults.read_termination),
        encoding=table.get("encoding", str, defaults.encoding),
    )
    try:
        # The keys are checked one by one above; this checks how they fit together.
        settings = TransportSettings(**values)
    except ConfigError as exc:
        raise ConfigError(f"{table.path}: [{table.where}] {exc}") from None
    usb = None
    if table.has("usb"):
        usb_table = table.sub("usb")
        usb_table.check_keys({"vid", "pid", "serial_number"})
        usb = UsbIdentity(
            vid=usb_table.integer("vid"), pid=usb_table.integer("pid"),
            serial_number=usb_table.get("serial_number", str),
        )
    serial = SerialOptions(
        baud_rate=table.integer("baud_rate", 115200, minimum=1),
        data_bits=table.integer("data_bits", 8, minimum=5),
        parity=table.choice("parity", ("N", "E", "O", "M", "S"), "N"),
        stop_bits=table.number("stop_bits", 1.0, positive=True),
        rtscts=table.get("rtscts", bool, False),
        usb=usb,
    )
    return InstrumentConfig(
        name=name,
        resource=table.get("resource", str, required=True),
        driver=driver,
        where=table.where,
        transport=table.choice("transport", ("visa", "serial")),
        visa_library=table.get("visa_library", str, "@py"),
        identity=table.get("identity", str),
        settings=settings,
        serial=serial,
        options=options,
    )


def _parse_bank(name: str, table: _Table, instruments: Mapping[str, Any], *, parameter: bool,
                n_default: int | None = None) -> BankConfig:
    table.check_keys(_PARAMETER_KEYS if parameter else _BANK_KEYS)
    instrument = table.get("instrument", str, required=True)
    if instrument not in instruments:
        raise table.error("instrument", f"no instrument named {instrument!r}; the station has {', '.join(sorted(instruments)) or 'none'}")
    channels = _channels(table)
    if parameter and table.has("shape"):
        raw_shape = table.get("shape", list)
        if not raw_shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in raw_shape):
            raise table.error("shape", f"expected a list of positive whole numbers, got {raw_shape!r}")
        shape = tuple(raw_shape)
    else:
        shape = (len(channels),)
    if int(np.prod(shape)) != len(channels):
        raise table.error("channels", f"{len(channels)} channel(s) for shape {list(shape)}; give {int(np.prod(shape))} (row-major)")
    limits = None
    if table.has("limits"):
        raw = table.get("limits", list)
        if len(raw) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            raise table.error("limits", f"expected [lower, upper], got {raw!r}")
        limits = (float(raw[0]), float(raw[1]))
        if not (math.isfinite(limits[0]) and math.isfinite(limits[1]) and limits[0] < limits[1]):
            raise table.error("limits", f"expected finite numbers with lower < upper, got {raw!r}")
    safe = table.number("safe")
    if safe is None:
        raise ConfigError(
            f"{table.path}: [{table.where}] is missing the key 'safe': the level applied on exit, "
            "on error and on Ctrl-C; add for example safe = 0.0"
        )
    return BankConfig(
        name=name,
        where=table.where,
        instrument=instrument,
        channels=channels,
        shape=shape,
        limits=limits,
        resolution=table.number("resolution", minimum=0.0),
        max_step=table.number("max_step", math.inf, positive=True) if table.has("max_step") else math.inf,
        ramp_delay_s=table.number("ramp_delay_s", 0.0, minimum=0.0),
        safe=safe,
        unknown_start=table.choice("unknown_start", ("refuse", "safe"), "refuse"),
        unit=table.get("unit", str),
        perturbation=table.number("perturbation", positive=True) if parameter else None,
    )


def _parse_read(table: _Table, instruments: Mapping[str, Any]) -> ReadConfig:
    table.check_keys(_READ_KEYS)
    instrument = table.get("instrument", str, required=True)
    if instrument not in instruments:
        raise table.error("instrument", f"no instrument named {instrument!r}; the station has {', '.join(sorted(instruments)) or 'none'}")
    return ReadConfig(table.where, instrument, _channels(table), table.get("unit", str, "V"))


def _parse_node(index: int, raw: Any, instruments: Mapping[str, Any], path: Path) -> NodeConfig:
    table = _Table(raw, f"nodes[{index}]", path)
    name = table.get("name", str, required=True)
    table = _Table(raw, f"nodes.{name}", path)
    table.check_keys(_NODE_KEYS)
    for key in ("inputs", "outputs"):
        if not table.has(key):
            raise ConfigError(f"{path}: [nodes.{name}] is missing the table [{key}]")
    inputs = _parse_bank("inputs", table.sub("inputs"), instruments, parameter=False)
    outputs = _parse_read(table.sub("outputs"), instruments)
    parameters = {}
    if table.has("parameters"):
        params = table.sub("parameters")
        for key in params.data:
            parameters[key] = _parse_bank(key, params.sub(key), instruments, parameter=True)
    probes = {}
    if table.has("probes"):
        probe_table = table.sub("probes")
        for key in probe_table.data:
            probes[key] = _parse_read(probe_table.sub(key), instruments)
    return NodeConfig(
        name=name,
        where=table.where,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        probes=probes,
        activation=table.get("activation", str),
        gradient=table.choice("gradient", ("outer-product", "perturbation", "none"), "perturbation" if parameters else "none"),
        mode=table.choice("mode", ("buffered", "point"), "buffered"),
        settle_s=table.number("settle_s", 0.0, minimum=0.0),
        averages=table.integer("averages", 1, minimum=1),
        update_mode=table.choice("update_mode", ("accumulate", "round"), "accumulate"),
        seed=table.integer("seed"),
        perturbation_samples=table.integer("perturbation_samples", 1, minimum=1),
    )


def parse_station(path: str | Path) -> StationConfig:
    """Read and check a station file without connecting to anything.

    Raises
    ------
    ConfigError
        For a missing or unreadable file, invalid TOML, unknown keys, wrong types, unknown
        instruments or drivers, or channel maps that do not fit their shapes; the message names
        the file, the table and the key.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"station file {path} not found; check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read station file {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax there") from None

    root = _Table(data, "", path)
    root.check_keys({"station", "instruments", "nodes", "safe_state"})
    station = root.sub("station") if root.has("station") else _Table({}, "station", path)
    station.where = "station"
    station.check_keys(_STATION_KEYS)
    record = station.get("record", str)

    if not root.has("instruments"):
        raise ConfigError(f"{path}: no [instruments.NAME] table; declare at least one instrument")
    instrument_tables = root.sub("instruments")
    instrument_tables.where = "instruments"
    instruments = {name: _parse_instrument(name, instrument_tables.sub(name)) for name in instrument_tables.data}

    raw_nodes = data.get("nodes", [])
    if not isinstance(raw_nodes, list):
        raise ConfigError(f"{path}: nodes must be an array of tables, written [[nodes]]")
    nodes = [_parse_node(i, raw, instruments, path) for i, raw in enumerate(raw_nodes)]
    names = [node.name for node in nodes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: node name(s) {duplicates} appear more than once; names must be unique")
    _check_channel_overlap(nodes, path)

    apply_on: tuple[str, ...] = SAFE_STATE_EVENTS
    safe_outputs = []
    if root.has("safe_state"):
        safe_table = root.sub("safe_state")
        safe_table.check_keys(_SAFE_STATE_KEYS)
        if safe_table.has("apply_on"):
            events = safe_table.get("apply_on", list)
            bad = [e for e in events if e not in SAFE_STATE_EVENTS]
            if bad:
                raise safe_table.error("apply_on", f"unknown event(s) {bad}; choose from {', '.join(SAFE_STATE_EVENTS)}")
            apply_on = tuple(events)
        for i, raw in enumerate(safe_table.get("outputs", list, [])):
            out = _Table(raw, f"safe_state.outputs[{i}]", path)
            out.check_keys(_SAFE_OUTPUT_KEYS)
            instrument = out.get("instrument", str, required=True)
            if instrument not in instruments:
                raise out.error("instrument", f"no instrument named {instrument!r}")
            safe_outputs.append(SafeOutputConfig(
                where=out.where, instrument=instrument, channels=_channels(out),
                value=out.number("value", required=True),
                max_step=out.number("max_step", math.inf, positive=True) if out.has("max_step") else math.inf,
                ramp_delay_s=out.number("ramp_delay_s", 0.0, minimum=0.0),
                unknown_start=out.choice("unknown_start", ("refuse", "safe"), "refuse"),
            ))

    return StationConfig(
        path=path,
        name=station.get("name", str, path.stem),
        description=station.get("description", str, ""),
        record=(path.parent / record) if record else None,
        instruments=instruments,
        nodes=nodes,
        apply_on=apply_on,
        safe_outputs=safe_outputs,
    )


def _check_channel_overlap(nodes: Sequence[NodeConfig], path: Path) -> None:
    """Raise if two banks write the same source channel of the same instrument."""
    owners: dict[tuple[str, int], str] = {}
    for node in nodes:
        for bank in [node.inputs, *node.parameters.values()]:
            for channel in bank.channels:
                key = (bank.instrument, channel)
                if key in owners:
                    raise ConfigError(
                        f"{path}: [{bank.where}] channel {channel} of {bank.instrument!r} is already "
                        f"used by [{owners[key]}]; every source channel may belong to one array only"
                    )
                owners[key] = bank.where


# ------------------------------------------------------------------------------ limits
def _resolve_spec(bank: BankConfig, ranges: ChannelRanges, path: Path, description: str) -> ParameterSpec:
    """Narrow the instrument's ranges by the station's limits; raise if the station widens them."""
    lower_d, upper_d, res_d = ranges.lower, ranges.upper, ranges.resolution
    where = f"{path}: [{bank.where}]"
    if bank.limits is not None:
        lo, hi = bank.limits
        span = float(np.max(upper_d - lower_d))
        tol = 1e-9 * max(span, 1e-12)
        too_low = lo < lower_d - tol
        too_high = hi > upper_d + tol
        if np.any(too_low) or np.any(too_high):
            bad = int(np.argmax(too_low | too_high))
            raise ConfigError(
                f"{where} limits = [{lo:g}, {hi:g}] is wider than instrument {bank.instrument!r} allows on "
                f"channel {ranges.channels[bad]} ([{lower_d[bad]:g}, {upper_d[bad]:g}] {ranges.unit}); narrow "
                "the limits to lie within the instrument's range"
            )
        lower = np.maximum(lower_d, lo)
        upper = np.minimum(upper_d, hi)
    else:
        lower, upper = lower_d.copy(), upper_d.copy()

    step_d = float(np.max(res_d)) if res_d.size else 0.0
    resolution = step_d if bank.resolution is None else bank.resolution
    if step_d > 0:
        if resolution < step_d * (1 - 1e-9):
            raise ConfigError(
                f"{where} resolution = {resolution:g} is finer than instrument {bank.instrument!r} can set "
                f"({step_d:g} {ranges.unit}); use {step_d:g} or a multiple of it"
            )
        ratio = resolution / step_d
        if abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(
                f"{where} resolution = {resolution:g} is not a multiple of the instrument's step "
                f"{step_d:g} {ranges.unit}; use a multiple such as {round(ratio) * step_d:g}"
            )
        # Snap narrowed limits inward onto the instrument's grid, so every level the spec
        # allows is one the instrument can set exactly.
        # The tolerance absorbs ranges that the instrument reports with a few digits only.
        lower = lower_d + np.ceil((lower - lower_d) / resolution - 1e-6) * resolution
        upper = lower_d + np.floor((upper - lower_d) / resolution + 1e-6) * resolution
        lower, upper = np.maximum(lower, lower_d), np.minimum(upper, upper_d)
    if np.any(upper < lower):
        raise ConfigError(f"{where} limits leave no level on the instrument's grid; widen them by one step")
    if math.isfinite(bank.max_step) and bank.max_step <= resolution:
        raise ConfigError(
            f"{where} max_step = {bank.max_step:g} is not larger than the resolution {resolution:g}; "
            "a ramp could not move; raise max_step"
        )
    lower = lower.reshape(bank.shape)
    upper = upper.reshape(bank.shape)
    safe = bank.safe
    if safe is not None and (np.any(safe < lower - 1e-9) or np.any(safe > upper + 1e-9)):
        raise ConfigError(
            f"{where} safe = {safe:g} lies outside the limits [{float(lower.min()):g}, {float(upper.max()):g}]; "
            "choose a safe value inside them"
        )
    lower_value: float | np.ndarray = float(lower.flat[0]) if np.all(lower == lower.flat[0]) else lower
    upper_value: float | np.ndarray = float(upper.flat[0]) if np.all(upper == upper.flat[0]) else upper
    return ParameterSpec(
        bank.shape, lower_value, upper_value, bank.unit or ranges.unit,
        resolution=resolution, max_step=bank.max_step, safe_value=safe, description=description,
    )


# ----------------------------------------------------------------------------- station
class Station:
    """Connected instruments and the nodes a station file describes.

    Use as a context manager: the safe state is applied when the block ends normally, when it
    raises, and on Ctrl-C (as configured by ``[safe_state] apply_on``), and the instruments are
    closed. A station that is never closed applies its safe state at interpreter exit.

    Build it with :func:`load_station`.
    """

    def __init__(self, config: StationConfig, instruments: dict[str, Instrument],
                 ranges: dict[tuple[str, int], tuple[float, float, float, str]], recorder: TrafficRecorder | None) -> None:
        self.config = config
        self.path = config.path
        self.name = config.name
        self.instruments = instruments
        self._ranges = ranges
        self._recorder = recorder
        self._nodes: list[InstrumentNode] | None = None
        self._closed = False
        self._exit_hook = _register_exit_hook(self)

    # ---------------------------------------------------------------------------- nodes
    def build_nodes(self) -> list[InstrumentNode]:
        """Return the nodes of the station file in order, building them on the first call.

        Building reads every output level back and sends the batch configuration, checking the
        error queue; it changes no output.
        """
        if self._nodes is None:
            nodes = []
            for node_config in self.config.nodes:
                nodes.append(self._build_node(node_config))
            self._nodes = nodes
        return list(self._nodes)

    @property
    def nodes(self) -> list[InstrumentNode]:
        """The built nodes (empty before :meth:`build_nodes`)."""
        return list(self._nodes or [])

    def _bank_ranges(self, bank: BankConfig) -> ChannelRanges:
        rows = [self._ranges[(bank.instrument, c)] for c in bank.channels]
        return ChannelRanges(
            bank.channels,
            np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
            rows[0][3],
        )

    def _build_node(self, node: NodeConfig) -> InstrumentNode:
        path = self.path
        input_ranges = self._bank_ranges(node.inputs)
        inputs_spec = _resolve_spec(node.inputs, input_ranges, path, "input")
        inputs = OutputBank("inputs", ChannelGroup(node.inputs.instrument, node.inputs.channels), inputs_spec,
                            node.inputs.ramp_delay_s, node.inputs.unknown_start,
                            input_ranges.lower, input_ranges.upper)
        parameters = {}
        sizes = {}
        for name, bank in node.parameters.items():
            ranges = self._bank_ranges(bank)
            spec = _resolve_spec(bank, ranges, path, name)
            parameters[name] = OutputBank(name, ChannelGroup(bank.instrument, bank.channels), spec,
                                          bank.ramp_delay_s, bank.unknown_start, ranges.lower, ranges.upper)
            if bank.perturbation is not None:
                sizes[name] = bank.perturbation
        probes = {name: ChannelGroup(read.instrument, read.channels) for name, read in node.probes.items()}
        try:
            return InstrumentNode(
                node.name,
                instruments=self.instruments,
                inputs=inputs,
                outputs=ChannelGroup(node.outputs.instrument, node.outputs.channels),
                output_unit=node.outputs.unit,
                parameters=parameters,
                probes=probes,
                activation=node.activation,
                gradient=node.gradient,
                settle_s=node.settle_s,
                averages=node.averages,
                mode=node.mode,
                update_mode=node.update_mode,
                perturbation=PerturbationSettings(size=sizes, samples=node.perturbation_samples),
                seed=node.seed,
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: [{node.where}] {exc}") from None

    # ------------------------------------------------------------------------ inspection
    def identify(self) -> dict[str, str]:
        """Query every instrument's identity again (changes no output)."""
        return {name: instrument.identify() for name, instrument in self.instruments.items()}

    def limits_report(self) -> list[dict[str, Any]]:
        """Return, per node array, the instrument's range and the limits the station allows."""
        report = []
        for node in self.config.nodes:
            for bank in [node.inputs, *node.parameters.values()]:
                ranges = self._bank_ranges(bank)
                spec = _resolve_spec(bank, ranges, self.path, bank.name)
                report.append({
                    "node": node.name,
                    "array": bank.name,
                    "instrument": bank.instrument,
                    "channels": f"{bank.channels[0]}..{bank.channels[-1]}" if len(bank.channels) > 1 else str(bank.channels[0]),
                    "instrument_range": (float(ranges.lower.min()), float(ranges.upper.max())),
                    "instrument_step": float(ranges.resolution.max()),
                    "limits": (float(spec.lower_array.min()), float(spec.upper_array.max())),
                    "resolution": spec.resolution,
                    "max_step": spec.max_step,
                    "safe": spec.safe_value,
                    "unit": spec.unit,
                })
        return report

    # ------------------------------------------------------------------------ safe state
    def apply_safe_state(self) -> None:
        """Ramp every node array and every extra safe-state output to its safe value.

        Each output gets its chance even if an earlier one fails; failures are logged, and the
        first one is raised at the end. A second Ctrl-C while this runs in the main thread is
        held back until the safe state is applied.
        """
        with _deferred_interrupts():
            first_error: BaseException | None = None
            for node in self._nodes or []:
                try:
                    node.apply_safe_state()
                except Exception as exc:  # noqa: BLE001 - keep going so every output goes safe
                    first_error = first_error or exc
            for output in self.config.safe_outputs:
                try:
                    self._apply_safe_output(output)
                except Exception as exc:  # noqa: BLE001 - keep going so every output goes safe
                    log.error("station %r: [%s] failed to go safe: %s", self.name, output.where, exc)
                    first_error = first_error or exc
            if first_error is not None:
                raise first_error
            log.info("station %r: safe state applied", self.name)

    def _apply_safe_output(self, output: SafeOutputConfig) -> None:
        instrument = self.instruments[output.instrument]
        if not isinstance(instrument, Source):
            raise ConfigError(f"[{output.where}]: instrument {output.instrument!r} has no source channels")
        target = np.full(len(output.channels), output.value)
        if not math.isfinite(output.max_step):
            instrument.write_levels(output.channels, target)
            return
        lower = np.array([self._ranges[(output.instrument, c)][0] for c in output.channels])
        upper = np.array([self._ranges[(output.instrument, c)][1] for c in output.channels])
        resolution = float(max(self._ranges[(output.instrument, c)][2] for c in output.channels))
        if instrument.can_read_levels:
            start = instrument.read_levels(output.channels)
            # A DAC may read back one step outside its range at the range's edge; a ramp planned
            # from there could otherwise send that out-of-range level.
            slack = max(resolution, 1e-9 * float(np.max(upper - lower)))
            inside = (start >= lower - slack) & (start <= upper + slack)
            if not np.all(inside):
                bad = int(np.argmin(inside))
                raise InstrumentError(
                    f"[{output.where}]: channel {output.channels[bad]} of {output.instrument!r} reads back "
                    f"{float(start[bad]):g}, outside its range [{lower[bad]:g}, {upper[bad]:g}]; check the instrument",
                    instrument=output.instrument,
                )
            start = np.clip(start, lower, upper)
        elif output.unknown_start == "safe":
            instrument.write_levels(output.channels, target)
            return
        else:
            raise InstrumentError(
                f"[{output.where}]: the present level cannot be read back, so ramping to the safe value "
                "could jump; set unknown_start = 'safe' to set it directly"
            )
        for index, step in enumerate(ramp_path(start, target, output.max_step, resolution=resolution, origin=lower)):
            if index and output.ramp_delay_s:
                threading.Event().wait(output.ramp_delay_s)
            instrument.write_levels(output.channels, step)

    # ------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close every node and instrument (outputs keep their levels); closing twice is allowed."""
        if self._closed:
            return
        self._closed = True
        self._exit_hook.detach()
        for node in self._nodes or []:
            node.close()
        for instrument in self.instruments.values():
            try:
                instrument.close()
            except Exception as exc:  # noqa: BLE001 - close the rest even if one fails
                log.error("station %r: closing instrument %r failed: %s", self.name, instrument.name, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
        if self._recorder is not None:
            self._recorder.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> Station:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            event = "exit"
        elif issubclass(exc_type, KeyboardInterrupt):
            event = "interrupt"
        else:
            event = "error"
        try:
            if event in self.config.apply_on and not self._closed:
                try:
                    self.apply_safe_state()
                except Exception as failure:  # noqa: BLE001 - do not hide the original exception
                    log.error("station %r: applying the safe state on %s failed: %s", self.name, event, failure,
                              exc_info=log.isEnabledFor(logging.DEBUG))
                    if exc_type is None:
                        raise
        finally:
            self.close()

    def describe(self) -> dict[str, Any]:
        """Return the station's file, name and instruments for a run record."""
        return {
            "path": str(self.path),
            "name": self.name,
            "instruments": [instrument.describe() for instrument in self.instruments.values()],
        }

    def __repr__(self) -> str:
        names = ", ".join(self.instruments)
        return f"<Station {self.name!r} from {self.path}: instruments {names}; {len(self.config.nodes)} node(s)>"


class _ExitHook:
    """Applies a forgotten station's safe state at interpreter exit, holding it only weakly."""

    def __init__(self, station: Station) -> None:
        self._station = weakref.ref(station)
        self._active = True
        atexit.register(self)

    def __call__(self) -> None:
        station = self._station()
        if not self._active or station is None or station.closed:
            return
        if "exit" in station.config.apply_on:
            try:
                station.apply_safe_state()
            except Exception as exc:  # noqa: BLE001 - nothing can be raised at interpreter exit
                log.error("station %r: applying the safe state at exit failed: %s", station.name, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
        station.close()

    def detach(self) -> None:
        self._active = False
        atexit.unregister(self)


def _register_exit_hook(station: Station) -> _ExitHook:
    return _ExitHook(station)


class _deferred_interrupts:
    """Hold back SIGINT inside the block (main thread only) and re-raise it afterwards."""

    def __enter__(self) -> _deferred_interrupts:
        self._received = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
            except ValueError:
                self._previous = None
        return self

    def _handler(self, signum: int, frame: object) -> None:
        self._received = True
        log.warning("Ctrl-C received while applying the safe state; finishing that first")

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self._received:
            raise KeyboardInterrupt


# ------------------------------------------------------------------------------ loading
class StationUnavailable(ConfigError):
    """An instrument of a station file could not be reached, identified or read before any write.

    Raised by :func:`open_station` for the command line, where it is a setup problem the user
    fixes (power, cable, address, identity or terminator), so it exits with code 2 like other
    bad input. :func:`load_station` raises the underlying instrument error instead.
    """


def open_station(path: str | Path) -> Station:
    """Load a station like :func:`load_station`, reporting instrument failures as StationUnavailable."""
    try:
        return load_station(path)
    except InstrumentError as exc:
        raise StationUnavailable(str(exc)) from exc


def load_station(path: str | Path, *, connect: bool = True) -> Station:
    """Read a station file, connect to its instruments and check them; change no output.

    Steps, each of which raises before any output changes: parse and check the file; open
    every instrument and check its identity (an unreachable resource, a wrong terminator or a
    wrong identity fails here); read the range and resolution of every channel the nodes use
    and check that the station's limits lie within them.

    Parameters
    ----------
    path
        The station file.
    connect
        False only parses and checks the file (no instrument is touched); the returned
        station then has no instruments and cannot build nodes.

    Returns
    -------
    Station
        Build the nodes with :meth:`Station.build_nodes`.
    """
    config = parse_station(path)
    recorder = TrafficRecorder(config.record) if (connect and config.record is not None) else None
    instruments: dict[str, Instrument] = {}
    ranges: dict[tuple[str, int], tuple[float, float, float, str]] = {}
    if not connect:
        return Station(config, instruments, ranges, recorder)
    try:
        for name, item in config.instruments.items():
            transport = open_transport(
                item.resource, item.settings, name=name, recorder=recorder, kind=item.transport,
                visa_library=item.visa_library, serial_options=item.serial,
            )
            driver = get_driver(item.driver)
            try:
                instrument = driver(transport, name=name, expected_identity=item.identity, **item.options)
            except TypeError as exc:
                raise ConfigError(f"{config.path}: [{item.where}] invalid option for driver {item.driver!r} ({exc})") from None
            except ConfigError as exc:
                raise ConfigError(f"{config.path}: [{item.where}] {exc}") from None
            instruments[name] = instrument
            try:
                instrument.connect()
            except PnnError as exc:
                raise type(exc)(f"{config.path}: [{item.where}] {exc}") from None
        _read_ranges(config, instruments, ranges)
        for output in config.safe_outputs:
            _check_safe_output(output, ranges, config.path)
        # Check every limit now, so a wider limit fails before any node is built.
        for node in config.nodes:
            for bank in [node.inputs, *node.parameters.values()]:
                rows = [ranges[(bank.instrument, c)] for c in bank.channels]
                _resolve_spec(bank, ChannelRanges(bank.channels, np.array([r[0] for r in rows]),
                                                  np.array([r[1] for r in rows]), np.array([r[2] for r in rows]), rows[0][3]),
                              config.path, bank.name)
    except BaseException:
        for instrument in instruments.values():
            instrument.close()
        if recorder is not None:
            recorder.close()
        raise
    return Station(config, instruments, ranges, recorder)


def _read_ranges(config: StationConfig, instruments: Mapping[str, Instrument],
                 ranges: dict[tuple[str, int], tuple[float, float, float, str]]) -> None:
    requested: dict[str, list[int]] = {}
    for node in config.nodes:
        for bank in [node.inputs, *node.parameters.values()]:
            requested.setdefault(bank.instrument, []).extend(bank.channels)
    for output in config.safe_outputs:
        requested.setdefault(output.instrument, []).extend(output.channels)
    for name, channels in requested.items():
        instrument = instruments[name]
        if not isinstance(instrument, Source):
            raise ConfigError(f"{config.path}: instrument {name!r} ({config.instruments[name].driver}) has no source channels to set")
        unique = sorted(set(channels))
        try:
            table = instrument.channel_ranges(unique)
        except PnnError as exc:
            raise type(exc)(f"{config.path}: [{config.instruments[name].where}] reading channel ranges: {exc}") from None
        for i, channel in enumerate(table.channels):
            lower, upper = float(table.lower[i]), float(table.upper[i])
            if not lower < upper:
                raise InstrumentError(f"instrument {name!r} reports an empty range [{lower:g}, {upper:g}] on channel {channel}")
            ranges[(name, channel)] = (lower, upper, float(table.resolution[i]), table.unit)


def _check_safe_output(output: SafeOutputConfig, ranges: Mapping[tuple[str, int], tuple[float, float, float, str]],
                       path: Path) -> None:
    """Raise ConfigError if a safe-state output's value or ramp step does not fit its channels."""
    for channel in output.channels:
        lower, upper, resolution, unit = ranges[(output.instrument, channel)]
        if not lower <= output.value <= upper:
            raise ConfigError(
                f"{path}: [{output.where}] value = {output.value:g} lies outside channel {channel} of "
                f"{output.instrument!r} ([{lower:g}, {upper:g}] {unit}); choose a value inside that range"
            )
        if math.isfinite(output.max_step) and output.max_step <= resolution:
            raise ConfigError(
                f"{path}: [{output.where}] max_step = {output.max_step:g} is not larger than the step "
                f"{resolution:g} {unit} of channel {channel}; raise max_step"
            )


def build_station_layers(path: str | Path, n_features: int, n_classes: int) -> list[InstrumentNode]:
    """Load a station file and return its nodes as the physical layers of a network.

    This is what ``pnn train --station FILE`` calls. The first node must take ``n_features``
    inputs and the last must give ``n_classes`` outputs. Closing the first node applies the
    station's safe state (nodes and extra outputs) and closes every instrument, so closing the
    network releases the station.

    Raises
    ------
    ConfigError
        If the file has no nodes or the widths do not fit the dataset, and
        :class:`StationUnavailable` (a ConfigError) if an instrument cannot be reached,
        identified or read; nothing was written in either case.
    """
    station = open_station(path)
    try:
        try:
            nodes = station.build_nodes()
        except InstrumentError as exc:
            raise StationUnavailable(f"{station.path}: {exc}") from exc
        if not nodes:
            raise ConfigError(f"{station.path}: the station file has no [[nodes]] to train; add at least one")
        if nodes[0].n_in != n_features:
            raise ConfigError(
                f"{station.path}: the first node {nodes[0].name!r} has {nodes[0].n_in} input channels, but the "
                f"dataset has {n_features} features; map {n_features} input channels"
            )
        if nodes[-1].n_out != n_classes:
            raise ConfigError(
                f"{station.path}: the last node {nodes[-1].name!r} has {nodes[-1].n_out} output channels, but the "
                f"dataset has {n_classes} classes; map {n_classes} output channels"
            )
    except BaseException:
        station.close()
        raise
    nodes[0].add_close_callback(lambda: station.__exit__(None, None, None))
    return nodes
