"""Direct feedback alignment (Nokland 2016, "Direct feedback alignment provides learning in deep
neural networks", NeurIPS).

Every hidden node receives the output error through its own feedback path B_l and turns it
into a local update, delta_l = (B_l e) * f'(a_l) and dW_l = delta_l h_{l-1}^T; the last
trainable node receives the true error (through the readout), so its update equals the backprop
gradient. No error travels back through the network, so the hardware never runs backwards.
"""

from __future__ import annotations

import numpy as np

from ..network import PhysicalNetwork
from .alignment import AlignmentRule, FeedbackRoute
from .base import RuleContext, StepResult, forward_checked, register_rule

__all__ = ["DFA", "direct_routes"]


def direct_routes(network: PhysicalNetwork, hidden: list[int]) -> list[FeedbackRoute]:
    """Return the routes from each hidden node's outputs to the network's outputs.

    A direct feedback path B_l of shape (n_l, n_out) replaces the transposed Jacobian of the
    network output with respect to node l's outputs.
    """
    last = len(network) - 1
    return [
        FeedbackRoute(
            key=i, n_target=network[i].n_out, n_error=network.n_out, first=i + 1, last=last, response="outputs",
            mismatch=f"node {network[i].name!r} has {network[i].n_out} outputs but the network has {network.n_out}",
        )
        for i in hidden
    ]


@register_rule
class DFA(AlignmentRule):
    """Direct feedback alignment.

    Parameters
    ----------
    feedback
        Feedback path for hidden nodes: ``"random"``, ``"identity"``, ``"physical"`` or
        ``"learned"`` (see :mod:`pnn.learning.feedback`). Learned paths track the Jacobian of the
        network output with respect to the node's outputs, measured by adding noise there.
    feedback_scale, feedback_rate, feedback_noise
        See :class:`~pnn.learning.alignment.AlignmentRule`.
    """

    name = "dfa"

    def routes(self, network: PhysicalNetwork) -> list[FeedbackRoute]:
        return direct_routes(network, network.trainable_indices[:-1])

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, error = context.loss(outputs, labels)
        states = network.states
        indices = network.trainable_indices
        gradients = {}

        last = indices[-1]
        gradients[last] = network[last].local_gradient(states[last], network.backward_to(last, error))
        for i in indices[:-1]:
            gradients[i] = network[i].local_gradient(states[i], self.paths_[i].project(error))
        self.remember(states)
        return StepResult(loss=loss, outputs=outputs, gradients=gradients)
