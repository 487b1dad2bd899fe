"""Multiplexed gradient descent (McCaughan et al. 2023, "Multiplexed gradient descent: fast online
training of modern datasets on hardware neural networks without backpropagation", APL Machine
Learning 1, 026118).

Every parameter carries its own perturbation code ``p_i(t)``, and the network runs one time step
(one forward pass) per code value. The change of the cost from its unperturbed value,
``C~(t) = C(t) - C_0``, is correlated with each parameter's own code and integrated over a
window of ``T`` steps:

    G_i = sum_t C~(t) p_i(t) / sum_t p_i(t)^2

Two codes are offered:

- ``sign`` (code multiplexing): at every time step each parameter gets a fresh random sign, so
  all parameters are perturbed at once and the window averages ``T`` simultaneous estimates;
- ``time`` (time multiplexing): the parameters are split into slots of ``slot_size`` and the
  slots are perturbed one after the other. With one parameter per slot the code is ``+d`` and
  ``G_i = [C(theta + d e_i) - C_0] / d``, forward finite differences; with more per slot, the
  parameters of a slot get random signs, so that their estimates do not add up.

Here one call of :meth:`MGD.compute` is one integration window: the batch is held fixed while the
codes run (the paper's sample period equals its gradient-integration period), the cost baseline
``C_0`` is measured once at the start of the window instead of by the paper's high-pass filter,
and the integrated estimate goes through the controller's optimizer like any gradient. The time
code continues from the slot where the last window stopped, so a window shorter than the number
of slots sweeps the parameters over several batches; parameters not visited in a window get a
zero estimate for that window.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..network import PhysicalNetwork
from .base import RuleContext, StepResult, forward_checked, register_rule
from .perturbation import (
    NodeArrays,
    ParameterPerturbationRule,
    check_count_option,
    DEFAULT_STEPS,
    rademacher,
)

__all__ = ["MGD", "MGD_CODES"]

#: Perturbation codes of :class:`MGD`.
MGD_CODES = ("sign", "time")

#: Window of the sign code when the ``window`` option is unset, in time steps (forward passes).
DEFAULT_SIGN_WINDOW = 16


@register_rule
class MGD(ParameterPerturbationRule):
    """Multiplexed gradient descent with random-sign or time-multiplexed codes.

    Parameters
    ----------
    code
        ``"sign"`` (every parameter perturbed at every time step by a random sign) or ``"time"``
        (slots of parameters perturbed one after another).
    perturbation
        Amplitude ``d`` of each parameter's code, in the parameter's unit; at least its
        resolution. None: ``perturbation_steps`` resolution steps on quantized parameters, 1e-3
        on continuous ones.
    perturbation_steps
        Amplitude of a quantized parameter's code in resolution steps, when ``perturbation`` is
        None.
    window
        Integration window, in time steps per update (each step is one forward pass). None: 16
        for the sign code, one full sweep over all slots for the time code.
    slot_size
        Parameters perturbed together in one time slot of the time code.
    """

    name = "mgd"

    def __init__(
        self,
        code: str = "sign",
        perturbation: float | None = None,
        perturbation_steps: int = DEFAULT_STEPS,
        window: int | None = None,
        slot_size: int = 1,
    ) -> None:
        if code not in MGD_CODES:
            raise ConfigError(f"rule 'mgd': unknown code {code!r}; choose one of {', '.join(MGD_CODES)}")
        self.code = code
        self._init_perturbation(perturbation, perturbation_steps)
        self.window = None if window is None else check_count_option(self.name, window, "window")
        self.slot_size = check_count_option(self.name, slot_size, "slot_size")
        if code == "sign" and slot_size != 1:
            raise ConfigError("rule 'mgd': slot_size applies to the time code only; remove it or set code=time")
        self.next_slot_ = 0

    def setup(self, network: PhysicalNetwork, context: RuleContext) -> None:
        super().setup(network, context)
        # Every trainable element in a fixed order: parameter arrays in node order, each
        # flattened. ``offsets_[j]`` is the flat position of array j's first element.
        self.arrays_ = [(i, name) for i in network.trainable_indices for name in network[i].parameters]
        sizes = [int(np.prod(network[i].parameters[name].shape)) for i, name in self.arrays_]
        self.offsets_ = np.concatenate([[0], np.cumsum(sizes)])
        self.n_slots_ = -(-int(self.offsets_[-1]) // self.slot_size)

    @property
    def steps_per_window(self) -> int:
        """Time steps (forward passes, besides the baseline) in one window."""
        if self.window is not None:
            return self.window
        return DEFAULT_SIGN_WINDOW if self.code == "sign" else self.n_slots_

    def _sign_offsets(self, base: NodeArrays, rng: np.random.Generator) -> NodeArrays:
        return {
            i: {name: self.sizes_[i][name] * rademacher(rng, value.shape) for name, value in params.items()}
            for i, params in base.items()
        }

    def _slot_members(self, slot: int) -> list[tuple[int, str, int]]:
        """Return (node position, parameter name, flat index) of every element in ``slot``."""
        start = slot * self.slot_size
        stop = min(start + self.slot_size, int(self.offsets_[-1]))
        members = []
        for position in range(start, stop):
            j = int(np.searchsorted(self.offsets_, position, side="right")) - 1
            i, name = self.arrays_[j]
            members.append((i, name, position - int(self.offsets_[j])))
        return members

    def _slot_offsets(self, base: NodeArrays, slot: int, perturbed: set[int], rng: np.random.Generator) -> NodeArrays:
        """Return offsets for the nodes of ``slot`` and for those still perturbed (set back to zero)."""
        members = self._slot_members(slot)
        signs = np.ones(len(members)) if len(members) == 1 else rademacher(rng, (len(members),))
        touched = perturbed | {i for i, _, _ in members}
        # Every parameter of a touched node is written, so the last slot's offset is cleared.
        offsets = {i: {name: np.zeros_like(value) for name, value in base[i].items()} for i in touched}
        for (i, name, k), sign in zip(members, signs):
            offsets[i][name].flat[k] = sign * self.sizes_[i][name]
        return offsets

    def compute(self, network: PhysicalNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        outputs = forward_checked(network, x)
        baseline, _ = context.loss(outputs, labels)
        base = self.perturber_.snapshot()
        correlation = self._zeros(base)
        power = self._zeros(base)
        steps = self.steps_per_window
        slot = self.next_slot_
        # Nodes whose parameters hold a perturbation; the time code sets back only those.
        perturbed: set[int] = set()
        changes = []
        try:
            for _ in range(steps):
                if self.code == "sign":
                    offsets = self._sign_offsets(base, context.rng)
                else:
                    offsets = self._slot_offsets(base, slot, perturbed, context.rng)
                    slot = (slot + 1) % self.n_slots_
                applied = self.perturber_.set_offsets(base, offsets)
                perturbed = {i for i, params in applied.items() if any(np.any(v != 0) for v in params.values())}
                change = self._loss(network, x, labels, context) - baseline
                changes.append(abs(change))
                for i, params in applied.items():
                    for name, code in params.items():
                        correlation[i][name] += change * code
                        power[i][name] += code * code
        finally:
            self.perturber_.restore(base)
        self.next_slot_ = slot

        gradients = {
            i: {
                name: np.divide(correlation[i][name], power[i][name],
                                out=np.zeros_like(power[i][name]), where=power[i][name] > 0)
                for name in params
            }
            for i, params in base.items()
        }
        return StepResult(loss=float(baseline), outputs=outputs, gradients=gradients,
                          extras={"perturbation_loss_change": float(np.mean(changes))})

    def state_dict(self) -> dict[str, Any]:
        return {"next_slot": self.next_slot_}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.next_slot_ = int(state["next_slot"])

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name, "code": self.code, "perturbation": self.perturbation,
            "perturbation_steps": self.perturbation_steps, "window": self.window, "slot_size": self.slot_size,
        }
