"""Fault-injection suite: short trainings on the emulators under each kind of instrument fault.

Each scenario starts an emulator, writes a station file for it, and trains a small network
through the real driver stack (pyvisa and pyvisa-py over loopback TCP, or pyserial on a
pseudo-terminal) while one kind of fault is injected at chosen steps. Afterwards it replays the
emulator's record (:class:`~pnn.emulators.audit.CommandAudit`): every level and batch row must lie
within the station's limits, and no ramped channel may step further than its ``max_step``.

Run it from the shell (it takes about a minute)::

    python -m pnn.fault_suite              # every scenario, one summary line each
    python -m pnn.fault_suite --kind late  # one scenario
    python -m pnn.fault_suite --markdown   # the summary as a Markdown table

The exit code is 0 when every scenario ended as expected with no command outside the limits.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .controller import PhysicalNoProp, TrainingStopped
from .devices.station import Station, load_station
from .emulators import CommandAudit, EmulatedHardware, FaultConfig, LayerSpec, ScpiEmulator, SerialBoardEmulator
from .emulators.base import Emulator
from .errors import ConfigError, LimitError, PnnError
from .learning import DFA
from .network import Encoder, PhysicalNetwork, Readout
from .runs import RunDir

__all__ = ["Scenario", "FaultResult", "SCENARIOS", "run_fault_suite", "format_summary", "main"]

# The emulated hardware: one crossbar layer with 4 inputs and 3 tanh outputs (4 input, 12 weight
# and 3 bias channels), trained on 3 Gaussian classes in 4 dimensions.
N_IN, N_OUT = 4, 3
N_TRAIN, N_TEST = 48, 24
EPOCHS, BATCH = 3, 8
# Step callbacks (one per try of a batch) at which a scenario injects its fault.
INJECT_AT = (2, 5, 9, 13)
# Short timeouts keep a fault cheap: a timed-out reply costs about 0.25 s.
TIMEOUT_S, DEADLINE_S = 0.25, 0.6
MAX_CONSECUTIVE = 10
OPEN_CLOSE_CYCLES = 25


@dataclass
class _Run:
    """One training (or one batch of open and close cycles) within a scenario."""

    emulator: Emulator
    station: Station
    nodes: list
    audit: CommandAudit
    workdir: Path
    injected: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Scenario:
    """One kind of fault and how to inject it."""

    kind: str
    """Short name, as ``--kind`` takes it."""
    description: str
    """The fault in words, for the summary."""
    emulators: tuple[str, ...]
    """Emulators it runs on: ``"scpi"`` (pyvisa-py over TCP), ``"serial"`` (pyserial on a pty)."""
    inject: Callable[[_Run], None] | None = None
    """Injects one fault; called at the step callbacks listed in :data:`INJECT_AT`."""
    counted: tuple[str, ...] = ()
    """Emulator fault kinds whose counts are the faults injected (else the inject calls)."""
    expect: str = "completed"
    """``"completed"``, ``"stopped"`` (after too many failures in a row) or ``"refused"``."""
    transfer: str = "binary"
    faults: FaultConfig = field(default_factory=FaultConfig)
    set_only: str | None = None
    """``"safe"`` or ``"refuse"``: the station reads no level back, with this unknown_start."""
    readback_overshoot: bool = False
    checksum: bool = False
    """Whether the station turns on the board's CRC-32 for binary batches."""
    after_recovery: bool = False
    """Whether each injection waits for a batch accepted since the previous one. Two outages
    that overlap would add up towards the failures in a row that stop a run."""
    lr: float = 0.05
    special: str | None = None
    """What the scenario does besides injecting: ``"threads"`` (a second thread queries the
    instrument), ``"open_close"`` (no training, open and close cycles), ``"at_limits"``
    (parameters start at their range limits) or ``"count_unknown"`` (counts the channels whose
    start is unknown as the faults)."""


