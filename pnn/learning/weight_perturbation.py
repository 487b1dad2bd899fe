"""Weight perturbation and SPSA: every parameter perturbed at once by random signs.

Both rules change all trainable parameters together by ``d * xi``, with ``xi`` random signs
(Rademacher), measure the loss, and correlate its change with ``xi``:

- weight perturbation (``wp``), forward difference: ``g = [L(theta + d xi) - L(theta)] xi / d``
  (Jabri and Flower 1992, "Weight perturbation: an optimal architecture and learning technique
  for analog VLSI feedforward and recurrent multilayer networks", IEEE Transactions on Neural
  Networks 3(1));
- simultaneous perturbation stochastic approximation (``spsa``), central difference:
  ``g_i = [L(theta + c_k xi) - L(theta - c_k xi)] / (2 c_k xi_i)``, with Spall's gain sequences
  ``a_k = a / (k + 1 + A)^alpha`` and ``c_k = c / (k + 1)^gamma`` (Spall 1998, "Implementation of
  the simultaneous perturbation algorithm for stochastic optimization", IEEE Transactions on
  Aerospace and Electronic Systems 34(3)).

Each estimate is built from the perturbation the node reports as applied, after clipping at the
limits and quantization. Before the rule returns, even when a measurement fails, it sets the
parameters back to their values before the perturbation through ``set_parameters``.
A direction costs one forward pass for ``wp`` (plus one unperturbed pass per batch) and two for
``spsa``. Averaging ``directions`` of them per batch divides the variance by ``directions``; the
variance of one estimate grows in proportion to the number of parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..network import PhysicalNetwork
from .base import RuleContext, StepResult, forward_checked, register_rule
from .perturbation import (
    NodeArrays,
    ParameterPerturbationRule,
    check_count_option,
    DEFAULT_STEPS,
    rademacher,
)

__all__ = ["WeightPerturbation", "SPSA"]


@register_rule
class WeightPerturbation(ParameterPerturbationRule):
    """Weight perturbation: forward differences along random-sign directions of all parameters.

    Parameters
    ----------
    perturbation
        Size ``d`` of the perturbation of every parameter, in the parameter's unit; at least the
        parameter's resolution. None: ``perturbation_steps`` resolution steps on quantized
        parameters, 1e-3 on continuous ones.
    perturbation_steps
        Perturbation of a quantized parameter in resolution steps, when ``perturbation`` is
        None.
    directions
        Random directions averaged per batch; each costs one forward pass.
    """

    name = "wp"

    def __init__(
        self, perturbation: float | None = None, perturbation_steps: int = DEFAULT_STEPS, directions: int = 4
    ) -> None:
        self._init_perturbation(perturbation, perturbation_steps)
        self.directions = check_count_option(self.name, directions, "directions")

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss0, _ = context.loss(outputs, labels)
        base = self.perturber_.snapshot()
        gradients = self._zeros(base)
        changes = []
        try:
            for _ in range(self.directions):
                offsets = {
                    i: {name: self.sizes_[i][name] * rademacher(context.rng, value.shape) for name, value in params.items()}
                    for i, params in base.items()
                }
                applied = self.perturber_.set_offsets(base, offsets)
                change = self._loss(network, x, labels, context) - loss0
                changes.append(abs(change))
                for i, params in applied.items():
                    for name, offset in params.items():
                        gradients[i][name] += change * offset / self.sizes_[i][name] ** 2
        finally:
            self.perturber_.restore(base)
        for params in gradients.values():
            for value in params.values():
                value /= self.directions
        return StepResult(loss=float(loss0), outputs=outputs, gradients=gradients,
                          extras={"perturbation_loss_change": float(np.mean(changes))})

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name, "perturbation": self.perturbation,
            "perturbation_steps": self.perturbation_steps, "directions": self.directions,
        }


@register_rule
class SPSA(ParameterPerturbationRule):
    """Simultaneous perturbation stochastic approximation with Spall's gain sequences.

    The returned estimate is scaled by ``a_k / a_0 = ((1 + A) / (k + 1 + A))^alpha``. With plain
    SGD (no momentum) at learning rate ``a_0 = a / (1 + A)^alpha``, each step is then Spall's
    ``theta <- theta - a_k g_k``. The controller's learning-rate schedule multiplies on top.

    Parameters
    ----------
    perturbation
        Initial perturbation size ``c``, in each parameter's unit. ``c_k`` never falls below a
        parameter's resolution, where a smaller step would not move the device. None:
        ``perturbation_steps`` resolution steps on quantized parameters, 1e-3 on continuous ones.
    perturbation_steps
        ``c`` of a quantized parameter in resolution steps, when ``perturbation`` is None.
    directions
        Random directions averaged per batch; each costs two forward passes.
    stability
        Spall's stability constant ``A``. He suggests about a tenth of the planned iterations,
        and the default 1000 is that for a 10-epoch MNIST run (9380 batches of 64).
    alpha, gamma
        Decay exponents of ``a_k`` and ``c_k``; Spall's practical values are 0.602 and 0.101.
        Zero keeps that gain constant.
    """

    name = "spsa"

    def __init__(
        self,
        perturbation: float | None = None,
        perturbation_steps: int = DEFAULT_STEPS,
        directions: int = 4,
        stability: float = 1000.0,
        alpha: float = 0.602,
        gamma: float = 0.101,
    ) -> None:
        self._init_perturbation(perturbation, perturbation_steps)
        self.directions = check_count_option(self.name, directions, "directions")
        for label, value in (("stability", stability), ("alpha", alpha), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"rule 'spsa': {label} must be a number >= 0, got {value!r}")
        self.stability = float(stability)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.k_ = 0

    def gains(self, k: int) -> tuple[float, float]:
        """Return (a_k / a_0, c_k / c) for iteration ``k`` (0-based)."""
        gain = ((1.0 + self.stability) / (k + 1.0 + self.stability)) ** self.alpha
        return gain, (k + 1.0) ** -self.gamma

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        gain, shrink = self.gains(self.k_)
        base = self.perturber_.snapshot()
        sizes = {
            i: {
                name: np.float64(max(size * shrink, network[i].parameters[name].resolution))
                for name, size in params.items()
            }
            for i, params in self.sizes_.items()
        }
        gradients = self._zeros(base)
        changes = []
        try:
            for _ in range(self.directions):
                signs = {i: {name: rademacher(context.rng, value.shape) for name, value in params.items()}
                         for i, params in base.items()}
                plus = self.perturber_.set_offsets(
                    base, {i: {name: sizes[i][name] * s for name, s in p.items()} for i, p in signs.items()}
                )
                loss_plus = self._loss(network, x, labels, context)
                minus = self.perturber_.set_offsets(
                    base, {i: {name: -sizes[i][name] * s for name, s in p.items()} for i, p in signs.items()}
                )
                loss_minus = self._loss(network, x, labels, context)
                change = loss_plus - loss_minus
                changes.append(abs(change))
                # With nothing clipped, plus - minus = 2 c_k xi, and this is Spall's estimate.
                for i, params in plus.items():
                    for name, offset in params.items():
                        gradients[i][name] += change * (offset - minus[i][name]) / (2.0 * sizes[i][name]) ** 2
        finally:
            self.perturber_.restore(base)

        outputs = forward_checked(network, x)
        loss, _ = context.loss(outputs, labels)
        for params in gradients.values():
            for value in params.values():
                value *= gain / self.directions
        self.k_ += 1
        return StepResult(loss=float(loss), outputs=outputs, gradients=gradients,
                          extras={"perturbation_loss_change": float(np.mean(changes)), "spsa_gain": gain})

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k_}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.k_ = int(state["k"])

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name, "perturbation": self.perturbation,
            "perturbation_steps": self.perturbation_steps, "directions": self.directions,
            "stability": self.stability, "alpha": self.alpha, "gamma": self.gamma,
        }
