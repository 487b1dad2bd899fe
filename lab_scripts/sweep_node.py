"""Sweep one input of one node over its range and record every output.

The node's parameters keep their present levels (or ``--parameters-safe`` first ramps them to
their safe values). The chosen input channel steps from its lower to its upper limit while the
other inputs stay at their safe values; the whole sweep runs as one batch. The table goes to a
CSV file, and to a PNG plot if matplotlib is installed. The safe state is applied at the end, on
an error and on Ctrl-C.

Usage::

    python lab_scripts/sweep_node.py --station station.toml --node layer1 --input 0 --points 41

Exit code 0 on success, 2 for a problem in the file or the options, 1 for an instrument problem.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnn.devices import load_station  # noqa: E402
from pnn.errors import ConfigError, PnnError  # noqa: E402


def sweep(path: str, node_name: str, input_index: int, points: int, parameters_safe: bool, out: Path) -> np.ndarray:
    with load_station(path) as station:
        nodes = {node.name: node for node in station.build_nodes()}
        if node_name not in nodes:
            raise ConfigError(f"no node named {node_name!r}; the station has {', '.join(nodes)}")
        node = nodes[node_name]
        if not 0 <= input_index < node.n_in:
            raise ConfigError(f"node {node_name!r} has inputs 0..{node.n_in - 1}; --input {input_index} does not exist")
        if points < 2:
            raise ConfigError(f"--points must be at least 2, got {points}")
        if parameters_safe:
            node.apply_safe_state()
        spec = node.input_spec
        safe = spec.safe_value if spec.safe_value is not None else 0.0
        x = np.tile(np.clip(safe, spec.lower_array, spec.upper_array), (points, 1))
        x[:, input_index] = np.linspace(spec.lower_array[input_index], spec.upper_array[input_index], points)
        outputs = node.forward(x)
        applied = node.measure_state().inputs[:, input_index]
    table = np.column_stack([applied, outputs])
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"input{input_index} ({spec.unit})", *[f"output{j} ({node.output_unit})" for j in range(node.n_out)]])
        writer.writerows(table.tolist())
    return table


def plot(table: np.ndarray, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    for j in range(1, table.shape[1]):
        axes.plot(table[:, 0], table[:, j], marker=".", label=f"output {j - 1}")
    axes.set_xlabel("input")
    axes.set_ylabel("output")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--station", required=True, help="station file (TOML)")
    parser.add_argument("--node", required=True, help="name of the node to sweep")
    parser.add_argument("--input", type=int, default=0, help="index of the input to sweep, from 0 (default 0)")
    parser.add_argument("--points", type=int, default=41, help="number of input levels (default 41)")
    parser.add_argument("--parameters-safe", action="store_true", help="ramp the parameters to their safe values first")
    parser.add_argument("--out", default="sweep.csv", help="CSV file to write (default sweep.csv); the plot gets .png")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        table = sweep(args.station, args.node, args.input, args.points, args.parameters_safe, out)
    except ConfigError as exc:
        print(f"sweep_node: error: {exc}", file=sys.stderr)
        return 2
    except PnnError as exc:
        print(f"sweep_node: instrument problem: {exc}", file=sys.stderr)
        return 1
    print(f"{table.shape[0]} points written to {out}")
    if plot(table, out.with_suffix(".png")):
        print(f"plot written to {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
