"""Simulated analog crossbar: a matrix of conductance pairs computing y = f(W x + b) in place.

Model, one forward pass (the stages are named and switch off one by one, see :data:`STAGES`):

1. ``dac``: each input in [-1, 1] is quantized to a signed DAC code with ``dac_bits`` bits and
   applied as a read voltage.
2. The array sums currents along each column. A weight is stored as a differential pair,
   ``w = w_max * (g_plus - g_minus) / (g_max - g_min)``, so ``w`` spans [-w_max, w_max]; the
   bias is a pair driven by a constant full-scale input and spans [-b_max, b_max].
   ``conductance_levels``: each device is programmed to one of ``levels`` conductances.
3. ``read_noise``: Gaussian noise with a standard deviation of ``read_noise_std`` times the ADC
   full scale is added to every column signal.
4. ``saturation``: the ADC saturates at +-``adc_full_scale`` (in pre-activation units).
5. ``adc``: the column signal is quantized with ``adc_bits`` bits over that range.
6. The periphery applies the node's nonlinearity to the measured pre-activation.

With every stage off, the node is an exact linear layer followed by its nonlinearity.

Updates. One training update is often smaller than one conductance level, so updates are either
accumulated per device in a digital buffer and programmed when they pass a level (mixed-precision
training: Nandakumar et al. 2020, "Mixed-precision deep learning based on computational memory",
Frontiers in Neuroscience 14:406), or rounded stochastically to whole levels. Accumulation trained
better on MNIST with the default preset (97.7 % against 97.5 % test accuracy for 784-256-256-10
DFA after 10 epochs), so it is the default.

Signals and effective weights are float32 (the dtype of this module's kernels); conductances
and update buffers are float64 so that small updates are not lost to rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

from ..activations import get_activation
from ..errors import ConfigError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec

__all__ = ["CrossbarConfig", "CrossbarNode", "STAGES", "CROSSBAR_PRESETS", "crossbar_preset"]

log = logging.getLogger(__name__)

#: Float dtype of the crossbar's signals and effective weights.
FLOAT = np.float32

#: Imperfection stages of the crossbar, in signal order, each switched off by
#: :meth:`CrossbarConfig.without`.
STAGES = ("dac", "conductance_levels", "read_noise", "saturation", "adc")

# Activation codes understood by the forward kernel.
_ACTIVATION_CODES = {"linear": 0, "tanh": 1, "hardtanh": 2, "sigmoid": 3}

UPDATE_MODES = ("accumulate", "stochastic")


@dataclass(frozen=True)
class CrossbarConfig:
    """Device and periphery settings of a simulated crossbar."""

    g_min: float = 0.1
    """Lowest programmable conductance of one device, in microsiemens."""
    g_max: float = 25.0
    """Highest programmable conductance of one device, in microsiemens."""
    levels: int = 64
    """Number of programmable conductance levels per device (``conductance_levels`` stage)."""
    dac_bits: int = 8
    """Resolution of the input DAC, in bits including sign (``dac`` stage)."""
    adc_bits: int = 8
    """Resolution of the output ADC, in bits including sign (``adc`` stage)."""
    adc_full_scale: float = 4.0
    """Pre-activation at which the ADC saturates, in weight x input units (``saturation`` stage)."""
    output_full_scale: float | None = 8.0
    """ADC full scale for a node without a bounded nonlinearity (an output layer producing
    logits), in the same units; None uses ``adc_full_scale``."""
    read_noise_std: float = 0.02
    """Standard deviation of the read noise, relative to the ADC full scale (``read_noise``)."""
    w_max_scale: float = 8.0
    """Largest weight magnitude times sqrt(n_in): the weight that a full conductance difference
    ``g_max - g_min`` represents is ``w_max_scale / sqrt(n_in)``."""
    b_max: float = 1.0
    """Largest bias magnitude, in pre-activation units."""
    max_pulses_per_update: int = 16
    """Largest change of one weight per update, in conductance levels; sets ``max_step``."""
    update_mode: str = "accumulate"
    """How updates smaller than a level are applied: ``"accumulate"`` (per-device buffer,
    programmed when it passes a level) or ``"stochastic"`` (stochastic rounding to levels)."""
    disabled: frozenset[str] = field(default_factory=frozenset)
    """Names of the stages switched off, from :data:`STAGES`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        unknown = sorted(self.disabled - set(STAGES))
        if unknown:
            raise ConfigError(f"unknown crossbar stage(s) {unknown}; the stages are {', '.join(STAGES)}")
        if not 0 < self.g_min < self.g_max or not math.isfinite(self.g_max):
            raise ConfigError(
                f"crossbar conductances need 0 < g_min < g_max, got g_min={self.g_min} and g_max={self.g_max} uS"
            )
        for name in ("levels",):
            if int(getattr(self, name)) < 2:
                raise ConfigError(f"crossbar {name} must be at least 2, got {getattr(self, name)}")
        for name in ("dac_bits", "adc_bits"):
            if not 2 <= int(getattr(self, name)) <= 24:
                raise ConfigError(f"crossbar {name} must be between 2 and 24, got {getattr(self, name)}")
        for name in ("adc_full_scale", "w_max_scale", "b_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"crossbar {name} must be a positive number, got {value}")
        if self.output_full_scale is not None and not (
            math.isfinite(self.output_full_scale) and self.output_full_scale > 0
        ):
            raise ConfigError(f"crossbar output_full_scale must be positive or None, got {self.output_full_scale}")
        if not (math.isfinite(self.read_noise_std) and self.read_noise_std >= 0):
            raise ConfigError(f"crossbar read_noise_std must be >= 0, got {self.read_noise_std}")
        if int(self.max_pulses_per_update) < 1:
            raise ConfigError(f"crossbar max_pulses_per_update must be >= 1, got {self.max_pulses_per_update}")
        if self.update_mode not in UPDATE_MODES:
            raise ConfigError(f"crossbar update_mode must be one of {UPDATE_MODES}, got {self.update_mode!r}")

    def without(self, *stages: str) -> CrossbarConfig:
        """Return a copy with the named stages switched off (``"all"`` for every stage)."""
        names = set(STAGES) if "all" in stages else set(stages)
        return dataclasses.replace(self, disabled=self.disabled | names)

    def enabled(self, stage: str) -> bool:
        """True when ``stage`` is switched on."""
        return stage not in self.disabled

    def replace(self, **changes: Any) -> CrossbarConfig:
        """Return a copy with fields changed; unknown field names raise ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown crossbar setting(s) {unknown}; the settings are {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)


#: Named crossbar presets. ``default`` is a realistic analog array (8-bit DAC and ADC, 64 levels
#: per device, 2 % read noise, saturation at full scale); ``ideal`` switches every stage off.
CROSSBAR_PRESETS: dict[str, CrossbarConfig] = {
    "default": CrossbarConfig(),
    "ideal": CrossbarConfig().without("all"),
}


def crossbar_preset(name: str) -> CrossbarConfig:
    """Return the crossbar preset called ``name``, or raise ConfigError listing the presets."""
    try:
        return CROSSBAR_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown crossbar preset {name!r}; choose one of {', '.join(CROSSBAR_PRESETS)}"
        ) from None


# --------------------------------------------------------------------------------- kernels
@njit(cache=True)
def _dac_kernel(x, dac_steps):
    """Quantize inputs in [-1, 1] to a signed DAC code; dac_steps = 0 passes them through."""
    out = np.empty_like(x)
    flat_in = x.ravel()
    flat_out = out.ravel()
    for i in range(flat_in.size):
        v = flat_in[i]
        if dac_steps > 0:
            v = np.float32(np.round(v * dac_steps) / dac_steps)
        flat_out[i] = v
    return out


@njit(cache=True)
def _readout_kernel(a, bias, noise_sigma, full_scale, saturate, adc_steps, activation, rng):
    """Add bias and read noise, saturate, quantize and apply the nonlinearity, in place on a.

    a : float32 array of shape (batch, n_out), the ideal column sums W x.
    Returns the nonlinearity's output; a holds the measured pre-activation afterwards.
    """
    batch, n_out = a.shape
    y = np.empty_like(a)
    for i in range(batch):
        for j in range(n_out):
            v = a[i, j] + bias[j]
            if noise_sigma > 0:
                v += noise_sigma * rng.standard_normal()
            if saturate:
                if v > full_scale:
                    v = full_scale
                elif v < -full_scale:
                    v = -full_scale
            if adc_steps > 0:
                v = np.round(v / full_scale * adc_steps) / adc_steps * full_scale
            a[i, j] = v
            if activation == 1:
                y[i, j] = np.tanh(v)
            elif activation == 2:
                y[i, j] = min(1.0, max(-1.0, v))
            elif activation == 3:
                y[i, j] = 0.5 * (1.0 + np.tanh(0.5 * v))
            else:
                y[i, j] = v
    return y


@njit(cache=True)
def _forward_kernel(x, w, bias, dac_steps, noise_sigma, full_scale, saturate, adc_steps, activation, rng):
    """Full crossbar forward pass; returns (inputs as applied, measured pre-activation, outputs)."""
    x_applied = _dac_kernel(x, dac_steps)
    a = np.dot(x_applied, w.T)  # (batch, n_out)
    y = _readout_kernel(a, bias, noise_sigma, full_scale, saturate, adc_steps, activation, rng)
    return x_applied, a, y


@njit(cache=True)
def _program_kernel(g_plus, g_minus, buffer, delta_g, g_min, g_max, level_step, mode, rng):
    """Program a differential pair per element by a requested change of g_plus - g_minus.

    All arrays are float64 and flat. mode 0: continuous conductances (no levels); mode 1: add to
    the buffer and program the whole levels it holds; mode 2: stochastic rounding to levels.
    One device of each pair sits at g_min, the other carries the weight, so the pair's
    difference spans [-(g_max - g_min), g_max - g_min]. Returns the applied change of the
    difference.
    """
    span = g_max - g_min
    applied = np.empty_like(delta_g)
    for i in range(delta_g.size):
        diff = g_plus[i] - g_minus[i]
        step = delta_g[i]
        if mode == 1:
            buffer[i] += step
            pulses = np.trunc(buffer[i] / level_step)
            buffer[i] -= pulses * level_step
            step = pulses * level_step
        elif mode == 2:
            scaled = step / level_step
            lower = np.floor(scaled)
            if rng.random() < scaled - lower:
                lower += 1.0
            step = lower * level_step
        target = diff + step
        # The device saturates at its conductance range; a clipped target was already checked.
        if target > span:
            target = span
        elif target < -span:
            target = -span
        if mode != 0:
            target = np.round(target / level_step) * level_step
        if target >= 0:
            g_plus[i] = g_min + target
            g_minus[i] = g_min
        else:
            g_plus[i] = g_min
            g_minus[i] = g_min - target
        applied[i] = (g_plus[i] - g_minus[i]) - diff
    return applied


class CrossbarNode(Node):
    """A simulated analog crossbar layer: ``f(W x + b)`` from conductance pairs.

    Parameters
    ----------
    n_in, n_out
        Number of input rows and output columns.
    activation
        Peripheral nonlinearity: ``"tanh"``, ``"hardtanh"``, ``"sigmoid"`` or ``"linear"``.
    config
        Device settings; :data:`CROSSBAR_PRESETS` has named ones.
    rng
        Generator or seed for the initial weights, read noise and stochastic rounding.
    name
        Name in messages and the run record.
    init_scale
        Initial weights are drawn uniformly from +-``init_scale / sqrt(n_in)``.
    """

    gradient_method = "outer-product"
    has_input_gradient = True
    has_preactivation = True

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        activation: str = "tanh",
        config: CrossbarConfig | None = None,
        rng: np.random.Generator | int | None = None,
        name: str = "crossbar",
        init_scale: float = 1.0,
        preset: str | None = None,
    ) -> None:
        super().__init__(
            name,
            n_in,
            n_out,
            input_spec=ParameterSpec((int(n_in),), -1.0, 1.0, "1", description="input, relative to DAC full scale"),
            output_unit="1",
            dtype=FLOAT,
        )
        if activation not in _ACTIVATION_CODES:
            raise ConfigError(
                f"node {name!r}: unknown crossbar activation {activation!r}; choose one of {', '.join(_ACTIVATION_CODES)}"
            )
        self.config = config if config is not None else CrossbarConfig()
        self.preset = preset
        self.activation = get_activation(activation)
        self._activation_code = _ACTIVATION_CODES[activation]
        self.seed = rng if isinstance(rng, (int, np.integer)) else None
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

        cfg = self.config
        self.w_max = cfg.w_max_scale / math.sqrt(self.n_in)
        self.b_max = cfg.b_max
        self.g_span = cfg.g_max - cfg.g_min
        self.level_step_g = self.g_span / (cfg.levels - 1)
        bounded = self.activation.upper < np.inf
        self.full_scale = cfg.adc_full_scale if bounded or cfg.output_full_scale is None else cfg.output_full_scale

        levels_on = cfg.enabled("conductance_levels")
        w_res = self.w_max * self.level_step_g / self.g_span if levels_on else 0.0
        b_res = self.b_max * self.level_step_g / self.g_span if levels_on else 0.0
        pulses = cfg.max_pulses_per_update
        self._specs = {
            "weight": ParameterSpec(
                (self.n_out, self.n_in), -self.w_max, self.w_max, "1",
                resolution=w_res, max_step=pulses * self.w_max / (cfg.levels - 1),
                description="weight, w_max times (g_plus - g_minus) / (g_max - g_min)",
            ),
            "bias": ParameterSpec(
                (self.n_out,), -self.b_max, self.b_max, "1",
                resolution=b_res, max_step=pulses * self.b_max / (cfg.levels - 1),
                description="bias, b_max times (g_plus - g_minus) / (g_max - g_min)",
            ),
        }

        # Conductances in microsiemens, one pair per weight and per bias, and update buffers.
        self.g_plus = {k: np.full(s.shape, cfg.g_min) for k, s in self._specs.items()}
        self.g_minus = {k: np.full(s.shape, cfg.g_min) for k, s in self._specs.items()}
        self.buffer = {k: np.zeros(s.shape) for k, s in self._specs.items()}
        limit = init_scale / math.sqrt(self.n_in)
        initial = {"weight": self.rng.uniform(-limit, limit, (self.n_out, self.n_in)), "bias": np.zeros(self.n_out)}
        self._program_exact(initial)

    # --------------------------------------------------------------------------------- specs
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _scale(self, name: str) -> float:
        """Weight units per microsiemens of pair difference."""
        return (self.w_max if name == "weight" else self.b_max) / self.g_span

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return {k: (self.g_plus[k] - self.g_minus[k]) * self._scale(k) for k in self._specs}

    def _program_exact(self, values: Mapping[str, np.ndarray]) -> None:
        """Program pairs to the given weights (already in range and quantized)."""
        for name, value in values.items():
            diff = np.clip(np.asarray(value, dtype=np.float64) / self._scale(name), -self.g_span, self.g_span)
            if self.config.enabled("conductance_levels"):
                diff = np.round(diff / self.level_step_g) * self.level_step_g
            self.g_plus[name] = self.config.g_min + np.maximum(diff, 0.0)
            self.g_minus[name] = self.config.g_min + np.maximum(-diff, 0.0)
            self.buffer[name][...] = 0.0
        self._refresh()

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._program_exact(values)
        current = self._read_parameters()
        return {name: current[name] for name in values}

    def _refresh(self) -> None:
        weights = self._read_parameters()
        self._w = np.ascontiguousarray(weights["weight"], dtype=FLOAT)
        self._b = np.ascontiguousarray(weights["bias"], dtype=FLOAT)

    # ------------------------------------------------------------------------------ forward
    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        cfg = self.config
        dac_steps = 2 ** (cfg.dac_bits - 1) - 1 if cfg.enabled("dac") else 0
        adc_steps = 2 ** (cfg.adc_bits - 1) - 1 if cfg.enabled("adc") else 0
        noise = cfg.read_noise_std * self.full_scale if cfg.enabled("read_noise") else 0.0
        x_applied, a, y = _forward_kernel(
            x, self._w, self._b, dac_steps, FLOAT(noise), FLOAT(self.full_scale),
            cfg.enabled("saturation"), adc_steps, self._activation_code, self.rng,
        )
        return y, x_applied, {"preactivation": a}

    # ------------------------------------------------------------------------------ updates
    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Program a change of the weights and return the change actually programmed.

        Changes are checked against ``max_step`` and the limits like any node's; then, with the
        ``conductance_levels`` stage on, they go through the update buffer (``accumulate``) or
        stochastic rounding, so most small changes program nothing at first.
        """
        self._check_open()
        current = self._read_parameters()
        requests = {}
        for name, value in self._known(delta).items():
            spec = self._specs[name]
            step = spec.check_shape(value, self._where(name))
            limited = spec.check_step(step, self._where(name), clip=clip)
            target = spec.check_range(current[name] + limited, self._where(name), clip=clip)
            if clip:
                self._count_clips(name, current[name] + step, target)
            requests[name] = target - current[name]

        levels_on = self.config.enabled("conductance_levels")
        mode = 0 if not levels_on else (1 if self.config.update_mode == "accumulate" else 2)
        applied = {}
        for name, request in requests.items():
            scale = self._scale(name)
            shape = request.shape
            g_plus = self.g_plus[name].reshape(-1)
            g_minus = self.g_minus[name].reshape(-1)
            buffer = self.buffer[name].reshape(-1)
            change = _program_kernel(
                g_plus, g_minus, buffer, np.ascontiguousarray(request.reshape(-1) / scale),
                self.config.g_min, self.config.g_max, self.level_step_g, mode, self.rng,
            )
            applied[name] = change.reshape(shape) * scale
        self._refresh()
        return applied

    # ----------------------------------------------------------------------------- learning
    def _preactivation_error(self, state: NodeState, error: np.ndarray, at: ErrorSite) -> np.ndarray:
        a = np.asarray(state.probes["preactivation"], dtype=np.float64)
        delta = error * self.activation.df(a) if at == "output" else error
        if self.config.enabled("saturation"):
            # A saturated ADC reading carries no gradient: moving the weights a little does not
            # change it. Without this mask, saturated outputs keep pulling their weights.
            delta = delta * (np.abs(a) < self.full_scale * (1 - 1e-6))
        return delta

    def local_gradient(
        self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output"
    ) -> dict[str, np.ndarray]:
        """Outer product of the pre-activation error and the applied inputs, averaged over the batch."""
        error = self.check_error(state, output_error, at=at)
        delta = self._preactivation_error(state, error, at).astype(FLOAT)
        batch = delta.shape[0]
        grad_w = np.dot(delta.T, np.asarray(state.inputs, dtype=FLOAT)) / batch
        grad_b = delta.mean(axis=0)
        return {"weight": grad_w.astype(np.float64), "bias": grad_b.astype(np.float64)}

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Send the error back through the transposed array (the programmed weights, noise-free)."""
        error = self.check_error(state, output_error)
        delta = self._preactivation_error(state, error, "output")
        return delta @ self._w.astype(np.float64)

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Multiply the error by the nonlinearity's derivative at the measured pre-activation."""
        return self._preactivation_error(state, self.check_error(state, output_error), "output")

    # ---------------------------------------------------------------------------- lifecycle
    def identity(self) -> dict[str, Any]:
        info = super().identity()
        cfg = dataclasses.asdict(self.config)
        cfg["disabled"] = sorted(self.config.disabled)
        info.update(
            preset=self.preset,
            seed=self.seed,
            activation=self.activation.name,
            config=cfg,
        )
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "g_plus": {k: v.copy() for k, v in self.g_plus.items()},
            "g_minus": {k: v.copy() for k, v in self.g_minus.items()},
            "buffer": {k: v.copy() for k, v in self.buffer.items()},
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("g_plus", "g_minus", "buffer"):
            for name, spec in self._specs.items():
                value = np.asarray(state[key][name], dtype=np.float64)
                if value.shape != spec.shape:
                    raise ConfigError(
                        f"{self._where(name)}: saved {key} has shape {value.shape}, expected {spec.shape}"
                    )
                getattr(self, key)[name] = value.copy()
        self.rng.bit_generator.state = state["rng"]
        self._refresh()

    def conductances(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return (g_plus, g_minus) per parameter, in microsiemens."""
        return {k: (self.g_plus[k].copy(), self.g_minus[k].copy()) for k in self._specs}
