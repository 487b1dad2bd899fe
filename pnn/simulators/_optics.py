"""Parts shared by the optical nodes: phase parameters, signal encoding, gradients.

Both optical nodes (the interferometer mesh and the diffractive layer) work the same way at
their edges:

- Inputs in [-1, 1] set real field amplitudes (a negative value is a pi phase shift of the
  modulator), after an input DAC. Constant "bias" light enters next to them, so the detected
  intensities contain terms linear in the inputs as well as quadratic ones.
- Each output is a balanced (differential) detection: the power on one detector minus the power
  on its partner, in units of a reference power, so outputs are signed and centred near zero.
  The periphery applies the node's nonlinearity to that difference (the pre-activation).
- The trainable parameters are phase setpoints in radians, within +-``PHASE_TURNS`` turns. A
  phase shifter realises a setpoint modulo 2 pi, so the device applies the setpoint wrapped
  into [0, 2 pi) and training never has to stop at the edge of one turn.
- ``local_gradient`` uses either the adjoint of the ideal model at the measured inputs
  (``"adjoint"``) or simultaneous perturbations of every phase measured on the device
  (``"perturbation"``).

Every kernel in the optical modules works in float64 and complex128.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.linalg
from numba import njit

from ..activations import get_activation
from ..errors import ConfigError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec
from ._stage_settings import StageSettings as _StageSettings

log = logging.getLogger(__name__)

#: Float dtype of every optical signal; fields are complex128.
FLOAT = np.float64

TWO_PI = 2.0 * math.pi

#: Activation codes understood by :func:`_activate`.
ACTIVATION_CODES = {"linear": 0, "tanh": 1, "hardtanh": 2, "sigmoid": 3}

#: The two ways an optical node computes its local gradient.
OPTICAL_GRADIENT_METHODS = ("adjoint", "perturbation")


@njit(cache=True)
def _activate(v, code):
    """Apply the nonlinearity with the given code (see ACTIVATION_CODES) to one value."""
    if code == 1:
        return np.tanh(v)
    if code == 2:
        return min(1.0, max(-1.0, v))
    if code == 3:
        return 0.5 * (1.0 + np.tanh(0.5 * v))
    return v


@njit(cache=True)
def _dac_kernel(x, dac_steps):
    """Round inputs in [-1, 1] to a signed DAC code; dac_steps = 0 passes them through."""
    out = np.empty_like(x)
    batch, n = x.shape
    for i in range(batch):
        for j in range(n):
            v = x[i, j]
            if dac_steps > 0:
                v = np.round(v * dac_steps) / dac_steps
            out[i, j] = v
    return out


def dac_steps(bits: int, enabled: bool) -> int:
    """Return the number of positive codes of a signed DAC with ``bits`` bits (0 when off)."""
    return 2 ** (int(bits) - 1) - 1 if enabled else 0


#: Phase setpoints may range over this many turns either side of zero.
PHASE_TURNS = 16


def phase_spec(shape: tuple[int, ...], levels: int | None, max_step: float, description: str) -> ParameterSpec:
    """Return the spec of a phase setpoint array, quantized to ``levels`` steps per turn if given.

    The limits are +-``PHASE_TURNS`` turns, whole multiples of 2 pi, so the grid
    ``lower + k * resolution`` contains every multiple of the resolution. With levels,
    ``max_step`` is rounded down to whole steps (at least one), so that a change within it never
    rounds to a larger one.
    """
    bound = PHASE_TURNS * TWO_PI
    if levels is None:
        return ParameterSpec(shape, -bound, bound, "rad", max_step=max_step, description=description)
    resolution = TWO_PI / levels
    steps = max(1.0, math.floor(max_step / resolution + 1e-9))
    return ParameterSpec(
        shape, -bound, bound, "rad", resolution=resolution, max_step=steps * resolution, description=description
    )


def wrap_phase(values: np.ndarray, resolution: float) -> np.ndarray:
    """Return phases wrapped into [0, 2 pi), on the grid ``k * resolution`` when it is positive."""
    array = np.ascontiguousarray(values, dtype=FLOAT)
    levels = round(TWO_PI / resolution) if resolution > 0 else 0
    return _wrap_kernel(array.ravel(), float(resolution), levels).reshape(array.shape)


@njit(cache=True)
def _wrap_kernel(values, resolution, levels):
    """Wrap flat phases into [0, 2 pi) and, when levels > 0, round them to the phase grid."""
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        v = values[i] % TWO_PI
        if levels > 0:
            v = (np.round(v / resolution) % levels) * resolution
        out[i] = v
    return out


def perturbation_codes(n_params: int, samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Return +-1 perturbation codes of shape (n_codes, n_params).

    With ``samples=None`` the codes are the first ``n_params`` columns of a Sylvester Hadamard
    matrix of the next power-of-two order, so the columns are orthogonal and the estimate
    ``mean_k(dL_k * code_k)`` equals the gradient to first order in the perturbation. With a
    number of samples, the codes are random signs (simultaneous perturbation stochastic
    approximation), an unbiased estimate whose variance grows with ``n_params / samples``.
    """
    if samples is None:
        order = 1 << max(0, (n_params - 1).bit_length())
        return scipy.linalg.hadamard(order).astype(FLOAT)[:, :n_params].copy()
    return rng.choice(np.array([-1.0, 1.0]), size=(int(samples), n_params))


