"""Evaluate a finished NoProp run with sampled inference noise and with posterior means.

Run from the repository root, with pnn installed (``pip install -e .``) or on ``PYTHONPATH``:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/eval_noprop_inference.py RUN_DIR

It rebuilds the run's network from ``RUN_DIR/config.json``, loads the parameters of
``RUN_DIR/checkpoint.npz`` and prints the test accuracy of the inference recursion with its
noise sampled (``inference_noise=true``) and without it (posterior means). Both use the same
trained parameters and the same z_0, drawn from the run's seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pnn.config import config_from_mapping, resolve_config
from pnn.datasets import load_dataset
from pnn.experiment import build_network
from pnn.runs import load_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="folder of a finished NoProp-DT or -CT run")
    args = parser.parse_args()

    stored = json.loads((args.run_dir / "config.json").read_text())["config"]
    config = resolve_config(config_from_mapping(stored, source=str(args.run_dir / "config.json")))
    dataset = load_dataset(config.dataset, config.data_dir, n_train=config.n_train, n_test=config.n_test)
    network, _ = build_network(config, dataset)
    try:
        network.load_state_dict(load_tree(args.run_dir / "checkpoint.npz")["network"])
        print(f"{config.rule} on {config.dataset}, {len(dataset.y_test)} test examples")
        for noise in (True, False):
            network.inference_noise = noise
            started = time.perf_counter()
            predicted = np.argmax(network.predict(dataset.x_test), axis=1)
            accuracy = float(np.mean(predicted == dataset.y_test))
            print(f"inference_noise={str(noise).lower():<5}  test accuracy {accuracy:.4f}  ({time.perf_counter() - started:.1f} s)")
    finally:
        network.close()


if __name__ == "__main__":
    main()
