"""The emulated hardware behind both emulators: crossbar layers wired to numbered channels.

Each layer is a simulated :class:`~pnn.simulators.crossbar.CrossbarNode` computing
``f(W x + b)``. Its inputs, weights and biases are source (DAC) channels, and its outputs and
pre-activations are meter (ADC) channels. Channels are numbered from 1, layer after layer:

- source: the layer's n_in inputs, then its n_out * n_in weights in row-major order
  (``weight[j, i]`` on ``first_weight + j * n_in + i``), then its n_out biases;
- meter: the layer's n_out outputs, then its n_out pre-activations.

Each source channel reports the range and resolution of what it drives: inputs span the
crossbar's DAC range [-1, 1] with its DAC step; weights and biases span the crossbar's weight
range with one conductance level as the step. A level outside the range is rejected, as a real
DAC rejects it, and the level is kept.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..simulators.crossbar import CrossbarNode, crossbar_preset

__all__ = ["LayerSpec", "EmulatedHardware", "ChannelError", "parse_layers"]


#: Most weights (source channels) one emulated layer may have; larger ones would not fit in
#: memory and no instrument has that many channels.
MAX_WEIGHTS = 1_000_000


class ChannelError(ValueError):
    """A request the hardware rejects: unknown channel or level out of range."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LayerSpec:
    """Size and activation of one emulated crossbar layer."""

    n_in: int
    n_out: int
    activation: str = "tanh"

    @classmethod
    def parse(cls, text: str) -> LayerSpec:
        """Parse ``"12x8:tanh"`` (activation optional, default tanh)."""
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?::\s*(\w+))?\s*", text)
        if match is None:
            raise ConfigError(f"layer {text!r}: write N_INxN_OUT[:ACTIVATION], for example 12x8:tanh")
        n_in, n_out = int(match.group(1)), int(match.group(2))
        if n_in < 1 or n_out < 1:
            raise ConfigError(f"layer {text!r}: both sizes must be at least 1, for example 12x8:tanh")
        if n_in * n_out > MAX_WEIGHTS:
            raise ConfigError(
                f"layer {text!r} has {n_in * n_out} weights, each an emulated channel; "
                f"use at most {MAX_WEIGHTS} per layer"
            )
        return cls(n_in, n_out, match.group(3) or "tanh")


def parse_layers(text: str) -> list[LayerSpec]:
    """Parse a comma-separated layer list, ``"12x8:tanh,8x7:linear"``."""
    layers = [LayerSpec.parse(part) for part in text.split(",") if part.strip()]
    if not layers:
        raise ConfigError("at least one layer is needed, for example 12x8:tanh")
    return layers


@dataclass(frozen=True)
class _LayerChannels:
    """Channel numbers of one layer (all 1-based, first channel of each block)."""

    first_input: int
    first_weight: int
    first_bias: int
    first_output: int
    first_preactivation: int


