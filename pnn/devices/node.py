"""A node made of instrument channels: inputs and parameters on sources, outputs on meters.

The node contains no model of the hardware beyond what the station file declares. Its limits come
from the instruments (each channel's range and resolution) and were narrowed by the station;
every write goes through the :class:`~pnn.nodes.ParameterSpec` checks and then through a ramp
(:func:`~pnn.devices.scpi.ramp_path`), so no command leaves the limits and no step exceeds
``max_step``, whatever the caller asks.

Local gradients:

- ``"outer-product"``: the station declares that the node computes ``f(W x + b)``, with the
  parameters ``weight`` (n_out, n_in) and ``bias`` (n_out,) as W and b and ``f`` one of
  :mod:`pnn.activations`. The gradient is the outer product of the error, times ``f'``, with
  the measured inputs; ``f'`` comes from a measured pre-activation probe when the station maps
  one, otherwise from the measured outputs (for tanh, ``f' = 1 - y**2``).
- ``"perturbation"``: measured in situ by simultaneous perturbation (SPSA; Spall 1992, IEEE
  Trans. Automatic Control 37(3)): all parameters move by +-c along random signs, the batch is
  measured at both points, and the change of ``sum(error * outputs)`` gives the directional
  derivative. It needs no model but costs two extra forward passes per sample.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..activations import Activation, get_activation
from ..errors import ConfigError, LimitError, MeasurementError, PnnError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec
from .instrument import BatchRunner, Instrument, Meter, Source
from .scpi import format_channel_list, ramp_path

__all__ = ["InstrumentNode", "ChannelGroup", "OutputBank", "PerturbationSettings", "output_derivative"]

log = logging.getLogger(__name__)

GRADIENTS = ("outer-product", "perturbation", "none")
MODES = ("buffered", "point")
UPDATE_MODES = ("accumulate", "round")


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of one instrument carrying one signal or parameter array, in row-major order."""

    instrument: str
    """Name of the instrument in the station."""
    channels: tuple[int, ...]
    """Channel numbers, one per element."""

    def __str__(self) -> str:
        return f"{self.instrument} {format_channel_list(self.channels)}"


@dataclass(frozen=True)
class OutputBank:
    """An array of values set on source channels: the node's inputs or one parameter."""

    name: str
    group: ChannelGroup
    spec: ParameterSpec
    """Shape, limits (already narrowed to the instrument's), resolution, ramp step and safe value."""
    ramp_delay_s: float = 0.0
    """Pause between ramp steps, in seconds."""
    unknown_start: str = "refuse"
    """When a level is unknown: ``"refuse"`` raises, ``"safe"`` sets the safe value first."""
    range_lower: np.ndarray | None = None
    """The instrument's own lowest level per value (before the station narrowed it), or None."""
    range_upper: np.ndarray | None = None
    """The instrument's own highest level per value, or None."""

    def __post_init__(self) -> None:
        if int(np.prod(self.spec.shape)) != len(self.group.channels):
            raise ConfigError(
                f"{self.name}: {len(self.group.channels)} channel(s) for a shape of {self.spec.shape} "
                f"({int(np.prod(self.spec.shape))} values); give one channel per value"
            )
        if self.unknown_start not in ("refuse", "safe"):
            raise ConfigError(f"{self.name}: unknown_start must be 'refuse' or 'safe', got {self.unknown_start!r}")
        if self.unknown_start == "safe" and self.spec.safe_value is None:
            raise ConfigError(f"{self.name}: unknown_start = 'safe' needs a safe value")


@dataclass(frozen=True)
class PerturbationSettings:
    """Settings of the in-situ perturbation gradient."""

    size: Mapping[str, float] = field(default_factory=dict)
    """Perturbation per parameter, in its unit; by default twice its resolution, or 1 % of its
    range when continuous, and never more than half its ``max_step``."""
    samples: int = 1
    """Random directions averaged per gradient."""


def output_derivative(activation: Activation, outputs: np.ndarray) -> np.ndarray:
    """Return ``f'(a)`` from measured outputs ``y = f(a)``, for activations that allow it.

    Noise can push a reading past the activation's range, so outputs are clipped into it first.
    """
    y = np.clip(outputs, activation.lower, activation.upper)
    name = activation.name
    if name == "tanh":
        return 1.0 - y * y
    if name == "sigmoid":
        return y * (1.0 - y)
    if name == "hardtanh":
        return (np.abs(y) < 1.0).astype(np.float64)
    if name == "relu":
        return (y > 0).astype(np.float64)
    if name == "linear":
        return np.ones_like(y)
    raise ConfigError(
        f"activation {name!r} has no derivative in terms of its output; map a pre-activation probe"
    )


