"""The node interface: one physical or digital stage of a network.

Every learning rule talks to nodes only through :class:`Node`, so a rule that trains a simulated
crossbar trains an instrument node unchanged. A node declares its trainable parameters with
:class:`ParameterSpec` (limits, resolution, maximum change per update, unit, safe value), and
every write goes through that spec: an out-of-range request raises :class:`~pnn.errors.LimitError`
before anything reaches the device, unless the caller asks for clipping, which is then logged.

Conventions shared by all nodes:

- Signals are arrays of shape (batch, n_in) in, (batch, n_out) out, in the node's declared units.
- ``output_error`` is the per-example derivative of the loss with respect to the node's outputs,
  array of shape (batch, n_out); :meth:`Node.local_gradient` returns the batch-mean gradient of
  the loss with respect to each parameter, so a descent step is ``-lr * gradient``.
- :meth:`Node.apply_update` returns the change that was actually applied, and
  :meth:`Node.set_parameters` returns the values that were actually applied, both after
  quantization to the parameter's resolution.
"""

from __future__ import annotations

import functools
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, LimitError, PnnError

__all__ = ["ParameterSpec", "NodeState", "Node", "GRADIENT_METHODS", "ErrorSite"]

log = logging.getLogger(__name__)

#: How a node turns an output error into a parameter gradient.
#:
#: - ``exact``: the node is digital and computes the true gradient.
#: - ``outer-product``: the error times the applied input, as a crossbar computes in place.
#: - ``adjoint``: the adjoint (transpose) of the node's ideal or calibrated model.
#: - ``perturbation``: in-situ perturbation of the parameters, measured on the device.
#: - ``none``: the node has no trainable parameters.
GRADIENT_METHODS = ("exact", "outer-product", "adjoint", "perturbation", "none")

#: Where an error signal given to :meth:`Node.local_gradient` sits: at the node's outputs (the
#: node applies the derivative of its own nonlinearity) or at its pre-activation (the caller has
#: already applied a derivative, or a stand-in for it as augmented DFA does).
ErrorSite = Literal["output", "preactivation"]


