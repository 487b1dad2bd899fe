"""Calibrations in a training run: look them up, check them, use them and record their hashes.

:func:`prepare_calibrations` is what ``pnn train`` calls after building the network. For every
physical node (not the encoder, the readout or a digital layer) it finds the calibration
record:

- a station's nodes look in the calibration store, by default ``calibrations/`` next to the
  station file, and take the newest record that matches the node's identity and has not
  expired. A record of another device or an expired one stops the run before it starts,
  unless overridden explicitly. A node without any record trains uncalibrated with a warning
  (``calibration = "use"``), or stops the run (``calibration = "require"``);
- simulated nodes look in a store only when one is given. When the run needs a twin (twin
  gradients or drift checks) and has no record, the node is calibrated at the start and the
  record is kept in the run folder's own store.

With ``twin_gradients`` each calibrated node computes gradients through its twin
(:class:`~pnn.calibration.twin.TwinGradientNode`). With ``drift_check`` each calibrated node is
wrapped in a :class:`~pnn.calibration.wrappers.CalibratedNode` and watched by a
:class:`~pnn.calibration.drift.DriftMonitor`. The run folder gets ``calibration.json`` with
every record's hash, file and validity, so the run can be traced to its calibrations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CalibrationError, ConfigError
from ..network import DigitalLinear, Encoder, PhysicalNetwork, Readout
from ..nodes import Node
from ..runs import atomic_write_json
from .calibrator import Calibrator
from .drift import DRIFT_ACTIONS, DriftMonitor
from .record import CalibrationRecord
from .store import CalibrationStore
from .twin import TwinGradientNode
from .wrappers import CalibratedNode

__all__ = ["TrainingCalibrations", "prepare_calibrations", "CALIBRATION_MODES", "CALIBRATION_FILE"]

log = logging.getLogger(__name__)

#: Modes of calibration lookup in a run: ``"require"`` a valid record for every physical node,
#: ``"use"`` the records that exist, ``"off"`` no lookup at all.
CALIBRATION_MODES = ("require", "use", "off")
#: File in the run folder that lists the calibrations the run used.
CALIBRATION_FILE = "calibration.json"


def is_physical(node: Node) -> bool:
    """True for a node that can be calibrated: not the encoder, the readout or a digital layer."""
    return not isinstance(node, (Encoder, Readout, DigitalLinear))


@dataclass
class TrainingCalibrations:
    """The calibrations of one run: the network to train, its callbacks and what was used."""

    network: PhysicalNetwork
    """The network, with wrapped nodes where twin gradients or drift checks are on."""
    callbacks: list[Any] = field(default_factory=list)
    """Controller callbacks (the drift monitor)."""
    records: dict[str, CalibrationRecord | None] = field(default_factory=dict)
    """The record of every physical node, by node name; None for an uncalibrated node."""
    sources: dict[str, str] = field(default_factory=dict)
    """Source of each record: its file, or ``"made at the start of the run"``."""
    store: CalibrationStore | None = None
    """The store the records were looked up in."""
    new_records: list[CalibrationRecord] = field(default_factory=list)
    """Records made at the start of the run, to be stored in the run folder."""
    monitor: DriftMonitor | None = None
    """The drift monitor, when drift checks are on."""

    def hashes(self) -> dict[str, str | None]:
        """Return the content hash of every physical node's record, by node name."""
        return {name: None if record is None else record.content_hash for name, record in self.records.items()}

    def describe(self) -> dict[str, Any]:
        """Return what ``calibration.json`` contains."""
        nodes = {}
        for name, record in self.records.items():
            if record is None:
                nodes[name] = {"record": None}
                continue
            nodes[name] = {
                "record": record.content_hash,
                "source": self.sources.get(name, ""),
                "created": record.created,
                "expires": record.expires,
                "expired_at_start": record.is_expired(),
                "model": record.model,
            }
        return {"store": None if self.store is None else str(self.store.path), "nodes": nodes}

    def finish_setup(self, run_path: Path) -> None:
        """Write ``calibration.json`` into a new run folder, with the records made at the start.

        Records made at the start of the run go to the run folder's own ``calibrations/``
        store, which also receives the drift monitor's records when the run has no store.
        """
        if self.new_records:
            store = CalibrationStore(Path(run_path) / "calibrations")
            for record in self.new_records:
                self.sources[record.node] = str(store.append(record))
            if self.monitor is not None and self.monitor.store is None:
                self.monitor.store = store
        atomic_write_json(Path(run_path) / CALIBRATION_FILE, self.describe())


def _option(config: Any, name: str, default: Any) -> Any:
    return getattr(config, name, default)


def default_store_path(config: Any) -> Path | None:
    """Return the store folder of a run: the configured one, or ``calibrations/`` beside the station."""
    if _option(config, "calibrations", None):
        return Path(config.calibrations)
    if getattr(config, "station", None):
        return Path(config.station).resolve().parent / "calibrations"
    return None


