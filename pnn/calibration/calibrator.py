"""The calibrator: sweep a node, fit its transfer curves, and build the record and the twin.

:class:`Calibrator` follows the scikit-learn contract: the constructor stores settings, and
:meth:`Calibrator.fit` measures a node and returns the calibrator, with the results in
attributes ending in ``_``::

    from pnn.calibration import Calibrator, CalibrationStore, Sweep

    calibrator = Calibrator("tanh", sweep=Sweep(points=128, repeats=3)).fit(node)
    calibrator.fit_                 # per-channel parameters with uncertainties
    calibrator.holdout_error_       # the twin's error on points left out of the fit
    CalibrationStore("calibrations").append(calibrator.record_)
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import CalibrationError, ConfigError
from ..nodes import Node
from .fit import TransferFit, fit_transfer
from .models import TransferModel, get_model
from .record import DEFAULT_VALIDITY, CalibrationRecord
from .reference import LinearReference, Reference, reference_for
from .sweep import Sweep, SweepResult
from .twin import DigitalTwin

__all__ = ["Calibrator", "default_model", "default_parameter_ranges"]

log = logging.getLogger(__name__)

# Transfer model for each activation a node may declare; other activations get "linear".
_MODEL_FOR_ACTIVATION = {"tanh": "tanh", "sigmoid": "sigmoid"}


def default_parameter_ranges(node: Node, reference: Reference) -> dict[str, tuple[float, float]]:
    """Return parameter ranges that make a linear reference's stimulus span a saturating curve.

    A node computing ``f(W x + b)`` may hold weights that make ``W x + b`` almost constant (an
    instrument's source channels start at 0 V; a fresh crossbar has small weights), and then
    no curve can be fitted. Sweeping the weights within ``+-3 / sqrt(n_in)`` and the bias within
    ``+-1`` (each narrowed to its limits) gives inputs uniform in ``[-1, 1]`` a stimulus with a
    standard deviation of about 1.2, which covers the bend of tanh and sigmoid. Other references
    get no parameter sweep.
    """
    if not isinstance(reference, LinearReference) or reference.weight not in node.parameters:
        return {}
    ranges = {}
    limits = {reference.weight: 3.0 / math.sqrt(node.n_in)}
    if reference.bias is not None and reference.bias in node.parameters:
        limits[reference.bias] = 1.0
    for name, half_width in limits.items():
        spec = node.parameters[name]
        lower = max(float(np.max(spec.lower_array)), -half_width)
        upper = min(float(np.min(spec.upper_array)), half_width)
        if lower < upper:
            ranges[name] = (lower, upper)
    return ranges


def default_model(node: Node, reference: Reference | None = None) -> str:
    """Return the model that fits a node: its declared saturating activation, or ``linear``.

    Only a stimulus at the pre-activation (a linear reference) passes through the activation.
    """
    activation = getattr(node, "activation", None)
    name = getattr(activation, "name", None)
    if reference is not None and reference.kind != "linear":
        return "linear"
    return _MODEL_FOR_ACTIVATION.get(name, "linear")


class Calibrator:
    """Calibrate one node: sweep it, fit a transfer model per output channel, record the result.

    Parameters
    ----------
    model
        Transfer model name or object (see :mod:`pnn.calibration.models`); ``"auto"`` picks
        the node's saturating activation (tanh, sigmoid) or ``linear``.
    sweep
        The sweep settings. The default is a random design of 64 points with 3 repeats. For a
        node computing ``f(W x + b)`` it also sweeps 4 parameter settings drawn from
        :func:`default_parameter_ranges`, and the node's parameters are restored afterwards.
    reference
        How the stimulus follows from inputs and parameters (see
        :func:`~pnn.calibration.reference.reference_for`).
    holdout
        Fraction of the points kept out of the fit to measure the twin's prediction error.
    robust
        Use the robust first pass and outlier rejection of :func:`~pnn.calibration.fit.fit_channel`.
    outlier_threshold
        Residuals beyond this many robust standard deviations are outliers.
    valid_for
        How long the record stays valid.
    initial
        Starting values of the fit, for every channel or per channel number.
    notes
        Free text stored in the record.
    seed
        Seed of the held-out split.

    Attributes
    ----------
    sweep_result_
        The measured :class:`~pnn.calibration.sweep.SweepResult`.
    reference_, model_
        The reference and model used.
    fit_
        The :class:`~pnn.calibration.fit.TransferFit` of the points kept in the fit.
    train_index_, holdout_index_
        Indices of the points fitted and held out.
    holdout_error_
        The twin's rms and largest error per channel on the held-out points (None without).
    twin_
        The :class:`~pnn.calibration.twin.DigitalTwin`.
    record_
        The :class:`~pnn.calibration.record.CalibrationRecord`, not yet stored.
    """

    def __init__(
        self,
        model: str | TransferModel = "auto",
        *,
        sweep: Sweep | None = None,
        reference: str | Reference = "auto",
        holdout: float = 0.2,
        robust: bool = True,
        outlier_threshold: float = 5.0,
        valid_for: _dt.timedelta = DEFAULT_VALIDITY,
        initial: Sequence[float] | Mapping[int, Sequence[float]] | None = None,
        notes: str = "",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.sweep = sweep
        self.reference = reference
        self.holdout = holdout
        self.robust = robust
        self.outlier_threshold = outlier_threshold
        self.valid_for = valid_for
        self.initial = initial
        self.notes = notes
        self.seed = seed

    def _check_settings(self) -> None:
        if not 0 <= self.holdout < 0.9:
            raise ConfigError(f"holdout must be a fraction in [0, 0.9), got {self.holdout}")
        if self.valid_for.total_seconds() <= 0:
            raise ConfigError(f"a calibration must stay valid for a positive time, got {self.valid_for}")

    def check(self, node: Node) -> None:
        """Check settings, reference, model and sweep ranges on ``node`` without measuring.

        Raises
        ------
        ConfigError or LimitError
            Naming the node and the setting to change.
        """
        self._check_settings()
        reference = reference_for(node, self.reference)
        self._resolve_model(node, reference)
        self.sweep_for(node).check(node)

    def fit(
        self,
        node: Node,
        *,
        progress: bool = True,
        leave_progress: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Calibrator:
        """Sweep ``node``, fit it and build its record and twin; return ``self``.

        Everything that can be checked without touching the node (settings, reference, model,
        sweep ranges) is checked first. ``progress``, ``leave_progress`` and ``sleep`` go to
        :meth:`Sweep.run <pnn.calibration.sweep.Sweep.run>`.

        Raises
        ------
        LimitError
            If the sweep leaves the node's limits (nothing is applied).
        CalibrationError
            If a fit fails; the message names the node, the channel and what to try.
        """
        self.check(node)
        result = self.sweep_for(node).run(node, progress=progress, leave_progress=leave_progress, sleep=sleep)
        return self.fit_sweep(node, result)

    def sweep_for(self, node: Node) -> Sweep:
        """Return the sweep :meth:`fit` runs on ``node``: the one given, or the default."""
        return self.sweep or Sweep(parameters=default_parameter_ranges(node, reference_for(node, self.reference)))

    def _resolve_model(self, node: Node, reference: Reference) -> TransferModel:
        return get_model(default_model(node, reference) if self.model == "auto" else self.model)

    def fit_sweep(self, node: Node, result: SweepResult) -> Calibrator:
        """Fit an already measured sweep of ``node``; return ``self``."""
        self._check_settings()
        reference = reference_for(node, self.reference)
        model = self._resolve_model(node, reference)
        if result.n_out != node.n_out or result.inputs.shape[1] != node.n_in:
            raise ConfigError(
                f"node {node.name!r} maps {node.n_in} -> {node.n_out} channels, but the sweep has "
                f"{result.inputs.shape[1]} inputs and {result.n_out} outputs"
            )

        # Held-out split: a random subset of the points, the same for every channel.
        order = np.random.default_rng(self.seed).permutation(result.n_points)
        n_holdout = int(round(self.holdout * result.n_points))
        if result.n_points - n_holdout < model.n_parameters + 2:
            raise CalibrationError(
                f"node {node.name!r}: {result.n_points} sweep point(s) leave too few to fit the "
                f"{model.name} model after holding out {n_holdout}; sweep more points or lower the holdout"
            )
        holdout_index = np.sort(order[:n_holdout])
        train_index = np.sort(order[n_holdout:])
        fitted = result.subset(train_index)

        stimulus = reference.stimulus(fitted.inputs, fitted.parameters())
        fit = fit_transfer(
            stimulus, fitted.outputs, model, node=node.name,
            stimulus_unit=reference.stimulus_unit(node), output_unit=node.output_unit,
            initial=self.initial, robust=self.robust, outlier_threshold=self.outlier_threshold,
        )
        twin = DigitalTwin.from_node(fit, reference, node)
        holdout_error = twin.prediction_error(result.subset(holdout_index)) if n_holdout else None

        noise = result.noise_std()
        sweep_info = dict(result.settings)
        sweep_info.update(
            n_points=result.n_points,
            n_invalid=result.n_invalid,
            noise_std=None if noise is None else [float(v) for v in noise],
            started=result.started,
        )
        record = CalibrationRecord.from_fit(
            fit, node=node, reference=reference.describe(), sweep=sweep_info, holdout=holdout_error,
            valid_for=self.valid_for, identity=result.identity, notes=self.notes,
        )
        twin.record_hash = record.content_hash

        self.sweep_result_ = result
        self.reference_ = reference
        self.model_ = model
        self.fit_: TransferFit = fit
        self.train_index_ = train_index
        self.holdout_index_ = holdout_index
        self.holdout_error_ = holdout_error
        self.twin_ = twin
        self.record_ = record
        log.info("node %r: calibrated with %s, record %s", node.name, model.name, record.content_hash)
        return self

    def summary(self) -> str:
        """Return the fit table and the held-out error of the last :meth:`fit`."""
        if not hasattr(self, "record_"):
            return repr(self)
        lines = [f"Calibration of node {self.record_.node!r}: {self.model_.name} against the {self.reference_.kind} reference",
                 self.fit_.summary()]
        if self.holdout_error_:
            rms = ", ".join(f"{v:.3g}" for v in self.holdout_error_["rms"])
            unit = "" if self.fit_.output_unit in ("", "1") else f" {self.fit_.output_unit}"
            lines.append(f"held-out rms error per channel ({self.holdout_error_['n_points']} point(s)): {rms}{unit}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Calibrator(model={getattr(self.model, 'name', self.model)!r}, reference={self.reference!r}, holdout={self.holdout})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self) if cycle else self.summary())
