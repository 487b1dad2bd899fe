"""Drift tracking during training: periodic check measurements, and recalibration when needed.

:class:`DriftMonitor` is a controller callback (``PhysicalNoProp(..., callbacks=[monitor])``).
Every ``every`` epochs it measures each watched :class:`~pnn.calibration.wrappers.CalibratedNode`
at a fixed set of check inputs and compares the raw readings with what the node's baseline
twin predicts at the node's present parameters, through the present correction. Per channel,
a straight-line fit of readings against prediction gives the drift: the gain (slope minus 1)
and the offset (mean difference), each with its standard error. When either leaves its
tolerance on some channel by more than three standard errors, the monitor acts as configured:

- ``"recalibrate"``: sweep the node, fit ``linear`` gains and offsets of the raw readings against
  the baseline twin (a calibration with a :class:`~pnn.calibration.reference.TwinReference`),
  install them as the node's correction, store the record, and log why.
- ``"pause"``: raise :class:`TrainingPaused`. The epoch's checkpoint is already written, so the
  run resumes with ``pnn train --resume`` after the device has been looked at.
- ``"warn"``: log a warning and go on.

Every check and every recalibration goes to the run's metrics log (kinds ``"drift"`` and
``"recalibration"``) and to the ``history_`` list.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, PnnError
from .calibrator import Calibrator
from .reference import TwinReference
from .store import CalibrationStore
from .sweep import Sweep
from .wrappers import CalibratedNode

if TYPE_CHECKING:
    from ..controller import PhysicalNoProp

__all__ = ["DriftMonitor", "TrainingPaused", "DRIFT_ACTIONS"]

log = logging.getLogger(__name__)

#: Actions of the monitor when drift leaves its tolerance.
DRIFT_ACTIONS = ("recalibrate", "pause", "warn")

# Inputs of unbounded nodes are drawn from [-1, 1]: beyond a physical range there is no scale.
_UNBOUNDED_INPUT = 1e6


def _output_span(node: CalibratedNode) -> np.ndarray:
    """Return each channel's output span over its calibrated stimulus range, array of shape (n_out,).

    This is a property of the device, unlike the spread of the present readings, which is small
    while the weights are small and would make a fixed offset look like a large drift.
    """
    spans = []
    for channel in node.baseline.fit.channels:
        grid = np.linspace(channel.stimulus_range[0], channel.stimulus_range[1], 65)
        values = channel.predict(grid)
        spans.append(float(np.max(values) - np.min(values)))
    # A flat channel gets the span of the widest one, so its tolerance is not zero.
    widest = max(max(spans), 1e-12)
    return np.array([span if span > 0 else widest for span in spans]) * np.abs(node.gain)


def _trusted(node: CalibratedNode, stimulus: np.ndarray) -> np.ndarray:
    """Return where the baseline twin's prediction is trusted, array of shape (n, n_out) of bool.

    A fitted curve is trusted inside the stimulus range it was fitted on. Training moves the
    weights, so check inputs can reach stimuli beyond that range, where a saturating curve's
    extrapolation error would read as drift. A straight line is taken to hold everywhere.
    """
    fit = node.baseline.fit
    if fit.model == "linear":
        return np.ones(stimulus.shape, dtype=bool)
    lower = np.array([channel.stimulus_range[0] for channel in fit.channels])
    upper = np.array([channel.stimulus_range[1] for channel in fit.channels])
    return (stimulus >= lower) & (stimulus <= upper)


class TrainingPaused(PnnError):
    """Training stopped because a node drifted out of tolerance and the monitor is set to pause."""


class DriftMonitor:
    """Check calibrated nodes for drift during training, and recalibrate, pause or warn.

    Parameters
    ----------
    nodes
        The nodes to watch; each needs a baseline twin.
    every
        Check after every this many epochs.
    check_points
        Input rows of the check measurement, drawn once per node from its input limits.
    gain_tolerance
        Largest accepted gain drift on any channel, relative (0.05 is 5 %).
    offset_tolerance
        Largest accepted offset drift on any channel, relative to the span of the channel's
        output over its calibrated stimulus range (0.05 is 5 % of that span).
    action
        ``"recalibrate"``, ``"pause"`` or ``"warn"`` (see :data:`DRIFT_ACTIONS`).
    sweep
        Sweep of a recalibration; by default 64 random points with 2 repeats.
    store
        Store for the recalibration records; None keeps them in ``records_`` only.
    seed
        Seed of the check inputs and of the recalibration sweeps.

    Attributes
    ----------
    history_
        One entry per check and per recalibration.
    records_
        The recalibration records, in order.
    """

    def __init__(
        self,
        nodes: Sequence[CalibratedNode],
        *,
        every: int = 1,
        check_points: int = 64,
        gain_tolerance: float = 0.05,
        offset_tolerance: float = 0.05,
        action: str = "recalibrate",
        sweep: Sweep | None = None,
        store: CalibrationStore | None = None,
        seed: int = 0,
    ) -> None:
        nodes = list(nodes)
        if not nodes:
            raise ConfigError("the drift monitor needs at least one node to watch")

        for node in nodes:
            if not isinstance(node, CalibratedNode) or node.baseline is None:
                raise ConfigError(
                    f"node {node.name!r}: the drift monitor watches CalibratedNode objects with a baseline twin; "
                    "wrap the node as CalibratedNode(node, baseline=record.twin(node))"
                )
        if action not in DRIFT_ACTIONS:
            raise ConfigError(f"unknown drift action {action!r}; choose one of {', '.join(DRIFT_ACTIONS)}")
        if int(every) != every or every < 1:
            raise ConfigError(f"drift checks need every >= 1 epoch, got {every}")
        if int(check_points) != check_points or check_points < 4:
            raise ConfigError(f"a drift check needs at least 4 check points, got {check_points}")
        for label, value in (("gain_tolerance", gain_tolerance), ("offset_tolerance", offset_tolerance)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"drift {label} must be a positive number, got {value}")

        self.nodes = nodes
        self.every = int(every)
        self.check_points = int(check_points)
        self.gain_tolerance = float(gain_tolerance)
        self.offset_tolerance = float(offset_tolerance)
        self.action = action
        self.sweep = sweep
        self.store = store
        self.seed = int(seed)
        self.history_: list[dict[str, Any]] = []
        self.records_: list[Any] = []
        self._check_inputs: dict[str, np.ndarray] = {}
        self._n_recalibrations = 0

    @property
    def n_recalibrations(self) -> int:
        """Number of recalibrations so far."""
        return self._n_recalibrations

    # ---------------------------------------------------------------------------- checks
    def _inputs_for(self, node: CalibratedNode) -> np.ndarray:
        if node.name not in self._check_inputs:
            lower = np.clip(node.input_spec.lower_array, -_UNBOUNDED_INPUT, None)
            upper = np.clip(node.input_spec.upper_array, None, _UNBOUNDED_INPUT)
            lower = np.where(lower <= -_UNBOUNDED_INPUT, -1.0, lower)
            upper = np.where(upper >= _UNBOUNDED_INPUT, 1.0, upper)
            rng = np.random.default_rng([self.seed, len(self._check_inputs)])
            self._check_inputs[node.name] = rng.uniform(lower, upper, (self.check_points, node.n_in))
        return self._check_inputs[node.name]

    def check(self, node: CalibratedNode) -> dict[str, Any]:
        """Measure ``node`` at its check inputs and return the drift per channel.

        Returns
        -------
        dict
            Per channel: ``gain`` (slope minus 1) and ``offset`` (mean difference, in the output
            unit), with their standard errors ``gain_error`` and ``offset_error``. For the node:
            ``span``, the output span of each channel over its calibrated range, ``rms``, the
            rms difference,
            and ``exceeded``, the reasons to act (empty when within tolerance). A channel
            with fewer than 3 trusted points has NaN gain and offset, and one without a usable
            slope has a NaN gain.
        """
        x = self._inputs_for(node)
        raw = node.node.forward(x)
        applied = node.node.measure_state().inputs
        stimulus = node.baseline.stimulus(applied, node.node.get_parameters())
        expected = node.uncorrect(node.baseline.fit.predict(stimulus))
        trusted = _trusted(node, stimulus)

        span = _output_span(node)
        scale = float(np.sqrt(np.mean((expected - expected.mean(axis=0)) ** 2)))
        difference = raw - expected
        gain = np.full(node.n_out, np.nan)
        gain_error = np.full(node.n_out, np.nan)
        offset = np.full(node.n_out, np.nan)
        offset_error = np.full(node.n_out, np.nan)
        for k in range(node.n_out):
            use = np.isfinite(raw[:, k]) & trusted[:, k]
            n_use = int(np.count_nonzero(use))
            if n_use < 3:
                continue
            offset[k] = float(np.mean(difference[use, k]))
            offset_error[k] = float(np.std(difference[use, k], ddof=1)) / np.sqrt(n_use)
            spread = expected[use, k] - expected[use, k].mean()
            variance = float(np.sum(spread**2))
            # A channel whose prediction hardly changes over the check inputs carries no slope.
            if variance <= n_use * (0.1 * scale) ** 2:
                continue
            centred = raw[use, k] - raw[use, k].mean()
            slope = float(np.sum(spread * centred) / variance)
            gain[k] = slope - 1.0
            gain_error[k] = float(np.sqrt(np.sum((centred - slope * spread) ** 2) / (n_use - 2) / variance))

        # A drift counts when it passes the tolerance by more than three of its standard errors,
        # so read noise on a short check does not trigger recalibrations.
        reasons = []
        with np.errstate(invalid="ignore"):
            gain_excess = np.abs(gain) - np.maximum(self.gain_tolerance, 3 * gain_error)
            offset_excess = np.abs(offset) - np.maximum(self.offset_tolerance * span, 3 * offset_error)
        if np.any(gain_excess > 0):
            k = int(np.nanargmax(gain_excess))
            reasons.append(f"gain of channel {k} drifted by {gain[k]:+.3f} (tolerance +-{self.gain_tolerance:g})")
        if np.any(offset_excess > 0):
            k = int(np.nanargmax(offset_excess))
            unit = "" if node.output_unit in ("", "1") else f" {node.output_unit}"
            reasons.append(
                f"offset of channel {k} drifted by {offset[k]:+.3g}{unit}, {abs(offset[k]) / span[k]:.3f} of its "
                f"calibrated output span (tolerance {self.offset_tolerance:g})"
            )
        return {
            "gain": [float(v) for v in gain],
            "gain_error": [float(v) for v in gain_error],
            "offset": [float(v) for v in offset],
            "offset_error": [float(v) for v in offset_error],
            "span": [float(v) for v in span],
            "rms": float(np.sqrt(np.nanmean(difference**2))),
            "trusted_points": [int(v) for v in trusted.sum(axis=0)],
            "exceeded": reasons,
        }

    def recalibrate(self, node: CalibratedNode, *, reason: str = "") -> Any:
        """Fit the node's present gains and offsets against its baseline twin and install them.

        Returns the calibration record, which is also stored when the monitor has a store.
        """
        sweep = self.sweep or Sweep(points=64, repeats=2, seed=self.seed + self._n_recalibrations + 1)
        calibrator = Calibrator(
            "linear", sweep=sweep, reference=TwinReference(node.baseline), holdout=0.0,
            notes=f"drift recalibration: {reason}" if reason else "drift recalibration",
        ).fit(node.node, progress=False)
        fit = calibrator.fit_
        gains = np.array([channel.parameters["gain"] for channel in fit.channels])
        offsets = np.array([channel.parameters["offset"] for channel in fit.channels])
        record = calibrator.record_
        node.set_correction(gains, offsets, record.content_hash)
        if self.store is not None:
            self.store.append(record)
        self.records_.append(record)
        self._n_recalibrations += 1
        return record

    # ------------------------------------------------------------------------ callback
    def __call__(self, controller: PhysicalNoProp, epoch_record: dict[str, Any]) -> None:
        """Check the watched nodes after an epoch; the controller calls this."""
        epoch = int(epoch_record.get("epoch", 0))
        if (epoch + 1) % self.every:
            return
        run = getattr(controller, "run", None)
        for node in self.nodes:
            result = self.check(node)
            entry = {"kind": "drift", "epoch": epoch, "node": node.name, **result}
            self.history_.append(entry)
            if run is not None:
                run.log(entry)
            if not result["exceeded"]:
                log.debug("node %r: drift within tolerance after epoch %d", node.name, epoch + 1)
                continue

            reason = "; ".join(result["exceeded"])
            if self.action == "warn":
                log.warning("node %r after epoch %d: %s; continuing as configured (action 'warn')", node.name, epoch + 1, reason)
                continue
            if self.action == "pause":
                where = f"; resume with: pnn train --resume {run.path}" if run is not None else ""
                raise TrainingPaused(
                    f"node {node.name!r} after epoch {epoch + 1}: {reason}. Training paused with the "
                    f"checkpoint written; check the device and recalibrate it{where}"
                )
            log.warning("node %r after epoch %d: %s; recalibrating", node.name, epoch + 1, reason)
            record = self.recalibrate(node, reason=reason)
            entry = {
                "kind": "recalibration", "epoch": epoch, "node": node.name, "reason": reason,
                "gain": [float(v) for v in node.gain], "offset": [float(v) for v in node.offset],
                "record": record.content_hash,
            }
            self.history_.append(entry)
            if run is not None:
                run.log(entry)

    def __repr__(self) -> str:
        names = ", ".join(repr(node.name) for node in self.nodes)
        return (f"DriftMonitor([{names}], every={self.every}, action={self.action!r}, "
                f"gain_tolerance={self.gain_tolerance:g}, offset_tolerance={self.offset_tolerance:g})")
