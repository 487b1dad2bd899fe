"""The interactive calibration session behind ``pnn calibrate``.

For each node the session shows the node's identity, limits and a few live readings. It runs
the sweep with a progress bar, prints the fit summary and saves a PNG plot of data and fit.
Then it prompts for accept, redo or skip before it writes the record to the store. With
``assume_yes`` it accepts every successful fit without asking, for scripts.

Questions are read from a text stream (standard input by default), so a test or a script can
reply to them. The end of input counts as "skip" for the node in question.
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from ..errors import CalibrationError, LimitError
from ..nodes import Node
from .calibrator import Calibrator
from .record import identity_summary
from .store import CalibrationStore

__all__ = ["CalibrationSession", "SessionOutcome", "describe_node"]

log = logging.getLogger(__name__)

_ANSWERS = {"a": "accept", "accept": "accept", "r": "redo", "redo": "redo", "s": "skip", "skip": "skip"}


@dataclass(frozen=True)
class SessionOutcome:
    """Outcome of one node in a session."""

    node: str
    """Name of the node."""
    status: str
    """``"accepted"``, ``"skipped"`` or ``"failed"``."""
    record_path: Path | None = None
    """The stored record file, when accepted."""
    content_hash: str | None = None
    """The stored record's content hash, when accepted."""
    plot: Path | None = None
    """The last plot saved for the node."""
    message: str = ""
    """The error of a failed node."""


