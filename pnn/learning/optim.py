"""Optimizers that turn a node's gradients into the update pushed to it.

One optimizer instance serves one node; it keeps its moments per parameter name, and returns
the change to apply (``apply_update`` takes it as is). Learning-rate schedules set ``lr``
between epochs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import _optim_kernels as kernels

__all__ = ["Optimizer", "SGD", "Adam", "make_optimizer", "OPTIMIZERS", "lr_at_epoch", "LR_SCHEDULES"]


_EMPTY = np.zeros(0)


def _flat(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64).reshape(-1)


class Optimizer:
    """Base class: ``step(gradients) -> updates``, with a state that checkpoints restore."""

    def __init__(self, lr: float) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rate must be a positive number, got {lr}")
        self.lr = float(lr)

    def step(self, gradients: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the update (change to add) for each parameter."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return the optimizer's moments and counters."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class SGD(Optimizer):
    """Stochastic gradient descent with heavy-ball momentum: ``v = m v + g``, update ``-lr v``."""

    def __init__(self, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, gradients: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        updates = {}
        for name, grad in gradients.items():
            grad = np.ascontiguousarray(grad, dtype=np.float64)
            first = name not in self.velocity
            if first:
                self.velocity[name] = np.zeros_like(grad)
            decay = self.weight_decay if params is not None else 0.0
            flat_params = _flat(params[name]) if decay else _EMPTY
            step = kernels.momentum_kernel(
                grad.reshape(-1), self.velocity[name].reshape(-1), flat_params, self.lr, self.momentum, decay, first
            )
            updates[name] = step.reshape(grad.shape)
        return updates

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": {k: v.copy() for k, v in self.velocity.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = {k: np.array(v, dtype=np.float64) for k, v in state.get("velocity", {}).items()}


class Adam(Optimizer):
    """Adam (Kingma and Ba 2015, ICLR), with decoupled weight decay as in AdamW when set."""

    def __init__(
        self,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr)
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ConfigError(f"Adam {label} must be in [0, 1), got {beta}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.weight_decay = float(weight_decay)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self, gradients: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        self.t += 1
        correction1 = 1.0 - self.beta1**self.t
        correction2 = 1.0 - self.beta2**self.t
        updates = {}
        for name, grad in gradients.items():
            grad = np.ascontiguousarray(grad, dtype=np.float64)
            if name not in self.m:
                self.m[name] = np.zeros_like(grad)
                self.v[name] = np.zeros_like(grad)
            decay = self.weight_decay if params is not None else 0.0
            flat_params = _flat(params[name]) if decay else _EMPTY
            step = kernels.adam_kernel(
                grad.reshape(-1), self.m[name].reshape(-1), self.v[name].reshape(-1), flat_params, self.lr,
                self.beta1, self.beta2, self.eps, correction1, correction2, decay,
            )
            updates[name] = step.reshape(grad.shape)
        return updates

    def state_dict(self) -> dict[str, Any]:
        return {
            "m": {k: v.copy() for k, v in self.m.items()},
            "v": {k: v.copy() for k, v in self.v.items()},
            "t": self.t,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = {k: np.array(v, dtype=np.float64) for k, v in state.get("m", {}).items()}
        self.v = {k: np.array(v, dtype=np.float64) for k, v in state.get("v", {}).items()}
        self.t = int(state.get("t", 0))


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    """Return a new optimizer called ``name`` (``"adam"`` or ``"sgd"``)."""
    if name == "adam":
        return Adam(lr, weight_decay=weight_decay)
    if name == "sgd":
        return SGD(lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


LR_SCHEDULES = ("constant", "cosine")


def lr_at_epoch(base_lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """Return the learning rate for ``epoch`` (0-based) of ``epochs`` under ``schedule``.

    ``cosine`` falls from ``base_lr`` at the first epoch along half a cosine period, reaching
    ``base_lr * (1 + cos(pi * (epochs - 1) / epochs)) / 2`` at the last one.
    """
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise ConfigError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
