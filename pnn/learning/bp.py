"""Backpropagation on a fully digital network: the exact gradient, the reference for every rule.

The error at the network output goes back node by node through each node's exact input
gradient, and each trainable node turns the error at its outputs into its parameter gradient.
:func:`backprop_gradients` is shared with physics-aware training (``pat``), which runs the same
pass through the models of physical nodes, and with the alignment metrics.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..network import PhysicalNetwork
from .base import LearningRule, RuleContext, StepResult, forward_checked, register_rule

__all__ = ["Backprop", "backprop_gradients", "check_backward_models"]


def check_backward_models(
    network: PhysicalNetwork,
    user: str,
    remedy: str = "give it a digital twin, or use a rule that needs none, such as 'dfa' or 'adfa'",
) -> None:
    """Raise ConfigError naming the first node the error cannot pass back through.

    Every node after the first trainable one needs ``input_gradient`` (a model of itself).
    ``user`` names what needs the backward pass in the message (for example "rule 'pat'"),
    and ``remedy`` is the advice that ends the message.
    """
    first = network.trainable_indices[0]
    for node in network.nodes[first + 1 :]:
        if not node.has_input_gradient:
            raise ConfigError(
                f"{user}: node {node.name!r} ({type(node).__name__}) has no model to send the "
                f"error back to its inputs (input_gradient); {remedy}"
            )


def backprop_gradients(network: PhysicalNetwork, error: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Return every trainable node's gradient for an output error of the last forward pass.

    Parameters
    ----------
    network
        A network that has just run :meth:`~pnn.network.PhysicalNetwork.forward`; its states
        are the operating points of each node's model.
    error
        Loss derivative with respect to the network outputs, array of shape (batch, n_out).

    Returns
    -------
    dict
        Gradient per parameter, by node position.
    """
    states = network.states
    first = network.trainable_indices[0]
    gradients = {}
    for position in range(len(network) - 1, first - 1, -1):
        node = network[position]
        if node.trainable:
            gradients[position] = node.local_gradient(states[position], error)
        if position > first:
            error = node.input_gradient(states[position], error)
    return gradients


@register_rule
class Backprop(LearningRule):
    """Backpropagation; every trainable node must compute its gradient exactly (a digital node).

    For physical nodes use ``pat``, which runs the same backward pass through their models.
    """

    name = "bp"

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        for i in network.trainable_indices:
            node = network[i]
            if node.gradient_method != "exact":
                raise ConfigError(
                    f"rule 'bp' needs a fully digital network, but node {node.name!r} "
                    f"({type(node).__name__}) computes its gradient by {node.gradient_method!r}; "
                    "use rule 'pat' to backpropagate through the node's model, or --device digital"
                )
        check_backward_models(network, f"rule {self.name!r}")

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, error = context.loss(outputs, labels)
        return StepResult(loss=loss, outputs=outputs, gradients=backprop_gradients(network, error))
