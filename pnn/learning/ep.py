"""Contrastive rules on networks that settle: equilibrium propagation and coupled learning.

Both rules train a node that relaxes to the minimum of an energy (a layered Hopfield network, a
resistive network) from two or three measured equilibria of the same batch:

1. the free state ``s0``, which gives the outputs and the loss;
2. a perturbed state ``s1``, in which the outputs are pushed towards lower loss;
3. for the centred variant, a second perturbed state pushed the other way.

The gradient estimate of each parameter is the difference of ``dE/dtheta`` between the states
divided by the perturbation's strength. ``dE/dtheta`` is local: a Hopfield weight needs the
activations of the two units it joins, a conductance needs its own voltage drop. The node
provides it as ``energy_gradient(state, reference=None)``; with a reference state it returns
the difference between the two states.

Equilibrium propagation (Scellier and Bengio 2017, Frontiers in Computational Neuroscience
11:24) nudges the outputs with a force ``-beta * dLoss/dy``. As beta goes to zero the estimate
becomes the gradient of the loss at the free equilibrium, with an error of order beta. The
centred estimate, ``(dE/dtheta(+beta) - dE/dtheta(-beta)) / (2 beta)``, has an error of order
beta squared (Laborieux et al. 2021, Frontiers in Neuroscience 15:633674). On a resistive
network the force is a current injected at the outputs (Kendall et al. 2020, arXiv:2006.01981).

Coupled learning (Stern et al. 2021, "Supervised learning in physical networks: from machine
learning to learning machines", Physical Review X 11:021045) clamps the output voltages part of
the way from the free outputs towards lower loss, ``y_c = y_0 - eta * dLoss/dy``, and takes
``(dE/dG(clamped) - dE/dG(free)) / eta``.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..network import PhysicalNetwork, Readout
from ..nodes import Node, NodeState
from .base import LearningRule, RuleContext, StepResult, make_rule, register_rule

__all__ = ["ContrastiveRule", "EquilibriumPropagation", "CoupledLearning", "VARIANTS", "RESISTIVE_READOUT_GAIN"]

log = logging.getLogger(__name__)

#: Schemes of perturbed phases: ``one-sided`` (one phase at +strength), ``random-sign`` (one
#: phase, its sign drawn for every batch) or ``centered`` (two phases, at +strength and
#: -strength).
VARIANTS = ("one-sided", "random-sign", "centered")

#: Readout gain of the resistive networks that :meth:`ContrastiveRule.build_network` builds. At
#: the start of training the differential outputs span some tens of millivolts, so logits of
#: gain 1 leave the softmax nearly flat. On the vowels (12-16-7, centred EP, 60 epochs) gains 1,
#: 2, 4 and 8 reached 75.5, 81.6, 95.9 and 95.9 % test accuracy.
RESISTIVE_READOUT_GAIN = 8.0

_LAYER_NUMBER = re.compile(r"(\d+)$")


def _layer_of(name: str) -> int:
    """Return the layer number that ends a parameter name (``weight2``, ``g_layer2`` -> 2)."""
    match = _LAYER_NUMBER.search(name)
    if match is None:
        raise ConfigError(
            f"parameter {name!r} does not end with a layer number, so layer_lr cannot apply to it; "
            "remove the layer_lr option"
        )
    return int(match.group(1))


class ContrastiveRule(LearningRule):
    """Shared machinery of equilibrium propagation and coupled learning.

    Subclasses set ``strength_name`` and implement :meth:`perturbed_state`.

    Parameters
    ----------
    variant
        One of :data:`VARIANTS`. The centred estimate costs a third settle but has the smallest
        bias. On the resistive vowel network (12-16-7, 60 epochs) one-sided EP fell back to
        chance after a few epochs, while centred and random-sign EP trained.
    persistent
        Start each example's free phase from its last free state, so that the state carries
        over from epoch to epoch. The states are kept by example index and saved in
        checkpoints. On a Hopfield network with several minima the free state then depends on
        the history, while ``forward`` (evaluation) starts from zero states.
    free_iterations, nudged_iterations, step
        Settling settings of nodes that settle by a fixed number of iterations (the Hopfield
        network); None keeps the node's own. Nodes that settle to convergence reject them.
    layer_lr
        Learning-rate multiplier of each layer's parameters (the layer number ends the
        parameter name), first layer first; None multiplies all by 1. The multipliers scale the
        gradient before the optimizer, so they act as per-layer rates with SGD but have no
        effect with Adam, which is invariant to the gradient's scale.
    """

    #: Name of the perturbation's strength in options and messages.
    strength_name = "beta"

    def __init__(
        self,
        *,
        variant: str = "centered",
        persistent: bool = False,
        free_iterations: int | None = None,
        nudged_iterations: int | None = None,
        step: float | None = None,
        layer_lr: Sequence[float] | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"rule {self.name!r}: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if not isinstance(persistent, (bool, np.bool_)):
            raise ConfigError(f"rule {self.name!r}: persistent must be true or false, got {persistent!r}")
        for label, value in (("free_iterations", free_iterations), ("nudged_iterations", nudged_iterations)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"rule {self.name!r}: {label} must be a positive integer, got {value!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1):
            raise ConfigError(f"rule {self.name!r}: step must be a number in (0, 1], got {step!r}")
        if layer_lr is not None:
            if isinstance(layer_lr, (str, bytes)) or not isinstance(layer_lr, Sequence) or not layer_lr:
                raise ConfigError(f"rule {self.name!r}: layer_lr must be a list of numbers, got {layer_lr!r}")
            for value in layer_lr:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                    raise ConfigError(f"rule {self.name!r}: every layer_lr entry must be a positive number, got {layer_lr!r}")
            layer_lr = [float(v) for v in layer_lr]
        self.variant = variant
        self.persistent = bool(persistent)
        self.free_iterations = free_iterations
        self.nudged_iterations = nudged_iterations
        self.step = None if step is None else float(step)
        self.layer_lr = layer_lr
        self.index_: int | None = None
        self.states_: np.ndarray | None = None
        self.seen_: np.ndarray | None = None

    # ----------------------------------------------------------------------------- checks
    def _settling_index(self, network: PhysicalNetwork) -> int:
        trainable = network.trainable_indices
        names = [network[i].name for i in trainable]
        for i in trainable:
            node = network[i]
            if not getattr(node, "can_settle", False):
                raise ConfigError(
                    f"rule {self.name!r}: node {node.name!r} ({type(node).__name__}) cannot settle to an "
                    "equilibrium; the rule needs a node with settle(), such as a resistive network "
                    "(--device resistive) or a Hopfield network (--device digital)"
                )
        if len(trainable) != 1:
            raise ConfigError(
                f"rule {self.name!r} trains one settling node, but the network has {len(trainable)} "
                f"trainable nodes {names}; put every layer in one settling node"
            )
        return trainable[0]

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        index = self._settling_index(network)
        node = network[index]
        for later in network.nodes[index + 1 :]:
            if not later.has_input_gradient:
                raise ConfigError(
                    f"rule {self.name!r}: node {later.name!r} after the settling node has no model to pass "
                    "the output error back; end the network with the settling node or a digital readout"
                )
        accepted = inspect.signature(node.settle).parameters
        for option, keyword in (("free_iterations", "iterations"), ("nudged_iterations", "iterations"), ("step", "step")):
            if getattr(self, option) is not None and keyword not in accepted:
                raise ConfigError(
                    f"rule {self.name!r}: node {node.name!r} settles to convergence and takes no {keyword!r}; "
                    f"remove the {option} option"
                )
        if self.persistent and not getattr(node, "settle_state_probe", None):
            raise ConfigError(
                f"rule {self.name!r}: node {node.name!r} does not name the probe of its settled state, so "
                "persistent states cannot be kept; set persistent=false"
            )
        if self.layer_lr is not None:
            layers = sorted({_layer_of(name) for name in node.parameters})
            if len(self.layer_lr) != len(layers):
                raise ConfigError(
                    f"rule {self.name!r}: layer_lr has {len(self.layer_lr)} entries but node {node.name!r} has "
                    f"{len(layers)} layers of parameters; give one multiplier per layer"
                )
        if not callable(getattr(node, "energy_gradient", None)):
            raise ConfigError(
                f"rule {self.name!r}: node {node.name!r} has no energy_gradient(state), so the rule cannot "
                "turn its states into a gradient"
            )

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        self.check(network)
        self.index_ = self._settling_index(network)
        self.states_ = None
        self.seen_ = None

    # ------------------------------------------------------------------------------- phases
    def _settle_options(self, nudged: bool) -> dict[str, Any]:
        options: dict[str, Any] = {}
        iterations = self.nudged_iterations if nudged else self.free_iterations
        if iterations is not None:
            options["iterations"] = iterations
        if self.step is not None:
            options["step"] = self.step
        return options

    def perturbed_state(
        self, node: Node, inputs: np.ndarray, free: NodeState, error: np.ndarray, strength: float
    ) -> NodeState:
        """Return the state with the outputs pushed by ``strength`` against ``error`` (dLoss/dy)."""
        raise NotImplementedError

    def _initial(self, node: Node, indices: np.ndarray | None, batch: int) -> NodeState | None:
        """Return the batch's stored free states, or None when some example has none yet."""
        if not self.persistent:
            return None
        if indices is None:
            raise ConfigError(
                f"rule {self.name!r} with persistent states needs each batch's example indices, which "
                "PhysicalNoProp passes; set persistent=false to call compute() directly"
            )
        if self.states_ is None or indices.max() >= self.states_.shape[0] or not np.all(self.seen_[indices]):
            return None
        start = self.states_[indices].astype(np.float64)
        return NodeState(inputs=np.zeros((batch, node.n_in)), outputs=np.zeros((batch, node.n_out)),
                         probes={node.settle_state_probe: start})

    def _remember(self, node: Node, indices: np.ndarray, free: NodeState) -> None:
        state = np.asarray(free.probes[node.settle_state_probe])
        needed = int(indices.max()) + 1
        if self.states_ is None or needed > self.states_.shape[0]:
            # Grow to the largest index seen, not by doubling, which could leave half the
            # memory unused. The controller visits the training set in random order, so the
            # store reaches its final size after a few batches of the first epoch. float32
            # halves the memory of large sets.
            states = np.zeros((needed, state.shape[1]), dtype=np.float32)
            seen = np.zeros(needed, dtype=bool)
            if self.states_ is not None:
                states[: self.states_.shape[0]] = self.states_
                seen[: self.seen_.shape[0]] = self.seen_
            self.states_, self.seen_ = states, seen
        finite = np.all(np.isfinite(state), axis=1)
        self.states_[indices[finite]] = state[finite]
        self.seen_[indices[finite]] = True

    @staticmethod
    def _check_state(node: Node, state: NodeState, phase: str) -> None:
        reason = state.invalid_reason()
        if reason is not None:
            raise MeasurementError(f"node {node.name!r}, {phase} state: {reason}")

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        if self.index_ is None:
            raise ConfigError(f"rule {self.name!r}: call setup(network, context) before compute")
        index = self.index_
        node = network[index]
        strength = self.strength_

        inputs = x
        for before in network.nodes[:index]:
            inputs = before.forward(inputs)
        indices = None if context.batch_indices is None else np.asarray(context.batch_indices)
        initial = self._initial(node, indices, len(x))
        free = node.settle(inputs, initial=initial, **self._settle_options(nudged=False))
        self._check_state(node, free, "free")

        # The nodes after the settling node (a readout) turn its outputs into the network's.
        outputs = free.outputs
        later_states = []
        for later in network.nodes[index + 1 :]:
            outputs = later.forward(outputs)
            later_states.append(later.measure_state())
        loss, error = context.loss(outputs, labels)
        for later, state in zip(reversed(network.nodes[index + 1 :]), reversed(later_states)):
            error = later.input_gradient(state, error)

        if self.variant == "centered":
            plus = self.perturbed_state(node, inputs, free, error, strength)
            minus = self.perturbed_state(node, inputs, free, error, -strength)
            self._check_state(node, plus, f"+{self.strength_name}")
            self._check_state(node, minus, f"-{self.strength_name}")
            change = node.energy_gradient(plus, reference=minus)
            scale = 1.0 / (2.0 * strength)
            signed = strength
        else:
            signed = strength
            if self.variant == "random-sign" and context.rng.random() < 0.5:
                signed = -strength
            perturbed = self.perturbed_state(node, inputs, free, error, signed)
            self._check_state(node, perturbed, self.strength_name)
            change = node.energy_gradient(perturbed, reference=free)
            scale = 1.0 / signed

        # One pass per parameter: the division by the strength and the layer's multiplier.
        if self.layer_lr is None:
            gradients = {key: value * scale for key, value in change.items()}
        else:
            layers = sorted({_layer_of(name) for name in change})
            multiplier = dict(zip(layers, self.layer_lr))
            gradients = {key: value * (scale * multiplier[_layer_of(key)]) for key, value in change.items()}
        if self.persistent:
            self._remember(node, indices, free)
        return StepResult(loss=loss, outputs=outputs, gradients={index: gradients},
                          extras={self.strength_name: float(signed)})

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.states_ is None:
            return {}
        return {"states": self.states_.copy(), "seen": self.seen_.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "states" in state:
            self.states_ = np.array(state["states"], dtype=np.float32)
            self.seen_ = np.array(state["seen"], dtype=bool)
        else:
            self.states_, self.seen_ = None, None

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "variant": self.variant,
            "persistent": self.persistent,
            "free_iterations": self.free_iterations,
            "nudged_iterations": self.nudged_iterations,
            "step": self.step,
            "layer_lr": self.layer_lr,
        }

    # ------------------------------------------------------------------------------ network
    #: Device kinds whose networks this rule can build, mapped to a description for messages.
    DEVICES: Mapping[str, str] = {}

    @classmethod
    def build_network(cls, config: Any, dataset: Any) -> tuple[PhysicalNetwork, None]:
        """Build encoder, one settling node with every layer, and readout for ``pnn train``.

        ``--device digital`` builds a :class:`~pnn.simulators.hopfield.HopfieldNode`. ``--device
        resistive`` builds a :class:`~pnn.simulators.resistive.ResistiveNode` with diodes on the
        hidden nodes and a readout of gain :data:`RESISTIVE_READOUT_GAIN`. ``--hidden`` gives the
        hidden layers of that one node.
        """
        from ..experiment import _encoder_for  # noqa: PLC0415 - experiment imports the rules
        from ..simulators import get_device  # noqa: PLC0415
        from ..simulators.hopfield import HopfieldNode  # noqa: PLC0415
        from ..simulators.resistive import ResistiveNode  # noqa: PLC0415

        if config.station:
            raise ConfigError(
                f"rule {config.rule!r} needs a network that settles as a whole; station nodes offer no "
                "settle(), so remove --station"
            )
        if config.device not in cls.DEVICES:
            choices = "; ".join(f"--device {name} ({text})" for name, text in cls.DEVICES.items())
            raise ConfigError(f"rule {config.rule!r} needs a network that settles; use {choices}")
        device = get_device(config.device)
        device_config = device.config(config.preset, config.device_options)
        rule = make_rule(cls.name, **config.rule_options)
        n_in, n_out = dataset.x_train.shape[1], dataset.n_classes
        rng = np.random.default_rng([config.seed, 1])
        if config.device == "digital":
            settings = {"init_scale": device_config.init_scale}
            for option, keyword in (("step", "step"), ("free_iterations", "iterations"),
                                    ("nudged_iterations", "nudged_iterations")):
                if getattr(rule, option, None) is not None:
                    settings[keyword] = getattr(rule, option)
            node: Node = HopfieldNode(n_in, n_out, hidden=config.hidden, rng=rng, name="hopfield", **settings)
        else:
            node = ResistiveNode(
                n_in, n_out, hidden=config.hidden, diodes="hidden", config=device_config,
                preset=config.preset or device.default_preset, rng=rng, name="resistive",
            )
        if config.device == "digital" and config.loss != "mse":
            log.warning(
                "rule %r on a Hopfield network with loss %r: its outputs lie in [0, 1], which --loss mse "
                "compares with one-hot targets directly (on the vowels, 12-32-7, mse reached 91.8 %% "
                "test accuracy and cross-entropy 57.1 %%)", config.rule, config.loss,
            )
        encoder = _encoder_for(node, config, dataset.x_train)
        # The Hopfield outputs lie in [0, 1] and are compared with one-hot targets as they are.
        gain = 1.0 if config.device == "digital" else RESISTIVE_READOUT_GAIN
        return PhysicalNetwork([encoder, node, Readout(n_out, gain=gain)]), None


