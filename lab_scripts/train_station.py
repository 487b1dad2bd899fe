"""Train the nodes of a station with a local learning rule, through pnn's controller.

The same run as ``pnn train --station FILE``: the station's nodes become the physical layers
between a digital encoder and readout, the controller trains them batch by batch (rejecting any
batch with an invalid measurement), and the run folder keeps the configuration, the metrics,
checkpoints and a summary. The safe state is applied at the end, on an error and on Ctrl-C.

Usage::

    python lab_scripts/train_station.py --station station.toml --epochs 40 --out runs/bench-1

The first node must have as many inputs as the dataset has features (12 for the vowels) and the
last as many outputs as it has classes (7). Exit code 0 on success, 2 for a problem in the file
or the options (an instrument that cannot be reached or identified at the start included), 1 for
an instrument that keeps failing during training, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnn.config import TrainConfig  # noqa: E402
from pnn.controller import TrainingInterrupted  # noqa: E402
from pnn.errors import ConfigError, PnnError  # noqa: E402
from pnn.experiment import train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--station", required=True, help="station file (TOML)")
    parser.add_argument("--dataset", default="vowels", help="dataset (default vowels, embedded)")
    parser.add_argument("--data-dir", help="folder with the dataset files (MNIST)")
    parser.add_argument("--rule", default="dfa", help="learning rule (default dfa)")
    parser.add_argument("--epochs", type=int, help="passes over the training set (default: the dataset's)")
    parser.add_argument("--batch-size", type=int, help="examples per update (default: the dataset's)")
    parser.add_argument("--lr", type=float, help="learning rate, in parameter units per unit gradient")
    parser.add_argument("--seed", type=int, default=0, help="seed of the feedback matrices and batch order")
    parser.add_argument("--out", help="run folder (default runs/<date>-<time>-<dataset>-<rule>)")
    args = parser.parse_args()
    config = TrainConfig(
        station=args.station, dataset=args.dataset, data_dir=args.data_dir, rule=args.rule,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=args.out,
    )
    try:
        summary = train(config, progress=sys.stderr.isatty())
    except ConfigError as exc:
        print(f"train_station: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"train_station: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("train_station: interrupted; the safe state was applied", file=sys.stderr)
        return 130
    except PnnError as exc:
        print(f"train_station: {exc}", file=sys.stderr)
        return 1
    print(f"test accuracy: {summary['test_accuracy']:.4f}")
    print(f"rejected batches: {summary['rejected_batches']}")
    print(f"run folder: {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
