"""Shared parts of the perturbative rules: perturbation sizes, perturbing and restoring parameters,
and per-example losses.

Perturbative rules need only forward measurements: they change parameters (or node outputs) by a
known amount, measure the change of the loss, and correlate the two. Parameters are changed
through :meth:`~pnn.nodes.Node.set_parameters`, so every perturbation respects the parameter's
limits and resolution, and the estimate uses the perturbation the node reports as applied, not
the one requested.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError, PnnError
from ..network import PhysicalNetwork
from .base import LearningRule, RuleContext, forward_checked
from .losses import CrossEntropy, Loss, MeanSquaredError, one_hot

__all__ = [
    "DEFAULT_PERTURBATION",
    "ParameterPerturbationRule",
    "ParameterPerturber",
    "check_count_option",
    "check_perturbation_option",
    "perturbation_sizes",
    "per_example_losses",
    "rademacher",
]

log = logging.getLogger(__name__)

#: Perturbation of a continuous parameter when the rule's ``perturbation`` option is unset, in
#: the parameter's unit. Quantized parameters use ``perturbation_steps`` resolution steps.
DEFAULT_PERTURBATION = 1e-3

#: Resolution steps of a quantized parameter's perturbation when the ``perturbation`` option is
#: unset. On the default crossbar preset, one step changes a batch-mean loss less than the read
#: noise does, and 4 steps trained the vowels better than 2 or 8 (``wp`` with 16 directions and
#: batches of 32: 67, 61 and 53 % test accuracy).
DEFAULT_STEPS = 4

#: Arrays (values, offsets or gradients) by node position, then by parameter name.
NodeArrays = dict[int, dict[str, np.ndarray]]


def check_perturbation_option(rule: str, value: float | None, label: str = "perturbation") -> float | None:
    """Return ``value`` as a float, or raise ConfigError unless it is None or a positive number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"rule {rule!r}: {label} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"rule {rule!r}: {label} must be a positive number, got {value}")
    return float(value)


def check_count_option(rule: str, value: int, label: str) -> int:
    """Return ``value`` if it is a positive integer, or raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"rule {rule!r}: {label} must be a positive integer, got {value!r}")
    return int(value)


def perturbation_sizes(
    network: PhysicalNetwork, rule: str, perturbation: float | None, steps: int = DEFAULT_STEPS
) -> NodeArrays:
    """Return the perturbation size of every trainable parameter array, checked against its spec.

    Parameters
    ----------
    network
        The network whose trainable nodes are perturbed.
    rule
        Rule name, for messages.
    perturbation
        Requested size in each parameter's unit, or None for :data:`DEFAULT_PERTURBATION` on
        continuous parameters and ``steps`` resolution steps on quantized ones.
    steps
        Resolution steps of a quantized parameter's perturbation when ``perturbation`` is None.

    Returns
    -------
    dict
        ``{node position: {parameter name: size}}``, each size a 0-d float64 array.

    Raises
    ------
    ConfigError
        If a requested size is below a parameter's resolution (the device would not move), or
        more than half the narrowest span between its limits.
    """
    sizes: NodeArrays = {}
    for i in network.trainable_indices:
        node = network[i]
        sizes[i] = {}
        for name, spec in node.parameters.items():
            where = f"node {node.name!r} parameter {name!r}"
            unit = "" if spec.unit in ("", "1") else f" {spec.unit}"
            if perturbation is None:
                size = steps * spec.resolution if spec.resolution > 0 else DEFAULT_PERTURBATION
            else:
                size = perturbation
                if spec.resolution > 0 and size < spec.resolution * (1 - 1e-9):
                    raise ConfigError(
                        f"rule {rule!r}: perturbation {size:g} is smaller than the resolution "
                        f"{spec.resolution:g}{unit} of {where}, so the device would not move; use a "
                        f"perturbation of at least {spec.resolution:g}, or leave it unset to use "
                        "perturbation_steps resolution steps"
                    )
                if spec.resolution > 0:
                    ratio = size / spec.resolution
                    if abs(ratio - round(ratio)) > 1e-6:
                        log.warning(
                            "rule %r: perturbation %g is not a whole number of resolution steps (%g%s) of "
                            "%s; the device rounds it, and the estimate uses the applied perturbation",
                            rule, size, spec.resolution, unit, where,
                        )
            span = float(np.min(spec.upper_array - spec.lower_array))
            if 2 * size > span:
                raise ConfigError(
                    f"rule {rule!r}: perturbation {size:g}{unit} is more than half the range "
                    f"{spec.range_text()} of {where}; use a perturbation (or perturbation_steps times "
                    f"the resolution) below {span / 2:g}"
                )
            sizes[i][name] = np.float64(size)
    return sizes


def rademacher(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Return random signs, +1 or -1 with equal probability, as float64 of ``shape``."""
    return rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float64) * 2.0 - 1.0