@register_rule
class EquilibriumPropagation(ContrastiveRule):
    """Equilibrium propagation: nudge the outputs with a force, compare the two equilibria.

    Parameters
    ----------
    beta
        Nudge strength, positive; the force on the outputs is ``-beta * dLoss/dy`` (on a
        resistive network, a current in amperes per unit of dLoss/dy). None takes the node's
        ``default_beta`` (0.5 on the Hopfield network, 1e-5 A on the resistive network).
    variant, persistent, free_iterations, nudged_iterations, step, layer_lr
        See :class:`ContrastiveRule`.
    """

    name = "ep"
    strength_name = "beta"
    DEVICES = {"digital": "a layered Hopfield network", "resistive": "a resistive network with diodes"}

    def __init__(self, beta: float | None = None, **options: Any) -> None:
        super().__init__(**options)
        if beta is not None and (
            isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0)
        ):
            raise ConfigError(
                f"rule 'ep': beta must be a positive number, got {beta!r}; the variant sets its sign "
                "(variant=random-sign or centered)"
            )
        self.beta = None if beta is None else float(beta)
        self.strength_ = self.beta

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        super().setup(network, context)
        node = network[self.index_]
        if self.beta is None:
            default = getattr(node, "default_beta", None)
            if default is None:
                raise ConfigError(f"rule 'ep': node {node.name!r} has no default_beta; set the beta option")
            self.strength_ = float(default)

    def perturbed_state(
        self, node: Node, inputs: np.ndarray, free: NodeState, error: np.ndarray, strength: float
    ) -> NodeState:
        # NOTE: the force stays at its value for the free state's error, which linearises the
        # cost there. Scellier and Bengio 2017 pull with beta * (target - s_out) at the current
        # state instead. Both give the same gradient as beta goes to zero, but their O(beta)
        # biases differ, so one-sided results are not bit-for-bit comparable with that work.
        return node.settle(inputs, -strength * error, initial=free, **self._settle_options(nudged=True))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}