def prepare_calibrations(
    network: PhysicalNetwork,
    config: Any,
    *,
    pinned: Mapping[str, str | None] | None = None,
    pinned_store: CalibrationStore | None = None,
) -> TrainingCalibrations:
    """Find, check and apply the calibrations of a network's physical nodes.

    Parameters
    ----------
    network
        The network as built for the run.
    config
        The run's :class:`~pnn.config.TrainConfig`: ``station``, ``calibrations``,
        ``calibration``, ``allow_expired_calibration``, ``allow_identity_mismatch``,
        ``twin_gradients``, ``drift_check`` and ``drift_action`` are read.
    pinned
        Content hashes by node name that a resumed run used. They are taken instead of the
        newest records, and may have expired since the run began.
    pinned_store
        Extra store to search for pinned hashes (the run folder's own).

    Raises
    ------
    CalibrationError
        If a record belongs to another device or has expired (without an override), or a
        node has no record and ``calibration`` is ``"require"``.
    """
    mode = _option(config, "calibration", "use")
    if mode not in CALIBRATION_MODES:
        raise ConfigError(f"unknown calibration mode {mode!r}; choose one of {', '.join(CALIBRATION_MODES)}")
    twin_gradients = bool(_option(config, "twin_gradients", False))
    drift_every = int(_option(config, "drift_check", 0) or 0)
    drift_action = _option(config, "drift_action", "recalibrate")
    if drift_action not in DRIFT_ACTIONS:
        raise ConfigError(f"unknown drift action {drift_action!r}; choose one of {', '.join(DRIFT_ACTIONS)}")
    needs_twin = twin_gradients or drift_every > 0
    if mode == "off" and needs_twin:
        raise ConfigError("twin gradients and drift checks need calibrations; remove calibration = 'off'")

    path = default_store_path(config)
    store = CalibrationStore(path) if path is not None and mode != "off" else None
    result = TrainingCalibrations(network=network, store=store)
    if mode == "off":
        return result

    nodes = list(network.nodes)
    watched = []
    for position, node in enumerate(nodes):
        if not is_physical(node):
            continue
        record = _find_record(node, config, store, mode, pinned, pinned_store, result)
        if record is None and needs_twin:
            log.info("node %r: no calibration record, so it is calibrated now for its twin", node.name)
            record = Calibrator().fit(node, progress=False).record_
            result.new_records.append(record)
            result.sources[node.name] = "made at the start of the run"
        result.records[node.name] = record
        if record is None:
            continue
        twin = record.twin(node)
        wrapped: Node = TwinGradientNode(node, twin) if twin_gradients else node
        if drift_every:
            wrapped = CalibratedNode(wrapped, baseline=twin)
            watched.append(wrapped)
        nodes[position] = wrapped

    if twin_gradients or drift_every:
        result.network = PhysicalNetwork(nodes)
    if watched:
        result.monitor = DriftMonitor(watched, every=drift_every, action=drift_action, store=store,
                                      seed=int(_option(config, "seed", 0)))
        result.callbacks.append(result.monitor)
    return result


def _find_record(
    node: Node,
    config: Any,
    store: CalibrationStore | None,
    mode: str,
    pinned: Mapping[str, str | None] | None,
    pinned_store: CalibrationStore | None,
    result: TrainingCalibrations,
) -> CalibrationRecord | None:
    """Return the record a run uses for ``node``, or None when it has none and may go without."""
    if pinned is not None and node.name in pinned:
        content_hash = pinned[node.name]
        if content_hash is None:
            return None
        for candidate in (pinned_store, store):
            if candidate is None:
                continue
            try:
                record = candidate.get(content_hash)
            except CalibrationError:
                continue
            # The run started with this record, so it stays in use even if it expired since.
            record.check_node(node, allow_expired=True,
                              allow_mismatch=bool(_option(config, "allow_identity_mismatch", False)))
            result.sources[node.name] = str(candidate.path / candidate.file_name(record))
            return record
        raise CalibrationError(
            f"node {node.name!r}: the run used calibration {content_hash}, which is in neither the run folder "
            f"nor the store {store.path if store else '(none)'}; restore the record file to resume"
        )

    if store is None:
        return None
    if not store.records(node.name):
        if mode == "require":
            raise CalibrationError(
                f"node {node.name!r} has no calibration record in {store.path}; calibrate it first "
                f"(pnn calibrate --station {getattr(config, 'station', None) or 'FILE'}), or set calibration = 'use'"
            )
        log.warning("node %r: no calibration record in %s; training it uncalibrated", node.name, store.path)
        return None
    record = store.latest(
        node,
        allow_expired=bool(_option(config, "allow_expired_calibration", False)),
        allow_mismatch=bool(_option(config, "allow_identity_mismatch", False)),
    )
    result.sources[node.name] = str(store.path / store.file_name(record))
    log.info("node %r: using calibration %s from %s", node.name, record.content_hash, result.sources[node.name])
    return record
