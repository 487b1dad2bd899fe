"""Losses on the network's outputs and their per-example error signals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["Loss", "CrossEntropy", "MeanSquaredError", "get_loss", "one_hot", "LOSSES"]


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Return labels of shape (batch,) as a float64 one-hot array of shape (batch, n_classes)."""
    labels = np.asarray(labels)
    out = np.zeros((labels.shape[0], n_classes))
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


@dataclass(frozen=True)
class Loss:
    """A loss with its per-example derivative with respect to the outputs."""

    name: str = "loss"

    def __call__(self, outputs: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """Return (batch-mean loss, per-example error dloss_i/doutputs_i of shape (batch, n_out))."""
        raise NotImplementedError


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy on logits; the error is ``softmax(z) - onehot(y)``."""

    name: str = "cross_entropy"

    def __call__(self, outputs: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        z = np.asarray(outputs, dtype=np.float64)
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1, keepdims=True))
        log_p = z - log_norm
        rows = np.arange(z.shape[0])
        loss = float(-log_p[rows, labels].mean())
        error = np.exp(log_p)
        error[rows, labels] -= 1.0
        return loss, error


@dataclass(frozen=True)
class MeanSquaredError(Loss):
    """Half the squared distance to the one-hot target, summed over outputs; error ``y - t``."""

    name: str = "mse"

    def __call__(self, outputs: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        y = np.asarray(outputs, dtype=np.float64)
        error = y - one_hot(labels, y.shape[1])
        return float(0.5 * (error**2).sum(axis=1).mean()), error


LOSSES = {"cross_entropy": CrossEntropy(), "mse": MeanSquaredError()}


def get_loss(name: str) -> Loss:
    """Return the loss called ``name``, or raise ConfigError listing the valid names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
