"""References: what a node is expected to produce on each output channel, from its settings.

A calibration fits, per output channel, the measured output against a nominal stimulus ``a``
(see :mod:`pnn.calibration.models`). The reference computes that stimulus from the applied
inputs and the node's parameters, so one transfer fit serves every parameter setting:

- :class:`LinearReference`: ``a = W x + b`` from the parameters ``weight`` (n_out, n_in) and
  ``bias`` (n_out,). This is the nominal pre-activation of a crossbar, of an instrument node
  declared as ``f(W x + b)``, and of a digital layer.
- :class:`ChannelReference`: ``a_k = x_m(k)``, output ``k`` responds to input ``m(k)``. This
  fits a DAC-to-ADC loop, or an interferometer whose input ``k`` drives the phase shifter of
  output ``k``.
- :class:`TwinReference`: ``a`` is another calibration's prediction (a digital twin). A fit of
  ``linear`` against it measures how far the node has drifted from that calibration.

A reference also sends errors back through ``a`` (input and parameter gradients), which is
what a digital twin needs for model-based gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CalibrationError, ConfigError
from ..nodes import Node

if TYPE_CHECKING:
    from .twin import DigitalTwin

__all__ = [
    "Reference",
    "LinearReference",
    "ChannelReference",
    "TwinReference",
    "reference_for",
    "reference_from_record",
]


class Reference(ABC):
    """Maps applied inputs and parameters to the nominal stimulus of every output channel."""

    #: Name stored in calibration records.
    kind: str = ""

    @abstractmethod
    def check(self, node: Node) -> None:
        """Raise ConfigError, naming the node and what it lacks, if the reference does not fit it."""

    @abstractmethod
    def stimulus(self, inputs: np.ndarray, parameters: Mapping[str, np.ndarray]) -> np.ndarray:
        """Return the stimulus of every output channel.

        Parameters
        ----------
        inputs
            Applied inputs, array of shape (batch, n_in).
        parameters
            Parameter values by name, each of the parameter's shape, or with a leading batch
            axis when they differ per example (a parameter sweep).

        Returns
        -------
        numpy.ndarray
            Array of shape (batch, n_out).
        """

    @abstractmethod
    def input_gradient(self, inputs: np.ndarray, parameters: Mapping[str, np.ndarray], delta: np.ndarray) -> np.ndarray:
        """Return the loss gradient at the inputs, (batch, n_in), from ``delta = dL/da``, (batch, n_out)."""

    def parameter_gradients(
        self, inputs: np.ndarray, parameters: Mapping[str, np.ndarray], delta: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Return the batch-mean loss gradient of each parameter the stimulus depends on."""
        return {}

    def stimulus_unit(self, node: Node) -> str:
        """Return the unit of the stimulus for ``node``."""
        return node.output_unit

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Return the reference as plain data for a calibration record."""


class LinearReference(Reference):
    """``a = W x + b``, the node's nominal pre-activation.

    Parameters
    ----------
    weight, bias
        Names of the weight parameter, of shape (n_out, n_in), and of the bias parameter, of
        shape (n_out,). ``bias=None`` means the node has no bias.
    """

    kind = "linear"

    def __init__(self, weight: str = "weight", bias: str | None = "bias") -> None:
        self.weight = weight
        self.bias = bias

    def check(self, node: Node) -> None:
        specs = node.parameters
        if self.weight not in specs:
            raise ConfigError(
                f"node {node.name!r} has no parameter {self.weight!r}, so its stimulus cannot be "
                f"computed as W x + b (its parameters are {sorted(specs) or 'none'}); use a channel "
                "reference instead"
            )
        if specs[self.weight].shape != (node.n_out, node.n_in):
            raise ConfigError(
                f"node {node.name!r}: parameter {self.weight!r} has shape {specs[self.weight].shape}, "
                f"but W x + b needs ({node.n_out}, {node.n_in})"
            )
        if self.bias is not None and self.bias in specs and specs[self.bias].shape != (node.n_out,):
            raise ConfigError(
                f"node {node.name!r}: parameter {self.bias!r} has shape {specs[self.bias].shape}, "
                f"but a bias needs ({node.n_out},)"
            )

    def _bias(self, parameters: Mapping[str, np.ndarray]) -> np.ndarray | None:
        if self.bias is None or self.bias not in parameters:
            return None
        return np.asarray(parameters[self.bias], dtype=np.float64)

    def stimulus(self, inputs, parameters):
        x = np.asarray(inputs, dtype=np.float64)
        w = np.asarray(parameters[self.weight], dtype=np.float64)
        if w.ndim == 3:
            # One weight matrix per example, (batch, n_out, n_in).
            a = np.einsum("boi,bi->bo", w, x)
        else:
            a = x @ w.T
        b = self._bias(parameters)
        return a if b is None else a + b

    def input_gradient(self, inputs, parameters, delta):
        w = np.asarray(parameters[self.weight], dtype=np.float64)
        if w.ndim == 3:
            return np.einsum("bo,boi->bi", delta, w)
        return delta @ w

    def parameter_gradients(self, inputs, parameters, delta):
        x = np.asarray(inputs, dtype=np.float64)
        batch = delta.shape[0]
        gradients = {self.weight: delta.T @ x / batch}
        if self._bias(parameters) is not None:
            gradients[self.bias] = delta.mean(axis=0)
        return gradients

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": self.weight, "bias": self.bias}

    def __repr__(self) -> str:
        bias = f" + {self.bias}" if self.bias else ""
        return f"LinearReference(a = {self.weight} @ x{bias})"


class ChannelReference(Reference):
    """``a_k = x_m(k)``: each output channel responds to one input channel.

    Parameters
    ----------
    mapping
        Input channel of each output channel, ``mapping[k] = m(k)``; None pairs output ``k``
        with input ``k`` (the node needs as many inputs as outputs).
    """

    kind = "channel"

    def __init__(self, mapping: Sequence[int] | None = None) -> None:
        self.mapping = None if mapping is None else tuple(int(m) for m in mapping)

    def _indices(self, node: Node) -> tuple[int, ...]:
        if self.mapping is None:
            if node.n_in != node.n_out:
                raise ConfigError(
                    f"node {node.name!r} has {node.n_in} inputs and {node.n_out} outputs, so output k "
                    "cannot simply follow input k; give the input channel of each output, for example "
                    f"--reference channel:{','.join('0' for _ in range(node.n_out))}"
                )
            return tuple(range(node.n_out))
        return self.mapping

    def check(self, node: Node) -> None:
        indices = self._indices(node)
        if len(indices) != node.n_out:
            raise ConfigError(
                f"node {node.name!r}: the channel reference maps {len(indices)} output(s), the node has {node.n_out}"
            )
        bad = [m for m in indices if not 0 <= m < node.n_in]
        if bad:
            raise ConfigError(
                f"node {node.name!r}: input channel(s) {bad} in the channel reference do not exist; "
                f"inputs are numbered 0..{node.n_in - 1}"
            )

    def _columns(self, n_out: int) -> np.ndarray:
        return np.arange(n_out) if self.mapping is None else np.asarray(self.mapping)

    def stimulus(self, inputs, parameters):
        x = np.asarray(inputs, dtype=np.float64)
        # Without a mapping, n_out equals n_in (checked), so the inputs are the stimulus.
        return x.copy() if self.mapping is None else x[:, self._columns(len(self.mapping))]

    def input_gradient(self, inputs, parameters, delta):
        x = np.asarray(inputs)
        gradient = np.zeros((delta.shape[0], x.shape[1]))
        columns = self._columns(delta.shape[1])
        # np.add.at sums the errors of several outputs that share one input.
        np.add.at(gradient, (slice(None), columns), delta)
        return gradient

    def stimulus_unit(self, node: Node) -> str:
        return node.input_spec.unit

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "mapping": None if self.mapping is None else list(self.mapping)}

    def __repr__(self) -> str:
        return f"ChannelReference(mapping={'identity' if self.mapping is None else list(self.mapping)})"


class TwinReference(Reference):
    """The prediction of a digital twin (an earlier calibration) as the stimulus.

    Parameters
    ----------
    twin
        The digital twin whose prediction is the stimulus.
    """

    kind = "twin"

    def __init__(self, twin: DigitalTwin) -> None:
        self.twin = twin

    def check(self, node: Node) -> None:
        if (self.twin.n_in, self.twin.n_out) != (node.n_in, node.n_out):
            raise ConfigError(
                f"node {node.name!r} maps {node.n_in} -> {node.n_out} channels, but the twin maps "
                f"{self.twin.n_in} -> {self.twin.n_out}"
            )

    def stimulus(self, inputs, parameters):
        return self.twin.predict(inputs, parameters)

    def input_gradient(self, inputs, parameters, delta):
        return self.twin.reference.input_gradient(
            inputs, parameters, delta * self.twin.slope(inputs, parameters)
        )

    def parameter_gradients(self, inputs, parameters, delta):
        return self.twin.reference.parameter_gradients(
            inputs, parameters, delta * self.twin.slope(inputs, parameters)
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "baseline": self.twin.record_hash}

    def __repr__(self) -> str:
        return f"TwinReference(baseline={self.twin.record_hash})"


def reference_for(node: Node, spec: str | Reference = "auto") -> Reference:
    """Return the reference for ``node`` from a specification, and check that it fits.

    Parameters
    ----------
    node
        The node to calibrate.
    spec
        A :class:`Reference`; ``"linear"``; ``"channel"`` (output k follows input k);
        ``"channel:M0,M1,..."`` (output k follows input Mk); or ``"auto"``, which takes
        ``linear`` for a node with a ``weight`` of shape (n_out, n_in) and ``channel``
        otherwise.
    """
    if isinstance(spec, Reference):
        reference = spec
    elif spec == "auto":
        weight = node.parameters.get("weight")
        if weight is not None and weight.shape == (node.n_out, node.n_in):
            reference = LinearReference()
        else:
            reference = ChannelReference()
    elif spec == "linear":
        reference = LinearReference()
    elif spec == "channel":
        reference = ChannelReference()
    elif isinstance(spec, str) and spec.startswith("channel:"):
        try:
            mapping = [int(part) for part in spec.split(":", 1)[1].split(",")]
        except ValueError:
            raise ConfigError(
                f"invalid reference {spec!r}; write channel:M0,M1,... with one input number per output"
            ) from None
        reference = ChannelReference(mapping)
    else:
        raise ConfigError(f"unknown reference {spec!r}; choose auto, linear, channel or channel:M0,M1,...")
    reference.check(node)
    return reference


def reference_from_record(description: Mapping[str, Any], source: str) -> Reference:
    """Rebuild a linear or channel reference from a record's description."""
    kind = description.get("kind")
    if kind == "linear":
        return LinearReference(description.get("weight", "weight"), description.get("bias"))
    if kind == "channel":
        return ChannelReference(description.get("mapping"))
    if kind == "twin":
        raise CalibrationError(
            f"{source}: the record is a drift correction against baseline {description.get('baseline')}; "
            "load the baseline record and build its twin first"
        )
    raise CalibrationError(f"{source}: unknown reference kind {kind!r}; the record is corrupt or from a newer pnn")