def check_positive(owner: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number above zero (or zero if allowed)."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{owner} {name} must be a finite number {bound}, got {value}")


def check_bits(owner: str, name: str, value: int, low: int = 2, high: int = 24) -> None:
    """Raise ConfigError unless ``value`` is an integer bit count in [low, high]."""
    if int(value) != value or not low <= value <= high:
        raise ConfigError(f"{owner} {name} must be an integer between {low} and {high}, got {value}")


class StageConfigMixin(_StageSettings):
    """The shared stage handling, plus the checks of the optical gradient settings."""

    def _check_gradient_settings(self) -> None:
        method = getattr(self, "gradient_method")
        if method not in OPTICAL_GRADIENT_METHODS:
            raise ConfigError(
                f"{self._owner} gradient_method must be one of {OPTICAL_GRADIENT_METHODS}, got {method!r}"
            )
        check_positive(self._owner, "perturbation_phase", getattr(self, "perturbation_phase"))
        samples = getattr(self, "perturbation_samples")
        if samples is not None and (int(samples) != samples or samples < 1):
            raise ConfigError(f"{self._owner} perturbation_samples must be None or an integer >= 1, got {samples}")


class OpticalNode(Node):
    """Base class of the optical nodes: phase setpoints, accumulated updates and gradients.

    Subclasses set ``self._specs`` and ``self.phases`` (dict of name to float64 array) and
    implement :meth:`_measure` (the device with all enabled stages, for given phases) and
    :meth:`_model_gradient` (the adjoint of the ideal model).
    """

    has_input_gradient = True
    has_preactivation = True

    def __init__(
        self,
        name: str,
        n_in: int,
        n_out: int,
        *,
        activation: str,
        config: Any,
        rng: np.random.Generator | int | None,
        preset: str | None,
        output_unit: str,
    ) -> None:
        super().__init__(
            name,
            n_in,
            n_out,
            input_spec=ParameterSpec(
                (int(n_in),), -1.0, 1.0, "1", description="input field amplitude, relative to full scale"
            ),
            output_unit=output_unit,
            dtype=FLOAT,
        )
        if activation not in ACTIVATION_CODES:
            raise ConfigError(
                f"node {name!r}: unknown optical activation {activation!r}; choose one of {', '.join(ACTIVATION_CODES)}"
            )
        self.config = config
        self.preset = preset
        self.activation = get_activation(activation)
        self._activation_code = ACTIVATION_CODES[activation]
        self.gradient_method = config.gradient_method
        self.seed = rng if isinstance(rng, (int, np.integer)) else None
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._specs: dict[str, ParameterSpec] = {}
        #: Phase setpoints on the phase grid, by parameter name (the parameter values).
        self.setpoints: dict[str, np.ndarray] = {}
        #: Phases on the device: the setpoints wrapped into [0, 2 pi), by parameter name.
        self.phases: dict[str, np.ndarray] = {}
        # Requested setpoints in float64; the device shows them rounded to its phase grid.
        self._targets: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _measure(self, x_applied: np.ndarray, phases: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run the device at the given phases; return (pre-activation, outputs), each (batch, n_out)."""

    @abstractmethod
    def _model_gradient(
        self, x_applied: np.ndarray, delta: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Return (summed phase gradients, per-example input gradient) of sum(delta * a) in the ideal model."""

    def _phases_changed(self) -> None:
        """Recompute whatever depends on the phases (transfer matrices)."""

    def _dac_steps(self) -> int:
        return dac_steps(self.config.input_dac_bits, self.config.enabled("input_dac"))

    def _saturated(self, a: np.ndarray) -> np.ndarray | None:
        """Boolean mask of pre-activations clipped by the readout, or None when nothing clips."""
        return None

    # ---------------------------------------------------------------------------- parameters
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self.setpoints.items()}

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in values.items():
            spec = self._specs[name]
            target = np.array(value, dtype=FLOAT)
            self._targets[name] = target
            self.setpoints[name] = spec.quantize(target)
            self.phases[name] = np.ascontiguousarray(wrap_phase(self.setpoints[name], spec.resolution))
        self._phases_changed()
        return {name: self.setpoints[name].copy() for name in values}

    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Add ``delta`` to the phases and return the change actually applied.

        Each change is checked against ``max_step`` and the result against the limits (it
        raises, or is clipped if ``clip``); nothing is written when it raises. The controller
        keeps every requested setpoint in float64 and the device shows it rounded to its phase
        grid, so changes smaller than one step add up over updates instead of being lost.
        """
        self._check_open()
        current = self._read_parameters()
        targets = {}
        for name, value in self._known(delta).items():
            spec = self._specs[name]
            step = spec.check_shape(value, self._where(name))
            limited = spec.check_step(step, self._where(name), clip=clip)
            target = spec.check_range(self._targets[name] + limited, self._where(name), clip=clip)
            if clip:
                self._count_clips(name, self._targets[name] + step, target)
            targets[name] = target
        applied = self._write_parameters(targets)
        return {name: applied[name] - current[name] for name in applied}

    # ------------------------------------------------------------------------------- forward
    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        x_applied = _dac_kernel(x, self._dac_steps())
        a, y = self._measure(x_applied, self.phases)
        return y, x_applied, {"preactivation": a}

    # ------------------------------------------------------------------------------ learning
    def _preactivation_error(self, state: NodeState, error: np.ndarray, at: ErrorSite) -> np.ndarray:
        a = np.asarray(state.probes["preactivation"], dtype=FLOAT)
        delta = error * self.activation.df(a) if at == "output" else error
        saturated = self._saturated(a)
        if saturated is not None:
            # A clipped reading does not move when the phases move a little, so it has no gradient.
            delta = delta * ~saturated
        return delta

    def local_gradient(
        self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output"
    ) -> dict[str, np.ndarray]:
        """Return the batch-mean gradient of the loss with respect to every phase, in 1/rad.

        ``gradient_method="adjoint"`` differentiates the ideal model (no crosstalk, ideal
        splitters, no loss, no noise) at the measured inputs, with the nonlinearity's derivative
        taken at the measured pre-activation. ``gradient_method="perturbation"`` measures
        ``sum(error * output)`` on the device while every phase is perturbed by +-
        ``perturbation_phase`` with orthogonal (or random) sign codes, and correlates the
        central differences with the codes. It needs ``2 * n_codes`` extra device runs of the
        batch and leaves the node's measured state unchanged.
        """
        error = self.check_error(state, output_error, at=at)
        x_applied = np.ascontiguousarray(state.inputs, dtype=FLOAT)
        batch = error.shape[0]
        if self.gradient_method == "adjoint":
            delta = self._preactivation_error(state, error, at)
            grads, _ = self._model_gradient(x_applied, np.ascontiguousarray(delta, dtype=FLOAT))
            return {name: grad / batch for name, grad in grads.items()}
        return self._perturbation_gradient(x_applied, error, at)

    def _perturbation_gradient(self, x_applied: np.ndarray, error: np.ndarray, at: ErrorSite) -> dict[str, np.ndarray]:
        cfg = self.config
        names = list(self._specs)
        sizes = [self._specs[name].shape for name in names]
        counts = [int(np.prod(shape)) for shape in sizes]
        flat = np.concatenate([self.phases[name].ravel() for name in names])
        codes = perturbation_codes(flat.size, cfg.perturbation_samples, self.rng)

        # The device only realises phases on its grid, so perturb by whole steps.
        resolution = max(self._specs[name].resolution for name in names)
        step = cfg.perturbation_phase
        if resolution > 0:
            step = max(1.0, round(step / resolution)) * resolution
        estimate = self._perturbation_estimate(x_applied, error, at, flat, codes, step)

        # The perturbed runs may change cached transfer matrices; restore the current ones.
        self._phases_changed()
        grads = {}
        start = 0
        for name, shape, count in zip(names, sizes, counts):
            grads[name] = estimate[start : start + count].reshape(shape)
            start += count
        return grads

    def _perturbation_estimate(
        self, x_applied: np.ndarray, error: np.ndarray, at: ErrorSite, flat: np.ndarray, codes: np.ndarray, step: float
    ) -> np.ndarray:
        """Return mean_k(code_k * central difference_k / (2 step)) over the codes, shape (n_params,).

        ``flat`` contains every phase, parameter after parameter, and each code perturbs it by
        +-``step``; every perturbed pair is measured on the device, the + run first.
        """
        names = list(self._specs)
        batch = error.shape[0]

        def measured_loss(phases_flat: np.ndarray) -> float:
            phases = {}
            start = 0
            for name in names:
                spec = self._specs[name]
                count = int(np.prod(spec.shape))
                phases[name] = wrap_phase(phases_flat[start : start + count].reshape(spec.shape), spec.resolution)
                start += count
            a, y = self._measure(x_applied, phases)
            signal = a if at == "preactivation" else y
            return float(np.sum(error * signal)) / batch

        estimate = np.zeros(flat.size)
        for code in codes:
            change = measured_loss(flat + step * code) - measured_loss(flat - step * code)
            estimate += (change / (2.0 * step)) * code
        return estimate / codes.shape[0]

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Send an output error back to the inputs through the ideal model, per example."""
        error = self.check_error(state, output_error)
        delta = self._preactivation_error(state, error, "output")
        x_applied = np.ascontiguousarray(state.inputs, dtype=FLOAT)
        _, grad_x = self._model_gradient(x_applied, np.ascontiguousarray(delta, dtype=FLOAT))
        return grad_x

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Multiply the error by the nonlinearity's derivative at the measured pre-activation.

        Readings clipped by the readout get no error, as in :meth:`local_gradient`.
        """
        return self._preactivation_error(state, self.check_error(state, output_error), "output")

    # ----------------------------------------------------------------------------- lifecycle
    def identity(self) -> dict[str, Any]:
        info = super().identity()
        cfg = dataclasses.asdict(self.config)
        cfg["disabled"] = sorted(self.config.disabled)
        info.update(
            preset=self.preset,
            seed=self.seed,
            activation=self.activation.name,
            gradient_method=self.gradient_method,
            config=cfg,
        )
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "parameters": self.get_parameters(),
            "targets": {name: value.copy() for name, value in self._targets.items()},
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = state.get("parameters", {})
        for name, spec in self._specs.items():
            value = np.asarray(params[name], dtype=FLOAT)
            if value.shape != spec.shape:
                raise ConfigError(f"{self._where(name)}: saved phases have shape {value.shape}, expected {spec.shape}")
        self.set_parameters(params)
        if "targets" in state:
            self._write_parameters({name: np.asarray(state["targets"][name], dtype=FLOAT) for name in self._specs})
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
