"""Check a station before a run: identify every instrument and read back every limit.

Connects to each instrument of the station file, checks its identity against the file, reads the
range and resolution of every channel the nodes use, reads every output level back, and reads
each instrument's error queue. It writes no output: the safe state is not applied, because
applying it would change outputs.

Usage::

    python lab_scripts/check_station.py --station station.toml

Exit code 0 when everything matches, 2 for a problem in the file, 1 for an instrument problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnn.devices import load_station  # noqa: E402
from pnn.errors import ConfigError, PnnError  # noqa: E402


def check(path: str) -> None:
    station = load_station(path)
    try:
        print(f"station {station.name!r} ({station.path})")
        for name, instrument in station.instruments.items():
            print(f"  instrument {name}: {instrument.transport.resource} -> {instrument.identity_}")
        print("limits (instrument range -> allowed by the station):")
        for row in station.limits_report():
            low, high = row["instrument_range"]
            lim_low, lim_high = row["limits"]
            print(
                f"  {row['node']}.{row['array']} on {row['instrument']} {row['channels']}: "
                f"[{low:g}, {high:g}] step {row['instrument_step']:g} -> [{lim_low:g}, {lim_high:g}] "
                f"step {row['resolution']:g}, max step {row['max_step']:g}, safe {row['safe']:g} {row['unit']}"
            )
        print("present levels (read back, nothing written):")
        for node in station.build_nodes():
            for array, levels in node.known_levels().items():
                known = levels[np.isfinite(levels)]
                if known.size:
                    print(f"  {node.name}.{array}: {known.size} channel(s), min {known.min():g}, max {known.max():g}")
                else:
                    print(f"  {node.name}.{array}: cannot be read back")
        for name, instrument in station.instruments.items():
            errors = instrument.read_errors() if hasattr(instrument, "read_errors") else []
            print(f"  {name} error queue: {'empty' if not errors else errors}")
    finally:
        # close() only: the safe state would write outputs, and this check changes none.
        station.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--station", required=True, help="station file (TOML)")
    args = parser.parse_args()
    try:
        check(args.station)
    except ConfigError as exc:
        print(f"check_station: error: {exc}", file=sys.stderr)
        return 2
    except PnnError as exc:
        print(f"check_station: instrument problem: {exc}", file=sys.stderr)
        return 1
    print("station OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
