"""Difference target propagation with learned inverses (Lee et al. 2015, "Difference target
propagation", ECML PKDD; Meulemans et al. 2020, "A theoretical framework for target
propagation", NeurIPS), the inverses trained by the local difference reconstruction loss of
Ernoult et al. 2022 ("Towards scaling difference target propagation by learning backprop
targets", ICML).

Targets, with h_l the measured output of trainable node l and g_l a learned inverse that maps
node l's outputs back to node l-1's outputs:

    t_L = h_L - beta * dLoss/dh_L,    t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l).

Each node descends its local loss ||h_l - t_l||^2 / (2 beta) with t_l held fixed, so the error
given to its ``local_gradient`` is (h_l - t_l) / beta; the last trainable node's error is then
exactly the backprop error. For a linear node with its exact inverse, t_{l-1} - h_{l-1} is the
Gauss-Newton step (Meulemans et al. 2020).

The inverses are digital parameters owned by the rule (checkpointed with it). After each
update they are trained on the batch's operating points from forward measurements only. With
x the inputs of node l's segment (the nodes after trainable node l-1, up to node l), dx and dy
Gaussian noise of standard deviation sigma, y = f_l(x) and r = g_l:

- ``"difference"`` (Ernoult et al. 2022, as in the authors' public code, scaled by 1/sigma^2):
  [-2 dx . (r(f_l(x + dx)) - r(y)) + ||r(y + dy) - r(y)||^2] / sigma^2, whose minimum for
  small sigma is at J_g = J_f^T, so the targets approach backprop's. Hardware clips x + dx at
  its input limits, so each input unit's part of the first term is divided by that unit's
  measured noise power in place of sigma^2;
- ``"reconstruction"`` (Lee et al. 2015): ||r(f_l(x + dx)) - (x + dx)||^2, which makes g_l an
  approximate inverse of f_l.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, MeasurementError
from ..network import PhysicalNetwork
from .alignment import is_positive_number, perturb_and_measure
from .base import LearningRule, RuleContext, StepResult, forward_checked, register_rule
from .optim import Adam

__all__ = ["DTP", "INVERSE_ACTIVATIONS", "INVERSE_LOSSES"]

log = logging.getLogger(__name__)

#: Nonlinearities an inverse may end with: g(h) = act(h W^T + b).
INVERSE_ACTIVATIONS = ("linear", "tanh")

#: Losses that train the inverses.
INVERSE_LOSSES = ("difference", "reconstruction")


class _Inverse:
    """A digital layer g(h) = act(h W^T + b) from (batch, n_upper) to (batch, n_lower)."""

    def __init__(self, n_upper: int, n_lower: int, activation: str, rng: np.random.Generator, scale: float) -> None:
        limit = scale / math.sqrt(n_upper)
        self.params = {"weight": rng.uniform(-limit, limit, (n_lower, n_upper)), "bias": np.zeros(n_lower)}
        self.activation = activation

    def __call__(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (g(h), pre-activation), both of shape (batch, n_lower)."""
        z = h @ self.params["weight"].T + self.params["bias"]
        return (np.tanh(z) if self.activation == "tanh" else z), z

    def gradients(self, h: np.ndarray, z: np.ndarray, upstream: np.ndarray) -> dict[str, np.ndarray]:
        """Return d(sum of upstream * g(h))/d(weight, bias) for g evaluated at ``h``."""
        if self.activation == "tanh":
            upstream = upstream * (1.0 - np.tanh(z) ** 2)
        return {"weight": upstream.T @ h, "bias": upstream.sum(axis=0)}


