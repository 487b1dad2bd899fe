"""Time forward passes through the SCPI emulator on loopback: ASCII against binary, and overhead.

Each transfer format gets its own emulator process (``pnn emulate scpi``), so the emulators'
work does not compete with the host for the interpreter lock and neither can change the other's
data format. The host talks to them through pyvisa and pyvisa-py over TCP, exactly as to a LAN
instrument. ASCII and binary measurements alternate, so a change of machine load hits both
alike. Reported, each as the median of ``--repeats`` runs after a warm-up:

- one forward pass of a batch through an instrument node (upload the inputs, run, fetch the
  readings), with ASCII and with binary transfer, and their ratio;
- the fetch of the readings alone (``FETC?``), ASCII against binary;
- the fixed costs no format changes: one round trip, and running the loaded batch;
- pnn's own overhead (validation, formatting, parsing, bookkeeping: everything outside the
  pyvisa read and write calls) as a share of the time spent in those calls, for a forward pass
  and for a whole DFA training step run by the controller. The overhead of each run is its
  wall time minus its time in those calls, and the median of these is reported;
- how many exchanges, link writes and link reads a forward pass and a training step take.

Run: ``python benchmarks/bench_transport.py`` (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pnn.controller import PhysicalNoProp  # noqa: E402
from pnn.devices import load_station  # noqa: E402
from pnn.devices.transport import TransportStats  # noqa: E402
from pnn.learning import DFA  # noqa: E402
from pnn.network import Encoder, PhysicalNetwork, Readout  # noqa: E402


def start_emulator(n_in: int, n_out: int, station: Path, transfer: str) -> subprocess.Popen:
    """Start ``pnn emulate scpi`` on a free port; return the process once its station file exists."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "pnn", "emulate", "scpi", "--port", "0", "--layers", f"{n_in}x{n_out}:linear",
         "--preset", "ideal", "--no-probes", "--transfer", transfer, "--write-station", str(station)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        if line.startswith("press Ctrl-C"):
            return process
    raise RuntimeError("the emulator did not start:\n" + "\n".join(lines))