def _with_context(exc: PnnError, context: str) -> PnnError:
    """Return an exception of the same type and attributes whose message starts with ``context``."""
    try:
        wrapped = type(exc)(f"{context}: {exc}")
    except TypeError:
        return exc
    wrapped.__dict__.update(exc.__dict__)
    return wrapped


def _float32_inside(values: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Return ``values`` as float32 numbers (in float64) that still lie within ``[lower, upper]``.

    Rounding to float32 moves a value by up to 6e-8 of its size, which can push a value at a
    limit just outside it; such values move one float32 step back inside.
    """
    single = np.asarray(values, dtype=np.float32).copy()
    lower = np.broadcast_to(lower, single.shape)
    upper = np.broadcast_to(upper, single.shape)
    high = single.astype(np.float64) > upper
    single[high] = np.nextafter(single[high], np.float32(-np.inf))
    low = single.astype(np.float64) < lower
    single[low] = np.nextafter(single[low], np.float32(np.inf))
    return single.astype(np.float64)


class InstrumentNode(Node):
    """A node assembled from instrument channels.

    Stations build these from a station file (:meth:`pnn.devices.Station.build_nodes`), which
    resolves the instruments' ranges into the specs given here.

    Parameters
    ----------
    name
        Node name.
    instruments
        Connected drivers by station name.
    inputs
        Source channels that take the input signal; ``spec.shape`` is (n_in,).
    outputs
        Meter channels read as outputs, n_out of them.
    output_unit
        Unit of the readings.
    parameters
        Trainable parameters on source channels, by name.
    probes
        Extra meter channels read with the outputs, by probe name; ``"preactivation"`` gives
        the signal before the activation.
    activation
        Name of the node's nonlinearity, needed for ``"outer-product"``.
    gradient
        ``"outer-product"``, ``"perturbation"`` or ``"none"``.
    settle_s
        Wait after applying an input before reading, in seconds.
    averages
        Readings averaged per example.
    mode
        ``"buffered"``: the whole batch runs on the instrument in one sequence (inputs, outputs
        and probes on one :class:`~pnn.devices.instrument.BatchRunner`). ``"point"``: one
        example at a time, which works with separate source and meter instruments.
    update_mode
        ``"accumulate"`` keeps the part of each update smaller than the resolution and adds it
        to the next one (mixed-precision training); ``"round"`` drops it.
    perturbation
        Settings of the ``"perturbation"`` gradient.
    seed
        Seed of the perturbation directions.
    """

    def __init__(
        self,
        name: str,
        *,
        instruments: Mapping[str, Instrument],
        inputs: OutputBank,
        outputs: ChannelGroup,
        output_unit: str = "V",
        parameters: Mapping[str, OutputBank] | None = None,
        probes: Mapping[str, ChannelGroup] | None = None,
        activation: str | None = None,
        gradient: str = "none",
        settle_s: float = 0.0,
        averages: int = 1,
        mode: str = "buffered",
        update_mode: str = "accumulate",
        perturbation: PerturbationSettings | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            name, len(inputs.group.channels), len(outputs.channels),
            input_spec=inputs.spec, output_unit=output_unit, dtype=np.float64,
        )
        self._instruments = dict(instruments)
        self._inputs = inputs
        self._outputs = outputs
        self._banks = dict(parameters or {})
        self._probes = dict(probes or {})
        self.activation = get_activation(activation) if activation is not None else None
        self.settle_s = float(settle_s)
        self.averages = int(averages)
        self.mode = mode
        self.update_mode = update_mode
        self.perturbation = perturbation or PerturbationSettings()
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._validate(gradient)
        self.gradient_method = gradient
        self.has_preactivation = "preactivation" in self._probes and gradient == "outer-product"
        self.has_input_gradient = gradient == "outer-product"
        self._specs = {name: bank.spec for name, bank in self._banks.items()}
        self._residual = {name: np.zeros(spec.shape) for name, spec in self._specs.items()}
        # Last known level of every bank (NaN where unknown), and the connection epoch of each
        # instrument when it was read, so a reconnection triggers a fresh read-back.
        self._levels = {bank.name: np.full(bank.spec.shape, np.nan) for bank in self._all_banks()}
        self._epochs: dict[str, int] = {}
        # Last level written to every bank (NaN before the first write). A bank that cannot be
        # read back and has unknown_start = "safe" counts as being there while its level is
        # unknown; its next write then goes through the safe value.
        self._commanded = {bank.name: np.full(bank.spec.shape, np.nan) for bank in self._all_banks()}
        self._channel_arrays = {bank.name: np.asarray(bank.group.channels) for bank in self._all_banks()}
        # Rounding to float32 is monotonic, so it can only carry an input across a limit that is
        # not itself a float32 number (a narrowed limit such as -0.496).
        lower, upper = self.input_spec.lower_array, self.input_spec.upper_array
        self._limits_off_float32 = bool(np.any(lower.astype(np.float32) != lower) or np.any(upper.astype(np.float32) != upper))
        self._close_callbacks: list[Callable[[], None]] = []
        self._refresh_levels(force=True)
        self._configure()

    # ------------------------------------------------------------------------ validation
    def _all_banks(self) -> list[OutputBank]:
        return [self._inputs, *self._banks.values()]

    def _validate(self, gradient: str) -> None:
        where = f"node {self.name!r}"
        if gradient not in GRADIENTS:
            raise ConfigError(f"{where}: gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        if self.mode not in MODES:
            raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.update_mode not in UPDATE_MODES:
            raise ConfigError(f"{where}: update_mode must be one of {', '.join(UPDATE_MODES)}, got {self.update_mode!r}")
        if not (math.isfinite(self.settle_s) and self.settle_s >= 0):
            raise ConfigError(f"{where}: settle_s must be >= 0, got {self.settle_s}")
        if self.averages < 1:
            raise ConfigError(f"{where}: averages must be >= 1, got {self.averages}")
        if self._banks and gradient == "none":
            raise ConfigError(
                f"{where} has parameters {sorted(self._banks)} but gradient = 'none'; choose "
                "'outer-product' or 'perturbation'"
            )
        if gradient != "none" and not self._banks:
            raise ConfigError(f"{where}: gradient {gradient!r} needs parameters to train; add some or use 'none'")
        if gradient == "outer-product":
            self._validate_outer_product(where)
        if self.perturbation.samples < 1:
            raise ConfigError(f"{where}: perturbation samples must be >= 1, got {self.perturbation.samples}")
        unknown = sorted(set(self.perturbation.size) - set(self._banks))
        if unknown:
            raise ConfigError(f"{where}: perturbation size given for unknown parameter(s) {unknown}")
        for group_name, group in self._groups().items():
            if group.instrument not in self._instruments:
                raise ConfigError(f"{where} {group_name}: no instrument named {group.instrument!r} in the station")
        for bank in self._all_banks():
            if not isinstance(self._instruments[bank.group.instrument], Source):
                raise ConfigError(f"{where} {bank.name}: instrument {bank.group.instrument!r} has no source channels")
        readers = [self._outputs, *self._probes.values()]
        if self.mode == "buffered":
            runner = self._instruments[self._inputs.group.instrument]
            same = all(group.instrument == self._inputs.group.instrument for group in readers)
            if not (same and isinstance(runner, BatchRunner)):
                raise ConfigError(
                    f"{where}: mode = 'buffered' needs the inputs, outputs and probes on one instrument "
                    "with a batch sequence; use mode = 'point' for separate source and meter instruments"
                )
        for group in readers:
            if not isinstance(self._instruments[group.instrument], Meter):
                raise ConfigError(f"{where}: instrument {group.instrument!r} has no meter channels")

    def _validate_outer_product(self, where: str) -> None:
        if self.activation is None:
            raise ConfigError(f"{where}: gradient = 'outer-product' needs the activation the node applies")
        weight = self._banks.get("weight")
        if weight is None or weight.spec.shape != (self.n_out, self.n_in):
            raise ConfigError(
                f"{where}: gradient = 'outer-product' needs a parameter 'weight' of shape "
                f"({self.n_out}, {self.n_in}) (the W of f(W x + b))"
            )
        extra = sorted(set(self._banks) - {"weight", "bias"})
        if extra:
            raise ConfigError(f"{where}: gradient = 'outer-product' allows only 'weight' and 'bias', not {extra}")
        bias = self._banks.get("bias")
        if bias is not None and bias.spec.shape != (self.n_out,):
            raise ConfigError(f"{where}: parameter 'bias' must have shape ({self.n_out},), got {bias.spec.shape}")
        if "preactivation" not in self._probes:
            output_derivative(self.activation, np.zeros(1))
        elif len(self._probes["preactivation"].channels) != self.n_out:
            raise ConfigError(f"{where}: the preactivation probe needs {self.n_out} channels")

    def _groups(self) -> dict[str, ChannelGroup]:
        groups = {"inputs": self._inputs.group, "outputs": self._outputs}
        groups.update({f"parameter {name!r}": bank.group for name, bank in self._banks.items()})
        groups.update({f"probe {name!r}": group for name, group in self._probes.items()})
        return groups

    def _configure(self) -> None:
        """Send the batch configuration once and check the error queue (no output changes)."""
        if self.mode != "buffered":
            return
        runner = self._instruments[self._inputs.group.instrument]
        configure = getattr(runner, "configure_batch", None)
        if configure is not None:
            try:
                configure(self._inputs.group.channels, self._reader_channels(),
                          settle_s=self.settle_s, averages=self.averages)
            except PnnError as exc:
                raise _with_context(exc, f"node {self.name!r} configuring the batch") from exc

    def _reader_channels(self) -> tuple[int, ...]:
        channels = list(self._outputs.channels)
        for group in self._probes.values():
            channels.extend(group.channels)
        return tuple(channels)

    # --------------------------------------------------------------------------- specs
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    @property
    def banks(self) -> dict[str, OutputBank]:
        """The source channels this node writes: ``"inputs"`` first, then each parameter, by name."""
        return {bank.name: bank for bank in self._all_banks()}

    @property
    def instruments(self) -> dict[str, Instrument]:
        """The drivers this node uses, by station name."""
        used = {group.instrument for group in self._groups().values()}
        return {name: self._instruments[name] for name in sorted(used)}

    # ------------------------------------------------------------------- known levels
    def _refresh_levels(self, *, force: bool = False) -> None:
        """Read levels back from instruments that (re)connected since the last read."""
        for bank in self._all_banks():
            instrument = self._instruments[bank.group.instrument]
            epoch = instrument.epoch
            if not force and self._epochs.get(bank.name) == epoch:
                continue
            before = self._levels[bank.name]
            if isinstance(instrument, Source) and instrument.can_read_levels:
                try:
                    levels = instrument.read_levels(bank.group.channels).reshape(bank.spec.shape)
                except PnnError as exc:
                    raise _with_context(exc, f"node {self.name!r} reading {bank.name!r} back") from exc
                # A level read back at a limit may sit a rounding error outside it.
                self._levels[bank.name] = self._snap(bank, levels)
            else:
                self._levels[bank.name] = np.full(bank.spec.shape, np.nan)
            changed = np.isfinite(before) & ~np.isclose(before, self._levels[bank.name], rtol=0, atol=1e-9)
            if not force and np.any(changed):
                log.warning(
                    "node %r: %d level(s) of %r differ from the last values written after %s reconnected",
                    self.name, int(np.count_nonzero(changed)), bank.name, bank.group.instrument,
                )
            self._epochs[bank.name] = epoch

    @staticmethod
    def _snap(bank: OutputBank, levels: np.ndarray) -> np.ndarray:
        """Return read-back levels with those within one step outside the instrument's range moved onto it.

        A DAC at the end of its range may read back one step outside it through rounding. Only
        the instrument's own range gets this allowance: a level outside limits that the station
        narrowed is really there, and moving it onto the limit would plan a ramp from the wrong
        start. Levels are not moved onto the grid either, for the same reason. A level further
        outside stays as read, so a ramp from there refuses instead of crossing the limit.
        """
        spec = bank.spec
        tol = max(spec.tolerance(), spec.resolution)
        lo, hi = spec.lower_array, spec.upper_array
        if bank.range_lower is not None and bank.range_upper is not None:
            at_lower = np.broadcast_to(np.asarray(bank.range_lower).reshape(-1), lo.size).reshape(spec.shape) >= lo - spec.tolerance()
            at_upper = np.broadcast_to(np.asarray(bank.range_upper).reshape(-1), hi.size).reshape(spec.shape) <= hi + spec.tolerance()
        else:
            at_lower = at_upper = np.ones(spec.shape, dtype=bool)
        low_ok = np.where(at_lower, levels >= lo - tol, levels >= lo)
        high_ok = np.where(at_upper, levels <= hi + tol, levels <= hi)
        return np.where(low_ok & high_ok, np.clip(levels, lo, hi), levels)

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return {name: self._assumed_levels(bank) for name, bank in self._banks.items()}

    def _assumed_levels(self, bank: OutputBank) -> np.ndarray:
        """Return a bank's known levels; where unknown, its stand-in when ``unknown_start`` allows one.

        With ``unknown_start = "safe"`` an unknown level stands for the last level written, or
        the safe value before the first write. That stand-in is only a starting point for
        computing targets: writes still start from a read-back or from the safe value itself.
        """
        levels = self._levels[bank.name].copy()
        unknown = ~np.isfinite(levels)
        if bank.unknown_start == "safe" and np.any(unknown):
            commanded = self._commanded[bank.name]
            stand_in = np.where(np.isfinite(commanded), commanded, float(bank.spec.safe_value))
            levels[unknown] = stand_in[unknown]
        return levels

    def known_levels(self) -> dict[str, np.ndarray]:
        """Return the last known level of the inputs and every parameter (NaN where unknown)."""
        return {name: value.copy() for name, value in self._levels.items()}

    # --------------------------------------------------------------------------- writes
    def _start_values(self, bank: OutputBank) -> np.ndarray:
        """Return the known start of a ramp, reading back or going to the safe value if needed."""
        current = self._levels[bank.name]
        if np.all(np.isfinite(current)) or not math.isfinite(bank.spec.max_step):
            # Without a ramp limit any start is fine: the target is written directly.
            return current
        instrument = self._instruments[bank.group.instrument]
        where = f"node {self.name!r} {bank.name!r}"
        if isinstance(instrument, Source) and instrument.can_read_levels:
            self._refresh_levels(force=True)
            current = self._levels[bank.name]
            if np.all(np.isfinite(current)):
                return current
        if bank.unknown_start != "safe":
            raise LimitError(
                f"{where}: the present level of {int(np.count_nonzero(~np.isfinite(current)))} channel(s) "
                "is unknown and cannot be read back, so a ramp could jump; set unknown_start = 'safe' "
                "in the station file to start from the safe value"
            )
        unknown = np.flatnonzero(~np.isfinite(current.ravel()))
        safe = np.full(len(unknown), float(bank.spec.safe_value))
        log.warning("%s: level unknown on %d channel(s); setting the safe value %g first",
                    where, len(unknown), bank.spec.safe_value)
        self._write_channels(bank, unknown, safe)
        return self._levels[bank.name]

    def _write_channels(self, bank: OutputBank, positions: np.ndarray, values: np.ndarray) -> None:
        """Write the channels at ``positions`` (flat indices into the bank) and update the known levels.

        On failure those levels become unknown.
        """
        instrument = self._instruments[bank.group.instrument]
        flat = self._levels[bank.name].reshape(-1)
        channels = self._channel_arrays[bank.name][positions].tolist()
        try:
            instrument.write_levels(channels, values)
        except BaseException:
            # The instrument may or may not have applied the values, so they are unknown until
            # the bank is read back, which the next refresh does.
            flat[positions] = np.nan
            self._epochs.pop(bank.name, None)
            raise
        flat[positions] = values
        self._commanded[bank.name].reshape(-1)[positions] = values

    def _ramp_banks(self, targets: Mapping[str, np.ndarray]) -> None:
        """Ramp several banks to their targets together, step by step."""
        paths = {}
        for name, target in targets.items():
            bank = self._bank(name)
            start = self._start_values(bank)
            spec = bank.spec
            if not math.isfinite(spec.max_step):
                paths[name] = [] if np.array_equal(start, target) else [np.asarray(target, dtype=np.float64)]
                continue
            self._check_start_inside(bank, start)
            paths[name] = ramp_path(start, target, spec.max_step, resolution=spec.resolution, origin=spec.lower_array)
        n_steps = max((len(path) for path in paths.values()), default=0)
        delay = max((self._bank(name).ramp_delay_s for name, path in paths.items() if len(path) > 1), default=0.0)
        for step in range(n_steps):
            if step and delay > 0:
                time.sleep(delay)
            for name, path in paths.items():
                if step >= len(path):
                    continue
                bank = self._bank(name)
                value = path[step].reshape(-1)
                changed = np.flatnonzero(value != self._levels[name].reshape(-1))
                if changed.size:
                    self._write_channels(bank, changed, value[changed])

    def _check_start_inside(self, bank: OutputBank, start: np.ndarray) -> None:
        """Raise LimitError if a ramp would start outside the limits.

        Every path from there into the limits in steps of at most ``max_step`` would send
        commands outside the limits, so the bank is left alone until a person moves it.
        """
        spec = bank.spec
        tol = spec.tolerance()
        outside = (start < spec.lower_array - tol) | (start > spec.upper_array + tol)
        if np.any(outside):
            index = int(np.flatnonzero(outside.ravel())[0])
            raise LimitError(
                f"node {self.name!r} {bank.name!r}: channel {bank.group.channels[index]} of "
                f"{bank.group.instrument!r} is at {float(start.ravel()[index]):g}, outside the limits "
                f"{spec.range_text()}, so ramping it would send commands outside them; set it inside "
                "the limits on the instrument, or widen the limits in the station file"
            )

    def _bank(self, name: str) -> OutputBank:
        return self._inputs if name == self._inputs.name else self._banks[name]

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._refresh_levels()
        try:
            self._ramp_banks(values)
        except PnnError as exc:
            raise _with_context(exc, f"node {self.name!r} setting {sorted(values)}") from exc
        return {name: self._levels[name].copy() for name in values}

    def set_parameters(self, values: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Set parameters, ramping each channel in steps no larger than its ``max_step``."""
        applied = super().set_parameters(values, clip=clip)
        for name in applied:
            self._residual[name][...] = 0.0
        return applied

    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Add ``delta`` to the parameters and return the change actually applied.

        Changes larger than ``max_step`` or leaving the limits raise (or are clipped, logged,
        with ``clip``). With ``update_mode="accumulate"`` the part of a change below the
        resolution is kept and added to the next update.
        """
        self._check_open()
        self._refresh_levels()
        current = self._read_parameters()
        targets = {}
        residuals = {}
        for name, value in self._known(delta).items():
            spec = self._specs[name]
            where = self._where(name)
            if not np.all(np.isfinite(current[name])):
                raise LimitError(
                    f"{where}: the present level is unknown and cannot be read back, so an update could "
                    "jump; set unknown_start = 'safe' in the station file to start from the safe value"
                )
            step = spec.check_shape(value, where)
            limited = spec.check_step(step, where, clip=clip)
            target = spec.check_range(current[name] + limited, where, clip=clip)
            if clip:
                self._count_clips(name, current[name] + step, target)
            if self.update_mode == "accumulate":
                wanted = np.clip(target + self._residual[name], spec.lower_array, spec.upper_array)
                quantized = spec.quantize(wanted)
                residuals[name] = wanted - quantized
            else:
                quantized = spec.quantize(target)
            targets[name] = quantized
        applied = self._write_parameters(targets)
        for name, residual in residuals.items():
            self._residual[name] = residual
        return {name: applied[name] - current[name] for name in applied}

    # --------------------------------------------------------------------------- forward
    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        applied = self.input_spec.quantize(x) if self.input_spec.resolution > 0 else x
        if self._limits_off_float32 and self.mode == "buffered" and self._instruments[self._inputs.group.instrument].sends_float32:
            applied = _float32_inside(applied, self.input_spec.lower_array, self.input_spec.upper_array)
        readings = self._measure_batch(applied)
        n_out = self.n_out
        outputs = readings[:, :n_out]
        probes = {}
        offset = n_out
        for name, group in self._probes.items():
            probes[name] = readings[:, offset : offset + len(group.channels)]
            offset += len(group.channels)
        return outputs, applied, probes

    def _measure_batch(self, x: np.ndarray) -> np.ndarray:
        """Apply each row of ``x`` and return the readings of outputs and probes, (batch, m)."""
        self._refresh_levels()
        try:
            if self.mode == "buffered":
                runner = self._instruments[self._inputs.group.instrument]
                readings = runner.run_batch(
                    self._inputs.group.channels, x, self._reader_channels(),
                    settle_s=self.settle_s, averages=self.averages,
                )
                self._levels[self._inputs.name] = x[-1].copy()
                return np.asarray(readings, dtype=np.float64)
            return self._measure_points(x)
        except PnnError as exc:
            raise _with_context(exc, f"node {self.name!r} forward pass") from exc

    def _measure_points(self, x: np.ndarray) -> np.ndarray:
        groups = [self._outputs, *self._probes.values()]
        rows = []
        for row in x:
            changed = np.flatnonzero(row != self._levels[self._inputs.name])
            if changed.size:
                self._write_channels(self._inputs, changed, row[changed])
            if self.settle_s > 0:
                time.sleep(self.settle_s)
            readings = []
            for group in groups:
                meter = self._instruments[group.instrument]
                readings.append(meter.measure(group.channels, self.averages))
            rows.append(np.concatenate(readings))
        return np.array(rows, dtype=np.float64)

    def describe_invalid(self, state: NodeState) -> str | None:
        """Return why ``state`` is invalid, naming the instrument and channels of the bad readings."""
        reason = state.invalid_reason()
        if reason is None:
            return None
        places = []
        for label, group, values in (("outputs", self._outputs, state.outputs),
                                     *((f"probe {name!r}", self._probes[name], state.probes[name]) for name in self._probes)):
            bad = ~np.all(np.isfinite(np.asarray(values, dtype=np.float64)), axis=0)
            if np.any(bad):
                channels = [c for c, flag in zip(group.channels, bad) if flag]
                places.append(f"{label} on instrument {group.instrument!r} channel(s) {format_channel_list(channels)}")
        if not places:
            return reason
        return f"{reason}: overrange or invalid reading(s) from {'; '.join(places)}"

    # -------------------------------------------------------------------------- learning
    def local_gradient(
        self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output"
    ) -> dict[str, np.ndarray]:
        """Return the batch-mean gradient of each parameter (see the module docstring)."""
        error = self.check_error(state, output_error, at=at)
        reason = self.describe_invalid(state)
        if reason is not None:
            raise MeasurementError(f"{self._where()}: cannot compute a gradient from an invalid measurement ({reason})")
        if self.gradient_method == "outer-product":
            delta = self._preactivation_error(state, error, at)
            batch = delta.shape[0]
            gradients = {"weight": delta.T @ np.asarray(state.inputs, dtype=np.float64) / batch}
            if "bias" in self._banks:
                gradients["bias"] = delta.mean(axis=0)
            return gradients
        if self.gradient_method == "perturbation":
            if at != "output":
                raise ConfigError(f"{self._where()}: the perturbation gradient takes errors at the outputs only")
            return self._perturbation_gradient(state, error)
        return super().local_gradient(state, output_error, at=at)

    def _preactivation_error(self, state: NodeState, error: np.ndarray, at: ErrorSite) -> np.ndarray:
        if at == "preactivation":
            return error
        assert self.activation is not None
        if "preactivation" in state.probes:
            return error * self.activation.df(np.asarray(state.probes["preactivation"], dtype=np.float64))
        return error * output_derivative(self.activation, np.asarray(state.outputs, dtype=np.float64))

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Multiply the error by f' at the measured pre-activation (needs the preactivation probe)."""
        if not self.has_preactivation:
            return super().preactivation_error(state, output_error)
        return self._preactivation_error(state, self.check_error(state, output_error), "output")

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Send the error back through the declared model: ``(error * f') @ W``."""
        if self.gradient_method != "outer-product":
            return super().input_gradient(state, output_error)
        error = self.check_error(state, output_error)
        delta = self._preactivation_error(state, error, "output")
        return delta @ self._read_parameters()["weight"]

    def _perturbation_size(self, name: str) -> np.ndarray:
        spec = self._specs[name]
        span = spec.upper_array - spec.lower_array
        if name in self.perturbation.size:
            size = np.full(spec.shape, float(self.perturbation.size[name]))
        elif spec.resolution > 0:
            size = np.full(spec.shape, 2.0 * spec.resolution)
        else:
            size = 0.01 * span
        if math.isfinite(spec.max_step):
            size = np.minimum(size, spec.max_step / 2)
        if spec.resolution > 0 and np.any(size < spec.resolution):
            raise ConfigError(
                f"{self._where(name)}: perturbation {float(size.min()):g} is below the resolution "
                f"{spec.resolution:g}; raise max_step or the perturbation size"
            )
        return size

    def _perturbation_gradient(self, state: NodeState, error: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(state.inputs, dtype=np.float64)
        batch = x.shape[0]
        centre = self._read_parameters()
        for name, value in centre.items():
            if not np.all(np.isfinite(value)):
                raise LimitError(f"{self._where(name)}: the present level is unknown; set the parameters first")
        sizes = {name: self._perturbation_size(name) for name in self._banks}
        gradients = {name: np.zeros(spec.shape) for name, spec in self._specs.items()}
        try:
            for _ in range(self.perturbation.samples):
                signs = {name: self.rng.choice((-1.0, 1.0), size=spec.shape) for name, spec in self._specs.items()}
                plus, minus = {}, {}
                for name, spec in self._specs.items():
                    lo, hi = spec.lower_array, spec.upper_array
                    plus[name] = spec.quantize(np.clip(centre[name] + sizes[name] * signs[name], lo, hi))
                    minus[name] = spec.quantize(np.clip(centre[name] - sizes[name] * signs[name], lo, hi))
                self._write_parameters(plus)
                y_plus = self._measure_batch(x)[:, : self.n_out]
                self._write_parameters(minus)
                y_minus = self._measure_batch(x)[:, : self.n_out]
                if not (np.all(np.isfinite(y_plus)) and np.all(np.isfinite(y_minus))):
                    raise MeasurementError(f"{self._where()}: invalid reading during the perturbation measurement")
                change = float(np.sum(error * (y_plus - y_minus))) / batch
                for name in self._specs:
                    half = (plus[name] - minus[name]) / 2
                    with np.errstate(divide="ignore", invalid="ignore"):
                        gradients[name] += np.where(half != 0, change / (2 * half), 0.0)
        finally:
            self._write_parameters(centre)
        return {name: grad / self.perturbation.samples for name, grad in gradients.items()}

    # ------------------------------------------------------------------------ safe state
    def apply_safe_state(self) -> None:
        """Ramp every input and parameter channel with a safe value to it.

        Every bank gets its chance even if an earlier one fails; the first failure is raised
        at the end.
        """
        if self._closed:
            return
        first_error: BaseException | None = None
        for bank in self._all_banks():
            if bank.spec.safe_value is None:
                continue
            target = np.full(bank.spec.shape, float(bank.spec.safe_value))
            try:
                self._refresh_levels()
                self._ramp_banks({bank.name: bank.spec.quantize(target)})
            except Exception as exc:  # noqa: BLE001 - every bank must get its chance to go safe
                log.error("node %r: applying the safe value to %r failed: %s", self.name, bank.name, exc)
                first_error = first_error or exc
        for name in self._residual:
            self._residual[name][...] = 0.0
        if first_error is not None:
            raise first_error

    # ------------------------------------------------------------------------- lifecycle
    def reconnect(self) -> None:
        """Reconnect every instrument of this node and read the levels back; change no output."""
        for instrument in self.instruments.values():
            instrument.reconnect()
        self._refresh_levels()
        self._configure()

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the node closes (an emulator to stop, say)."""
        self._close_callbacks.append(callback)

    def close(self) -> None:
        """Close the node; instruments stay open (the station owns them) unless callbacks close them."""
        if self._closed:
            return
        # Callbacks run first, while the node can still go to its safe state.
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - closing must run every callback
                log.error("node %r: a close callback failed: %s", self.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        super().close()

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(
            gradient=self.gradient_method,
            activation=self.activation.name if self.activation else None,
            mode=self.mode,
            settle_s=self.settle_s,
            averages=self.averages,
            channels={label: str(group) for label, group in self._groups().items()},
            instruments=[instrument.describe() for instrument in self.instruments.values()],
        )
        return info

    def state_dict(self) -> dict[str, Any]:
        """Return parameters, update residuals and the perturbation generator's state.

        Levels left unknown by a failed write are read back first. If the instrument does not
        reply, they are stored as NaN, and :meth:`load_state_dict` keeps the instrument's level
        there.
        """
        try:
            self._refresh_levels()
        except PnnError as exc:
            log.warning("node %r: reading levels back for the checkpoint failed: %s", self.name, exc)
        return {
            "parameters": self.get_parameters(),
            "residual": {name: value.copy() for name, value in self._residual.items()},
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Ramp the parameters to the saved values and restore residuals and generator state."""
        saved = state.get("parameters", {})
        if saved:
            present = self._read_parameters()
            values = {}
            for name, value in self._known(saved).items():
                value = np.asarray(value, dtype=np.float64)
                unknown = ~np.isfinite(value)
                if np.any(unknown) and value.shape == present[name].shape:
                    log.warning("node %r: the checkpoint has no value for %d element(s) of %r; keeping their present level",
                                self.name, int(np.count_nonzero(unknown)), name)
                    value = np.where(unknown, present[name], value)
                values[name] = value
            self.set_parameters(values)
        for name, value in state.get("residual", {}).items():
            if name in self._residual:
                self._residual[name] = np.asarray(value, dtype=np.float64).reshape(self._specs[name].shape).copy()
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
