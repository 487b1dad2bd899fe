"""Element-wise nonlinearities with their derivatives, by name.

Physical nodes apply one of these in their periphery (after the column readout of a crossbar,
for example); digital nodes apply them after a linear map. Each derivative is written in terms
of the pre-activation ``a``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import ConfigError

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]


@dataclass(frozen=True)
class Activation:
    """A nonlinearity ``f`` with its derivative ``df`` (of the pre-activation) and output range."""

    name: str
    f: Callable[[np.ndarray], np.ndarray]
    df: Callable[[np.ndarray], np.ndarray]
    lower: float
    upper: float


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _dsigmoid(a: np.ndarray) -> np.ndarray:
    s = _sigmoid(a)
    return s * (1.0 - s)


def _dtanh(a: np.ndarray) -> np.ndarray:
    t = np.tanh(a)
    return 1.0 - t * t


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", np.tanh, _dtanh, -1.0, 1.0),
    "hardtanh": Activation(
        "hardtanh",
        lambda a: np.clip(a, -1.0, 1.0),
        lambda a: (np.abs(a) < 1.0).astype(a.dtype),
        -1.0,
        1.0,
    ),
    "sigmoid": Activation("sigmoid", _sigmoid, _dsigmoid, 0.0, 1.0),
    "relu": Activation("relu", lambda a: np.maximum(a, 0), lambda a: (a > 0).astype(a.dtype), 0.0, np.inf),
    "linear": Activation("linear", lambda a: a, np.ones_like, -np.inf, np.inf),
}


def get_activation(name: str) -> Activation:
    """Return the activation called ``name``, or raise ConfigError listing the valid names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None
