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
- ``learned``: a matrix B that starts as the random one and is trained to track the transposed
  Jacobian of the part of the network it replaces. The rule injects small noise where the
  feedback signal arrives, measures the response where the error is taken, and moves B towards
  the measured correlation, in the manner of the weight mirrors of Akrout et al. 2019 ("Deep
  learning without weight transport", NeurIPS). Only forward measurements are needed, so it
  runs on hardware.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..nodes import Node

__all__ = [
    "Feedback",
    "RandomFeedback",
    "IdentityFeedback",
    "PhysicalFeedback",
    "LearnedFeedback",
    "FEEDBACK_STRATEGIES",
]

FEEDBACK_STRATEGIES = ("random", "identity", "physical", "learned")


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


class LearnedFeedback(RandomFeedback):
    """Feedback matrix B of shape (n_target, n_error), trained towards the transposed Jacobian.

    The part of the network that B replaces maps a change at the target (batch, n_target) to a
    change of the error source (batch, n_error) through a Jacobian J of shape
    (n_error, n_target). Backprop would send the error back with J^T, which has B's shape.
    :meth:`learn` takes one measured perturbation and its response, and moves B a fraction
    ``rate`` of the way to the per-row least-squares estimate of J^T. B is thus an exponential
    moving average of measured Jacobians over the operating points seen in training.

    Parameters
    ----------
    n_target, n_error
        Widths of the signal that B produces and of the error it receives.
    rng
        Generator for the random starting matrix.
    scale
        Scale of the random starting matrix (see :class:`RandomFeedback`).
    rate
        Fraction of the way from B to each new estimate, in (0, 1].
    """

    def __init__(
        self, n_target: int, n_error: int, rng: np.random.Generator, scale: float = 1.0, rate: float = 0.05
    ) -> None:
        super().__init__(n_target, n_error, rng, scale)
        if not 0 < rate <= 1:
            raise ConfigError(f"learned feedback rate must be in (0, 1], got {rate}")
        self.rate = float(rate)

    def learn(self, perturbation: np.ndarray, response: np.ndarray, std: float) -> int:
        """Move B towards the Jacobian estimate from one perturbation measurement.

        Parameters
        ----------
        perturbation
            Change applied at the target, as applied by the hardware, array of shape
            (batch, n_target).
        response
            Measured change of the error source, array of shape (batch, n_error).
        std
            Standard deviation the perturbation was drawn with. Rows of B whose perturbation
            carried less than a quarter of the nominal energy ``batch * std**2`` (inputs clipped
            at a limit, say) keep their value, because their estimate would be mostly noise.

        Returns
        -------
        int
            Number of rows of B that were updated.
        """
        p = np.asarray(perturbation, dtype=np.float64)
        r = np.asarray(response, dtype=np.float64)
        if p.shape != (r.shape[0], self.matrix.shape[0]) or r.shape[1:] != (self.matrix.shape[1],):
            raise ConfigError(
                f"learned feedback of shape {self.matrix.shape} got a perturbation of shape {p.shape} "
                f"and a response of shape {r.shape}"
            )
        energy = np.einsum("bi,bi->i", p, p)  # (n_target,)
        rows = energy >= 0.25 * p.shape[0] * std * std
        if not np.any(rows):
            return 0
        estimate = (p[:, rows].T @ r) / energy[rows, None]  # (n_rows, n_error), estimates J^T
        self.matrix[rows] += self.rate * (estimate - self.matrix[rows])
        return int(np.count_nonzero(rows))