@register_rule
class CoupledLearning(ContrastiveRule):
    """Coupled learning: clamp the output voltages part of the way to lower loss.

    The clamped outputs are ``y_c = y_0 - eta * dLoss/dy``; with the ``mse`` loss and a readout
    of gain 1 this is ``y_0 + eta * (target - y_0)``, the form of Stern et al. 2021. The
    simulator clamps an output by injecting the current that brings it to the target voltage.
    The rule measures the outputs' response to small test currents at the free state (one
    settle per output), then corrects the currents with it until every output is within
    ``clamp_tolerance`` of its target. A lab does the same with a source-measure unit in
    voltage mode.

    Parameters
    ----------
    eta
        Clamping strength, positive, in V^2 per unit of loss (dimensionless for the ``mse``
        loss with a readout of gain 1, where it is the fraction of the way to the target). The
        default suits cross-entropy behind the readout gain of 8 that ``pnn train`` uses, where
        the error at the outputs is up to 8 per volt, so the clamp moves an output by up to
        80 mV.
    probe_current
        Test current for measuring the outputs' response, in A.
    clamp_tolerance
        Largest distance of a clamped output from its target, in V.
    clamp_steps
        Current corrections allowed before the clamped state is used as it is (a warning is
        logged).
    variant, persistent, layer_lr
        See :class:`ContrastiveRule`.
    """

    name = "coupled"
    strength_name = "eta"
    DEVICES = {"resistive": "a resistive network with diodes"}

    def __init__(
        self,
        eta: float = 0.01,
        probe_current: float = 1e-5,
        clamp_tolerance: float = 2e-3,
        clamp_steps: int = 5,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        for label, value in (("eta", eta), ("probe_current", probe_current), ("clamp_tolerance", clamp_tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"rule 'coupled': {label} must be a positive number, got {value!r}")
        if isinstance(clamp_steps, bool) or not isinstance(clamp_steps, int) or clamp_steps < 1:
            raise ConfigError(f"rule 'coupled': clamp_steps must be a positive integer, got {clamp_steps!r}")
        self.eta = float(eta)
        self.strength_ = self.eta
        self.probe_current = float(probe_current)
        self.clamp_tolerance = float(clamp_tolerance)
        self.clamp_steps = int(clamp_steps)
        self.clamp_misses_ = 0

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        node = network[self._settling_index(network)]
        if node.output_unit != "V":
            raise ConfigError(
                f"rule 'coupled' clamps output voltages, but node {node.name!r} has outputs in "
                f"{node.output_unit!r}; use a resistive network, or rule 'ep'"
            )

    def perturbed_state(
        self, node: Node, inputs: np.ndarray, free: NodeState, error: np.ndarray, strength: float
    ) -> NodeState:
        target = free.outputs - strength * error
        batch, n_out = free.outputs.shape

        # Response of the outputs to a current at each output, (batch, n_out, n_out) in V/A.
        response = np.empty((batch, n_out, n_out))
        for k in range(n_out):
            probe = np.zeros((batch, n_out))
            probe[:, k] = self.probe_current
            state = node.settle(inputs, probe, initial=free)
            self._check_state(node, state, "probe")
            response[:, :, k] = (state.outputs - free.outputs) / self.probe_current

        current = np.zeros((batch, n_out))
        state = free
        for _ in range(self.clamp_steps):
            try:
                current = current + np.linalg.solve(response, (target - state.outputs)[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                raise MeasurementError(
                    f"node {node.name!r}: the outputs' response to the test currents is singular, so the "
                    "outputs cannot be clamped; raise probe_current above the read noise"
                ) from None
            state = node.settle(inputs, current, initial=state)
            self._check_state(node, state, "clamped")
            if np.max(np.abs(target - state.outputs)) <= self.clamp_tolerance:
                return state
        self.clamp_misses_ += 1
        # Warn on the 1st, 10th, 100th, ... miss, so that a long run does not flood the log.
        if math.log10(self.clamp_misses_).is_integer():
            log.warning(
                "rule 'coupled': node %r outputs stayed up to %.3g V from their clamp targets after %d "
                "corrections (tolerance %.3g V), %d time(s) so far; using that state",
                node.name, float(np.max(np.abs(target - state.outputs))), self.clamp_steps,
                self.clamp_tolerance, self.clamp_misses_,
            )
        return state

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "eta": self.eta,
            "probe_current": self.probe_current,
            "clamp_tolerance": self.clamp_tolerance,
            "clamp_steps": self.clamp_steps,
        }
