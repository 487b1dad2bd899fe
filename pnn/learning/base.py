"""The interface every learning rule implements, and the registry of rules by name.

A rule turns one batch into a gradient per trainable node. It may run the network once (the
feedback-alignment family), several times (perturbative rules) or settle it (equilibrium
propagation); the controller then validates the gradients, passes them through each node's
optimizer and pushes the updates within the node's limits. A rule raises
:class:`~pnn.errors.MeasurementError` when a measurement it needs is invalid, and the controller
rejects that batch.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..network import PhysicalNetwork
from ..nodes import Node
from .losses import Loss
from .optim import Optimizer

__all__ = [
    "LearningRule",
    "StepResult",
    "RuleContext",
    "register_rule",
    "make_rule",
    "RULES",
    "forward_checked",
]

#: Builds a physical node of the network's device kind: (n_in, n_out, name, activation) -> Node.
NodeFactory = Callable[[int, int, str, str], Node]


@dataclass
class RuleContext:
    """What a rule may use besides the network: randomness, the loss and the device factory.

    ``batch_indices`` contains the positions in the training set of the batch being computed, set
    by the controller before each step (None outside training); rules that keep a state per
    example (equilibrium propagation's persistent states) key it by these.

    ``optimizers`` are the controller's, by node position. A rule that updates nodes outside
    the network's own list (in worker processes, for example) copies their settings and reads
    the current learning rate from them. ``clip_updates`` is the controller's clipping setting.
    """

    rng: np.random.Generator
    loss: Loss
    n_classes: int
    node_factory: NodeFactory | None = None
    batch_indices: np.ndarray | None = None
    optimizers: Mapping[int, Optimizer] = field(default_factory=dict)
    clip_updates: bool = True


@dataclass
class StepResult:
    """The outcome of one batch under a rule.

    Attributes
    ----------
    loss
        Batch-mean loss of the forward pass the gradients belong to.
    outputs
        Network outputs for the batch, array of shape (batch, n_out).
    gradients
        Gradient per parameter, by node position in the network; only trainable nodes appear.
    extras
        Rule-specific numbers to log (per-block losses, perturbation sizes, ...).
    """

    loss: float
    outputs: np.ndarray
    gradients: dict[int, dict[str, np.ndarray]]
    extras: dict[str, float] = field(default_factory=dict)


def forward_checked(network: PhysicalNetwork, x: np.ndarray) -> np.ndarray:
    """Run a forward pass and raise MeasurementError if any node's measurement is invalid."""
    outputs = network.forward(x)
    reason = network.invalid_reason()
    if reason is not None:
        raise MeasurementError(f"invalid measurement, batch rejected: {reason}")
    return outputs


class LearningRule(ABC):
    """A local learning rule; subclasses set ``name`` and implement :meth:`compute`."""

    #: Name used on the command line (``pnn train --rule NAME``).
    name: ClassVar[str] = ""

    def check(self, network: PhysicalNetwork) -> None:
        """Raise ConfigError, naming the node and what it lacks, if the rule cannot run here."""
        if not network.trainable_indices:
            raise ConfigError(f"rule {self.name!r}: the network has no trainable node")

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        """Prepare rule state (feedback matrices, auxiliary heads) before the first step."""

    @abstractmethod
    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        """Return the gradients for one batch of inputs (batch, n_in) and labels (batch,)."""

    def after_update(self, network: PhysicalNetwork, context: RuleContext) -> None:
        """Run after the controller applied the updates (learned feedback trains here)."""

    def state_dict(self) -> dict[str, Any]:
        """Return the rule's own state for a checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def describe(self) -> dict[str, Any]:
        """Return the rule's settings for the run record."""
        return {"rule": self.name}


RULES: dict[str, type[LearningRule]] = {}


def register_rule(cls: type[LearningRule]) -> type[LearningRule]:
    """Class decorator adding a rule to :data:`RULES` under its ``name``."""
    if not cls.name or cls.name in RULES:
        raise ValueError(f"rule name {cls.name!r} is empty or already registered")
    RULES[cls.name] = cls
    return cls


def _accepted_options(cls: type) -> list[str]:
    """Return the keyword options a rule class takes, including those its ``**options`` passes on."""
    accepted: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        passes_on = False
        for parameter in inspect.signature(klass.__init__).parameters.values():
            if parameter.kind == inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif parameter.name != "self" and parameter.kind != inspect.Parameter.VAR_POSITIONAL:
                if parameter.name not in accepted:
                    accepted.append(parameter.name)
        # A constructor without **options hands nothing further up.
        if not passes_on:
            break
    return accepted


def make_rule(name: str, **options: Any) -> LearningRule:
    """Return a new rule called ``name`` with ``options``; unknown names or options raise."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ConfigError(f"unknown rule {name!r}; choose one of {', '.join(sorted(RULES))}") from None
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"rule {name!r}: invalid option(s) {', '.join(unknown)}; its options are: {valid}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"rule {name!r}: invalid option ({exc})") from None
