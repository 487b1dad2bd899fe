"""Direct feedback alignment (Nokland 2016, "Direct feedback alignment provides learning in deep
neural networks", NeurIPS).

Every hidden node receives the output error through its own fixed feedback path B_l and turns
it into a local update, delta_l = (B_l e) * f'(a_l) and dW_l = delta_l h_{l-1}^T; the last
trainable node receives the true error (through the readout), so its update equals the backprop
gradient. No error travels back through the network, so the hardware never runs backwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..network import PhysicalNetwork
from .base import LearningRule, RuleContext, StepResult, forward_checked, register_rule
from .feedback import FEEDBACK_STRATEGIES, Feedback, IdentityFeedback, PhysicalFeedback, RandomFeedback

__all__ = ["DFA"]


@register_rule
class DFA(LearningRule):
    """Direct feedback alignment.

    Parameters
    ----------
    feedback
        Feedback path for hidden nodes: ``"random"``, ``"identity"`` or ``"physical"`` (see
        :mod:`pnn.learning.feedback`).
    feedback_scale
        Scale of the random feedback matrices (and of the physical feedback node's weights).
    """

    name = "dfa"

    def __init__(self, feedback: str = "random", feedback_scale: float = 1.0) -> None:
        if feedback not in FEEDBACK_STRATEGIES:
            raise ConfigError(f"unknown feedback {feedback!r} for rule 'dfa'; choose one of {', '.join(FEEDBACK_STRATEGIES)}")
        if not feedback_scale > 0:
            raise ConfigError(f"feedback_scale must be positive, got {feedback_scale}")
        self.feedback = feedback
        self.feedback_scale = float(feedback_scale)
        self.paths_: dict[int, Feedback] = {}

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        last = network.trainable_indices[-1]
        for node in network.nodes[last + 1 :]:
            if not node.has_input_gradient:
                raise ConfigError(
                    f"rule 'dfa': node {node.name!r} after the last trainable node has no model to "
                    "pass the output error back; make it trainable or put a digital readout there"
                )
        if self.feedback == "identity":
            for i in network.trainable_indices[:-1]:
                if network[i].n_out != network.n_out:
                    raise ConfigError(
                        f"rule 'dfa' with identity feedback: node {network[i].name!r} has "
                        f"{network[i].n_out} outputs but the network has {network.n_out}; "
                        "use random feedback or equal widths"
                    )

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        self.check(network)
        if self.feedback == "physical" and context.node_factory is None:
            raise ConfigError("rule 'dfa' with physical feedback needs a device to build the feedback node on")
        self.paths_ = {}
        for i in network.trainable_indices[:-1]:
            n_target = network[i].n_out
            if self.feedback == "random":
                self.paths_[i] = RandomFeedback(n_target, network.n_out, context.rng, self.feedback_scale)
            elif self.feedback == "identity":
                self.paths_[i] = IdentityFeedback()
            else:
                node = context.node_factory(network.n_out, n_target, f"feedback-{network[i].name}", "linear")
                self.paths_[i] = PhysicalFeedback(node)

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
        return StepResult(loss=loss, outputs=outputs, gradients=gradients)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): path.state_dict() for i, path in self.paths_.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for i, path in self.paths_.items():
            path.load_state_dict(state[str(i)])

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, "feedback": self.feedback, "feedback_scale": self.feedback_scale}
