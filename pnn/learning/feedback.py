"""Feedback paths that carry the output error to hidden nodes in the alignment rules.

Each path maps an error of shape (batch, n_error) to a signal of shape (batch, n_target):

- ``random``: a fixed random matrix B, drawn from U[-s/sqrt(n_error), s/sqrt(n_error)], the
  distribution of Nokland's reference code for DFA (Nokland 2016, NeurIPS).
- ``identity``: the error itself, for a node with as many outputs as the network.
- ``physical``: the projection runs on a frozen physical node of the network's own device kind
  (random weights, with its noise and quantization); the measured output is the feedback
  signal, as in optical DFA hardware that projects the error through a scattering medium
  (Launay et al. 2020, "Hardware beyond backpropagation: a photonic co-processor for direct
  feedback alignment", arXiv:2012.06373).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..nodes import Node

__all__ = ["Feedback", "RandomFeedback", "IdentityFeedback", "PhysicalFeedback", "FEEDBACK_STRATEGIES"]

FEEDBACK_STRATEGIES = ("random", "identity", "physical")


class Feedback:
    """A fixed path from the output error to one node's outputs."""

    def project(self, error: np.ndarray) -> np.ndarray:
        """Return the feedback signal for ``error`` of shape (batch, n_error)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return the path's state for a checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class RandomFeedback(Feedback):
    """Fixed random matrix B of shape (n_target, n_error); the signal is ``error @ B.T``."""

    def __init__(self, n_target: int, n_error: int, rng: np.random.Generator, scale: float = 1.0) -> None:
        limit = scale / np.sqrt(n_error)
        self.matrix = rng.uniform(-limit, limit, (n_target, n_error))

    def project(self, error: np.ndarray) -> np.ndarray:
        return error @ self.matrix.T

    def state_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        matrix = np.asarray(state["matrix"], dtype=np.float64)
        if matrix.shape != self.matrix.shape:
            raise ConfigError(f"saved feedback matrix has shape {matrix.shape}, expected {self.matrix.shape}")
        self.matrix = matrix.copy()


class IdentityFeedback(Feedback):
    """The error itself; only for a node with as many outputs as the error has entries."""

    def project(self, error: np.ndarray) -> np.ndarray:
        return error


class PhysicalFeedback(Feedback):
    """The projection measured on a frozen node; the error is scaled into the node's input range."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def project(self, error: np.ndarray) -> np.ndarray:
        upper = float(np.min(self.node.input_spec.upper_array))
        peak = float(np.max(np.abs(error)))
        gain = upper / peak if peak > upper else 1.0
        measured = self.node.forward(error * gain)
        reason = self.node.measure_state().invalid_reason()
        if reason is not None:
            raise MeasurementError(f"feedback node {self.node.name!r}: {reason}")
        return np.asarray(measured, dtype=np.float64) / gain

    def state_dict(self) -> dict[str, Any]:
        return {"node": self.node.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.node.load_state_dict(state["node"])
