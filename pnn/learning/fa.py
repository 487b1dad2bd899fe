"""Feedback alignment (Lillicrap et al. 2016, "Random synaptic feedback weights support error
backpropagation for deep learning", Nature Communications 7, 13276).

The error travels back layer by layer as in backprop, but through fixed feedback matrices in
place of the transposed forward weights: with delta_l the error at node l's pre-activation,

    delta_L = e * f'(a_L),    delta_l = (B_{l+1} delta_{l+1}) * f'(a_l),    dW_l = delta_l h_{l-1}^T,

where B_{l+1} has the shape of W_{l+1}^T. The last trainable node receives the true error
through the readout, so its update equals the backprop gradient.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..network import PhysicalNetwork
from .alignment import AlignmentRule, FeedbackRoute, has_preactivation_error
from .base import RuleContext, StepResult, forward_checked, register_rule

__all__ = ["FA"]


@register_rule
class FA(AlignmentRule):
    """Feedback alignment.

    Every trainable node but the first has a feedback path B from its pre-activation back to
    its inputs; parameter-free nodes between two trainable nodes pass the error on through their
    model (``input_gradient``). The hardware needs to supply each node's pre-activation error
    (``preactivation_error``: the output error times f' at the measured pre-activation), and
    the feedback matrices run off the device.

    Parameters
    ----------
    feedback
        ``"random"`` (fixed B, Lillicrap et al. 2016), ``"identity"`` (B = I, for square
        nodes), ``"physical"`` (B is a frozen node of the network's device kind) or
        ``"learned"``: B tracks W^T, measured by adding noise to the node's inputs and reading
        the change of its pre-activation (a weight mirror, Akrout et al. 2019, NeurIPS).
    feedback_scale, feedback_rate, feedback_noise
        See :class:`~pnn.learning.alignment.AlignmentRule`.
    """

    name = "fa"

    def routes(self, network: PhysicalNetwork) -> list[FeedbackRoute]:
        routes = []
        for j in network.trainable_indices[1:]:
            node = network[j]
            routes.append(
                FeedbackRoute(
                    key=j, n_target=node.n_in, n_error=node.n_out, first=j, last=j, response="preactivation",
                    mismatch=f"node {node.name!r} has {node.n_in} inputs but {node.n_out} outputs",
                )
            )
        return routes

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        indices = network.trainable_indices
        for previous, j in zip(indices, indices[1:]):
            if not has_preactivation_error(network[j]):
                raise ConfigError(
                    f"rule 'fa': node {network[j].name!r} exposes no pre-activation error "
                    "(preactivation_error), which feedback alignment sends through its feedback "
                    "matrix; use rule 'dfa' or 'adfa'"
                )
            for between in network.nodes[previous + 1 : j]:
                if not between.has_input_gradient:
                    raise ConfigError(
                        f"rule 'fa': node {between.name!r} between two trainable nodes has no model to "
                        "pass the error back (input_gradient); use rule 'dfa'"
                    )

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, error = context.loss(outputs, labels)
        states = network.states
        indices = network.trainable_indices
        gradients = {}

        # error: at the outputs of the trainable node being handled, shape (batch, n_out of it).
        error = network.backward_to(indices[-1], error)
        gradients[indices[-1]] = network[indices[-1]].local_gradient(states[indices[-1]], error)
        for k in range(len(indices) - 1, 0, -1):
            j, previous = indices[k], indices[k - 1]
            delta = network[j].preactivation_error(states[j], error)
            error = self.paths_[j].project(delta)  # at node j's inputs: (batch, n_in of node j)
            for position in range(j - 1, previous, -1):
                error = network[position].input_gradient(states[position], error)
            gradients[previous] = network[previous].local_gradient(states[previous], error)
        self.remember(states)
        return StepResult(loss=loss, outputs=outputs, gradients=gradients)