@register_rule
class DTP(LearningRule):
    """Difference target propagation with learned inverses.

    Parameters
    ----------
    target_step
        beta, the step from the last trainable node's output to its target, in output units per
        unit error. With linear inverses the updates do not depend on it.
    inverse
        Nonlinearity at the end of each inverse: ``"linear"`` or ``"tanh"``.
    inverse_loss
        ``"difference"`` (Ernoult et al. 2022) or ``"reconstruction"`` (Lee et al. 2015).
    inverse_lr
        Adam learning rate of the inverses.
    inverse_noise
        sigma, the standard deviation of the noise used to train the inverses, in the units of
        the signal it is added to.
    inverse_steps
        Inverse updates per training batch, each with fresh noise (and two forward passes of
        the segment).
    inverse_scale
        Initial inverse weights are uniform in +-inverse_scale / sqrt(n_upper).
    """

    name = "dtp"

    def __init__(
        self,
        target_step: float = 0.1,
        inverse: str = "linear",
        inverse_loss: str = "difference",
        inverse_lr: float = 1e-3,
        inverse_noise: float = 0.1,
        inverse_steps: int = 1,
        inverse_scale: float = 1.0,
    ) -> None:
        for label, value in (("target_step", target_step), ("inverse_lr", inverse_lr),
                             ("inverse_noise", inverse_noise), ("inverse_scale", inverse_scale)):
            if not is_positive_number(value):
                raise ConfigError(f"rule 'dtp': {label} must be a positive number, got {value!r}")
        if inverse not in INVERSE_ACTIVATIONS:
            raise ConfigError(
                f"rule 'dtp': unknown inverse {inverse!r}; choose one of {', '.join(INVERSE_ACTIVATIONS)}"
            )
        if inverse_loss not in INVERSE_LOSSES:
            raise ConfigError(
                f"rule 'dtp': unknown inverse_loss {inverse_loss!r}; choose one of {', '.join(INVERSE_LOSSES)}"
            )
        if isinstance(inverse_steps, bool) or not isinstance(inverse_steps, int) or inverse_steps < 1:
            raise ConfigError(f"rule 'dtp': inverse_steps must be a positive integer, got {inverse_steps!r}")
        self.target_step = float(target_step)
        self.inverse = inverse
        self.inverse_loss = inverse_loss
        self.inverse_lr = float(inverse_lr)
        self.inverse_noise = float(inverse_noise)
        self.inverse_steps = inverse_steps
        self.inverse_scale = float(inverse_scale)
        self.inverses_: dict[int, _Inverse] = {}
        self.optimizers_: dict[int, Adam] = {}
        self._segments: dict[int, tuple[int, int]] = {}
        self._operating_points: dict[int, np.ndarray] = {}

    def check(self, network: PhysicalNetwork) -> None:
        super().check(network)
        last = network.trainable_indices[-1]
        for node in network.nodes[last + 1 :]:
            if not node.has_input_gradient:
                raise ConfigError(
                    f"rule 'dtp': node {node.name!r} after the last trainable node has no model to pass "
                    "the output error back; make it trainable or put a digital readout there"
                )

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        self.check(network)
        indices = network.trainable_indices
        self.inverses_ = {}
        self.optimizers_ = {}
        # Segment of node j: the nodes after the previous trainable node, up to j.
        self._segments = {j: (previous + 1, j) for previous, j in zip(indices, indices[1:])}
        for previous, j in zip(indices, indices[1:]):
            self.inverses_[j] = _Inverse(network[j].n_out, network[previous].n_out, self.inverse, context.rng,
                                         self.inverse_scale)
            self.optimizers_[j] = Adam(self.inverse_lr)
        self._operating_points = {}

    # ---------------------------------------------------------------------------- targets
    def target_differences(self, network: PhysicalNetwork, error: np.ndarray) -> dict[int, np.ndarray]:
        """Return t_l - h_l for every trainable node, from the last forward pass.

        Parameters
        ----------
        network
            The network, right after the forward pass the error belongs to.
        error
            Loss derivative with respect to the network outputs, array of shape (batch, n_out).

        Returns
        -------
        dict
            By node position, arrays of shape (batch, n_out of that node).
        """
        states = network.states
        indices = network.trainable_indices
        top = indices[-1]
        differences = {top: -self.target_step * network.backward_to(top, error)}
        for previous, j in reversed(list(zip(indices, indices[1:]))):
            h = np.asarray(states[j].outputs, dtype=np.float64)
            inverse = self.inverses_[j]
            target_image, _ = inverse(h + differences[j])
            output_image, _ = inverse(h)
            differences[previous] = target_image - output_image
        return differences

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        loss, error = context.loss(outputs, labels)
        states = network.states
        gradients = {}
        for i, difference in self.target_differences(network, error).items():
            gradients[i] = network[i].local_gradient(states[i], -difference / self.target_step)
        self._operating_points = {j: states[first].inputs for j, (first, _) in self._segments.items()}
        return StepResult(loss=loss, outputs=outputs, gradients=gradients)

    # --------------------------------------------------------------------------- inverses
    def inverse_gradients(
        self,
        j: int,
        clean_in: np.ndarray,
        noisy_in: np.ndarray,
        clean_out: np.ndarray,
        noisy_out: np.ndarray,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """Return the gradient of the inverse loss for node ``j``'s inverse from one measurement.

        ``clean_in`` and ``noisy_in`` are the segment's inputs as applied, shape
        (batch, n_lower); ``clean_out`` and ``noisy_out`` its measured outputs, shape
        (batch, n_upper).
        """
        inverse = self.inverses_[j]
        batch = clean_in.shape[0]
        sigma2 = self.inverse_noise**2
        if self.inverse_loss == "reconstruction":
            r, z = inverse(noisy_out)
            return inverse.gradients(noisy_out, z, 2.0 * (r - noisy_in) / batch)

        dx = noisy_in - clean_in
        # Inputs clipped at a limit received less noise than sigma^2; weighting each input unit by
        # 1 / (its measured noise power) keeps the estimate of J_f^T unbiased there. Units that
        # got under a quarter of sigma^2 carry too little signal and are left out of this term.
        power = np.mean(dx * dx, axis=0)  # (n_lower,)
        weight = np.where(power >= 0.25 * sigma2, 1.0 / np.maximum(power, 1e-300), 0.0)
        r0, z0 = inverse(clean_out)
        r1, z1 = inverse(noisy_out)
        shifted = clean_out + rng.normal(0.0, self.inverse_noise, clean_out.shape)
        r2, z2 = inverse(shifted)
        # Loss per batch: [-2 (dx / power).(r1 - r0) + |r2 - r0|^2 / sigma^2] / batch; each
        # term's derivative with respect to the three evaluations of r.
        pull = 2.0 * dx * weight / batch
        push = 2.0 * (r2 - r0) / (sigma2 * batch)
        parts = (
            inverse.gradients(noisy_out, z1, -pull),
            inverse.gradients(clean_out, z0, pull - push),
            inverse.gradients(shifted, z2, push),
        )
        return {name: sum(part[name] for part in parts) for name in ("weight", "bias")}

    def after_update(self, network: PhysicalNetwork, context: RuleContext) -> None:
        """Train every inverse on the last batch's operating points."""
        for j, inputs in self._operating_points.items():
            first, last = self._segments[j]
            for _ in range(self.inverse_steps):
                try:
                    measured = perturb_and_measure(network, first, last, inputs, self.inverse_noise, context.rng)
                except MeasurementError as exc:
                    # Skipped, not fatal: the forward update of this batch was already valid.
                    log.warning("rule 'dtp': inverse of node %r not trained on this batch: %s", network[j].name, exc)
                    break
                grads = self.inverse_gradients(j, *measured, context.rng)
                inverse = self.inverses_[j]
                for name, step in self.optimizers_[j].step(grads).items():
                    inverse.params[name] += step
        self._operating_points = {}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "inverses": {str(j): {k: v.copy() for k, v in inv.params.items()} for j, inv in self.inverses_.items()},
            "optimizers": {str(j): opt.state_dict() for j, opt in self.optimizers_.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for j, inverse in self.inverses_.items():
            saved = state["inverses"][str(j)]
            for name, value in inverse.params.items():
                array = np.asarray(saved[name], dtype=np.float64)
                if array.shape != value.shape:
                    raise ConfigError(
                        f"rule 'dtp': saved inverse {name} of node {j} has shape {array.shape}, expected {value.shape}"
                    )
                inverse.params[name] = array.copy()
            self.optimizers_[j].load_state_dict(state["optimizers"][str(j)])

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "target_step": self.target_step,
            "inverse": self.inverse,
            "inverse_loss": self.inverse_loss,
            "inverse_lr": self.inverse_lr,
            "inverse_noise": self.inverse_noise,
            "inverse_steps": self.inverse_steps,
            "inverse_scale": self.inverse_scale,
        }