class EmulatedHardware:
    """Crossbar layers behind numbered source and meter channels.

    Parameters
    ----------
    layers
        The layers, in channel order.
    preset
        Crossbar preset (see :data:`pnn.simulators.crossbar.CROSSBAR_PRESETS`).
    seed
        Seed of the crossbars' read noise (layer i uses ``seed + i``).
    meter_range
        Largest magnitude a meter channel reads; beyond it the reading is 9.9E37 (overrange).
    readback_overshoot
        Read a level that sits at a channel's range limit back as one step beyond it (one
        resolution step, or 1e-6 of the range on a continuous channel), as a DAC whose
        read-back is rounded does. The level itself stays inside the range.
    """

    def __init__(self, layers: Sequence[LayerSpec], *, preset: str = "default", seed: int = 0,
                 meter_range: float = 10.0, readback_overshoot: bool = False) -> None:
        if not layers:
            raise ConfigError("the emulated hardware needs at least one layer")
        self.layer_specs = list(layers)
        self.preset = preset
        self.seed = int(seed)
        self.meter_range = float(meter_range)
        self.readback_overshoot = bool(readback_overshoot)
        #: Read-back values reported beyond a range limit so far (see ``readback_overshoot``).
        self.overshoot_reads = 0
        config = crossbar_preset(preset)
        # Compile (or load) the crossbar kernels now, on a throwaway layer, so the first batch
        # a host sends is not slowed down by compilation past the host's timeout.
        CrossbarNode(1, 1, config=config, rng=0).forward(np.zeros((1, 1)))
        self.crossbars = [
            CrossbarNode(spec.n_in, spec.n_out, activation=spec.activation, config=config, rng=self.seed + i,
                         name=f"layer{i + 1}", preset=preset)
            for i, spec in enumerate(layers)
        ]
        lower, upper, resolution = [], [], []
        self.channels: list[_LayerChannels] = []
        source = 1
        meter = 1
        for spec, crossbar in zip(layers, self.crossbars):
            weight, bias = crossbar.parameters["weight"], crossbar.parameters["bias"]
            dac_step = 1.0 / (2 ** (config.dac_bits - 1) - 1) if config.enabled("dac") else 0.0
            blocks = [
                (spec.n_in, -1.0, 1.0, dac_step),
                (spec.n_in * spec.n_out, float(weight.lower_array.flat[0]), float(weight.upper_array.flat[0]), weight.resolution),
                (spec.n_out, float(bias.lower_array.flat[0]), float(bias.upper_array.flat[0]), bias.resolution),
            ]
            for count, lo, hi, step in blocks:
                lower += [lo] * count
                upper += [hi] * count
                resolution += [step] * count
            self.channels.append(_LayerChannels(
                first_input=source,
                first_weight=source + spec.n_in,
                first_bias=source + spec.n_in + spec.n_in * spec.n_out,
                first_output=meter,
                first_preactivation=meter + spec.n_out,
            ))
            source += spec.n_in + spec.n_in * spec.n_out + spec.n_out
            meter += 2 * spec.n_out
        self.lower = np.array(lower)
        self.upper = np.array(upper)
        self._lower_list, self._upper_list = list(lower), list(upper)
        self.resolution = np.array(resolution)
        self.n_source = len(lower)
        self.n_meter = meter - 1
        # Outputs start at 0 V, as a DAC does after power-on.
        self.levels = np.zeros(self.n_source)
        self.lock = threading.RLock()
        self._synced_levels: list[np.ndarray | None] = [None] * len(layers)

    # ---------------------------------------------------------------------------- source
    def check_source(self, channels: Sequence[int]) -> np.ndarray:
        """Return 0-based indices of source channels, or raise ChannelError."""
        index = np.asarray(channels, dtype=np.int64) - 1
        bad = (index < 0) | (index >= self.n_source)
        if np.any(bad):
            raise ChannelError(f"source channel {int(index[bad][0]) + 1} does not exist (1..{self.n_source})", -114)
        return index

    def check_meter(self, channels: Sequence[int]) -> np.ndarray:
        """Return 0-based indices of meter channels, or raise ChannelError."""
        index = np.asarray(channels, dtype=np.int64) - 1
        bad = (index < 0) | (index >= self.n_meter)
        if np.any(bad):
            raise ChannelError(f"meter channel {int(index[bad][0]) + 1} does not exist (1..{self.n_meter})", -114)
        return index

    def set_levels(self, channels: Sequence[int], values: Sequence[float]) -> None:
        """Set levels; all are checked first, and none changes if one is out of range."""
        # Plain Python: hosts mostly set one channel per command, where NumPy calls cost more
        # than the work.
        checked = []
        with self.lock:
            for channel, value in zip(channels, values):
                index = int(channel) - 1
                if not 0 <= index < self.n_source:
                    raise ChannelError(f"source channel {channel} does not exist (1..{self.n_source})", -114)
                lower, upper = self._lower_list[index], self._upper_list[index]
                value = float(value)
                tol = 1e-9 * (upper - lower)
                if not lower - tol <= value <= upper + tol:
                    raise ChannelError(f"level {value!r} out of range [{lower:g}, {upper:g}] on channel {channel}", -222)
                checked.append((index, min(max(value, lower), upper)))
            for index, value in checked:
                self.levels[index] = value

    def get_levels(self, channels: Sequence[int]) -> np.ndarray:
        """Return present levels as read back (see ``readback_overshoot``)."""
        with self.lock:
            index = self.check_source(channels)
            levels = self.levels[index].copy()
        if self.readback_overshoot:
            lower, upper = self.lower[index], self.upper[index]
            step = np.where(self.resolution[index] > 0, self.resolution[index], 1e-6 * (upper - lower))
            high, low = levels >= upper, levels <= lower
            self.overshoot_reads += int(np.count_nonzero(high | low))
            levels = np.where(high, upper + step, np.where(low, lower - step, levels))
        return levels

    def reset(self) -> None:
        """Set every level to 0 (what ``*RST`` does)."""
        with self.lock:
            self.levels[:] = 0.0

    # ----------------------------------------------------------------------------- meter
    def _sync_layer(self, i: int) -> None:
        """Program a crossbar with the weights and biases on its channels, if they changed."""
        ch = self.channels[i]
        spec = self.layer_specs[i]
        block = self.levels[ch.first_weight - 1 : ch.first_bias - 1 + spec.n_out]
        if self._synced_levels[i] is not None and np.array_equal(self._synced_levels[i], block):
            return
        weight = block[: spec.n_in * spec.n_out].reshape(spec.n_out, spec.n_in)
        bias = block[spec.n_in * spec.n_out :]
        self.crossbars[i].set_parameters({"weight": weight, "bias": bias})
        self._synced_levels[i] = block.copy()

    def _meter_map(self, index: np.ndarray) -> list[tuple[int, str, int]]:
        """Map 0-based meter indices to (layer, "output" or "preactivation", unit)."""
        result = []
        for k in index:
            channel = int(k) + 1
            for i, ch in enumerate(self.channels):
                n_out = self.layer_specs[i].n_out
                if ch.first_output <= channel < ch.first_output + n_out:
                    result.append((i, "output", channel - ch.first_output))
                    break
                if ch.first_preactivation <= channel < ch.first_preactivation + n_out:
                    result.append((i, "preactivation", channel - ch.first_preactivation))
                    break
        return result

    def run(self, sequence_channels: Sequence[int], rows: np.ndarray, meter_channels: Sequence[int],
            averages: int = 1, dwell_s: float = 0.0) -> np.ndarray:
        """Apply each row to the sequence channels and read the meter channels.

        Parameters
        ----------
        sequence_channels
            Source channels that take the row values (empty for a single static measurement).
        rows
            Array of shape (n_rows, len(sequence_channels)); values outside a channel's range
            raise ChannelError and nothing is applied.
        meter_channels
            Channels read per row.
        averages
            Readings averaged per row.
        dwell_s
            Wait per row before reading, in seconds (the emulator sleeps for the whole batch).

        Returns
        -------
        numpy.ndarray
            Readings of shape (n_rows, len(meter_channels)); after the run the sequence
            channels hold the last row, as a DAC does.
        """
        with self.lock:
            seq_index = self.check_source(sequence_channels) if len(sequence_channels) else np.zeros(0, dtype=np.int64)
            meter_index = self.check_meter(meter_channels)
            rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(seq_index)) if len(seq_index) else np.zeros((1, 0))
            tol = 1e-9 * (self.upper[seq_index] - self.lower[seq_index])
            bad = ~np.isfinite(rows) | (rows < self.lower[seq_index] - tol) | (rows > self.upper[seq_index] + tol)
            if np.any(bad):
                r, c = np.argwhere(bad)[0]
                raise ChannelError(
                    f"sequence value {rows[r, c]!r} out of range on channel {int(seq_index[c]) + 1}", -222
                )
            n_rows = rows.shape[0]
            if dwell_s > 0:
                time.sleep(dwell_s * n_rows)
            mapping = self._meter_map(meter_index)
            out = np.empty((n_rows, len(mapping)))
            needed = sorted({layer for layer, _, _ in mapping})
            for i in needed:
                self._sync_layer(i)
                spec, ch = self.layer_specs[i], self.channels[i]
                x = np.tile(self.levels[ch.first_input - 1 : ch.first_input - 1 + spec.n_in], (n_rows, 1))
                for column, k in enumerate(seq_index):
                    if ch.first_input - 1 <= k < ch.first_input - 1 + spec.n_in:
                        x[:, k - (ch.first_input - 1)] = rows[:, column]
                x = np.clip(x, -1.0, 1.0)
                y_sum = np.zeros((n_rows, spec.n_out))
                a_sum = np.zeros((n_rows, spec.n_out))
                for _ in range(max(1, int(averages))):
                    y_sum += self.crossbars[i].forward(x)
                    a_sum += self.crossbars[i].measure_state().probes["preactivation"]
                y, a = y_sum / max(1, int(averages)), a_sum / max(1, int(averages))
                for column, (layer, kind, unit) in enumerate(mapping):
                    if layer == i:
                        out[:, column] = (y if kind == "output" else a)[:, unit]
            if len(seq_index):
                self.levels[seq_index] = rows[-1]
            with np.errstate(invalid="ignore"):
                out[np.abs(out) > self.meter_range] = 9.9e37
            return out

    # ---------------------------------------------------------------------------- text
    def describe_channels(self) -> str:
        """Return the channel map as text, one line per layer."""
        lines = []
        for i, (spec, ch) in enumerate(zip(self.layer_specs, self.channels)):
            lines.append(
                f"layer{i + 1} ({spec.n_in} -> {spec.n_out}, {spec.activation}): "
                f"source inputs {ch.first_input}:{ch.first_weight - 1}, "
                f"weights {ch.first_weight}:{ch.first_bias - 1} (weight[j, i] on {ch.first_weight} + j*{spec.n_in} + i), "
                f"biases {ch.first_bias}:{ch.first_bias + spec.n_out - 1}; "
                f"meter outputs {ch.first_output}:{ch.first_preactivation - 1}, "
                f"pre-activations {ch.first_preactivation}:{ch.first_preactivation + spec.n_out - 1}"
            )
        return "\n".join(lines)

    def weight_range(self, i: int) -> tuple[float, float, float]:
        """Return (lower, upper, resolution) of layer ``i``'s weight channels."""
        k = self.channels[i].first_weight - 1
        return float(self.lower[k]), float(self.upper[k]), float(self.resolution[k])

    def bias_range(self, i: int) -> tuple[float, float, float]:
        """Return (lower, upper, resolution) of layer ``i``'s bias channels."""
        k = self.channels[i].first_bias - 1
        return float(self.lower[k]), float(self.upper[k]), float(self.resolution[k])

    def input_range(self, i: int) -> tuple[float, float, float]:
        """Return (lower, upper, resolution) of layer ``i``'s input channels."""
        k = self.channels[i].first_input - 1
        return float(self.lower[k]), float(self.upper[k]), float(self.resolution[k])