def _as_float_array(values: Any, where: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: expected numbers, got {type(values).__name__} ({exc})") from None
    return array


@dataclass(frozen=True)
class ParameterSpec:
    """Limits and units of one trainable parameter array of a node.

    Parameters
    ----------
    shape
        Shape of the parameter array.
    lower, upper
        Smallest and largest allowed value, in ``unit``. A scalar applies to every element; an
        array must broadcast to ``shape`` and sets per-element limits (for example one DAC
        channel with a narrower range than the others).
    unit
        Physical unit of the values, for example ``"V"``, ``"rad"``, or ``"1"`` for a
        dimensionless weight.
    resolution
        Smallest step the device can realise (DAC step or conductance level), in ``unit``; values
        are rounded to the grid ``lower + k * resolution``. Zero means continuous.
    max_step
        Largest change of one element that :meth:`Node.apply_update` accepts in one update, in
        ``unit``. Instrument nodes also ramp :meth:`Node.set_parameters` in steps no larger than
        this. ``inf`` means no limit.
    safe_value
        Value applied by :meth:`Node.apply_safe_state` on exit, on error and on Ctrl-C; ``None``
        when the node has no safe value of its own (simulators).
    description
        One line saying what the parameter is.
    """

    shape: tuple[int, ...]
    lower: float | np.ndarray
    upper: float | np.ndarray
    unit: str
    resolution: float = 0.0
    max_step: float = math.inf
    safe_value: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if any(s <= 0 for s in shape):
            raise ConfigError(f"parameter shape {shape} has a dimension below 1")
        object.__setattr__(self, "shape", shape)
        lower = np.broadcast_to(np.asarray(self.lower, dtype=np.float64), shape)
        upper = np.broadcast_to(np.asarray(self.upper, dtype=np.float64), shape)
        if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
            raise ConfigError("parameter limits must be finite numbers")
        if np.any(lower > upper):
            raise ConfigError(
                f"parameter lower limit {lower.min():g} is above its upper limit {upper.max():g}"
            )
        if not (self.resolution >= 0 and math.isfinite(self.resolution)):
            raise ConfigError(f"parameter resolution must be finite and >= 0, got {self.resolution}")
        if not self.max_step > 0:
            raise ConfigError(f"parameter max_step must be > 0, got {self.max_step}")
        if self.safe_value is not None and (
            np.any(self.safe_value < lower) or np.any(self.safe_value > upper)
        ):
            raise ConfigError(
                f"safe value {self.safe_value} lies outside the limits "
                f"[{lower.min():g}, {upper.max():g}] {self.unit}"
            )

    # Scalar views of the limits, for messages and for kernels that take one range. They are
    # computed once, because instrument nodes read them several times per update; the broadcast
    # views are read-only, so sharing them is safe.
    @functools.cached_property
    def lower_array(self) -> np.ndarray:
        """Lower limit broadcast to ``shape``."""
        return np.broadcast_to(np.asarray(self.lower, dtype=np.float64), self.shape)

    @functools.cached_property
    def upper_array(self) -> np.ndarray:
        """Upper limit broadcast to ``shape``."""
        return np.broadcast_to(np.asarray(self.upper, dtype=np.float64), self.shape)

    def range_text(self) -> str:
        """Return the allowed range as text, for error messages."""
        lo, hi = self.lower_array, self.upper_array
        lo_text = f"{lo.min():g}" if np.all(lo == lo.flat[0]) else f"{lo.min():g}..{lo.max():g}"
        hi_text = f"{hi.max():g}" if np.all(hi == hi.flat[0]) else f"{hi.min():g}..{hi.max():g}"
        unit = "" if self.unit in ("", "1") else f" {self.unit}"
        return f"[{lo_text}, {hi_text}]{unit}"

    def tolerance(self) -> float:
        """Slack allowed at the limits for floating-point rounding (1e-6 of the span)."""
        lower, upper = np.asarray(self.lower), np.asarray(self.upper)
        if lower.ndim == 0 and upper.ndim == 0:
            span = float(upper - lower)
        else:
            span = float(np.max(self.upper_array - self.lower_array))
        return 1e-6 * max(span, 1e-12)

    def check_shape(self, values: Any, where: str) -> np.ndarray:
        """Return ``values`` as a float64 array of this shape, or raise ConfigError."""
        array = _as_float_array(values, where)
        if array.shape != self.shape:
            raise ConfigError(f"{where}: expected shape {self.shape}, got {array.shape}")
        if not np.all(np.isfinite(array)):
            count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise LimitError(f"{where}: {count} value(s) are NaN or infinite; send finite values")
        return array

    def check_range(self, values: np.ndarray, where: str, *, clip: bool = False) -> np.ndarray:
        """Return ``values`` if they lie within the limits, clipped copies if ``clip``.

        Raises
        ------
        LimitError
            If a value lies outside the limits and ``clip`` is false.
        """
        lo, hi = self.lower_array, self.upper_array
        tol = self.tolerance()
        below = values < lo - tol
        above = values > hi + tol
        n_out = int(np.count_nonzero(below) + np.count_nonzero(above))
        if n_out == 0:
            return np.clip(values, lo, hi)
        worst = values[below | above]
        worst_value = float(worst[np.argmax(np.abs(worst))])
        if not clip:
            raise LimitError(
                f"{where}: {n_out} value(s) outside the allowed range {self.range_text()}, "
                f"for example {worst_value:g}; send values inside the range, or pass clip=True "
                "to clip them (every clip is logged)"
            )
        log.debug("%s: clipped %d value(s) into %s (worst %g)", where, n_out, self.range_text(), worst_value)
        return np.clip(values, lo, hi)

    def check_step(self, delta: np.ndarray, where: str, *, clip: bool = False) -> np.ndarray:
        """Return ``delta`` if no element exceeds ``max_step``, or a clipped copy if ``clip``."""
        if math.isinf(self.max_step):
            return delta
        limit = self.max_step * (1 + 1e-9)
        too_big = np.abs(delta) > limit
        n_big = int(np.count_nonzero(too_big))
        if n_big == 0:
            return delta
        worst = float(delta[too_big][np.argmax(np.abs(delta[too_big]))])
        if not clip:
            raise LimitError(
                f"{where}: {n_big} change(s) larger than the maximum change per update "
                f"{self.max_step:g} {self.unit}, for example {worst:g}; lower the learning rate, "
                "or pass clip=True to limit each change (every clip is logged)"
            )
        log.debug("%s: limited %d change(s) to +-%g %s (worst %g)", where, n_big, self.max_step, self.unit, worst)
        return np.clip(delta, -self.max_step, self.max_step)

    def check_update(
        self, current: np.ndarray, delta: np.ndarray, where: str, *, clip: bool = False
    ) -> tuple[np.ndarray, int]:
        """Return the change allowed by ``max_step`` and the limits, and how many were clipped.

        ``current`` and ``delta`` are float64 arrays of this shape (``delta`` already checked
        by :meth:`check_shape`). Raises LimitError like :meth:`check_step` and
        :meth:`check_range` when ``clip`` is false; nothing is returned then.
        """
        lower, upper = np.asarray(self.lower), np.asarray(self.upper)
        if lower.ndim or upper.ndim:
            # Per-element limits: the general NumPy path.
            limited = self.check_step(delta, where, clip=clip)
            target = self.check_range(current + limited, where, clip=clip)
            return target - current, int(np.count_nonzero(target != current + delta))
        from ._validation_kernels import update_check_kernel  # noqa: PLC0415 - loads Numba on first use

        out = np.empty(delta.size)
        n_step, n_range, n_changed, worst_step, worst_target = update_check_kernel(
            np.ascontiguousarray(current, dtype=np.float64).reshape(-1), np.ascontiguousarray(delta).reshape(-1),
            float(lower), float(upper), float(self.max_step), self.tolerance(), clip, out,
        )
        if not clip and n_step:
            raise LimitError(
                f"{where}: {n_step} change(s) larger than the maximum change per update "
                f"{self.max_step:g} {self.unit}, for example {worst_step:g}; lower the learning rate, "
                "or pass clip=True to limit each change (every clip is logged)"
            )
        if not clip and n_range:
            raise LimitError(
                f"{where}: {n_range} value(s) outside the allowed range {self.range_text()}, "
                f"for example {worst_target:g}; send values inside the range, or pass clip=True "
                "to clip them (every clip is logged)"
            )
        if n_changed:
            log.debug("%s: clipped %d change(s) to the step limit and range %s", where, n_changed, self.range_text())
        return out.reshape(self.shape), int(n_changed)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Round ``values`` to the nearest level ``lower + k * resolution`` inside the limits."""
        if self.resolution == 0:
            return values
        lo, hi = self.lower_array, self.upper_array
        levels = np.round((values - lo) / self.resolution)
        # The top of the range may not sit on the grid; stay on the last level inside it.
        top = np.floor((hi - lo) / self.resolution + 1e-9)
        return lo + np.clip(levels, 0, top) * self.resolution


@dataclass(frozen=True)
class NodeState:
    """What a node exposes about its last forward pass.

    Attributes
    ----------
    inputs
        Inputs as applied to the device (after DAC quantization, for example), array of shape
        (batch, n_in).
    outputs
        Outputs as measured, array of shape (batch, n_out).
    probes
        Internal measurements the hardware offers, by name, each with a leading batch axis; for
        example ``"preactivation"``, the column signal before the node's nonlinearity.
    """

    inputs: np.ndarray
    outputs: np.ndarray
    probes: Mapping[str, np.ndarray] = field(default_factory=dict)

    def invalid_reason(self) -> str | None:
        """Return why this measurement must not be used for an update, or None if it is valid."""
        for label, array in (("outputs", self.outputs), *self.probes.items()):
            if not np.all(np.isfinite(array)):
                bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                return f"{label} contain {bad} NaN or infinite value(s)"
        return None

    @property
    def valid(self) -> bool:
        """True when every measured value is finite."""
        return self.invalid_reason() is None

    @property
    def batch_size(self) -> int:
        """Number of examples in the measurement."""
        return int(self.outputs.shape[0])


class Node(ABC):
    """One stage of a physical network, simulated, digital or a real instrument.

    Subclasses implement :meth:`_forward`, :meth:`_read_parameters` and
    :meth:`_write_parameters`, and declare ``gradient_method``; the public methods here validate
    every request against the declared specs before a subclass sees it.

    Parameters
    ----------
    name
        Name used in messages, logs and the run record.
    n_in, n_out
        Number of input and output channels.
    input_spec
        Limits and unit of the input signal, shape (n_in,); inputs outside it raise
        :class:`~pnn.errors.LimitError` in :meth:`forward`.
    output_unit
        Unit of the measured outputs.
    dtype
        Float dtype of the signals the node returns.
    """

    #: How :meth:`local_gradient` works; one of :data:`GRADIENT_METHODS`.
    gradient_method: str = "none"
    #: True when :meth:`input_gradient` can send an error back through the node (a digital node,
    #: or a physical node with a model of itself).
    has_input_gradient: bool = False
    #: True when :meth:`local_gradient` accepts errors at the pre-activation.
    has_preactivation: bool = False
    #: True when the node relaxes to an equilibrium and offers ``settle(inputs, nudge=None)``,
    #: which returns the free or weakly clamped equilibrium state for equilibrium propagation.
    can_settle: bool = False

    def __init__(
        self,
        name: str,
        n_in: int,
        n_out: int,
        *,
        input_spec: ParameterSpec,
        output_unit: str,
        dtype: type = np.float64,
    ) -> None:
        for label, value in (("n_in", n_in), ("n_out", n_out)):
            if int(value) != value or value < 1:
                raise ConfigError(f"node {name!r}: {label} must be a positive integer, got {value!r}")
        if input_spec.shape != (int(n_in),):
            raise ConfigError(f"node {name!r}: input_spec shape {input_spec.shape} does not match n_in={n_in}")
        self.name = str(name)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        self.input_spec = input_spec
        self.output_unit = output_unit
        self.dtype = np.dtype(dtype)
        #: Count of clipped elements per parameter since the last :meth:`pop_limit_events`.
        self.limit_events: Counter[str] = Counter()
        self._state: NodeState | None = None
        self._closed = False

    # ----------------------------------------------------------------------------------- specs
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        """Trainable parameters by name; empty for a node with nothing to train."""
        return {}

    @property
    def trainable(self) -> bool:
        """True when the node has at least one trainable parameter."""
        return bool(self.parameters)

    def _where(self, parameter: str | None = None) -> str:
        if parameter is None:
            return f"node {self.name!r}"
        return f"node {self.name!r} parameter {parameter!r}"

    # --------------------------------------------------------------------------------- forward
    def check_inputs(self, inputs: Any, *, clip: bool = False) -> np.ndarray:
        """Validate an input batch and return it as a contiguous array of the node's dtype."""
        where = f"node {self.name!r} input"
        array = inputs if isinstance(inputs, np.ndarray) and inputs.dtype.kind == "f" else _as_float_array(inputs, where)
        if array.ndim != 2 or array.shape[1] != self.n_in:
            raise ConfigError(
                f"{where}: expected an array of shape (batch, {self.n_in}), got {array.shape}; "
                "reshape a single example with x[None, :]"
            )
        if array.shape[0] == 0:
            raise ConfigError(f"{where}: the batch is empty")
        spec = self.input_spec
        if np.ndim(spec.lower) == 0 and np.ndim(spec.upper) == 0 and np.isfinite(np.sum(array, dtype=np.float64)):
            # Fast path for scalar limits: a finite sum means every value is finite, and two
            # reductions show whether any value needs the slow path's clipping or error.
            if float(array.min()) >= float(spec.lower) and float(array.max()) <= float(spec.upper):
                return np.array(array, dtype=self.dtype, order="C", copy=True)
        if not np.all(np.isfinite(array)):
            raise LimitError(f"{where}: contains NaN or infinite values; send finite inputs")
        lo, hi = self.input_spec.lower_array, self.input_spec.upper_array
        tol = self.input_spec.tolerance()
        outside = (array < lo - tol) | (array > hi + tol)
        if np.any(outside):
            worst = float(array[outside][np.argmax(np.abs(array[outside]))])
            if not clip:
                raise LimitError(
                    f"{where}: {int(outside.sum())} value(s) outside {self.input_spec.range_text()}, "
                    f"for example {worst:g}; scale the signal into range (an encoder does this)"
                )
            log.debug("%s: clipped %d input value(s) into %s", where, int(outside.sum()), self.input_spec.range_text())
        array = np.clip(array, lo, hi)
        return np.ascontiguousarray(array, dtype=self.dtype)

    def forward(self, inputs: Any) -> np.ndarray:
        """Apply an input batch and return the measured outputs.

        Parameters
        ----------
        inputs
            Array of shape (batch, n_in), within ``input_spec``.

        Returns
        -------
        numpy.ndarray
            Measured outputs, array of shape (batch, n_out). An invalid measurement (NaN for an
            overrange reading, say) is returned as is and flagged by :meth:`NodeState.valid`.
        """
        self._check_open()
        x = self.check_inputs(inputs)
        outputs, applied, probes = self._forward(x)
        self._state = NodeState(inputs=applied, outputs=outputs, probes=probes)
        return outputs

    def measure_state(self) -> NodeState:
        """Return the state of the last forward pass: inputs as applied, outputs, probes."""
        if self._state is None:
            raise PnnError(f"{self._where()}: no forward pass yet, so there is no state to measure")
        return self._state

    def describe_invalid(self, state: NodeState) -> str | None:
        """Return why ``state`` must not be used for an update, or None if it is valid.

        Nodes that know where a reading came from (an instrument channel) add that.
        """
        return state.invalid_reason()

    @abstractmethod
    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Run the device on validated inputs; return (outputs, inputs as applied, probes)."""

    # ------------------------------------------------------------------------------ parameters
    def get_parameters(self) -> dict[str, np.ndarray]:
        """Return a copy of every parameter's current value, in its unit."""
        return {name: np.array(value, dtype=np.float64) for name, value in self._read_parameters().items()}

    def set_parameters(self, values: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Set some or all parameters and return the values actually applied.

        Values are checked against each :class:`ParameterSpec` and quantized to its resolution.

        Raises
        ------
        LimitError
            If a value lies outside its limits and ``clip`` is false; nothing is written.
        ConfigError
            For an unknown parameter name or a wrong shape.
        """
        self._check_open()
        targets = {}
        for name, value in self._known(values).items():
            spec = self.parameters[name]
            array = spec.check_shape(value, self._where(name))
            array = spec.check_range(array, self._where(name), clip=clip)
            if clip:
                self._count_clips(name, value, array)
            targets[name] = spec.quantize(array)
        return self._write_parameters(targets)

    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Add ``delta`` to the parameters and return the change actually applied.

        Each change is checked against ``max_step`` and the result against the limits before
        anything is written; the result is then quantized to the parameter's resolution, so a
        change smaller than half a step is lost (nodes with an update buffer override this).

        Raises
        ------
        LimitError
            If a change is larger than ``max_step`` or the result leaves the limits, and ``clip``
            is false; nothing is written.
        """
        self._check_open()
        current = self._read_parameters()
        targets = {}
        for name, request in self._checked_requests(current, delta, clip).items():
            targets[name] = self.parameters[name].quantize(current[name] + request)
        applied = self._write_parameters(targets)
        return {name: applied[name] - current[name] for name in applied}

    def _checked_requests(
        self, current: Mapping[str, np.ndarray], delta: Mapping[str, Any], clip: bool
    ) -> dict[str, np.ndarray]:
        """Check every requested change before anything is written; return the allowed changes."""
        requests = {}
        for name, value in self._known(delta).items():
            spec = self.parameters[name]
            step = spec.check_shape(value, self._where(name))
            request, clipped = spec.check_update(np.asarray(current[name], dtype=np.float64), step, self._where(name), clip=clip)
            if clipped:
                self.limit_events[name] += clipped
            requests[name] = request
        return requests

    def _known(self, values: Mapping[str, Any]) -> Mapping[str, Any]:
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{self._where()}: parameters must be a mapping of name to array, got {type(values).__name__}"
            )
        unknown = sorted(set(values) - set(self.parameters))
        if unknown:
            raise ConfigError(
                f"{self._where()}: unknown parameter(s) {unknown}; this node has {sorted(self.parameters)}"
            )
        return values

    def _count_clips(self, name: str, requested: Any, applied: np.ndarray) -> None:
        changed = int(np.count_nonzero(np.asarray(requested, dtype=np.float64) != applied))
        if changed:
            self.limit_events[name] += changed

    def pop_limit_events(self) -> dict[str, int]:
        """Return and reset the count of clipped elements per parameter."""
        events = dict(self.limit_events)
        self.limit_events.clear()
        return events

    def _read_parameters(self) -> dict[str, np.ndarray]:
        """Return the current parameter arrays (subclasses with parameters override this)."""
        return {}

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write validated, quantized values; return the values now on the device."""
        if values:
            raise ConfigError(f"{self._where()} has no parameters to write")
        return {}

    # ---------------------------------------------------------------------------- safe state
    def apply_safe_state(self) -> None:
        """Set every parameter that declares a safe value to it (instrument nodes override)."""
        safe = {
            name: np.full(spec.shape, spec.safe_value)
            for name, spec in self.parameters.items()
            if spec.safe_value is not None
        }
        if safe and not self._closed:
            self._write_parameters(safe)

    # ------------------------------------------------------------------------------ learning
    def local_gradient(
        self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output"
    ) -> dict[str, np.ndarray]:
        """Turn an error at the node's outputs into the batch-mean gradient of each parameter.

        Parameters
        ----------
        state
            The node's state from the forward pass the error belongs to.
        output_error
            Array of shape (batch, n_out): the per-example loss derivative with respect to the
            outputs (``at="output"``), or with respect to the pre-activation
            (``at="preactivation"``, only where ``has_preactivation`` is true).

        Returns
        -------
        dict of str to numpy.ndarray
            Gradient per parameter, each shaped like the parameter.
        """
        raise PnnError(f"{self._where()} has no trainable parameters, so it has no local gradient")

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Send an output error back to the inputs through the node's model.

        Only nodes with ``has_input_gradient`` implement this; backprop and feedback alignment
        through a node need it.
        """
        raise PnnError(
            f"{self._where()} ({type(self).__name__}) has no model to send an error back to its inputs"
        )

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Turn an error at the outputs into the per-example error at the pre-activation.

        Returns the array of shape (batch, n_out) that :meth:`local_gradient` would use with
        ``at="preactivation"``: the output error times the derivative of the node's nonlinearity
        at the measured pre-activation. Feedback alignment sends this signal through its feedback
        matrix. Nodes with ``has_preactivation`` implement this.
        """
        raise PnnError(
            f"{self._where()} ({type(self).__name__}) exposes no pre-activation, so it cannot "
            "turn an output error into a pre-activation error"
        )

    def check_error(self, state: NodeState, output_error: Any, *, at: ErrorSite = "output") -> np.ndarray:
        """Validate an error array against a state; return it as float64."""
        error = np.asarray(output_error, dtype=np.float64)
        if error.shape != state.outputs.shape:
            raise ConfigError(
                f"{self._where()}: error of shape {error.shape} does not match the outputs {state.outputs.shape}"
            )
        if at == "preactivation" and not self.has_preactivation:
            raise ConfigError(f"{self._where()} ({type(self).__name__}) exposes no pre-activation")
        if at not in ("output", "preactivation"):
            raise ConfigError(f"error site must be 'output' or 'preactivation', got {at!r}")
        return error

    # ---------------------------------------------------------------------------- lifecycle
    def identity(self) -> dict[str, Any]:
        """Return what identifies this node in a run record (kind, settings, seed or serial)."""
        return {"name": self.name, "kind": type(self).__name__, "n_in": self.n_in, "n_out": self.n_out}

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to restore the node exactly (parameters, buffers, RNG)."""
        return {"parameters": self.get_parameters()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        params = state.get("parameters", {})
        if params:
            self.set_parameters(params)

    def close(self) -> None:
        """Release the device; further calls raise. Closing twice is allowed."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise PnnError(f"{self._where()} is closed")

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}{v.shape}" for k, v in self.parameters.items()) or "no parameters"
        return f"<{type(self).__name__} {self.name!r}: {self.n_in} -> {self.n_out}, {params}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Show the node's limits and units in IPython, one line per signal and parameter."""
        if cycle:
            printer.text(repr(self))
            return
        output_unit = "" if self.output_unit in ("", "1") else f" in {self.output_unit}"
        lines = [
            repr(self),
            f"  gradient   {self.gradient_method}",
            f"  inputs     {self.n_in} channel(s) in {self.input_spec.range_text()}",
            f"  outputs    {self.n_out} channel(s){output_unit}",
        ]
        for name, spec in self.parameters.items():
            step = f", step {spec.resolution:g}" if spec.resolution else ""
            lines.append(f"  parameter  {name} {spec.shape} in {spec.range_text()}{step}")
        printer.text("\n".join(lines))