def _shown(path: Path) -> Path:
    """Return ``path`` relative to the working directory when it lies inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _unit(unit: str) -> str:
    return "" if unit in ("", "1") else f" {unit}"


def describe_node(node: Node) -> list[str]:
    """Return lines describing a node: identity, instruments, inputs, outputs and parameters."""
    identity = node.identity()
    lines = [f"  device      {identity_summary(identity)}"]
    for instrument in identity.get("instruments", []) or []:
        if isinstance(instrument, dict):
            lines.append(f"  instrument  {instrument.get('name')}: {instrument.get('identity')} at {instrument.get('resource')}")
    spec = node.input_spec
    lines.append(f"  inputs      {node.n_in} channel(s) in {spec.range_text()}")
    unit = f" in {node.output_unit}" if _unit(node.output_unit) else " (dimensionless)"
    lines.append(f"  outputs     {node.n_out} channel(s){unit}")
    for name, parameter in node.parameters.items():
        lines.append(f"  parameter   {name} {parameter.shape} in {parameter.range_text()}")
    return lines


class CalibrationSession:
    """Calibrate nodes one after the other, asking before each record is written.

    Parameters
    ----------
    nodes
        The nodes to calibrate, in order.
    store
        Where accepted records go.
    make_calibrator
        Returns a fresh, unfitted calibrator for a node.
    plot_dir
        Folder for the PNG plots; None saves no plot.
    assume_yes
        Accept every successful fit without asking.
    input, output
        Streams for the questions and everything printed.
    progress
        Show the sweep's progress bar (on standard error).
    live_readings
        Readings taken at the hold input to show the node is alive (0 for none).
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        *,
        store: CalibrationStore,
        make_calibrator: Callable[[Node], Calibrator],
        plot_dir: str | Path | None = None,
        assume_yes: bool = False,
        input: TextIO | None = None,
        output: TextIO | None = None,
        progress: bool = True,
        live_readings: int = 3,
    ) -> None:
        self.nodes = list(nodes)
        self.store = store
        self.make_calibrator = make_calibrator
        self.plot_dir = None if plot_dir is None else Path(plot_dir)
        self.assume_yes = assume_yes
        self.input = input if input is not None else sys.stdin
        self.output = output if output is not None else sys.stdout
        self.progress = progress
        self.live_readings = int(live_readings)

    def _print(self, text: str = "") -> None:
        print(text, file=self.output, flush=True)

    def _ask(self, question: str, choices: Sequence[str]) -> str:
        """Prompt until the reply is one of ``choices``, and return it; the end of input returns ``"skip"``."""
        while True:
            self.output.write(question)
            self.output.flush()
            line = self.input.readline()
            if not line:
                self._print("")
                self._print("  (end of input: skipping)")
                return "skip"
            answer = _ANSWERS.get(line.strip().lower())
            if answer in choices:
                # Echo a reply that did not come from a terminal, so a transcript reads like a session.
                if not self.input.isatty():
                    self._print(line.strip())
                return answer
            if not self.input.isatty():
                self._print(line.strip())
            self._print(f"  please answer {' or '.join(c[0] + ' (' + c + ')' for c in choices)}")

    # ---------------------------------------------------------------------------- steps
    def _show_live_readings(self, node: Node, calibrator: Calibrator) -> None:
        if self.live_readings < 1:
            return
        hold_levels = calibrator.sweep_for(node).hold_inputs(node)
        readings = np.array([node.forward(hold_levels[None, :])[0] for _ in range(self.live_readings)])
        self._print(f"  live        {self.live_readings} reading(s) at the hold input {np.round(hold_levels, 4).tolist()}:")
        self._print("    channel " + "".join(f"{k:>11}" for k in range(node.n_out)))
        self._print("    mean    " + "".join(f" {v:>10.4g}" for v in readings.mean(axis=0)))
        if self.live_readings > 1:
            self._print("    std     " + "".join(f" {v:>10.2g}" for v in readings.std(axis=0, ddof=1)))

    def _plot(self, node: Node, calibrator: Calibrator) -> Path | None:
        if self.plot_dir is None:
            return None
        try:
            from .plot import plot_calibration  # noqa: PLC0415 - matplotlib is optional
        except ImportError:
            self._print("  plot        not saved: matplotlib is not installed (pip install 'pnn-lab[plot]')")
            return None
        self.plot_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = plot_calibration(calibrator, self.plot_dir / f"{node.name}-{stamp}.png")
        self._print(f"  plot        {_shown(path)}")
        return path

    def calibrate_node(self, node: Node, position: str = "") -> SessionOutcome:
        """Run the session's steps for one node and return the outcome."""
        self._print(f"== node {node.name!r}{position} ==")
        for line in describe_node(node):
            self._print(line)
        plot = None
        while True:
            calibrator = self.make_calibrator(node)
            try:
                self._show_live_readings(node, calibrator)
                sweep = calibrator.sweep_for(node)
                swept = "".join(f", {name} in [{lo:.4g}, {hi:.4g}]" for name, (lo, hi) in sweep.parameters.items())
                settings = f" at {sweep.parameter_points} parameter setting(s){swept}" if sweep.parameters else ""
                self._print(f"  sweep       {sweep.design} design, {sweep.points} input point(s){settings}")
                started = time.perf_counter()
                calibrator.fit(node, progress=self.progress, leave_progress=True)
                result = calibrator.sweep_result_
                self._print(
                    f"  measured    {result.n_points} point(s) x {result.repeats} repeat(s) in "
                    f"{time.perf_counter() - started:.1f} s, {result.n_invalid} invalid reading(s)"
                )
            except (CalibrationError, LimitError) as exc:
                self._print(f"  error: {exc}")
                if self.assume_yes:
                    return SessionOutcome(node.name, "failed", plot=plot, message=str(exc))
                answer = self._ask("Redo or skip this node? [r/s] ", ("redo", "skip"))
                if answer == "redo":
                    continue
                return SessionOutcome(node.name, "skipped", plot=plot, message=str(exc))

            self._print("  " + calibrator.summary().replace("\n", "\n  "))
            plot = self._plot(node, calibrator) or plot
            if self.assume_yes:
                answer = "accept"
                self._print("Accept, redo or skip this calibration? [a/r/s] accept (--yes)")
            else:
                answer = self._ask("Accept, redo or skip this calibration? [a/r/s] ", ("accept", "redo", "skip"))
            if answer == "redo":
                continue
            if answer == "skip":
                self._print(f"  skipped: no record written for node {node.name!r}")
                return SessionOutcome(node.name, "skipped", plot=plot)
            path = self.store.append(calibrator.record_)
            self._print(f"  record      {_shown(path)}")
            self._print(f"  hash        {calibrator.record_.content_hash}")
            return SessionOutcome(node.name, "accepted", path, calibrator.record_.content_hash, plot)

    def run(self) -> list[SessionOutcome]:
        """Calibrate every node; return one outcome per node."""
        outcomes = []
        for i, node in enumerate(self.nodes):
            position = f" ({i + 1} of {len(self.nodes)})" if len(self.nodes) > 1 else ""
            outcomes.append(self.calibrate_node(node, position))
            self._print()
        self._print("summary:")
        for outcome in outcomes:
            detail = outcome.content_hash or outcome.message or ""
            self._print(f"  {outcome.node:<16} {outcome.status:<9} {detail[:90]}")
        return outcomes
