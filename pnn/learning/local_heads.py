"""Digital heads and the local objectives the layer-local rules put on them.

A head is a small affine map owned by a rule, computed digitally on a node's measured outputs.
Each objective returns the batch-mean loss and its gradient with respect to the head's output;
:meth:`LinearHead.backward` turns that into the head's own gradients and the gradient with
respect to the node's outputs. Arrays are float64 throughout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["LinearHead", "squared_error", "supervised_contrastive"]


class LinearHead:
    """A digital affine map ``z = h W^T + b`` from a node's outputs.

    Parameters
    ----------
    n_in
        Width of the node's outputs.
    n_out
        Width of the head's output.
    rng
        Generator for the initial weights, uniform in +-``1 / sqrt(n_in)``; the bias starts at 0.
    """

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator) -> None:
        limit = 1.0 / math.sqrt(n_in)
        self.weight = rng.uniform(-limit, limit, (n_out, n_in))
        self.bias = np.zeros(n_out)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """Return the head's output, array of shape (batch, n_out), for ``h`` of shape (batch, n_in)."""
        return np.asarray(h, dtype=np.float64) @ self.weight.T + self.bias

    def backward(self, h: np.ndarray, grad_z: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return (dL/dh of shape (batch, n_in), head gradients) for ``grad_z = dL/dz``."""
        h = np.asarray(h, dtype=np.float64)
        return grad_z @ self.weight, {"weight": grad_z.T @ h, "bias": grad_z.sum(axis=0)}

    def parameters(self) -> dict[str, np.ndarray]:
        """Return the head's arrays by name (not copies: optimizer steps add to them)."""
        return {"weight": self.weight, "bias": self.bias}

    def state_dict(self) -> dict[str, Any]:
        """Return copies of the head's arrays."""
        return {"weight": self.weight.copy(), "bias": self.bias.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a shape mismatch raises ConfigError."""
        for name in ("weight", "bias"):
            value = np.asarray(state[name], dtype=np.float64)
            current = getattr(self, name)
            if value.shape != current.shape:
                raise ConfigError(f"saved head {name} has shape {value.shape}, expected {current.shape}")
            setattr(self, name, value.copy())


def squared_error(z: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Return ``mean_n 0.5 ||z_n - t_n||^2`` and its gradient dL/dz, shape (batch, n)."""
    residual = z - target
    batch = z.shape[0]
    return float(0.5 * np.sum(residual**2) / batch), residual / batch


def supervised_contrastive(z: np.ndarray, labels: np.ndarray, temperature: float) -> tuple[float, np.ndarray, int]:
    """Supervised contrastive loss of a batch and its gradient with respect to ``z``.

    The loss of Khosla et al. 2020 ("Supervised contrastive learning", NeurIPS), in its
    ``L_out`` form: each example ``i`` is an anchor whose positives ``P(i)`` are the other
    examples of its class, and

        L_i = -1/|P(i)| sum_{p in P(i)} log[ exp(u_i . u_p / tau) / sum_{a != i} exp(u_i . u_a / tau) ]

    with ``u = z / ||z||``. The batch loss is the mean over anchors that have at least one
    positive; a batch without any gives zero loss and zero gradient.

    Parameters
    ----------
    z
        Embeddings, array of shape (batch, n).
    labels
        Class of each example, shape (batch,).
    temperature
        ``tau``, positive.

    Returns
    -------
    tuple
        (loss, dL/dz of shape (batch, n), number of anchors with a positive).
    """
    batch = z.shape[0]
    norms = np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    u = z / norms
    logits = u @ u.T / temperature  # (batch, batch)
    off_diagonal = ~np.eye(batch, dtype=bool)
    positives = (labels[:, None] == labels[None, :]) & off_diagonal
    n_positives = positives.sum(axis=1)
    anchors = n_positives > 0
    n_anchors = int(np.count_nonzero(anchors))
    if n_anchors == 0:
        return 0.0, np.zeros_like(z), 0

    masked = np.where(off_diagonal, logits, -np.inf)
    row_max = masked.max(axis=1, keepdims=True)
    log_norm = row_max[:, 0] + np.log(np.exp(masked - row_max).sum(axis=1))
    softmax = np.exp(masked - log_norm[:, None])  # zero on the diagonal
    mean_positive = np.where(positives, logits, 0.0).sum(axis=1) / np.maximum(n_positives, 1)
    loss = float(np.sum((log_norm - mean_positive)[anchors]) / n_anchors)

    # dL/dlogits, row by anchor; rows of anchors without positives are zero.
    grad_logits = (softmax - positives / np.maximum(n_positives, 1)[:, None]) * anchors[:, None] / n_anchors
    grad_u = (grad_logits + grad_logits.T) @ u / temperature
    grad_z = (grad_u - u * np.sum(u * grad_u, axis=1, keepdims=True)) / norms
    return loss, grad_z, n_anchors