@dataclass
class FaultResult:
    """Counts of one scenario over all its runs."""

    kind: str
    description: str
    emulators: tuple[str, ...]
    expect: str
    injected: int = 0
    runs: int = 0
    ended_as_expected: int = 0
    rejected: int = 0
    """Batches skipped because their measurement was invalid."""
    retried: int = 0
    """Instrument faults caught by the training loop (each followed by a pause and a retry)."""
    reconnects: int = 0
    outside_limits: int = 0
    """Commands outside a limit or ramp step, from the audit; must be zero."""
    checked_levels: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every run ended as expected, faults were injected, and nothing was unsafe."""
        return (self.ended_as_expected == self.runs and self.runs > 0 and self.injected > 0
                and self.outside_limits == 0 and not self.problems)

    def line(self) -> str:
        """Return the one-line summary."""
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.kind}: {self.injected} injected, {self.ended_as_expected}/{self.runs} runs {self.expect}, "
            f"{self.rejected} batches rejected, {self.retried} retried, {self.reconnects} reconnects, "
            f"{self.outside_limits} commands outside limits ({self.checked_levels} levels checked) "
            f"[{', '.join(self.emulators)}; {self.seconds:.1f} s] {verdict}"
        )


# --------------------------------------------------------------------------- injections
def _queue(kind: str, count: int = 1, **options: Any) -> Callable[[_Run], None]:
    def inject(run: _Run) -> None:
        run.emulator.inject(kind, count, **options)
    return inject


def _port_gone(run: _Run) -> None:
    run.emulator.disconnect(reappear_s=0.4)
    run.injected += 1


SCENARIOS: list[Scenario] = [
    Scenario("late", "reply later than the timeout", ("scpi", "serial"), _queue("late", late_s=0.5), ("late",)),
    Scenario("split", "reply split into pieces with pauses", ("scpi",),
             _queue("split", 2, split_pieces=4, split_pause_s=0.03), ("split",), transfer="ascii"),
    Scenario("trickle", "line that never ends while bytes keep arriving", ("scpi", "serial"),
             _queue("trickle", trickle_s=0.9, trickle_interval_s=0.01), ("trickle",)),
    Scenario("binary_fragments", "binary block fragmented across reads", ("scpi", "serial"),
             _queue("split", 2, split_pieces=6, split_pause_s=0.02), ("split",)),
    Scenario("wrong_terminator", "reply ending with another terminator", ("scpi", "serial"),
             _queue("wrong_terminator"), ("wrong_terminator",)),
    Scenario("bitflip", "bit flipped in a binary reply, checksum on", ("serial",), _queue("bitflip"), ("bitflip",),
             checksum=True),
    Scenario("overrange", "overrange reading (9.9E37)", ("scpi", "serial"), _queue("overrange"), ("overrange",)),
    Scenario("garbled", "garbled reply (ASCII transfer)", ("scpi",), _queue("garbled"), ("garbled",), transfer="ascii"),
    Scenario("partial", "reply cut off without its terminator", ("scpi",), _queue("partial"), ("partial",)),
    Scenario("no_reply", "reply that never comes", ("scpi",), _queue("no_reply"), ("no_reply",)),
    Scenario("disconnect", "connection dropped in the middle of a reply", ("scpi", "serial"),
             _queue("disconnect"), ("disconnect",), faults=FaultConfig(reappear_s=0.3), after_recovery=True),
    Scenario("port_gone", "serial port that disappears and comes back", ("serial",), _port_gone,
             after_recovery=True),
    Scenario("slow", "instrument slower than the timeout for 0.8 s", ("scpi",), _queue("slow", slow_s=0.8), ("slow",),
             faults=FaultConfig(slow_latency_s=0.35)),
    Scenario("threads", "two threads sharing one instrument", ("scpi", "serial"), special="threads"),
    Scenario("open_close", f"opening and closing an instrument {OPEN_CLOSE_CYCLES} times", ("scpi", "serial"),
             special="open_close"),
    Scenario("readback_overshoot", "DAC reading back one step outside its limit", ("scpi", "serial"),
             readback_overshoot=True, lr=0.5, special="at_limits"),
    Scenario("set_only_safe", "set-only output, unknown start, unknown_start = 'safe'", ("scpi",),
             set_only="safe", special="count_unknown"),
    Scenario("set_only_refuse", "set-only output, unknown start, unknown_start = 'refuse'", ("scpi",),
             set_only="refuse", expect="refused", special="count_unknown"),
    Scenario("persistent", "overrange on every reading: the run must stop", ("scpi",),
             expect="stopped", faults=FaultConfig(rates={"overrange": 1.0}), counted=("overrange",)),
]


# ------------------------------------------------------------------------------- setup
def _dataset(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng([seed, 17])
    centres = rng.normal(0.0, 1.5, (N_OUT, N_IN))
    y = rng.integers(0, N_OUT, N_TRAIN + N_TEST)
    x = centres[y] + rng.normal(0.0, 0.7, (len(y), N_IN))
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _start(scenario: Scenario, kind: str, seed: int, workdir: Path) -> Emulator:
    faults = FaultConfig(**{**scenario.faults.__dict__, "seed": seed})
    hardware = EmulatedHardware([LayerSpec(N_IN, N_OUT, "tanh")], seed=seed,
                                readback_overshoot=scenario.readback_overshoot)
    if scenario.special == "at_limits":
        # Weights and biases start at their range limits, where the read-back overshoots.
        channels = hardware.channels[0]
        first, stop = channels.first_weight - 1, channels.first_bias - 1 + N_OUT
        pick = np.arange(stop - first) % 2 == 0
        hardware.levels[first:stop] = np.where(pick, hardware.upper[first:stop], hardware.lower[first:stop])
    if kind == "scpi":
        return ScpiEmulator(hardware, faults=faults).start()
    return SerialBoardEmulator(hardware, faults=faults, link=workdir / "board").start()


def _station_text(emulator: Emulator, scenario: Scenario) -> str:
    lines = ["reconnect_backoff_s = 0.05"]
    if scenario.checksum:
        lines.append("checksum = true")
    if scenario.set_only:
        lines += ["[instruments.emulator.commands]", 'level_get = ""']
    text = emulator.station_toml(timeout_s=TIMEOUT_S, deadline_s=DEADLINE_S, transfer=scenario.transfer,
                                 extra_instrument_lines=tuple(lines))
    if scenario.set_only:
        text = text.replace("max_step", f'unknown_start = "{scenario.set_only}"\nmax_step')
    return text


def _open(scenario: Scenario, kind: str, seed: int, workdir: Path) -> _Run:
    emulator = _start(scenario, kind, seed, workdir)
    try:
        path = workdir / "station.toml"
        path.write_text(_station_text(emulator, scenario), encoding="utf-8")
        station = load_station(path)
        try:
            nodes = station.build_nodes()
            audit = CommandAudit(emulator, nodes)
        except BaseException:
            station.close()
            raise
    except BaseException:
        emulator.stop()
        raise
    return _Run(emulator, station, nodes, audit, workdir)


def _close(run: _Run, scenario: Scenario) -> None:
    """Apply the station's safe state, close it and stop the emulator; record a failing safe state."""
    try:
        run.station.__exit__(None, None, None)
    except LimitError as exc:
        # With unknown_start = "refuse" the safe state must refuse to ramp from an unknown level.
        if scenario.set_only != "refuse":
            run.problems.append(f"applying the safe state at the end failed: {exc}")
    except PnnError as exc:
        run.problems.append(f"applying the safe state at the end failed: {exc}")
    finally:
        run.emulator.stop()


