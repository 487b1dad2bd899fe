"""Factories for every Node implementation that the conformance suite checks.

Each entry builds a fresh, small node. Add every new simulator or instrument node here, so
that it runs through tests/test_node_conformance.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pnn.calibration import CalibratedNode, Calibrator, DigitalTwin, OutputDrift, Sweep, TwinGradientNode
from pnn.network import DigitalLinear
from pnn.nodes import Node
from pnn.simulators.crossbar import CROSSBAR_PRESETS, CrossbarNode
from pnn.simulators.hopfield import HopfieldNode
from pnn.simulators.resistive import RESISTIVE_PRESETS, ResistiveNode
from pnn.simulators.diffractive import DIFFRACTIVE_PRESETS, DiffractiveNode
from pnn.simulators.mzi import MZI_PRESETS, MziNode


def _crossbar_twin(node: Node) -> DigitalTwin:
    """Return the twin of a quick calibration of ``node``."""
    return Calibrator(sweep=Sweep(points=24, repeats=2), holdout=0.0).fit(node, progress=False).twin_


def _twin_gradient() -> Node:
    node = CrossbarNode(6, 4, rng=0, name="xbar")
    return TwinGradientNode(node, _crossbar_twin(node))


NODE_FACTORIES: dict[str, Callable[[], Node]] = {
    "crossbar-default": lambda: CrossbarNode(6, 4, rng=0, name="xbar"),
    "crossbar-ideal": lambda: CrossbarNode(6, 4, rng=0, name="xbar", config=CROSSBAR_PRESETS["ideal"]),
    "crossbar-stochastic": lambda: CrossbarNode(
        6, 4, rng=0, name="xbar", config=CROSSBAR_PRESETS["default"].replace(update_mode="stochastic")
    ),
    "resistive-default": lambda: ResistiveNode(6, 4, hidden=(5,), rng=0, name="resistive"),
    "resistive-ideal": lambda: ResistiveNode(6, 4, rng=0, name="resistive", config=RESISTIVE_PRESETS["ideal"]),
    "hopfield": lambda: HopfieldNode(6, 4, hidden=(5,), rng=0, name="hopfield"),
    "digital-linear": lambda: DigitalLinear(6, 4, rng=0, name="fc", dtype=np.float64),
    "calibration-twin": lambda: _crossbar_twin(CrossbarNode(6, 4, rng=0, name="xbar")),
    "calibration-twin-gradient": _twin_gradient,
    "calibration-corrected": lambda: CalibratedNode(CrossbarNode(6, 4, rng=0, name="xbar"), gain=[1.1, 0.9, 1.0, 1.2], offset=0.05),
    "calibration-output-drift": lambda: OutputDrift(CrossbarNode(6, 4, rng=0, name="xbar"), gain_rate=1e-3, offset_rate=-1e-3),
    "mzi-default": lambda: MziNode(6, 4, rng=0, name="mesh"),
    "mzi-ideal": lambda: MziNode(6, 4, rng=0, name="mesh", config=MZI_PRESETS["ideal"]),
    "mzi-perturbation": lambda: MziNode(
        6, 4, rng=0, name="mesh", config=MZI_PRESETS["default"].replace(gradient_method="perturbation")
    ),
    "mzi-coarse-phase": lambda: MziNode(6, 4, rng=0, name="mesh", config=MZI_PRESETS["default"].replace(phase_bits=5)),
    "diffractive-default": lambda: DiffractiveNode(6, 4, rng=0, name="slm"),
    "diffractive-ideal": lambda: DiffractiveNode(6, 4, rng=0, name="slm", config=DIFFRACTIVE_PRESETS["ideal"]),
    "diffractive-perturbation": lambda: DiffractiveNode(
        6, 4, rng=0, name="slm",
        config=DIFFRACTIVE_PRESETS["default"].replace(gradient_method="perturbation", slm_pixels=8),
    ),
}

# Instrument nodes on emulators, through the real pyvisa-py and pyserial code paths. Closing
# the node applies its safe state, closes the station and stops its emulator.
from pnn.emulators import emulated_node  # noqa: E402

NODE_FACTORIES.update({
    "instrument-scpi": lambda: emulated_node("scpi", 6, 4, seed=0, timeout_s=2.0),
    "instrument-serial": lambda: emulated_node("serial", 6, 4, seed=0, transfer="ascii", timeout_s=2.0),
    "instrument-scpi-point-perturbation": lambda: emulated_node(
        "scpi", 6, 4, seed=0, mode="point", gradient="perturbation", timeout_s=2.0
    ),
})
