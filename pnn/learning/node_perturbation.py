"""Node perturbation: perturb the outputs of every trainable node and correlate with the loss change.

Each trainable node's outputs get independent Gaussian noise ``xi ~ N(0, s^2)`` per example, added
in the host before the next node (:meth:`PhysicalNetwork.forward` with ``perturbations``). The
change of each example's loss estimates the loss gradient with respect to that node's outputs,

    dL_n/dh ~ [L_n(h + xi) - L_n(h)] xi / s^2,

and the node turns that error into its parameter gradient with
:meth:`~pnn.nodes.Node.local_gradient`, at the state of the unperturbed pass. Because each
example has its own perturbation and its own loss change, one perturbed pass gives ``batch``
independent estimates, and the variance grows with the number of perturbed outputs, not with
the number of parameters.
Werfel, Xie and Seung (2005, "Learning curves for stochastic gradient descent in linear
feedforward networks", Neural Computation 17) analyse a linear perceptron at its best learning
rate. There, node perturbation is slower than gradient descent by a factor equal to the number
of output units, and weight perturbation is slower again by the number of input units.

What the hardware needs: a way to add a known signal to each node's outputs before the next
node (the host does it when signals pass through it, as in this package), and per-example loss
measurements. The parameter gradient comes from the node's own ``local_gradient``, so the node
needs the derivative of its nonlinearity at the measured pre-activation (a crossbar's periphery
knows it) or its own in-situ gradient method.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..network import PhysicalNetwork
from .base import LearningRule, RuleContext, StepResult, forward_checked, register_rule
from .perturbation import check_count_option, check_perturbation_option, per_example_losses

__all__ = ["NodePerturbation"]


def check_local_gradient(rule: str, network: PhysicalNetwork, indices: list[int]) -> None:
    """Raise ConfigError naming the first node in ``indices`` that cannot turn an error into a gradient."""
    for i in indices:
        node = network[i]
        if node.gradient_method == "none":
            raise ConfigError(
                f"rule {rule!r}: node {node.name!r} ({type(node).__name__}) has trainable parameters but no "
                "local gradient (gradient_method 'none'), so it cannot turn an error at its outputs into an "
                "update; use wp, spsa or mgd, which need only forward measurements"
            )


@register_rule
class NodePerturbation(LearningRule):
    """Node perturbation of every trainable node's outputs, with per-example loss changes.

    Parameters
    ----------
    perturbation
        Standard deviation ``s`` of the Gaussian perturbation of each output, in the node's
        output unit.
    directions
        Perturbed passes averaged per batch; each costs one forward pass.
    """

    name = "np"

    def __init__(self, perturbation: float = 0.1, directions: int = 1) -> None:
        value = check_perturbation_option(self.name, perturbation)
        if value is None:
            raise ConfigError("rule 'np': perturbation must be a positive number, got None")
        self.perturbation = value
        self.directions = check_count_option(self.name, directions, "directions")

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        check_local_gradient(self.name, network, network.trainable_indices)

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        self.check(network)

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, _ = context.loss(outputs, labels)
        clean_losses = per_example_losses(context.loss, outputs, labels)
        states = network.states
        indices = network.trainable_indices
        batch = outputs.shape[0]
        variance = self.perturbation**2
        errors = {i: np.zeros((batch, network[i].n_out)) for i in indices}

        for _ in range(self.directions):
            noise = {i: context.rng.normal(0.0, self.perturbation, (batch, network[i].n_out)) for i in indices}
            perturbed = network.forward(x, perturbations=noise)
            reason = network.invalid_reason()
            if reason is not None:
                raise MeasurementError(f"invalid measurement in a perturbed pass, batch rejected: {reason}")
            change = per_example_losses(context.loss, perturbed, labels) - clean_losses
            for i in indices:
                errors[i] += change[:, None] * network.applied_perturbations[i] / variance

        gradients = {}
        for i in indices:
            gradients[i] = network[i].local_gradient(states[i], errors[i] / self.directions)
        return StepResult(loss=float(loss), outputs=outputs, gradients=gradients)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, "perturbation": self.perturbation, "directions": self.directions}
