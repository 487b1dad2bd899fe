"""Digital twins: a node's fitted calibration used as a differentiable model of the node.

:class:`DigitalTwin` is a :class:`~pnn.nodes.Node` computing ``y = T(a(x, p))``: the
reference stimulus ``a`` (``W x + b`` for a crossbar) passed through the fitted transfer
curves ``T``, one per channel. It has exact input and parameter gradients of that model, so it
can stand in for the node in simulation and in backpropagation.

:class:`TwinGradientNode` is physics-aware training (Wright et al. 2022, "Deep physical neural
networks trained with backpropagation", Nature 601, 549-555): the forward pass runs on the
physical node, and the backward pass uses the twin's derivative at the inputs the node actually
received. It gives a physical node ``has_input_gradient`` and model-based local gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CalibrationError, ConfigError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec
from .fit import TransferFit
from .reference import Reference, reference_from_record
from .sweep import SweepResult
from .wrappers import NodeWrapper

if TYPE_CHECKING:
    from .record import CalibrationRecord

__all__ = ["DigitalTwin", "TwinGradientNode"]


class DigitalTwin(Node):
    """A model of a node from its calibration: ``y = T(a(x, p))``.

    The twin keeps its own copy of the node's parameters, with the node's limits, so it can be
    trained or swept on its own. :meth:`sync` copies the node's current values.

    Parameters
    ----------
    fit
        The fitted transfer curves, one per output channel.
    reference
        How the stimulus follows from inputs and parameters.
    name
        Name of the twin (the node's name by default, in :meth:`from_node`).
    input_spec
        Input limits, shape (n_in,).
    parameter_specs
        The node's parameter specs, by name.
    parameters
        Starting parameter values, by name.
    output_unit
        Unit of the predicted readings.
    record_hash
        Content hash of the calibration record, for run records and drift corrections.
    """

    gradient_method = "adjoint"
    has_input_gradient = True
    has_preactivation = True

    def __init__(
        self,
        fit: TransferFit,
        reference: Reference,
        *,
        name: str,
        input_spec: ParameterSpec,
        parameter_specs: Mapping[str, ParameterSpec] | None = None,
        parameters: Mapping[str, np.ndarray] | None = None,
        output_unit: str = "",
        record_hash: str | None = None,
    ) -> None:
        super().__init__(name, input_spec.shape[0], fit.n_out, input_spec=input_spec,
                         output_unit=output_unit or fit.output_unit, dtype=np.float64)
        self.fit = fit
        self.reference = reference
        self.record_hash = record_hash
        self._specs = dict(parameter_specs or {})
        self._values = {name: np.array(parameters[name], dtype=np.float64) for name in self._specs} if parameters else {
            name: np.zeros(spec.shape) for name, spec in self._specs.items()
        }

    @classmethod
    def from_node(cls, fit: TransferFit, reference: Reference, node: Node, record_hash: str | None = None) -> DigitalTwin:
        """Return the twin of ``node``, with its limits and current parameters."""
        reference.check(node)
        if fit.n_out != node.n_out:
            raise ConfigError(f"node {node.name!r} has {node.n_out} outputs, the fit has {fit.n_out}")
        return cls(
            fit, reference, name=node.name, input_spec=node.input_spec, parameter_specs=node.parameters,
            parameters=node.get_parameters(), output_unit=node.output_unit, record_hash=record_hash,
        )

    @classmethod
    def from_record(cls, record: CalibrationRecord, node: Node | None = None) -> DigitalTwin:
        """Return the twin a record describes; ``node`` gives limits and parameters.

        A record with a channel reference needs no node (its inputs are then unbounded).
        """
        reference = reference_from_record(record.reference, f"record {record.content_hash[:19]}")
        fit = record.fit()
        if node is not None:
            return cls.from_node(fit, reference, node, record.content_hash)
        if reference.kind != "channel":
            raise CalibrationError(
                f"record of node {record.node!r}: a twin with a {reference.kind} reference needs the node "
                "for its parameters; pass the node"
            )
        n_in = int(record.identity.get("n_in", fit.n_out))
        big = np.finfo(np.float64).max / 4
        inputs = ParameterSpec((n_in,), -big, big, record.units.get("input", "1"))
        return cls(fit, reference, name=record.node, input_spec=inputs,
                   output_unit=record.units.get("output", ""), record_hash=record.content_hash)

    # ------------------------------------------------------------------------ model
    def _parameter_values(self, parameters: Mapping[str, np.ndarray] | None) -> Mapping[str, np.ndarray]:
        return self._values if parameters is None else parameters

    def stimulus(self, inputs: np.ndarray, parameters: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Return the reference stimulus, (batch, n_out), at the twin's parameters or the ones given."""
        return self.reference.stimulus(np.asarray(inputs, dtype=np.float64), self._parameter_values(parameters))

    def predict(self, inputs: np.ndarray, parameters: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Return the predicted readings, (batch, n_out), without the input checks of :meth:`forward`."""
        return self.fit.predict(self.stimulus(inputs, parameters))

    def slope(self, inputs: np.ndarray, parameters: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Return ``dy/da`` of every channel, (batch, n_out)."""
        return self.fit.derivative(self.stimulus(inputs, parameters))

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        a = self.stimulus(x)
        return self.fit.predict(a), x, {"preactivation": a}

    def prediction_error(self, sweep: SweepResult) -> dict[str, Any]:
        """Return the twin's error on measured points: rms and largest error per channel.

        Uses the parameters recorded with the sweep, so held-out points of a parameter sweep are
        predicted at the setting they were measured at.
        """
        measured = sweep.mean_outputs()
        predicted = self.predict(sweep.inputs, sweep.parameters())
        error = measured - predicted
        valid = np.isfinite(error)
        counts = valid.sum(axis=0)
        squared = np.where(valid, error**2, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rms = np.sqrt(squared / counts)
        largest = np.where(valid, np.abs(error), 0.0).max(axis=0) if len(error) else np.zeros(self.n_out)
        return {
            "n_points": int(sweep.n_points),
            "rms": [float(v) for v in rms],
            "max_abs": [float(v) for v in largest],
        }

    # ------------------------------------------------------------------ parameters
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _read_parameters(self) -> dict[str, np.ndarray]:
        # A new dict: apply_update compares these values with the ones written after them.
        return dict(self._values)

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in values.items():
            self._values[name] = np.array(value, dtype=np.float64)
        return {name: self._values[name].copy() for name in values}

    def sync(self, node: Node) -> None:
        """Copy ``node``'s current parameter values into the twin."""
        for name, value in node.get_parameters().items():
            if name in self._values:
                self._values[name] = np.array(value, dtype=np.float64)

    # -------------------------------------------------------------------- gradients
    def _delta(self, state: NodeState, error: np.ndarray, at: ErrorSite) -> np.ndarray:
        if at == "preactivation":
            return error
        return error * self.fit.derivative(state.probes["preactivation"])

    def local_gradient(self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output") -> dict[str, np.ndarray]:
        error = self.check_error(state, output_error, at=at)
        gradients = self.reference.parameter_gradients(state.inputs, self._values, self._delta(state, error, at))
        if not gradients and self._specs:
            raise ConfigError(f"node {self.name!r}: the {self.reference.kind} reference gives no parameter gradient")
        return gradients

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        error = self.check_error(state, output_error)
        return self.reference.input_gradient(state.inputs, self._values, self._delta(state, error, "output"))

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        return self._delta(state, self.check_error(state, output_error), "output")

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(model=self.fit.model, reference=self.reference.describe(), record=self.record_hash)
        return info

    def __repr__(self) -> str:
        return f"<DigitalTwin {self.name!r}: {self.n_in} -> {self.n_out}, {self.fit.model} on {self.reference!r}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self) if cycle else f"{self!r}\n{self.fit.summary()}")


class TwinGradientNode(NodeWrapper):
    """A physical node whose gradients come from its digital twin (physics-aware training).

    The forward pass measures the physical node. The twin's stimulus at the applied inputs and
    the node's parameters of that pass is kept with the state as the probe ``twin_stimulus``.
    Local and input gradients use the twin's derivative there. Parameters, updates and limits
    stay the physical node's.

    Parameters
    ----------
    node
        The physical node.
    twin
        Its digital twin, for example ``record.twin(node)``.
    """

    gradient_method = "adjoint"

    def __init__(self, node: Node, twin: DigitalTwin) -> None:
        super().__init__(node)
        if (twin.n_in, twin.n_out) != (node.n_in, node.n_out):
            raise ConfigError(
                f"node {node.name!r} maps {node.n_in} -> {node.n_out} channels, its twin {twin.n_in} -> {twin.n_out}"
            )
        twin.reference.check(node)
        self.twin = twin
        self.gradient_method = "adjoint"
        self.has_input_gradient = True
        self.has_preactivation = True
        self._parameters_at_forward: dict[str, np.ndarray] = {}

    def _transform(self, inner: NodeState) -> NodeState:
        # The parameters of this pass. Updates come after the gradient, so these are the values
        # the gradient belongs to.
        self._parameters_at_forward = self.node.get_parameters()
        stimulus = self.twin.stimulus(inner.inputs, self._parameters_at_forward)
        probes = {**inner.probes, "twin_stimulus": stimulus}
        return NodeState(inputs=inner.inputs, outputs=inner.outputs, probes=probes)

    def _delta(self, state: NodeState, error: np.ndarray, at: ErrorSite) -> np.ndarray:
        if "twin_stimulus" not in state.probes:
            raise ConfigError(f"node {self.name!r}: the state was not measured through its TwinGradientNode")
        if at == "preactivation":
            return error
        return error * self.twin.fit.derivative(state.probes["twin_stimulus"])

    def local_gradient(self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output") -> dict[str, np.ndarray]:
        error = self.check_error(state, output_error, at=at)
        return self.twin.reference.parameter_gradients(state.inputs, self._parameters_at_forward, self._delta(state, error, at))

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        error = self.check_error(state, output_error)
        return self.twin.reference.input_gradient(state.inputs, self._parameters_at_forward, self._delta(state, error, "output"))

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        return self._delta(state, self.check_error(state, output_error), "output")

    def __repr__(self) -> str:
        return f"<TwinGradientNode of {self.node!r} through {self.twin.fit.model} twin>"
