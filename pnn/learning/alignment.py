"""Shared machinery of the feedback-alignment family (FA, DFA, IFA, augmented DFA).

Each rule sends the output error to its hidden nodes along feedback paths, each of which
replaces the backward pass through part of the network. A :class:`FeedbackRoute` names that
part. :class:`AlignmentRule` builds one path per route with the chosen strategy (``random``,
``identity``, ``physical`` or ``learned``, see :mod:`pnn.learning.feedback`), checks the
network, checkpoints the paths and trains learned ones after each update.

Learned feedback is trained from forward measurements only (:func:`measure_response`). Noise is
added to the signal entering the route, and the route runs on the clean and the perturbed signal
in one batch. The change of its output (or pre-activation) is the response, and its correlation
with the noise estimates the route's Jacobian.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..network import PhysicalNetwork
from ..nodes import Node, NodeState
from .base import LearningRule, RuleContext
from .feedback import (
    FEEDBACK_STRATEGIES,
    Feedback,
    IdentityFeedback,
    LearnedFeedback,
    PhysicalFeedback,
    RandomFeedback,
)

__all__ = [
    "AlignmentRule",
    "FeedbackRoute",
    "perturb_and_measure",
    "measure_response",
    "measure_linear_map",
    "has_preactivation_error",
    "is_positive_number",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackRoute:
    """The part of a network whose backward pass one feedback path replaces.

    The route runs from the inputs of node ``first`` to node ``last`` (inclusive). Its
    Jacobian maps a change of node ``first``'s inputs, shape (batch, n_target), to a change of
    node ``last``'s outputs or pre-activation (``response``), shape (batch, n_error). The
    feedback path carries an error the other way.

    Attributes
    ----------
    key
        Position of the node whose error signal the path produces; keys the rule's paths.
    n_target, n_error
        Widths of the feedback signal and of the error it receives.
    first, last
        Positions of the first and last node of the route.
    response
        ``"outputs"`` or ``"preactivation"`` of node ``last``: where the error is taken.
    mismatch
        Why identity feedback cannot replace the route when the widths differ, as text
        naming the node (for example "node 'layer1' has 64 outputs but the network has 7").
    """

    key: int
    n_target: int
    n_error: int
    first: int
    last: int
    response: Literal["outputs", "preactivation"]
    mismatch: str


def is_positive_number(value: Any) -> bool:
    """Return True for a finite int or float above zero (booleans and strings are not numbers)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def has_preactivation_error(node: Node) -> bool:
    """Return True when ``node`` can turn an output error into a pre-activation error."""
    return node.has_preactivation and type(node).preactivation_error is not Node.preactivation_error


def _checked_state(node: Node) -> NodeState:
    state = node.measure_state()
    reason = state.invalid_reason()
    if reason is not None:
        raise MeasurementError(f"node {node.name!r}: {reason}")
    return state


