"""Indirect feedback alignment (Nokland 2016, "Direct feedback alignment provides learning in deep
neural networks", NeurIPS, figure 1d).

The output error reaches the first hidden node through one feedback path B_1, and from there it
travels up through the forward weights, in the direction of the forward pass:

    delta_1 = (B_1 e) * f'(a_1),    delta_l = (W_l delta_{l-1}) * f'(a_l)  for hidden l > 1,

and the last trainable node receives the true error. This follows the two-hidden-layer
equations given for IFA by Nokland 2016 (delta_1 from B_1 e, delta_2 from W_2 delta_1);
continuing the chain through W_l for more hidden layers is this module's reading of that rule.
NOTE: it was checked against secondary descriptions of the paper's figure 1d, not against the
paper's own text.

On hardware the product W_l delta_{l-1} is measured, not computed: the error is applied to
node l as an input, with both signs, and the difference of the two measured pre-activations
gives W_l delta_{l-1} without the bias (:func:`~pnn.learning.alignment.measure_linear_map`). So
the rule needs no model of the forward weights, but each hidden node after the first must
expose its pre-activation.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..network import PhysicalNetwork
from .alignment import AlignmentRule, FeedbackRoute, has_preactivation_error, measure_linear_map
from .base import RuleContext, StepResult, forward_checked, register_rule
from .dfa import direct_routes

__all__ = ["IFA"]


@register_rule
class IFA(AlignmentRule):
    """Indirect feedback alignment.

    Parameters
    ----------
    feedback
        Feedback path from the output error to the first hidden node: ``"random"``,
        ``"identity"``, ``"physical"`` or ``"learned"`` (see :mod:`pnn.learning.feedback`).
    feedback_scale, feedback_rate, feedback_noise
        See :class:`~pnn.learning.alignment.AlignmentRule`.
    """

    name = "ifa"

    def routes(self, network: PhysicalNetwork) -> list[FeedbackRoute]:
        hidden = network.trainable_indices[:-1]
        return direct_routes(network, hidden[:1])

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        hidden = network.trainable_indices[:-1]
        for previous, i in zip(hidden, hidden[1:]):
            if i != previous + 1:
                between = network[previous + 1]
                raise ConfigError(
                    f"rule 'ifa': node {between.name!r} sits between the hidden nodes {network[previous].name!r} "
                    f"and {network[i].name!r}, but the error travels directly from one hidden node to the next; "
                    "use rule 'dfa'"
                )
            if not has_preactivation_error(network[previous]):
                raise ConfigError(
                    f"rule 'ifa': node {network[previous].name!r} exposes no pre-activation error "
                    "(preactivation_error) to send on to the next hidden node; use rule 'dfa'"
                )
            if not network[i].has_preactivation:
                raise ConfigError(
                    f"rule 'ifa': node {network[i].name!r} exposes no pre-activation, so the forward "
                    "weights' product with the error cannot be measured on it; use rule 'dfa'"
                )
            spec = network[i].input_spec
            if np.any(spec.lower_array >= 0) or np.any(spec.upper_array <= 0):
                raise ConfigError(
                    f"rule 'ifa': node {network[i].name!r} takes inputs in {spec.range_text()}, but the "
                    "error must be applied to it with both signs; use rule 'dfa'"
                )

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, error = context.loss(outputs, labels)
        states = network.states
        indices = network.trainable_indices
        gradients = {}

        last = indices[-1]
        gradients[last] = network[last].local_gradient(states[last], network.backward_to(last, error))
        hidden = indices[:-1]
        if hidden:
            # signal: the error at the outputs of the hidden node being handled, (batch, n_out).
            signal = self.paths_[hidden[0]].project(error)
            for n, i in enumerate(hidden):
                if n > 0:
                    signal = measure_linear_map(network[i], delta)
                gradients[i] = network[i].local_gradient(states[i], signal)
                if n < len(hidden) - 1:
                    delta = network[i].preactivation_error(states[i], signal)
        self.remember(states)
        return StepResult(loss=loss, outputs=outputs, gradients=gradients)
