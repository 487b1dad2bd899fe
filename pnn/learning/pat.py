"""Physics-aware training (Wright et al. 2022, "Deep physical neural networks trained with
backpropagation", Nature 601, 549).

The forward pass runs on the hardware. The backward pass runs through a differentiable model
of each node, evaluated at the measured states: the inputs as applied, the measured outputs and
the pre-activations. The loss and its error come from the measured outputs, so a model that is
only roughly right still moves the hardware downhill, which training the model alone and
copying its weights over does not do. With a perfect model the update equals backprop.

In pnn a node's model is its ``input_gradient`` and ``local_gradient`` (for a simulated
crossbar: the programmed weights and f' at the measured pre-activation).
"""

from __future__ import annotations

import numpy as np

from ..network import PhysicalNetwork
from .base import LearningRule, RuleContext, StepResult, forward_checked, register_rule
from .bp import backprop_gradients, check_backward_models

__all__ = ["PhysicsAwareTraining"]


@register_rule
class PhysicsAwareTraining(LearningRule):
    """Physics-aware training: backprop through each node's model at its measured state.

    Every node after the first trainable one needs a model to pass the error back
    (``has_input_gradient``); :meth:`check` names the first one without.
    """

    name = "pat"

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        check_backward_models(network, f"rule {self.name!r}")

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, error = context.loss(outputs, labels)
        return StepResult(loss=loss, outputs=outputs, gradients=backprop_gradients(network, error))