class Timer:
    """Collects wall time, time inside pyvisa calls and link calls of repeated calls of one function."""

    def __init__(self, function: Callable[[], object], stats: TransportStats, steps: int = 1) -> None:
        self.function = function
        self.stats = stats
        self.steps = steps
        self.walls: list[float] = []
        self.ios: list[float] = []
        self.calls: list[tuple[int, int, int]] = []

    def once(self) -> None:
        stats = self.stats
        before = (stats.io_s, stats.exchanges, stats.writes, stats.reads)
        start = time.perf_counter()
        self.function()
        self.walls.append((time.perf_counter() - start) / self.steps)
        self.ios.append((stats.io_s - before[0]) / self.steps)
        self.calls.append((stats.exchanges - before[1], stats.writes - before[2], stats.reads - before[3]))

    @property
    def wall(self) -> float:
        return float(np.median(self.walls))

    @property
    def io(self) -> float:
        return float(np.median(self.ios))

    @property
    def overhead(self) -> float:
        """Median over runs of the time outside pyvisa calls."""
        return float(np.median(np.subtract(self.walls, self.ios)))

    @property
    def per_run(self) -> tuple[float, float, float]:
        """Mean exchanges, writes and reads per call of the function, per step."""
        return tuple(float(v) / self.steps for v in np.mean(self.calls, axis=0))

    @property
    def best(self) -> float:
        """Fastest run: the least disturbed by other work on a shared machine."""
        return float(np.min(self.walls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100, help="examples per forward pass (default 100)")
    parser.add_argument("--outputs", type=int, default=10, help="output channels; batch x outputs readings per pass")
    parser.add_argument("--repeats", type=int, default=300, help="timed repetitions per measurement")
    args = parser.parse_args()

    n_in = n_out = args.outputs
    values = args.batch * n_out
    folder = Path(tempfile.mkdtemp(prefix="pnn-bench-"))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch, n_in))
    processes, stations, timers = [], {}, {}
    try:
        for transfer in ("ascii", "binary"):
            path = folder / f"{transfer}.toml"
            processes.append(start_emulator(n_in, n_out, path, transfer))
            station = load_station(path)
            stations[transfer] = station
            node = station.build_nodes()[0]
            instrument = station.instruments["emulator"]
            stats = instrument.transport.stats

            def fetch(instrument=instrument) -> None:
                with instrument.exchange() as link:
                    link.write("FETC?")
                    instrument._read_data(link, where="bench", expected=values)

            timers[f"forward {transfer}"] = Timer((lambda n: lambda: n.forward(x))(node), stats)
            timers[f"fetch {transfer}"] = Timer(fetch, stats)
            if transfer == "binary":
                timers["round trip"] = Timer(lambda i=instrument: i.query("wait"), stats)
                timers["run"] = Timer(lambda i=instrument: i.query("run"), stats)
            for _ in range(20):
                node.forward(x)

        # Alternate the measurements so that load changes hit every one of them alike.
        for _ in range(args.repeats):
            for timer in timers.values():
                timer.once()

        station = stations["binary"]
        node = station.nodes[0]
        stats = station.instruments["emulator"].transport.stats
        network = PhysicalNetwork([Encoder(n_in).fit(x), node, Readout(n_out)])
        data = rng.uniform(-1, 1, (20 * args.batch, n_in))
        labels = rng.integers(0, n_out, 20 * args.batch)
        controller = PhysicalNoProp(network, DFA(), lr=1e-3, epochs=1, batch_size=args.batch,
                                    progress=False, clip_updates=True)
        controller.fit(data[: 2 * args.batch], labels[: 2 * args.batch], n_classes=n_out)
        # Each run is one epoch of 20 steps; times and calls are reported per step.
        training = Timer(lambda: controller.fit(data, labels, n_classes=n_out), stats, steps=20)
        for _ in range(max(3, args.repeats // 30)):
            training.once()
    finally:
        for station in stations.values():
            station.close()
        for process in processes:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=10)

    t = timers
    print(f"date: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"Python {platform.python_version()}")
    print(f"emulator: {n_in}->{n_out} linear crossbar layer, ideal preset, in its own process, loopback TCP")
    print(f"forward pass of {args.batch} examples ({values} readings, {args.batch * n_in} inputs), "
          f"median and fastest of {args.repeats}:")
    for kind in ("forward", "fetch"):
        if kind == "fetch":
            print(f"fetch of {values} readings alone:")
        ascii_timer, binary_timer = t[f"{kind} ascii"], t[f"{kind} binary"]
        print(f"  ascii   {ascii_timer.wall * 1e3:8.3f} ms  (fastest {ascii_timer.best * 1e3:.3f} ms)")
        print(f"  binary  {binary_timer.wall * 1e3:8.3f} ms  (fastest {binary_timer.best * 1e3:.3f} ms)   "
              f"ascii/binary = {ascii_timer.wall / binary_timer.wall:.1f} (fastest: {ascii_timer.best / binary_timer.best:.1f})")
    print(f"fixed costs: one round trip (*OPC?) {t['round trip'].wall * 1e3:.3f} ms, running the loaded batch "
          f"on the emulator (INIT;*OPC?) {t['run'].wall * 1e3:.3f} ms")
    rows = [("forward pass, binary", t["forward binary"]), ("forward pass, ascii", t["forward ascii"]),
            ("DFA training step, binary, through the controller", training)]
    for label, timer in rows:
        exchanges, writes, reads = timer.per_run
        print(f"pnn overhead, {label}: {timer.overhead * 1e3:.3f} ms of {timer.wall * 1e3:.3f} ms, "
              f"{100 * timer.overhead / timer.io:.1f} % of the {timer.io * 1e3:.3f} ms in pyvisa calls; "
              f"{exchanges:.1f} exchanges, {writes:.1f} writes, {reads:.1f} reads")


if __name__ == "__main__":
    main()
