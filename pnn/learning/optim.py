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

__all__ = ["Optimizer", "SGD", "Adam", "make_optimizer", "OPTIMIZERS", "lr_at_epoch", "LR_SCHEDULES"]


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
            if self.weight_decay and params is not None:
                grad = grad + self.weight_decay * params[name]
            if self.momentum:
                v = self.velocity.get(name)
                v = grad.copy() if v is None else self.momentum * v + grad
                self.velocity[name] = v
                grad = v
            updates[name] = -self.lr * grad
        return updates

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": {k: v.copy() for k, v in self.velocity.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = {k: np.array(v) for k, v in state.get("velocity", {}).items()}


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
            m = self.m.get(name)
            v = self.v.get(name)
            if m is None:
                m = np.zeros_like(grad)
                v = np.zeros_like(grad)
            m *= self.beta1
            m += (1.0 - self.beta1) * grad
            v *= self.beta2
            v += (1.0 - self.beta2) * grad * grad
            self.m[name], self.v[name] = m, v
            update = -self.lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)
            if self.weight_decay and params is not None:
                update -= self.lr * self.weight_decay * params[name]
            updates[name] = update
        return updates

    def state_dict(self) -> dict[str, Any]:
        return {
            "m": {k: v.copy() for k, v in self.m.items()},
            "v": {k: v.copy() for k, v in self.v.items()},
            "t": self.t,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = {k: np.array(v) for k, v in state.get("m", {}).items()}
        self.v = {k: np.array(v) for k, v in state.get("v", {}).items()}
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
