"""Nodes that wrap another node and change one thing about it.

:class:`NodeWrapper` passes every call to the wrapped node: parameters, updates, limits, safe
state, identity and state. Subclasses change how readings or gradients are formed:

- :class:`CalibratedNode` corrects each reading with a per-channel gain and offset. The network
  then receives the response the node had at its baseline calibration, even after the read-out
  chain drifts (see :mod:`pnn.calibration.drift`).
- :class:`~pnn.calibration.twin.TwinGradientNode` computes gradients through a digital twin.
- :class:`~pnn.calibration.injection.OutputDrift` simulates a drifting read-out chain.

A wrapper reports the wrapped node's identity unchanged, so calibration records of the wrapped
node match the wrapper too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, PnnError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec

if TYPE_CHECKING:
    from .twin import DigitalTwin

__all__ = ["NodeWrapper", "CalibratedNode"]


class NodeWrapper(Node):
    """A node that delegates to another node.

    Parameters
    ----------
    node
        The wrapped node. Attributes the wrapper does not define (a simulator's ``config`` or
        ``advance_time``, say) are read from it.
    """

    def __init__(self, node: Node) -> None:
        super().__init__(node.name, node.n_in, node.n_out, input_spec=node.input_spec,
                         output_unit=node.output_unit, dtype=node.dtype)
        self.node = node
        # Instance attributes, so that each wrapper reports what its own node can do.
        self.gradient_method = node.gradient_method
        self.has_input_gradient = node.has_input_gradient
        self.has_preactivation = node.has_preactivation
        self._last: tuple[NodeState, NodeState] | None = None

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on the wrapper; "node" itself may not exist yet
        # while the base class initialises.
        if name == "node" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.node, name)

    # ------------------------------------------------------------------------- readings
    def _transform(self, inner: NodeState) -> NodeState:
        """Return the wrapper's state for a state of the wrapped node (unchanged by default)."""
        return inner

    def _inner_state(self, state: NodeState) -> NodeState:
        """Return the wrapped node's state that ``state`` was formed from."""
        if self._last is not None and state is self._last[0]:
            return self._last[1]
        return self._untransform(state)

    def _untransform(self, state: NodeState) -> NodeState:
        """Rebuild the wrapped node's state from a wrapper state of an older forward pass."""
        return state

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        self.node.forward(x)
        inner = self.node.measure_state()
        outer = self._transform(inner)
        return outer.outputs, outer.inputs, dict(outer.probes)

    def forward(self, inputs: Any) -> np.ndarray:
        outputs = super().forward(inputs)
        self._last = (self.measure_state(), self.node.measure_state())
        return outputs

    # ----------------------------------------------------------------------- parameters
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self.node.parameters

    def get_parameters(self) -> dict[str, np.ndarray]:
        return self.node.get_parameters()

    def set_parameters(self, values: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        return self.node.set_parameters(values, clip=clip)

    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        return self.node.apply_update(delta, clip=clip)

    def pop_limit_events(self) -> dict[str, int]:
        return self.node.pop_limit_events()

    def apply_safe_state(self) -> None:
        self.node.apply_safe_state()

    # -------------------------------------------------------------------------- learning
    def local_gradient(self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output") -> dict[str, np.ndarray]:
        return self.node.local_gradient(self._inner_state(state), output_error, at=at)

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        return self.node.input_gradient(self._inner_state(state), output_error)

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        return self.node.preactivation_error(self._inner_state(state), output_error)

    # ------------------------------------------------------------------------- lifecycle
    def identity(self) -> dict[str, Any]:
        return self.node.identity()

    def state_dict(self) -> dict[str, Any]:
        return self.node.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.node.load_state_dict(state)

    def close(self) -> None:
        self.node.close()
        super().close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.node!r}>"


class CalibratedNode(NodeWrapper):
    """A node whose readings are corrected per channel: ``y = (y_raw - offset) / gain``.

    The correction starts as the identity. :meth:`set_correction` installs the gain and offset
    of a drift calibration (a ``linear`` fit of the raw readings against the baseline twin), so
    the corrected readings follow the baseline calibration again.

    Parameters
    ----------
    node
        The node whose readings are corrected.
    baseline
        The twin of the node's baseline calibration, which drift checks compare against
        (see :class:`~pnn.calibration.drift.DriftMonitor`).
    gain, offset
        Starting correction, arrays of shape (n_out,) or scalars; 1 and 0 by default.
    """

    def __init__(self, node: Node, baseline: DigitalTwin | None = None, *, gain: np.ndarray | float = 1.0,
                 offset: np.ndarray | float = 0.0) -> None:
        super().__init__(node)
        if baseline is not None and (baseline.n_in, baseline.n_out) != (node.n_in, node.n_out):
            raise ConfigError(
                f"node {node.name!r} maps {node.n_in} -> {node.n_out} channels, its baseline twin "
                f"{baseline.n_in} -> {baseline.n_out}"
            )
        self.baseline = baseline
        self.gain = np.ones(node.n_out)
        self.offset = np.zeros(node.n_out)
        #: Content hash of the record the correction comes from; None for the identity.
        self.correction_hash: str | None = None
        self.set_correction(gain, offset)

    def set_correction(self, gain: np.ndarray | float, offset: np.ndarray | float, record_hash: str | None = None) -> None:
        """Install a correction of the readings; gains must be finite and non-zero."""
        gain = np.broadcast_to(np.asarray(gain, dtype=np.float64), (self.n_out,)).copy()
        offset = np.broadcast_to(np.asarray(offset, dtype=np.float64), (self.n_out,)).copy()
        if not (np.all(np.isfinite(gain)) and np.all(gain != 0) and np.all(np.isfinite(offset))):
            raise ConfigError(
                f"node {self.name!r}: a correction needs finite, non-zero gains and finite offsets, got "
                f"gain {gain.tolist()} and offset {offset.tolist()}"
            )
        self.gain, self.offset, self.correction_hash = gain, offset, record_hash

    def correct(self, raw: np.ndarray) -> np.ndarray:
        """Return corrected readings for raw readings of shape (batch, n_out)."""
        return (np.asarray(raw, dtype=np.float64) - self.offset) / self.gain

    def uncorrect(self, corrected: np.ndarray) -> np.ndarray:
        """Return the raw readings that give these corrected readings."""
        return np.asarray(corrected, dtype=np.float64) * self.gain + self.offset

    def _transform(self, inner: NodeState) -> NodeState:
        return NodeState(inputs=inner.inputs, outputs=self.correct(inner.outputs).astype(self.dtype), probes=inner.probes)

    def _untransform(self, state: NodeState) -> NodeState:
        return NodeState(inputs=state.inputs, outputs=self.uncorrect(state.outputs), probes=state.probes)

    def local_gradient(self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output") -> dict[str, np.ndarray]:
        error = self.check_error(state, output_error, at=at)
        # dL/dy_raw = dL/dy / gain; an error at the pre-activation is before the correction.
        if at == "output":
            error = error / self.gain
        return self.node.local_gradient(self._inner_state(state), error, at=at)

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        error = self.check_error(state, output_error)
        return self.node.input_gradient(self._inner_state(state), error / self.gain)

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        error = self.check_error(state, output_error)
        return self.node.preactivation_error(self._inner_state(state), error / self.gain)

    def state_dict(self) -> dict[str, Any]:
        return {
            "node": self.node.state_dict(),
            "gain": self.gain.copy(),
            "offset": self.offset.copy(),
            "correction_hash": self.correction_hash or "",
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "node" not in state:
            raise PnnError(f"node {self.name!r}: saved state has no correction; it was saved without CalibratedNode")
        self.node.load_state_dict(state["node"])
        self.set_correction(state["gain"], state["offset"], state.get("correction_hash") or None)

    def __repr__(self) -> str:
        return (f"<CalibratedNode of {self.node!r}: gain {np.round(self.gain, 4).tolist()}, "
                f"offset {np.round(self.offset, 4).tolist()}>")