class ParameterPerturber:
    """Sets trainable parameters to perturbed values and back, through ``set_parameters`` only.

    Parameters
    ----------
    network
        The network whose trainable nodes are perturbed.
    """

    def __init__(self, network: PhysicalNetwork) -> None:
        self.network = network
        # Limits per node position and parameter name, looked up once: perturbations are set
        # many times per batch.
        self._limits = {
            i: {name: (spec.lower_array, spec.upper_array) for name, spec in network[i].parameters.items()}
            for i in network.trainable_indices
        }

    def snapshot(self) -> NodeArrays:
        """Return the current value of every trainable parameter, by node position and name."""
        return {i: self.network[i].get_parameters() for i in self.network.trainable_indices}

    def set_offsets(self, base: NodeArrays, offsets: Mapping[int, Mapping[str, np.ndarray]]) -> NodeArrays:
        """Set the parameters of the nodes in ``offsets`` to ``base + offset``; return what was applied.

        The requested values are clipped into the parameter's limits first, so a perturbation at
        a limit is one-sided, and the node quantizes them. The returned offsets are the node's
        applied values minus ``base``, so estimates built on them use what the device did.
        Nodes absent from ``offsets`` are left unchanged.
        """
        applied: NodeArrays = {}
        for i, params in offsets.items():
            node = self.network[i]
            targets = {}
            for name, offset in params.items():
                lower, upper = self._limits[i][name]
                targets[name] = np.clip(base[i][name] + offset, lower, upper)
            written = node.set_parameters(targets)
            applied[i] = {name: written[name] - base[i][name] for name in targets}
        return applied

    def restore(self, base: NodeArrays) -> None:
        """Set every parameter back to ``base``.

        Raises
        ------
        PnnError
            If a node reports a value that differs from ``base`` by more than half its
            resolution (by more than 1e-6 of its magnitude, for a continuous parameter), which
            means the device did not return to where it was.
        """
        for i, values in base.items():
            node = self.network[i]
            written = node.set_parameters(values)
            for name, value in written.items():
                spec = node.parameters[name]
                if spec.resolution > 0:
                    tolerance = 0.5 * spec.resolution
                else:
                    tolerance = 1e-6 * max(1.0, float(np.max(np.abs(value))))
                worst = float(np.max(np.abs(value - values[name])))
                if worst > tolerance:
                    raise PnnError(
                        f"node {node.name!r} parameter {name!r} did not return to its value before the "
                        f"perturbation (off by {worst:g} {spec.unit}); check the device before training on"
                    )


def per_example_losses(loss: Loss, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return each example's loss, array of shape (batch,); their mean is ``loss(outputs, labels)[0]``."""
    z = np.asarray(outputs, dtype=np.float64)
    rows = np.arange(z.shape[0])
    if isinstance(loss, CrossEntropy):
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        return log_norm - z[rows, labels]
    if isinstance(loss, MeanSquaredError):
        return 0.5 * ((z - one_hot(labels, z.shape[1])) ** 2).sum(axis=1)
    # Any other loss: evaluate it one example at a time.
    return np.array([loss(z[k : k + 1], labels[k : k + 1])[0] for k in rows])


class ParameterPerturbationRule(LearningRule):
    """Base of the rules that perturb parameters (``wp``, ``spsa``, ``mgd``).

    Subclasses call :meth:`_init_perturbation` in their constructor and implement
    :meth:`compute`. This class checks the perturbation sizes against every parameter's spec and
    keeps them in ``sizes_``.
    """

    perturbation: float | None = None
    perturbation_steps: int = DEFAULT_STEPS

    def _init_perturbation(self, perturbation: float | None, perturbation_steps: int) -> None:
        self.perturbation = check_perturbation_option(self.name, perturbation)
        self.perturbation_steps = check_count_option(self.name, perturbation_steps, "perturbation_steps")

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        perturbation_sizes(network, self.name, self.perturbation, self.perturbation_steps)

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        self.check(network)
        self.sizes_ = perturbation_sizes(network, self.name, self.perturbation, self.perturbation_steps)
        self.perturber_ = ParameterPerturber(network)

    def _loss(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> float:
        """Measure the batch-mean loss at the network's present parameters."""
        value, _ = context.loss(forward_checked(network, x), labels)
        return float(value)

    def _zeros(self, base: NodeArrays) -> NodeArrays:
        return {i: {name: np.zeros_like(value) for name, value in params.items()} for i, params in base.items()}
