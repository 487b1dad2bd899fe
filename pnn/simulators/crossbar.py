"""Simulated analog crossbar: a matrix of conductance pairs computing y = f(W x + b) in place.

Model, one forward pass (each imperfection is a named stage, see :data:`STAGES`):

1. ``dac``: each input in [-1, 1] is quantized to a signed DAC code with ``dac_bits`` bits and
   applied as a read voltage.
2. The array sums currents along each column. A weight is stored as a differential pair,
   ``w = w_max * (g_plus - g_minus) / (g_max - g_min)``, so ``w`` spans [-w_max, w_max]. The bias
   is a pair driven by a constant full-scale input and spans [-b_max, b_max].
   ``conductance_levels``: each device is programmed in pulses of one level,
   ``(g_max - g_min) / (levels - 1)``. ``drift``: conductances decay as a power law of the time
   since programming. ``stuck_devices``: some devices ignore every pulse.
3. ``read_noise``: Gaussian noise with a standard deviation of ``read_noise_std`` times the ADC
   full scale is added to every column signal.
4. ``saturation``: the ADC saturates at +-``adc_full_scale`` (in pre-activation units).
5. ``adc``: the column signal is quantized with ``adc_bits`` bits over that range.
6. The periphery applies the node's nonlinearity to the measured pre-activation.

Programming stages: ``update_nonlinearity`` (soft bounds: a pulse moves a device less the
closer it is to the bound it moves towards), ``update_asymmetry`` (depression pulses larger or
smaller than potentiation pulses), ``device_variation`` (each device its own saturation
conductance, pulse size and drift exponent) and ``cycle_variation`` (each pulse's size varies).
With every stage off, the node is an exact linear layer followed by its nonlinearity.

Updates. One training update is often smaller than one conductance level, so updates are either
accumulated per device in a digital buffer and programmed when they pass a level (mixed-precision
training: Nandakumar et al. 2020, "Mixed-precision deep learning based on computational memory",
Frontiers in Neuroscience 14:406), or rounded stochastically to whole levels. Accumulation trained
better on MNIST with the default preset (97.7 % against 97.5 % test accuracy for 784-256-256-10
DFA after 10 epochs), so it is the default.

Signals and effective weights are float32, the dtype of the forward kernel. Conductances and
update buffers are float64 so that small updates are not lost to rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..activations import get_activation
from ..errors import ConfigError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec
from . import _crossbar_kernels as kernels

__all__ = ["CrossbarConfig", "CrossbarNode", "STAGES", "CROSSBAR_PRESETS", "crossbar_preset"]

log = logging.getLogger(__name__)

#: Float dtype of the crossbar's signals and effective weights.
FLOAT = np.float32
#: Nonlinearities a crossbar column can apply after its ADC.
ACTIVATION_NAMES = ("linear", "tanh", "hardtanh", "sigmoid")
#: Stand-in for the noise draws when read noise is off.
_NO_NOISE = np.zeros((0, 0))

#: Imperfection stages of the crossbar, each switched off by :meth:`CrossbarConfig.without`.
STAGES = (
    "dac",
    "conductance_levels",
    "read_noise",
    "saturation",
    "adc",
    "update_nonlinearity",
    "update_asymmetry",
    "device_variation",
    "cycle_variation",
    "drift",
    "stuck_devices",
)

UPDATE_MODES = ("accumulate", "stochastic")
PROGRAMMING_SCHEMES = ("bidirectional", "potentiate-only")


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
    """Treatment of updates smaller than a level: ``"accumulate"`` (per-device buffer, programmed
    when it passes a level) or ``"stochastic"`` (stochastic rounding to levels)."""
    programming: str = "bidirectional"
    """Pulse scheme: ``"bidirectional"`` (devices step up and down) or ``"potentiate-only"``
    (phase-change memory: each device only steps up, and a saturated pair is reset and
    reprogrammed)."""
    update_nonlinearity: float = 0.0
    """Soft-bounds factor in [0, 1] (``update_nonlinearity``): a pulse's size shrinks linearly to
    ``1 - update_nonlinearity`` of nominal at the bound it moves towards."""
    update_asymmetry: float = 0.0
    """Depression pulse size relative to potentiation, minus one (``update_asymmetry``)."""
    g_max_dtod: float = 0.0
    """Device-to-device spread of the saturation conductance, relative to ``g_max``
    (``device_variation``)."""
    step_dtod: float = 0.0
    """Device-to-device spread of the nominal pulse size, relative (``device_variation``)."""
    step_std: float = 0.0
    """Cycle-to-cycle spread of each pulse's size, relative (``cycle_variation``)."""
    drift_nu: float = 0.0
    """Mean drift exponent nu of g(t) = g_prog (t / t_drift_ref) ** -nu (``drift``)."""
    drift_nu_dtod: float = 0.0
    """Device-to-device spread of the drift exponent, absolute (``device_variation``)."""
    t_drift_ref: float = 20.0
    """Time after programming at which a device has its programmed conductance, in seconds."""
    t_per_batch: float = 0.0
    """Simulated time that one forward pass takes, in seconds (drift clock)."""
    stuck_fraction: float = 0.0
    """Fraction of devices that ignore every pulse (``stuck_devices``)."""
    stuck_high_fraction: float = 0.5
    """Share of the stuck devices stuck at ``g_max``; the others stay at ``g_min``."""
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
        if int(self.levels) < 2:
            raise ConfigError(f"crossbar levels must be at least 2, got {self.levels}")
        for name in ("dac_bits", "adc_bits"):
            if not 2 <= int(getattr(self, name)) <= 24:
                raise ConfigError(f"crossbar {name} must be between 2 and 24, got {getattr(self, name)}")
        for name in ("adc_full_scale", "w_max_scale", "b_max", "t_drift_ref"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"crossbar {name} must be a positive number, got {value}")
        if self.output_full_scale is not None and not (
            math.isfinite(self.output_full_scale) and self.output_full_scale > 0
        ):
            raise ConfigError(f"crossbar output_full_scale must be positive or None, got {self.output_full_scale}")
        for name in ("read_noise_std", "g_max_dtod", "step_dtod", "step_std", "drift_nu", "drift_nu_dtod", "t_per_batch"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"crossbar {name} must be a number >= 0, got {value}")
        for name in ("update_nonlinearity", "stuck_fraction", "stuck_high_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"crossbar {name} must lie in [0, 1], got {value}")
        if not -1 < self.update_asymmetry < 10:
            raise ConfigError(f"crossbar update_asymmetry must lie in (-1, 10), got {self.update_asymmetry}")
        if int(self.max_pulses_per_update) < 1:
            raise ConfigError(f"crossbar max_pulses_per_update must be >= 1, got {self.max_pulses_per_update}")
        if self.update_mode not in UPDATE_MODES:
            raise ConfigError(f"crossbar update_mode must be one of {UPDATE_MODES}, got {self.update_mode!r}")
        if self.programming not in PROGRAMMING_SCHEMES:
            raise ConfigError(
                f"crossbar programming must be one of {PROGRAMMING_SCHEMES}, got {self.programming!r}"
            )

    def without(self, *stages: str) -> CrossbarConfig:
        """Return a copy with the named stages switched off (``"all"`` for every stage)."""
        names = set(STAGES) if "all" in stages else set(stages)
        return dataclasses.replace(self, disabled=self.disabled | names)

    def enabled(self, stage: str) -> bool:
        """True when ``stage`` is switched on (its settings may still make it do nothing)."""
        return stage not in self.disabled

    def replace(self, **changes: Any) -> CrossbarConfig:
        """Return a copy with fields changed; unknown field names raise ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown crossbar setting(s) {unknown}; the settings are {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def active(self, stage: str) -> bool:
        """True when ``stage`` is on and its settings change the device's behaviour."""
        if not self.enabled(stage):
            return False
        amounts = {
            "read_noise": self.read_noise_std,
            "update_nonlinearity": self.update_nonlinearity,
            "update_asymmetry": self.update_asymmetry,
            "device_variation": self.g_max_dtod + self.step_dtod + self.drift_nu_dtod,
            "cycle_variation": self.step_std,
            "drift": self.drift_nu,
            "stuck_devices": self.stuck_fraction,
        }
        return amounts.get(stage, 1.0) != 0


#: Named crossbar presets.
#:
#: - ``default``: a realistic analog array: 8-bit DAC and ADC, 64 levels per device, read noise of
#:   2 % of full scale, saturation at full scale, linear and symmetric devices.
#: - ``pcm``: phase-change memory programmed with SET pulses only. The drift exponent
#:   (mean 0.049, spread 0.008 across devices, defined 20 s after programming) and the 25 uS
#:   maximum conductance are the values of the PCM model fitted to a one-million-device array in
#:   Joshi et al. 2020, "Accurate deep neural network inference using computational phase-change
#:   memory", Nature Communications 11:2473 (at high target conductance). The one simulated second
#:   per batch is an assumption.
#: - ``ideal``: every stage off.
CROSSBAR_PRESETS: dict[str, CrossbarConfig] = {
    "default": CrossbarConfig(),
    "pcm": CrossbarConfig(
        g_min=0.1,
        g_max=25.0,
        programming="potentiate-only",
        # NOTE: typical values for PCM SET pulses, not fitted to a published device.
        update_nonlinearity=0.5,
        step_dtod=0.1,
        step_std=0.3,
        g_max_dtod=0.05,
        drift_nu=0.049,
        drift_nu_dtod=0.008,
        t_drift_ref=20.0,
        t_per_batch=1.0,
    ),
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
        Generator or seed for the initial weights, device variation, read noise and pulses.
    name
        Name in messages and the run record.
    init_scale
        Initial weights are drawn uniformly from +-``init_scale / sqrt(n_in)``.
    preset
        Name of the preset ``config`` came from, for the run record.
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
        if activation not in ACTIVATION_NAMES:
            raise ConfigError(
                f"node {name!r}: unknown crossbar activation {activation!r}; "
                f"choose one of {', '.join(ACTIVATION_NAMES)}"
            )
        self.config = config if config is not None else CrossbarConfig()
        self.preset = preset
        self.activation = get_activation(activation)
        self.seed = int(rng) if isinstance(rng, (int, np.integer)) else None
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

        cfg = self.config
        self.w_max = cfg.w_max_scale / math.sqrt(self.n_in)
        self.b_max = cfg.b_max
        self.g_span = cfg.g_max - cfg.g_min
        self.level_step_g = self.g_span / (cfg.levels - 1)
        bounded = self.activation.upper < np.inf
        self.full_scale = cfg.adc_full_scale if bounded or cfg.output_full_scale is None else cfg.output_full_scale
        #: Simulated time since the node was made, in seconds (the drift clock).
        self.time = 0.0
        #: Number of pair refreshes of the potentiate-only scheme.
        self.refreshes = np.zeros(1, dtype=np.int64)

        levels_on = cfg.enabled("conductance_levels")
        pulses = cfg.max_pulses_per_update
        self._specs = {
            "weight": ParameterSpec(
                (self.n_out, self.n_in), -self.w_max, self.w_max, "1",
                resolution=self.w_max / (cfg.levels - 1) if levels_on else 0.0,
                max_step=pulses * self.w_max / (cfg.levels - 1),
                description="weight, w_max times (g_plus - g_minus) / (g_max - g_min)",
            ),
            "bias": ParameterSpec(
                (self.n_out,), -self.b_max, self.b_max, "1",
                resolution=self.b_max / (cfg.levels - 1) if levels_on else 0.0,
                max_step=pulses * self.b_max / (cfg.levels - 1),
                description="bias, b_max times (g_plus - g_minus) / (g_max - g_min)",
            ),
        }

        # Per parameter: conductances g (2, n) in microsiemens (row 0 plus, row 1 minus devices),
        # the update buffer (n,), and device properties of shape (2, n).
        self._g: dict[str, np.ndarray] = {}
        self._buffer: dict[str, np.ndarray] = {}
        self._g_top: dict[str, np.ndarray] = {}
        self._step: dict[str, np.ndarray] = {}
        self._nu: dict[str, np.ndarray] = {}
        self._t_prog: dict[str, np.ndarray] = {}
        self._stuck: dict[str, np.ndarray] = {}
        for key, spec in self._specs.items():
            size = int(np.prod(spec.shape))
            self._g[key] = np.full((2, size), cfg.g_min)
            self._buffer[key] = np.zeros(size)
            self._t_prog[key] = np.zeros((2, size))
            self._draw_devices(key, size)

        limit = init_scale / math.sqrt(self.n_in)
        initial = {"weight": self.rng.uniform(-limit, limit, (self.n_out, self.n_in)), "bias": np.zeros(self.n_out)}
        self._program_exact(initial)

    # ---------------------------------------------------------------------- device physics
    def _draw_devices(self, key: str, size: int) -> None:
        """Draw each device's fixed properties: saturation, pulse size, drift exponent, stuck state."""
        cfg = self.config
        g_top = np.full((2, size), cfg.g_max)
        step = np.full((2, size), self.level_step_g)
        nu = np.full((2, size), cfg.drift_nu if cfg.active("drift") else 0.0)
        if cfg.active("device_variation"):
            g_top = cfg.g_max * (1.0 + cfg.g_max_dtod * self.rng.standard_normal((2, size)))
            g_top = np.clip(g_top, cfg.g_min + self.level_step_g, None)
            step = self.level_step_g * np.clip(1.0 + cfg.step_dtod * self.rng.standard_normal((2, size)), 0.05, None)
            if cfg.active("drift"):
                nu = np.clip(nu + cfg.drift_nu_dtod * self.rng.standard_normal((2, size)), 0.0, None)
        stuck = np.zeros((2, size), dtype=np.int8)
        if cfg.active("stuck_devices"):
            hit = self.rng.random((2, size)) < cfg.stuck_fraction
            high = self.rng.random((2, size)) < cfg.stuck_high_fraction
            stuck[hit & high] = kernels.STUCK_HIGH
            stuck[hit & ~high] = kernels.STUCK_LOW
        self._g_top[key], self._step[key], self._nu[key], self._stuck[key] = g_top, step, nu, stuck

    @property
    def _ideal_devices(self) -> bool:
        """True when every device is identical, linear and symmetric, so the fast kernel applies."""
        cfg = self.config
        return cfg.programming == "bidirectional" and not any(
            cfg.active(stage)
            for stage in ("update_nonlinearity", "update_asymmetry", "device_variation", "cycle_variation", "stuck_devices")
        )

    def _apply_stuck(self, key: str) -> None:
        stuck = self._stuck[key]
        g = self._g[key]
        g[stuck == kernels.STUCK_LOW] = self.config.g_min
        g[stuck == kernels.STUCK_HIGH] = self._g_top[key][stuck == kernels.STUCK_HIGH]

    def _read_conductances(self, key: str) -> np.ndarray:
        """Conductances as read now, after drift, array of shape (2, n) in microsiemens."""
        if not self.config.active("drift"):
            return self._g[key]
        return kernels.drifted_kernel(self._g[key], self._t_prog[key], self._nu[key], self.time, self.config.t_drift_ref)

    def advance_time(self, seconds: float) -> None:
        """Move the drift clock forward by ``seconds``."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ConfigError(f"node {self.name!r}: time step must be a finite number >= 0, got {seconds}")
        self.time += float(seconds)
        if self.config.active("drift") and seconds > 0:
            self._refresh()

    # --------------------------------------------------------------------------------- specs
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _scale(self, name: str) -> float:
        """Weight units per microsiemens of pair difference."""
        return (self.w_max if name == "weight" else self.b_max) / self.g_span

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return {key: self._weights[key].reshape(spec.shape) for key, spec in self._specs.items()}

    def _program_exact(self, values: Mapping[str, np.ndarray]) -> None:
        """Program pairs straight to the given weights (already in range and quantized).

        Models a write-verify that reaches the target up to the level grid; stuck devices keep
        their state and drift restarts for every device written. The update buffers are left as
        they are, because they contain updates not yet programmed that still apply after the
        weights are set and restored: perturbative rules set and restore the weights every step,
        and clearing the buffers there would discard every update below one level.
        """
        for name, value in values.items():
            diff = np.clip(np.asarray(value, dtype=np.float64).reshape(-1) / self._scale(name), -self.g_span, self.g_span)
            if self.config.enabled("conductance_levels"):
                diff = np.round(diff / self.level_step_g) * self.level_step_g
            g = self._g[name]
            g[0] = self.config.g_min + np.maximum(diff, 0.0)
            g[1] = self.config.g_min + np.maximum(-diff, 0.0)
            np.minimum(g, self._g_top[name], out=g)
            self._apply_stuck(name)
            self._t_prog[name][...] = self.time
        self._refresh()

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._program_exact(values)
        current = self._read_parameters()
        return {name: current[name] for name in values}

    def _refresh(self) -> None:
        """Recompute the weight caches from the conductances as read now."""
        self._weights = {}
        for key in self._specs:
            g = self._read_conductances(key)
            self._weights[key] = (g[0] - g[1]) * self._scale(key)
        self._w = self._weights["weight"].astype(FLOAT).reshape(self.n_out, self.n_in)
        self._b = self._weights["bias"].astype(FLOAT)

    # ------------------------------------------------------------------------------ forward
    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        cfg = self.config
        if cfg.t_per_batch:
            self.advance_time(cfg.t_per_batch)
        dac_steps = 2 ** (cfg.dac_bits - 1) - 1 if cfg.enabled("dac") else 0
        adc_steps = 2 ** (cfg.adc_bits - 1) - 1 if cfg.enabled("adc") else 0
        noise = cfg.read_noise_std * self.full_scale if cfg.enabled("read_noise") else 0.0
        x_applied = kernels.dac_kernel(x, dac_steps)
        # The product runs in NumPy's BLAS, not in a Numba kernel: np.dot inside Numba calls
        # SciPy's copy of OpenBLAS, and two BLAS thread pools spinning on the same cores made
        # training ten times slower on 2 cores (docs/benchmarks.md, "Training speed").
        a = np.dot(x_applied, self._w.T)
        # Float64 draws, in the order the scalar kernel used to take them, keep old seeds reproducible.
        draws = self.rng.standard_normal(a.shape) if noise > 0 else _NO_NOISE
        kernels.readout_kernel(a, self._b, draws, FLOAT(noise), FLOAT(self.full_scale), cfg.enabled("saturation"),
                               adc_steps)
        y = self.activation.f(a)
        if y is a:  # the linear activation: outputs and probes must not share memory
            y = a.copy()
        return y, x_applied, {"preactivation": a}

    # ------------------------------------------------------------------------------ updates
    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Program a change of the weights and return the change actually programmed.

        Changes are checked against ``max_step`` and the limits like any node's. With the
        ``conductance_levels`` stage on, they then go through the update buffer (``accumulate``)
        or stochastic rounding, so most small changes program nothing at first. Non-ideal devices
        (nonlinear, asymmetric, varying or stuck) realise a different change than requested;
        the returned change is the one programmed.
        """
        self._check_open()
        requests = self._checked_requests(self._read_parameters(), delta, clip)

        cfg = self.config
        if not cfg.enabled("conductance_levels"):
            mode = 0
        elif cfg.update_mode == "accumulate":
            mode = 1
        else:
            mode = 2
        applied = {}
        if self._ideal_devices and not cfg.active("drift"):
            caches32 = {"weight": self._w.reshape(-1), "bias": self._b}
            for name, request in requests.items():
                applied[name] = kernels.update_ideal_kernel(
                    self._g[name], self._buffer[name], self._weights[name], caches32[name],
                    np.ascontiguousarray(request).reshape(-1), self._scale(name), self.level_step_g,
                    float(cfg.max_pulses_per_update), mode, cfg.g_min, cfg.g_max,
                    cfg.enabled("conductance_levels"), self.rng,
                ).reshape(request.shape)
            return applied

        for name, request in requests.items():
            scale = self._scale(name)
            counts = kernels.pulse_counts_kernel(
                self._buffer[name], np.ascontiguousarray(request.reshape(-1) / scale), self.level_step_g,
                float(cfg.max_pulses_per_update), mode, self.rng,
            )
            applied[name] = self._program(name, counts).reshape(request.shape) * scale
        self._refresh()
        return applied

    def _program(self, name: str, counts: np.ndarray) -> np.ndarray:
        """Apply signed pulse counts to the pairs of one parameter; return the change in microsiemens."""
        cfg = self.config
        if self._ideal_devices and not cfg.active("drift"):
            snap = cfg.enabled("conductance_levels")
            return kernels.program_ideal_kernel(self._g[name], counts, cfg.g_min, cfg.g_max, self.level_step_g, snap)

        # Pulses act on the conductance as it is now (drifted); devices that receive a pulse
        # restart their drift, the others keep their programmed value and age.
        stored = self._g[name]
        work = np.array(self._read_conductances(name))
        before = work[0] - work[1]
        t_prog = self._t_prog[name]
        previous_t = t_prog.copy()
        scheme = kernels.SCHEME_BIDIRECTIONAL if cfg.programming == "bidirectional" else kernels.SCHEME_POTENTIATE_ONLY
        kernels.program_pulses_kernel(
            work, counts, cfg.g_min, self._g_top[name], self._step[name], self._stuck[name], scheme,
            cfg.update_nonlinearity if cfg.enabled("update_nonlinearity") else 0.0,
            cfg.update_asymmetry if cfg.enabled("update_asymmetry") else 0.0,
            cfg.step_std if cfg.enabled("cycle_variation") else 0.0,
            t_prog, self.time, self.refreshes, self.rng,
        )
        touched = (t_prog != previous_t) | (counts != 0)[None, :] & (t_prog == self.time)
        stored[touched] = work[touched]
        return (work[0] - work[1]) - before

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
        """Send the error back through the transposed array (the current weights, noise-free)."""
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
        info.update(preset=self.preset, seed=self.seed, activation=self.activation.name, config=cfg)
        return info

    def state_dict(self) -> dict[str, Any]:
        arrays = {
            "g": self._g, "buffer": self._buffer, "g_top": self._g_top, "step": self._step,
            "nu": self._nu, "t_prog": self._t_prog, "stuck": self._stuck,
        }
        state: dict[str, Any] = {key: {k: v.copy() for k, v in table.items()} for key, table in arrays.items()}
        state.update(time=self.time, refreshes=int(self.refreshes[0]), rng=self.rng.bit_generator.state)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tables = ("g", "buffer", "g_top", "step", "nu", "t_prog", "stuck")
        loaded = {}
        for key in tables:
            loaded[key] = {}
            for name in self._specs:
                value = np.asarray(state[key][name])
                expected = getattr(self, f"_{key}")[name]
                if value.shape != expected.shape:
                    raise ConfigError(
                        f"{self._where(name)}: saved {key} has shape {value.shape}, expected {expected.shape}"
                    )
                loaded[key][name] = value.astype(expected.dtype, copy=True)
        for key in tables:
            setattr(self, f"_{key}", loaded[key])
        self.time = float(state["time"])
        self.refreshes[0] = int(state["refreshes"])
        self.rng.bit_generator.state = state["rng"]
        self._refresh()

    def update_buffers(self) -> dict[str, np.ndarray]:
        """Return a copy of each parameter's pending update buffer, in microsiemens."""
        return {key: self._buffer[key].reshape(spec.shape).copy() for key, spec in self._specs.items()}

    def conductances(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Return (g_plus, g_minus) per parameter as read now, in microsiemens."""
        out = {}
        for key, spec in self._specs.items():
            g = self._read_conductances(key)
            out[key] = (g[0].reshape(spec.shape).copy(), g[1].reshape(spec.shape).copy())
        return out
