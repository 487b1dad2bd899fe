"""Augmented direct feedback alignment (Nakajima et al. 2022, "Physical deep learning with
biologically inspired training method: gradient-free approach for physical hardware", Nature
Communications 13, 7847).

DFA with the derivative of the nonlinearity replaced by a chosen function g of the measured
pre-activation:

    delta_l = (B_l e) * g(a_l),    dW_l = delta_l h_{l-1}^T,

so training needs the node's pre-activation but no derivative, and no model, of the hardware's
nonlinearity. The last trainable node receives the true error through the readout, as in DFA
(its nonlinearity is the identity in a classifier's output layer, so no derivative is needed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..network import PhysicalNetwork
from .base import RuleContext, StepResult, forward_checked, register_rule
from .dfa import DFA

__all__ = ["ADFA", "DERIVATIVE_STAND_INS"]


def _tanh_prime(a: np.ndarray) -> np.ndarray:
    t = np.tanh(a)
    return 1.0 - t * t


#: Functions g(a) that ADFA may use in place of f'(a), by name.
DERIVATIVE_STAND_INS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "one": np.ones_like,
    "cos": np.cos,
    "tanh-prime": _tanh_prime,
    "gaussian": lambda a: np.exp(-0.5 * a * a),
}


@register_rule
class ADFA(DFA):
    """Augmented direct feedback alignment.

    Parameters
    ----------
    feedback
        Feedback path for hidden nodes, as in DFA: ``"random"``, ``"identity"``,
        ``"physical"`` or ``"learned"``.
    derivative
        The function g(a) used in place of f'(a), with a the measured pre-activation:
        ``"one"`` (g = 1), ``"cos"`` (cos a), ``"tanh-prime"`` (1 - tanh(a)^2, whatever the
        node's real nonlinearity is) or ``"gaussian"`` (exp(-a^2 / 2)).
    feedback_scale, feedback_rate, feedback_noise
        See :class:`~pnn.learning.alignment.AlignmentRule`.
    """

    name = "adfa"

    def __init__(
        self,
        feedback: str = "random",
        derivative: str = "cos",
        feedback_scale: float = 1.0,
        feedback_rate: float = 0.05,
        feedback_noise: float = 0.1,
    ) -> None:
        super().__init__(feedback, feedback_scale, feedback_rate, feedback_noise)
        if derivative not in DERIVATIVE_STAND_INS:
            raise ConfigError(
                f"unknown derivative {derivative!r} for rule 'adfa'; choose one of {', '.join(DERIVATIVE_STAND_INS)}"
            )
        self.derivative = derivative

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        for i in network.trainable_indices[:-1]:
            if not network[i].has_preactivation:
                raise ConfigError(
                    f"rule 'adfa': node {network[i].name!r} exposes no pre-activation, which augmented DFA "
                    "evaluates g(a) on; use rule 'dfa'"
                )

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, error = context.loss(outputs, labels)
        states = network.states
        indices = network.trainable_indices
        stand_in = DERIVATIVE_STAND_INS[self.derivative]
        gradients = {}

        last = indices[-1]
        gradients[last] = network[last].local_gradient(states[last], network.backward_to(last, error))
        for i in indices[:-1]:
            probe = states[i].probes.get("preactivation")
            if probe is None:
                raise ConfigError(f"rule 'adfa': node {network[i].name!r} measured no 'preactivation' probe")
            delta = self.paths_[i].project(error) * stand_in(np.asarray(probe, dtype=np.float64))
            gradients[i] = network[i].local_gradient(states[i], delta, at="preactivation")
        self.remember(states)
        return StepResult(loss=loss, outputs=outputs, gradients=gradients)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["derivative"] = self.derivative
        return info
