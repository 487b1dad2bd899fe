"""Alignment metrics: how far a rule's updates point from the backprop gradient.

The backprop gradient is computed through the nodes' own models (``input_gradient``, the
digital copy of each node) at the states of a fresh forward pass, as physics-aware training
computes it. On a digital network it is the exact gradient.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import MeasurementError
from ..network import PhysicalNetwork
from .base import LearningRule, RuleContext, forward_checked
from .bp import backprop_gradients

__all__ = ["angle_degrees", "update_angles"]

log = logging.getLogger(__name__)


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Return the angle between two arrays, flattened, in degrees; NaN if either is zero."""
    a = np.ravel(a).astype(np.float64)
    b = np.ravel(b).astype(np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b) / norms, -1.0, 1.0))))


def update_angles(
    network: PhysicalNetwork, rule: LearningRule, x: np.ndarray, labels: np.ndarray, context: RuleContext
) -> dict[str, float]:
    """Return the angle, in degrees, between the rule's gradient and backprop's for each hidden node.

    Parameters
    ----------
    network
        The network being trained; every node after the first trainable one needs
        ``input_gradient`` (:func:`~pnn.learning.bp.check_backward_models` checks this).
    rule
        The rule, set up on ``network``. Its :meth:`~LearningRule.compute` runs on the batch;
        nothing is applied, and :meth:`~LearningRule.after_update` is not called.
    x, labels
        The probe batch: inputs of shape (batch, n_in) and labels of shape (batch,).
    context
        The rule context; pass one with its own generator so that the probe does not shift the
        training's random stream.

    Returns
    -------
    dict
        Angle by node name, for every trainable node but the last that the rule gave a
        gradient. Empty if a measurement was invalid (a warning is logged).
    """
    try:
        result = rule.compute(network, x, labels, context)
        outputs = forward_checked(network, x)
        _, error = context.loss(outputs, labels)
        reference = backprop_gradients(network, error)
    except MeasurementError as exc:
        log.warning("alignment angles skipped: %s", exc)
        return {}

    angles = {}
    for i in network.trainable_indices[:-1]:
        update = result.gradients.get(i)
        if update is None:
            continue
        names = sorted(update)
        angles[network[i].name] = angle_degrees(
            np.concatenate([np.ravel(update[name]) for name in names]),
            np.concatenate([np.ravel(reference[i][name]) for name in names]),
        )
    return angles
