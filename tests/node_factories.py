"""Factories for every Node implementation that the conformance suite checks.

Each entry builds a fresh, small node. Add every new simulator or instrument node here, so
that it runs through tests/test_node_conformance.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pnn.network import DigitalLinear
from pnn.nodes import Node
from pnn.simulators.crossbar import CROSSBAR_PRESETS, CrossbarNode
from pnn.simulators.hopfield import HopfieldNode
from pnn.simulators.resistive import RESISTIVE_PRESETS, ResistiveNode

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
}
