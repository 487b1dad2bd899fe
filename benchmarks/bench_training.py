"""Training speed of pnn against PyTorch backprop and the matrix-multiply limit.

Usage: python benchmarks/bench_training.py [--quick] [--json PATH]
The same as ``pnn bench``; see pnn/benchmark.py for what each figure means.
"""

import sys

from pnn.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