def perturb_and_measure(
    network: PhysicalNetwork,
    first: int,
    last: int,
    inputs: np.ndarray,
    std: float,
    rng: np.random.Generator,
    response: Literal["outputs", "preactivation"] = "outputs",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run nodes ``first`` to ``last`` on clean inputs and on inputs with Gaussian noise added.

    Parameters
    ----------
    network
        The network the nodes belong to.
    first, last
        Positions of the first and last node to run (inclusive).
    inputs
        Inputs of node ``first``, array of shape (batch, n_in of that node).
    std
        Standard deviation of the noise, in the node's input units. Noisy inputs are clipped to
        the node's input range.
    rng
        Generator for the noise.
    response
        Read node ``last``'s ``"outputs"`` or its ``"preactivation"`` probe.

    Returns
    -------
    applied_clean, applied_noisy, measured_clean, measured_noisy
        Inputs as node ``first`` applied them (after clipping and any DAC rounding), each of
        shape (batch, n_in), and the response to each, each of shape (batch, n_out).

    Raises
    ------
    MeasurementError
        If a node returns an invalid measurement.
    """
    node = network[first]
    lower, upper = node.input_spec.lower_array, node.input_spec.upper_array
    clean = np.clip(np.asarray(inputs, dtype=np.float64), lower, upper)
    noisy = np.clip(clean + rng.normal(0.0, std, clean.shape), lower, upper)
    batch = clean.shape[0]

    # Clean and noisy examples go through in one batch: (2 * batch, n_in).
    signal = np.concatenate([clean, noisy])
    applied = None
    state = None
    for position in range(first, last + 1):
        signal = network[position].forward(signal)
        state = _checked_state(network[position])
        if applied is None:
            applied = np.asarray(state.inputs, dtype=np.float64)
    if response == "preactivation":
        measured = np.asarray(state.probes["preactivation"], dtype=np.float64)
    else:
        measured = np.asarray(signal, dtype=np.float64)
    return applied[:batch], applied[batch:], measured[:batch], measured[batch:]


def measure_response(
    network: PhysicalNetwork,
    route: FeedbackRoute,
    inputs: np.ndarray,
    std: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Measure how a route responds to noise added at its inputs.

    Returns the change of the inputs as the route's first node applied them, shape
    (batch, n_target), and the measured change of the route's output or pre-activation, shape
    (batch, n_error). See :func:`perturb_and_measure` for the arguments.
    """
    applied_clean, applied_noisy, clean, noisy = perturb_and_measure(
        network, route.first, route.last, inputs, std, rng, route.response
    )
    return applied_noisy - applied_clean, noisy - clean


def measure_linear_map(node: Node, signal: np.ndarray) -> np.ndarray:
    """Measure ``W @ signal`` for each example: the node's pre-activation response without bias.

    The signal is scaled by a gain g to fill the node's input range (at most [-1, 1]), so that
    DAC rounding costs little, and applied with both signs in one batch. The difference of the
    two measured pre-activations, ``a(g s) - a(-g s) = 2 g W s``, divided by ``2 g`` is the
    result, and the bias cancels in it.

    Parameters
    ----------
    node
        A node that exposes its pre-activation (``has_preactivation``).
    signal
        Array of shape (batch, n_in).

    Returns
    -------
    numpy.ndarray
        Array of shape (batch, n_out).
    """
    signal = np.asarray(signal, dtype=np.float64)
    batch = signal.shape[0]
    peak = float(np.max(np.abs(signal))) if signal.size else 0.0
    if peak == 0.0:
        return np.zeros((batch, node.n_out))
    reach = min(1.0, float(np.min(node.input_spec.upper_array)), float(np.min(-node.input_spec.lower_array)))
    if not reach > 0:
        raise ConfigError(
            f"node {node.name!r}: its input range {node.input_spec.range_text()} does not contain both "
            "signs around zero, so a signal cannot be applied with both signs"
        )
    gain = reach / peak
    node.forward(np.concatenate([gain * signal, -gain * signal]))
    state = _checked_state(node)
    a = np.asarray(state.probes["preactivation"], dtype=np.float64)  # (2 * batch, n_out)
    return (a[:batch] - a[batch:]) / (2.0 * gain)


class AlignmentRule(LearningRule):
    """Base of the alignment rules: feedback paths by strategy, checks, checkpoints.

    Subclasses set ``name``, implement :meth:`routes` and :meth:`compute`, and call
    :meth:`remember` with the forward pass's states so that learned feedback can train.

    Parameters
    ----------
    feedback
        ``"random"``, ``"identity"``, ``"physical"`` or ``"learned"`` (see
        :mod:`pnn.learning.feedback`).
    feedback_scale
        Scale of the random matrices, which are also the starting point of learned ones. A
        physical feedback node keeps the initial weights its device kind gives it.
    feedback_rate
        Learned feedback only: fraction of the way each measurement moves B towards its
        Jacobian estimate, in (0, 1].
    feedback_noise
        Learned feedback only: standard deviation of the noise added at each route's inputs,
        in the node's input units.
    """

    def __init__(
        self,
        feedback: str = "random",
        feedback_scale: float = 1.0,
        feedback_rate: float = 0.05,
        feedback_noise: float = 0.1,
    ) -> None:
        if feedback not in FEEDBACK_STRATEGIES:
            raise ConfigError(
                f"unknown feedback {feedback!r} for rule {self.name!r}; choose one of {', '.join(FEEDBACK_STRATEGIES)}"
            )
        for label, value in (("feedback_scale", feedback_scale), ("feedback_rate", feedback_rate),
                             ("feedback_noise", feedback_noise)):
            if not is_positive_number(value):
                raise ConfigError(f"rule {self.name!r}: {label} must be a positive number, got {value!r}")
        if feedback_rate > 1:
            raise ConfigError(f"rule {self.name!r}: feedback_rate must be in (0, 1], got {feedback_rate!r}")
        self.feedback = feedback
        self.feedback_scale = float(feedback_scale)
        self.feedback_rate = float(feedback_rate)
        self.feedback_noise = float(feedback_noise)
        self.paths_: dict[int, Feedback] = {}
        self.routes_: dict[int, FeedbackRoute] = {}
        self._operating_points: dict[int, np.ndarray] = {}

    @abstractmethod
    def routes(self, network: PhysicalNetwork) -> list[FeedbackRoute]:
        """Return the route of every feedback path the rule uses on ``network``."""

    # ---------------------------------------------------------------------------- checks
    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        last = network.trainable_indices[-1]
        for node in network.nodes[last + 1 :]:
            if not node.has_input_gradient:
                raise ConfigError(
                    f"rule {self.name!r}: node {node.name!r} after the last trainable node has no model to "
                    "pass the output error back; make it trainable or put a digital readout there"
                )
        routes = self.routes(network)
        if self.feedback == "identity":
            for route in routes:
                if route.n_target != route.n_error:
                    raise ConfigError(
                        f"rule {self.name!r} with identity feedback: {route.mismatch}; "
                        "use random feedback or equal widths"
                    )
        if self.feedback == "learned":
            for route in routes:
                node = network[route.last]
                if route.response == "preactivation" and not node.has_preactivation:
                    raise ConfigError(
                        f"rule {self.name!r} with learned feedback: node {node.name!r} exposes no "
                        "pre-activation to measure the feedback's target on; use random feedback"
                    )

    # ----------------------------------------------------------------------------- setup
    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        self.check(network)
        if self.feedback == "physical" and context.node_factory is None:
            raise ConfigError(
                f"rule {self.name!r} with physical feedback needs a device to build the feedback node on"
            )
        self.routes_ = {route.key: route for route in self.routes(network)}
        self.paths_ = {key: self._make_path(route, network, context) for key, route in self.routes_.items()}
        self._operating_points = {}

    def _make_path(self, route: FeedbackRoute, network: PhysicalNetwork, context: RuleContext) -> Feedback:
        if self.feedback == "random":
            return RandomFeedback(route.n_target, route.n_error, context.rng, self.feedback_scale)
        if self.feedback == "identity":
            return IdentityFeedback()
        if self.feedback == "learned":
            return LearnedFeedback(route.n_target, route.n_error, context.rng, self.feedback_scale, self.feedback_rate)
        node = context.node_factory(route.n_error, route.n_target, f"feedback-{network[route.key].name}", "linear")
        return PhysicalFeedback(node)

    # ------------------------------------------------------------------ learned feedback
    def remember(self, states: list[NodeState]) -> None:
        """Keep each route's inputs from the forward pass, the operating points of learning."""
        if self.feedback == "learned":
            self._operating_points = {key: states[route.first].inputs for key, route in self.routes_.items()}

    def after_update(self, network: PhysicalNetwork, context: RuleContext) -> None:
        """Train learned feedback on the last batch's operating points; other paths are fixed."""
        if self.feedback != "learned":
            return
        for key, route in self.routes_.items():
            inputs = self._operating_points.get(key)
            if inputs is None:
                continue
            try:
                perturbation, response = measure_response(network, route, inputs, self.feedback_noise, context.rng)
            except MeasurementError as exc:
                log.warning(
                    "rule %r: feedback of node %r not trained on this batch: %s", self.name, network[key].name, exc
                )
                continue
            self.paths_[key].learn(perturbation, response, self.feedback_noise)
        self._operating_points = {}

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {str(key): path.state_dict() for key, path in self.paths_.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, path in self.paths_.items():
            path.load_state_dict(state[str(key)])

    def describe(self) -> dict[str, Any]:
        info = {"rule": self.name, "feedback": self.feedback, "feedback_scale": self.feedback_scale}
        if self.feedback == "learned":
            info.update(feedback_rate=self.feedback_rate, feedback_noise=self.feedback_noise)
        return info