# ------------------------------------------------------------------------------- runs
def _train(scenario: Scenario, run: _Run, seed: int, result: FaultResult) -> str:
    """Train with the scenario's injections; return how the run ended."""
    x_train, y_train, x_test, y_test = _dataset(seed)
    network = PhysicalNetwork([Encoder(N_IN, lower=-1.0, upper=1.0).fit(x_train), *run.nodes, Readout(N_OUT)])
    calls = {"n": 0, "due": 0}

    def hook(controller: PhysicalNoProp, record: dict[str, Any]) -> None:
        calls["n"] += 1
        if scenario.inject is None:
            return
        calls["due"] += calls["n"] in INJECT_AT
        recovered = record["outcome"] == "accepted" or not scenario.after_recovery
        if calls["due"] and recovered:
            calls["due"] -= 1
            scenario.inject(run)

    folder = RunDir.create(run.workdir / "run", {"fault_suite": scenario.kind, "seed": seed})
    controller = PhysicalNoProp(
        network, DFA(), lr=scenario.lr, epochs=EPOCHS, batch_size=BATCH, seed=seed, progress=False,
        max_consecutive_invalid=4 if scenario.expect == "stopped" else MAX_CONSECUTIVE,
        retry_backoff_s=0.02, retry_backoff_max_s=0.2, run=folder, step_callbacks=[hook],
    )
    monitor = _Monitor(run) if scenario.special == "threads" else None
    try:
        controller.fit(x_train, y_train, x_test, y_test, n_classes=N_OUT)
        controller.evaluate(x_test, y_test)
        ended = "completed"
    except TrainingStopped as exc:
        ended = "stopped"
        if not folder.has_checkpoint():
            run.problems.append(f"stopped without a checkpoint: {exc}")
    except LimitError as exc:
        ended = "refused"
        if scenario.expect != "refused":
            run.problems.append(f"unexpected limit error: {exc}")
    finally:
        if monitor is not None:
            run.injected += monitor.stop()
            run.problems += monitor.problems
    result.rejected += controller.n_rejected_
    result.retried += controller.n_faults_
    if ended == "stopped":
        _check_safe_levels(run)
    return ended


