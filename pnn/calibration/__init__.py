"""Calibration of nodes: sweeps, transfer-curve fits, versioned records, digital twins, drift.

A calibration sweeps a node's inputs (and optionally its parameters), fits a transfer model per
output channel against the node's nominal response, and writes a record that ties the fit to
the node's identity and a time. The fitted model is the node's digital twin, and during
training a drift monitor compares check measurements with the twin and recalibrates when the
node leaves tolerance::

    from pnn.calibration import Calibrator, CalibrationStore, Sweep

    calibrator = Calibrator(sweep=Sweep(points=128, repeats=3)).fit(node)
    print(calibrator.summary())
    store = CalibrationStore("calibrations")
    store.append(calibrator.record_)
    record = store.latest(node)          # refuses another device or an expired record
    twin = record.twin(node)             # a Node computing the fitted model

Modules: :mod:`~pnn.calibration.sweep` (measuring), :mod:`~pnn.calibration.reference` (the
nominal stimulus), :mod:`~pnn.calibration.models` and :mod:`~pnn.calibration.fit` (fitting),
:mod:`~pnn.calibration.record` and :mod:`~pnn.calibration.store` (records),
:mod:`~pnn.calibration.twin` (digital twins), :mod:`~pnn.calibration.wrappers`,
:mod:`~pnn.calibration.drift` and :mod:`~pnn.calibration.injection` (drift), and
:mod:`~pnn.calibration.session` (the interactive session of ``pnn calibrate``).
"""

from .calibrator import Calibrator, default_model, default_parameter_ranges
from .drift import DRIFT_ACTIONS, DriftMonitor, TrainingPaused
from .fit import ChannelFit, TransferFit, fit_channel, fit_transfer
from .injection import OutputDrift
from .models import MODEL_NAMES, TransferModel, get_model
from .record import (
    DEFAULT_VALIDITY,
    SCHEMA,
    SCHEMA_VERSION,
    CalibrationRecord,
    identity_differences,
    identity_key,
    read_record,
)
from .reference import ChannelReference, LinearReference, Reference, TwinReference, reference_for
from .session import CalibrationSession, SessionOutcome, describe_node
from .store import CalibrationStore
from .sweep import SWEEP_DESIGNS, Sweep, SweepResult
from .twin import DigitalTwin, TwinGradientNode
from .wrappers import CalibratedNode, NodeWrapper

__all__ = [
    "Sweep",
    "SweepResult",
    "SWEEP_DESIGNS",
    "TransferModel",
    "MODEL_NAMES",
    "get_model",
    "ChannelFit",
    "TransferFit",
    "fit_channel",
    "fit_transfer",
    "Reference",
    "LinearReference",
    "ChannelReference",
    "TwinReference",
    "reference_for",
    "Calibrator",
    "default_model",
    "default_parameter_ranges",
    "CalibrationRecord",
    "SCHEMA",
    "SCHEMA_VERSION",
    "DEFAULT_VALIDITY",
    "identity_key",
    "identity_differences",
    "read_record",
    "CalibrationStore",
    "DigitalTwin",
    "TwinGradientNode",
    "NodeWrapper",
    "CalibratedNode",
    "OutputDrift",
    "DriftMonitor",
    "TrainingPaused",
    "DRIFT_ACTIONS",
    "CalibrationSession",
    "SessionOutcome",
    "describe_node",
]
