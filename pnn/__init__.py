"""pnn: train physical neural networks with local learning rules.

The same training code drives simulated devices, real instruments over VISA or serial, and
emulated instruments. Heavy submodules (Numba kernels) load on first use, so ``import pnn``
and ``pnn --help`` stay fast.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Public names and the submodule that defines each; loaded on first attribute access.
_EXPORTS = {
    "Node": "nodes",
    "NodeState": "nodes",
    "ParameterSpec": "nodes",
    "PhysicalNetwork": "network",
    "DigitalLinear": "network",
    "Encoder": "network",
    "Readout": "network",
    "PnnError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "LimitError": "errors",
    "InstrumentError": "errors",
    "MeasurementError": "errors",
    "CalibrationError": "errors",
    "Dataset": "datasets",
    "load_dataset": "datasets",
    "PhysicalNoProp": "controller",
    "TrainConfig": "config",
    "train": "experiment",
    "CrossbarNode": "simulators",
    "CrossbarConfig": "simulators",
    "ResistiveNode": "simulators",
    "ResistiveConfig": "simulators",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