def _check_safe_levels(run: _Run) -> None:
    """Record a problem for every parameter channel that is not at its safe value."""
    for node in run.nodes:
        for name, bank in node.banks.items():
            if name == "inputs" or bank.spec.safe_value is None:
                continue
            levels = run.emulator.hardware.levels[np.asarray(bank.group.channels) - 1]
            if not np.allclose(levels, bank.spec.safe_value, atol=max(bank.spec.resolution, 1e-9)):
                run.problems.append(f"node {node.name!r} {name} is not at its safe value after stopping")


class _Monitor:
    """A second thread that queries the instrument while the training thread uses it."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.queries = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fault-suite-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        instrument = self.run.station.instruments["emulator"]
        expected = self.run.emulator.identity
        channels = self.run.nodes[0].banks["bias"].group.channels
        while not self._stop.is_set():
            try:
                reply = instrument.identify()
                levels = instrument.read_levels(channels)
            except PnnError as exc:
                self.problems.append(f"monitor thread query failed: {exc}")
                return
            self.queries += 1
            if reply != expected:
                self.problems.append(f"monitor thread got {reply!r} for its identity query")
            if levels.shape != (len(channels),) or not np.all(np.isfinite(levels)):
                self.problems.append(f"monitor thread got {levels!r} for its read-back")
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.queries


def _open_close(scenario: Scenario, kind: str, seed: int, workdir: Path, result: FaultResult) -> None:
    """Open, use and close the station many times; record leaked file descriptors and threads."""
    emulator = _start(scenario, kind, seed, workdir)
    try:
        path = workdir / "station.toml"
        path.write_text(_station_text(emulator, scenario), encoding="utf-8")
        x = np.zeros((2, N_IN))

        def cycle() -> None:
            station = load_station(path)
            try:
                station.build_nodes()[0].forward(x)
            finally:
                station.close()

        cycle()  # the first cycle loads pyvisa and pyserial, which keep some state for good
        before = _resources()
        for _ in range(OPEN_CLOSE_CYCLES):
            cycle()
            result.injected += 1
        after = _settled_resources(before)
        result.runs += 1
        if after[0] > before[0]:
            result.problems.append(f"{kind}: {after[0] - before[0]} file descriptor(s) leaked over {OPEN_CLOSE_CYCLES} cycles")
        if after[1] > before[1]:
            result.problems.append(f"{kind}: {after[1] - before[1]} thread(s) leaked over {OPEN_CLOSE_CYCLES} cycles")
        if after[0] <= before[0] and after[1] <= before[1]:
            result.ended_as_expected += 1
    finally:
        emulator.stop()


def _resources() -> tuple[int, int]:
    """Return (open file descriptors, live threads) of this process."""
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0  # NOTE: no /proc (macOS, Windows): only threads are compared there.
    return fds, threading.active_count()


def _settled_resources(before: tuple[int, int], wait_s: float = 2.0) -> tuple[int, int]:
    # The emulator's connection threads end a moment after the host closes its side.
    stop = time.monotonic() + wait_s
    now = _resources()
    while (now[0] > before[0] or now[1] > before[1]) and time.monotonic() < stop:
        time.sleep(0.05)
        now = _resources()
    return now


def run_scenario(scenario: Scenario, *, seed: int = 0) -> FaultResult:
    """Run one scenario on each of its emulators and return its counts."""
    # A full garbage collection in a test session pauses every thread for 0.1 s or more, so the
    # emulator can miss the 0.25 s timeouts. Freezing the existing objects keeps collections short.
    gc.collect()
    gc.freeze()
    try:
        return _run_scenario(scenario, seed)
    finally:
        gc.unfreeze()


def _run_scenario(scenario: Scenario, seed: int) -> FaultResult:
    result = FaultResult(scenario.kind, scenario.description, scenario.emulators, scenario.expect)
    started = time.monotonic()
    for kind in scenario.emulators:
        workdir = Path(tempfile.mkdtemp(prefix=f"pnn-faults-{scenario.kind}-"))
        try:
            if scenario.special == "open_close":
                _open_close(scenario, kind, seed, workdir, result)
                continue
            run = _open(scenario, kind, seed, workdir)
            try:
                ended = _train(scenario, run, seed, result)
            finally:
                _close(run, scenario)
            result.runs += 1
            result.ended_as_expected += ended == scenario.expect
            if ended != scenario.expect:
                run.problems.append(f"{kind}: the run {ended}, expected {scenario.expect}")
            counted = sum(run.emulator.faults.counts[name] for name in scenario.counted)
            if scenario.readback_overshoot:
                counted = run.emulator.hardware.overshoot_reads
            if scenario.special == "count_unknown":
                # The fault is the unknown start level of every parameter channel.
                counted = sum(len(bank.group.channels) for node in run.nodes for name, bank in node.banks.items()
                              if name != "inputs")
            result.injected += counted + run.injected
            result.reconnects += sum(instrument.reconnects for instrument in run.station.instruments.values())
            if scenario.set_only == "refuse":
                parameter_channels = {channel for node in run.nodes for name, bank in node.banks.items()
                                      if name != "inputs" for channel in bank.group.channels}
                blind = [w for w in run.emulator.level_writes() if w[1] in parameter_channels]
                if blind:
                    run.problems.append(f"{len(blind)} write(s) to parameter channels whose level is unknown")
            violations = run.audit.violations()
            result.outside_limits += len(violations)
            result.checked_levels += run.audit.checked_levels
            result.problems += [f"{kind}: {line}" for line in violations[:5]]
            result.problems += [f"{kind}: {line}" for line in run.problems]
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def run_fault_suite(kinds: Sequence[str] | None = None, *, seed: int = 0,
                    report: Callable[[FaultResult], None] | None = None) -> list[FaultResult]:
    """Run the scenarios named in ``kinds`` (all by default) and return their results.

    ``report`` is called with each result as soon as its scenario ends.
    """
    known = {scenario.kind: scenario for scenario in SCENARIOS}
    unknown = sorted(set(kinds or ()) - set(known))
    if unknown:
        raise ConfigError(f"unknown fault kind(s) {unknown}; choose from {', '.join(known)}")
    results = []
    for scenario in SCENARIOS:
        if kinds and scenario.kind not in kinds:
            continue
        result = run_scenario(scenario, seed=seed)
        results.append(result)
        if report is not None:
            report(result)
    return results


def format_summary(results: Sequence[FaultResult], *, markdown: bool = False) -> str:
    """Return the results as one line per scenario, or as a Markdown table."""
    if not markdown:
        return "\n".join(result.line() for result in results)
    rows = [
        "| fault | emulators | injected | runs ended as expected | batches rejected | batches retried | reconnects | commands outside limits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rows.append(
            f"| {r.description} (`{r.kind}`) | {', '.join(r.emulators)} | {r.injected} | "
            f"{r.ended_as_expected}/{r.runs} {r.expect} | {r.rejected} | {r.retried} | {r.reconnects} | {r.outside_limits} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite from the shell; return 0 when every scenario passed."""
    parser = argparse.ArgumentParser(prog="python -m pnn.fault_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", action="append", choices=[scenario.kind for scenario in SCENARIOS],
                        help="run only this scenario; repeatable (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the network and the emulator (default 0)")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table at the end")
    args = parser.parse_args(argv)
    results = run_fault_suite(args.kind, seed=args.seed, report=lambda result: print(result.line(), flush=True))
    failed = [result for result in results if not result.ok]
    for result in failed:
        for problem in result.problems:
            print(f"  {result.kind}: {problem}", file=sys.stderr)
    if args.markdown:
        print()
        print(format_summary(results, markdown=True))
    total = sum(result.seconds for result in results)
    print(f"{len(results) - len(failed)} of {len(results)} scenarios passed in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
