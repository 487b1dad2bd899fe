"""Simulated drift of a read-out chain, to test drift tracking on simulated nodes.

:class:`OutputDrift` wraps any node, multiplies each output channel by a gain and adds an
offset. Both change linearly with a simulated clock, as the gain of a transimpedance amplifier
and the offset of an ADC do while the electronics warm up::

    y = (1 + gain_rate * t) * y_node + offset_rate * t

The clock advances by ``t_per_batch`` on every forward pass (the same convention as the
crossbar's conductance drift) and by :meth:`OutputDrift.advance_time`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..nodes import Node, NodeState
from .wrappers import NodeWrapper

__all__ = ["OutputDrift"]


class OutputDrift(NodeWrapper):
    """A node whose read-out gain and offset drift with time.

    Gradients pass to the wrapped node unchanged: an analog node that computes its update in
    place (a crossbar's outer product) does not see the gain of the chain that digitises its
    outputs.

    Parameters
    ----------
    node
        The node whose outputs drift.
    gain_rate
        Change of each channel's gain per second, relative (scalar or array of shape (n_out,)).
    offset_rate
        Change of each channel's offset per second, in the output unit per second.
    t_per_batch
        Simulated time one forward pass takes, in seconds.
    """

    def __init__(
        self,
        node: Node,
        *,
        gain_rate: np.ndarray | float = 0.0,
        offset_rate: np.ndarray | float = 0.0,
        t_per_batch: float = 1.0,
    ) -> None:
        super().__init__(node)
        self.gain_rate = self._per_channel(gain_rate, "gain_rate")
        self.offset_rate = self._per_channel(offset_rate, "offset_rate")
        if not (math.isfinite(t_per_batch) and t_per_batch >= 0):
            raise ConfigError(f"node {node.name!r}: t_per_batch must be a finite number of seconds >= 0, got {t_per_batch}")
        self.t_per_batch = float(t_per_batch)
        #: Simulated time since the drift began, in seconds.
        self.time = 0.0

    def _per_channel(self, value: np.ndarray | float, label: str) -> np.ndarray:
        array = np.asarray(value, dtype=np.float64)
        try:
            array = np.broadcast_to(array, (self.n_out,)).copy()
        except ValueError:
            raise ConfigError(f"node {self.name!r}: {label} must be a number or {self.n_out} numbers, got shape {array.shape}") from None
        if not np.all(np.isfinite(array)):
            raise ConfigError(f"node {self.name!r}: {label} must be finite")
        return array

    @property
    def gain(self) -> np.ndarray:
        """Present gain of each channel, relative to the node's own output."""
        return 1.0 + self.gain_rate * self.time

    @property
    def offset(self) -> np.ndarray:
        """Present offset of each channel, in the output unit."""
        return self.offset_rate * self.time

    def advance_time(self, seconds: float) -> None:
        """Move the drift clock forward by ``seconds``."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ConfigError(f"node {self.name!r}: time step must be a finite number >= 0, got {seconds}")
        self.time += float(seconds)

    def _transform(self, inner: NodeState) -> NodeState:
        self.time += self.t_per_batch
        outputs = (inner.outputs * self.gain + self.offset).astype(self.dtype)
        return NodeState(inputs=inner.inputs, outputs=outputs, probes=inner.probes)

    def _untransform(self, state: NodeState) -> NodeState:
        # NOTE: uses the present gain and offset, so a state from many passes ago maps back
        # approximately.
        return NodeState(inputs=state.inputs, outputs=(state.outputs - self.offset) / self.gain, probes=state.probes)

    def state_dict(self) -> dict[str, Any]:
        return {"node": self.node.state_dict(), "time": self.time}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.node.load_state_dict(state["node"])
        self.time = float(state["time"])

    def __repr__(self) -> str:
        return f"<OutputDrift of {self.node!r} at t = {self.time:g} s>"
