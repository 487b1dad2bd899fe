"""Sweeps: measure a node's outputs over a design of inputs and parameter settings.

A :class:`Sweep` contains the settings (design, points, repeats, averaging, settling time,
ranges). :meth:`Sweep.run` measures one node and returns a :class:`SweepResult`, whose arrays
carry their units. The order of the points is shuffled by default, with a new order per
repeat. A slow drift of the device then spreads over the whole range as noise and does not bend
the measured response into a false curve.

Every range is checked against the node's limits before anything is applied, and parameters
changed by the sweep are restored afterwards, also when the sweep fails.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, LimitError
from ..nodes import Node, ParameterSpec
from ..runs import load_tree, save_tree

__all__ = ["Sweep", "SweepResult", "SWEEP_DESIGNS"]

log = logging.getLogger(__name__)

#: Designs a sweep accepts: ``"random"`` draws every swept value uniformly in its range;
#: ``"grid"`` steps all swept channels together through evenly spaced levels.
SWEEP_DESIGNS = ("random", "grid")


@dataclass(frozen=True)
class Sweep:
    """Settings of a sweep over a node's inputs and, optionally, its parameters.

    With ``design="random"``, each of the ``points`` input rows draws every swept input channel
    uniformly in its range, and each of the ``parameter_points`` parameter settings draws every
    element of a swept parameter uniformly in its range. With ``design="grid"``, all swept input
    channels share one of ``points`` evenly spaced levels per row, every element of a swept
    parameter shares one of ``parameter_points`` levels, and the settings are the full grid of
    the swept parameters' levels. Every input row is measured at every parameter setting.
    """

    design: str = "random"
    """``"random"`` or ``"grid"`` (see :data:`SWEEP_DESIGNS`)."""
    points: int = 64
    """Input rows per parameter setting."""
    repeats: int = 3
    """Passes over all points; their spread gives the noise level."""
    averages: int = 1
    """Readings averaged into one repeat of a point."""
    settle_s: float = 0.0
    """Wait after each parameter setting and before each repeat pass, in seconds. The wait after
    each input change is the node's own (an instrument node's ``settle_s``)."""
    inputs: tuple[float, float] | None = None
    """Range of the swept inputs, in the input unit; None uses each channel's full limits."""
    channels: tuple[int, ...] | None = None
    """Input channels swept (numbered from 0); None sweeps all of them."""
    hold: float | None = None
    """Level of the input channels that are not swept, in the input unit; None uses 0, or the
    middle of a channel's range when 0 lies outside it."""
    parameters: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Range of each swept parameter, by name, in the parameter's unit."""
    parameter_points: int = 4
    """Parameter settings (random design) or levels per swept parameter (grid design)."""
    shuffle: bool = True
    """Measure the points in a random order, a new one per repeat."""
    seed: int = 0
    """Seed of the random design and of the order."""
    batch_size: int = 256
    """Input rows sent to the node in one forward pass."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", {str(k): tuple(v) for k, v in dict(self.parameters).items()})
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.inputs is not None:
            object.__setattr__(self, "inputs", tuple(float(v) for v in self.inputs))
        if self.design not in SWEEP_DESIGNS:
            raise ConfigError(f"unknown sweep design {self.design!r}; choose one of {', '.join(SWEEP_DESIGNS)}")
        for name, minimum in (("points", 2), ("repeats", 1), ("averages", 1), ("parameter_points", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < minimum:
                raise ConfigError(f"sweep {name} must be an integer of at least {minimum}, got {value!r}")
        if not (math.isfinite(self.settle_s) and self.settle_s >= 0):
            raise ConfigError(f"sweep settle_s must be a finite number of seconds >= 0, got {self.settle_s}")
        for label, bounds in [("inputs", self.inputs), *self.parameters.items()]:
            if bounds is None:
                continue
            if len(bounds) != 2 or not all(math.isfinite(v) for v in bounds) or not bounds[0] < bounds[1]:
                raise ConfigError(
                    f"sweep range of {label} must be two finite numbers (lower, upper) with lower < upper, got {bounds}"
                )

    def describe(self) -> dict[str, Any]:
        """Return the settings as plain data, for calibration records."""
        return {
            "design": self.design,
            "points": self.points,
            "repeats": self.repeats,
            "averages": self.averages,
            "settle_s": self.settle_s,
            "inputs": None if self.inputs is None else list(self.inputs),
            "channels": None if self.channels is None else list(self.channels),
            "hold": self.hold,
            "parameters": {k: list(v) for k, v in self.parameters.items()},
            "parameter_points": self.parameter_points,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    # --------------------------------------------------------------------------- planning
    def _input_ranges(self, node: Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return the swept channels, their lower and upper levels, and the held level of every channel."""
        spec = node.input_spec
        lower, upper = spec.lower_array, spec.upper_array
        channels = np.arange(node.n_in) if self.channels is None else np.asarray(self.channels)
        bad = [int(c) for c in channels if not 0 <= c < node.n_in]
        if bad or len(set(channels.tolist())) != len(channels) or len(channels) == 0:
            raise ConfigError(
                f"node {node.name!r}: sweep channels {list(self.channels or [])} are invalid; give distinct "
                f"input channel numbers between 0 and {node.n_in - 1}"
            )
        tol = spec.tolerance()
        if self.inputs is None:
            lo, hi = lower[channels].copy(), upper[channels].copy()
        else:
            lo = np.full(len(channels), self.inputs[0])
            hi = np.full(len(channels), self.inputs[1])
            outside = (lo < lower[channels] - tol) | (hi > upper[channels] + tol)
            if np.any(outside):
                raise LimitError(
                    f"node {node.name!r}: the sweep range [{self.inputs[0]:g}, {self.inputs[1]:g}]"
                    f"{_unit_text(spec.unit)} of the inputs leaves their allowed range {spec.range_text()}; "
                    "narrow the sweep range to lie within it"
                )
        if self.hold is None:
            held = np.where((lower <= 0) & (upper >= 0), 0.0, 0.5 * (lower + upper))
        else:
            held = np.full(node.n_in, float(self.hold))
            if np.any(held < lower - tol) or np.any(held > upper + tol):
                raise LimitError(
                    f"node {node.name!r}: the hold level {self.hold:g}{_unit_text(spec.unit)} for unswept inputs "
                    f"leaves their allowed range {spec.range_text()}; choose a level within it"
                )
        return channels, lo, hi, held

    def _parameter_ranges(self, node: Node) -> dict[str, tuple[ParameterSpec, float, float]]:
        specs = node.parameters
        ranges = {}
        for name, (lo, hi) in self.parameters.items():
            if name not in specs:
                raise ConfigError(
                    f"node {node.name!r} has no parameter {name!r} to sweep; its parameters are {sorted(specs) or 'none'}"
                )
            spec = specs[name]
            tol = spec.tolerance()
            if np.any(lo < spec.lower_array - tol) or np.any(hi > spec.upper_array + tol):
                raise LimitError(
                    f"node {node.name!r}: the sweep range [{lo:g}, {hi:g}]{_unit_text(spec.unit)} of parameter "
                    f"{name!r} leaves its allowed range {spec.range_text()}; narrow the sweep range to lie within it"
                )
            ranges[name] = (spec, lo, hi)
        return ranges

    def _input_rows(self, node: Node, rng: np.random.Generator) -> np.ndarray:
        channels, lo, hi, held = self._input_ranges(node)
        rows = np.tile(held, (self.points, 1))
        if self.design == "random":
            rows[:, channels] = rng.uniform(lo, hi, (self.points, len(channels)))
        else:
            fraction = np.linspace(0.0, 1.0, self.points)[:, None]
            rows[:, channels] = lo + fraction * (hi - lo)
        return rows

    def _parameter_settings(self, node: Node, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        ranges = self._parameter_ranges(node)
        if not ranges:
            return [{}]
        if self.design == "random":
            return [
                {name: rng.uniform(lo, hi, spec.shape) for name, (spec, lo, hi) in ranges.items()}
                for _ in range(self.parameter_points)
            ]
        levels = {name: np.linspace(lo, hi, self.parameter_points) for name, (_, lo, hi) in ranges.items()}
        settings = []
        for combination in itertools.product(*levels.values()):
            settings.append({name: np.full(ranges[name][0].shape, level) for name, level in zip(levels, combination)})
        return settings

    def hold_inputs(self, node: Node) -> np.ndarray:
        """Return the level of every input channel when it is not swept, array of shape (n_in,)."""
        return self._input_ranges(node)[3]

    def check(self, node: Node) -> None:
        """Raise LimitError or ConfigError, naming the node, if the sweep does not fit its limits."""
        self._input_ranges(node)
        self._parameter_ranges(node)

    # ------------------------------------------------------------------------ measuring
    def run(
        self,
        node: Node,
        *,
        progress: bool = True,
        leave_progress: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> SweepResult:
        """Measure ``node`` over the sweep and return the result.

        Parameters
        ----------
        node
            The node to measure; parameters the sweep changes are restored afterwards.
        progress
            Show a tqdm progress bar.
        leave_progress
            Keep the finished bar on the screen (an interactive session does).
        sleep
            Function that waits the settling time (tests pass a stand-in).

        Raises
        ------
        LimitError
            If a sweep range leaves the node's limits; nothing was applied.
        """
        rng = np.random.default_rng(self.seed)
        rows = self._input_rows(node, rng)
        settings = self._parameter_settings(node, rng)
        n_rows, n_settings = len(rows), len(settings)
        n_points = n_rows * n_settings

        inputs = np.tile(rows, (n_settings, 1))
        outputs = np.full((n_points, self.repeats, node.n_out), np.nan)
        times = np.full((n_points, self.repeats), np.nan)
        start_values = node.get_parameters()
        swept = {name: np.empty((n_points, *node.parameters[name].shape)) for name in self.parameters}
        fixed = {name: value for name, value in start_values.items() if name not in swept}

        setting_order = rng.permutation(n_settings) if self.shuffle else np.arange(n_settings)
        started = time.monotonic()
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        log.info("node %r: sweeping %d point(s) x %d repeat(s)", node.name, n_points, self.repeats)
        bar = tqdm(total=n_points * self.repeats, unit="point", desc=f"sweep {node.name}", disable=not progress,
                   leave=leave_progress, dynamic_ncols=True)
        try:
            with bar:
                for s in setting_order:
                    block = slice(s * n_rows, (s + 1) * n_rows)
                    if settings[s]:
                        applied = node.set_parameters(settings[s])
                        for name, value in applied.items():
                            swept[name][block] = value
                    for repeat in range(self.repeats):
                        if self.settle_s:
                            sleep(self.settle_s)
                        order = rng.permutation(n_rows) if self.shuffle else np.arange(n_rows)
                        for first in range(0, n_rows, self.batch_size):
                            chunk = order[first : first + self.batch_size]
                            index = s * n_rows + chunk
                            reading, applied_inputs = self._measure(node, rows[chunk])
                            outputs[index, repeat] = reading
                            times[index, repeat] = time.monotonic() - started
                            if repeat == 0:
                                inputs[index] = applied_inputs
                            bar.update(len(chunk))
        finally:
            if swept:
                # Restore what the sweep changed, so calibrating leaves the node as it was.
                node.set_parameters({name: start_values[name] for name in swept})

        result = SweepResult(
            node=node.name,
            identity=node.identity(),
            settings=self.describe(),
            inputs=inputs,
            outputs=outputs,
            times=times,
            swept_parameters=swept,
            fixed_parameters=fixed,
            input_unit=node.input_spec.unit,
            output_unit=node.output_unit,
            parameter_units={name: spec.unit for name, spec in node.parameters.items()},
            started=created,
        )
        if result.n_invalid:
            log.warning("node %r: %d reading(s) of the sweep were invalid (NaN or overrange)", node.name, result.n_invalid)
        return result

    def _measure(self, node: Node, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean of ``averages`` readings of one batch, and the inputs as applied."""
        total = np.zeros((len(x), node.n_out))
        applied = None
        for _ in range(self.averages):
            total += node.forward(x)
            if applied is None:
                applied = np.asarray(node.measure_state().inputs, dtype=np.float64)
        return total / self.averages, applied


def _unit_text(unit: str, prefix: str = " ") -> str:
    """Return ``prefix + unit``, or nothing for a dimensionless quantity."""
    return "" if unit in ("", "1") else f"{prefix}{unit}"


@dataclass
class SweepResult:
    """The readings of one sweep, with the settings and units they belong to.

    Attributes
    ----------
    node
        Name of the node measured.
    identity
        The node's :meth:`~pnn.nodes.Node.identity` at the time of the sweep.
    settings
        The :class:`Sweep` settings, as plain data.
    inputs
        Inputs as applied, array of shape (n_points, n_in), in ``input_unit``.
    outputs
        Readings, array of shape (n_points, repeats, n_out), in ``output_unit``; NaN marks an
        invalid reading.
    times
        Time of each reading since the sweep began, array of shape (n_points, repeats), in
        seconds.
    swept_parameters
        Value of each swept parameter at each point, arrays of shape (n_points, *shape).
    fixed_parameters
        Value of every other parameter during the sweep, by name.
    input_unit, output_unit
        Units of the inputs and outputs.
    parameter_units
        Unit of each parameter, by name.
    started
        UTC time the sweep began, in ISO 8601.
    """

    node: str
    identity: dict[str, Any]
    settings: dict[str, Any]
    inputs: np.ndarray
    outputs: np.ndarray
    times: np.ndarray
    swept_parameters: dict[str, np.ndarray]
    fixed_parameters: dict[str, np.ndarray]
    input_unit: str
    output_unit: str
    parameter_units: dict[str, str]
    started: str

    @property
    def n_points(self) -> int:
        """Number of points (input rows times parameter settings)."""
        return int(self.outputs.shape[0])

    @property
    def repeats(self) -> int:
        """Number of repeats per point."""
        return int(self.outputs.shape[1])

    @property
    def n_out(self) -> int:
        """Number of output channels."""
        return int(self.outputs.shape[2])

    @property
    def n_invalid(self) -> int:
        """Number of readings that are NaN or infinite."""
        return int(np.size(self.outputs) - np.count_nonzero(np.isfinite(self.outputs)))

    def mean_outputs(self) -> np.ndarray:
        """Return the mean over the valid repeats, array of shape (n_points, n_out); NaN where none is valid."""
        valid = np.isfinite(self.outputs)
        counts = valid.sum(axis=1)
        total = np.where(valid, self.outputs, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)

    def noise_std(self) -> np.ndarray | None:
        """Return each channel's noise level from the spread of the repeats, array of shape (n_out,).

        The pooled standard deviation: the square root of the mean, over points, of each point's
        variance across its valid repeats (ddof=1). None with a single repeat.
        """
        if self.repeats < 2:
            return None
        valid = np.isfinite(self.outputs)
        counts = valid.sum(axis=1)
        mean = self.mean_outputs()
        squares = np.where(valid, (self.outputs - mean[:, None, :]) ** 2, 0.0).sum(axis=1)
        dof = np.maximum(counts - 1, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(squares.sum(axis=0) / dof.sum(axis=0))

    def parameters(self, index: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        """Return every parameter's values at the points ``index`` (all points for None).

        Swept parameters have a leading point axis; fixed ones have their own shape.
        """
        index = slice(None) if index is None else index
        values = {name: value for name, value in self.fixed_parameters.items()}
        values.update({name: value[index] for name, value in self.swept_parameters.items()})
        return values

    def subset(self, index: np.ndarray) -> SweepResult:
        """Return the sweep restricted to the points ``index`` (an index or boolean array)."""
        return SweepResult(
            node=self.node,
            identity=self.identity,
            settings=self.settings,
            inputs=self.inputs[index],
            outputs=self.outputs[index],
            times=self.times[index],
            swept_parameters={name: value[index] for name, value in self.swept_parameters.items()},
            fixed_parameters=self.fixed_parameters,
            input_unit=self.input_unit,
            output_unit=self.output_unit,
            parameter_units=self.parameter_units,
            started=self.started,
        )

    # ------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the sweep to an ``.npz`` file, atomically, and return its path."""
        path = Path(path)
        save_tree(path, {
            "format": "pnn-sweep",
            "node": self.node,
            "identity": self.identity,
            "settings": self.settings,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "times": self.times,
            "swept_parameters": self.swept_parameters,
            "fixed_parameters": self.fixed_parameters,
            "input_unit": self.input_unit,
            "output_unit": self.output_unit,
            "parameter_units": self.parameter_units,
            "started": self.started,
        })
        return path

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Read a sweep written by :meth:`save`."""
        tree = load_tree(path)
        if tree.get("format") != "pnn-sweep":
            raise ConfigError(f"{path} is not a sweep file written by pnn (format {tree.get('format')!r})")
        del tree["format"]
        return cls(**tree)

    # -------------------------------------------------------------------------- display
    def summary(self) -> str:
        """Return a few lines describing the sweep."""
        s = self.settings
        lines = [
            f"Sweep of node {self.node!r}, started {self.started}",
            f"  design {s['design']}, {self.n_points} point(s) x {self.repeats} repeat(s), "
            f"{s['averages']} average(s) per reading, settle {s['settle_s']:g} s, shuffled: {s['shuffle']}",
            f"  inputs  {self.inputs.shape}, range [{np.min(self.inputs):.4g}, {np.max(self.inputs):.4g}]"
            f"{_unit_text(self.input_unit)}",
            f"  outputs {self.outputs.shape}{_unit_text(self.output_unit, ' in ')}, {self.n_invalid} invalid reading(s)",
        ]
        for name, value in self.swept_parameters.items():
            lines.append(f"  swept parameter {name!r}, range [{np.min(value):.4g}, {np.max(value):.4g}]"
                         f"{_unit_text(self.parameter_units.get(name, ''))}")
        noise = self.noise_std()
        if noise is not None:
            lines.append(f"  noise (std of repeats) per channel: {_format_values(noise)}{_unit_text(self.output_unit)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<SweepResult {self.node!r}: {self.n_points} points x {self.repeats} repeats, "
                f"{self.inputs.shape[1]} inputs [{self.input_unit}] -> {self.n_out} outputs [{self.output_unit}]>")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self) if cycle else self.summary())


def _format_values(values: Sequence[float] | np.ndarray, limit: int = 8) -> str:
    values = list(np.asarray(values, dtype=np.float64))
    text = ", ".join(f"{v:.3g}" for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"
