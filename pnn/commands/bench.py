"""``pnn bench``: measure training speed against PyTorch backprop and the matmul limit."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pnn bench``."""
    from ..cli import add_common_options  # noqa: PLC0415

    parser = subparsers.add_parser(
        "bench",
        help="measure training throughput, memory and start-up time",
        description=(
            "Measure, in one process and after warm-up, the training throughput of DFA on ideal "
            "digital layers and on the simulated crossbar against PyTorch backprop (when torch is "
            "installed: pip install 'pnn-lab[bench]'), the machine's float32 matrix-multiply rate, "
            "peak memory per step as depth grows, and start-up times. Takes several minutes; "
            "--quick takes about one."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples, repeats and depths (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure, with versions and thread counts, to PATH")
    add_common_options(parser)
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Run ``pnn bench``; return the exit code."""
    from ..benchmark import format_report, run_benchmarks  # noqa: PLC0415
    from ..errors import ConfigError  # noqa: PLC0415

    if args.json:
        try:
            open(args.json, "a").close()
        except OSError as exc:
            raise ConfigError(f"cannot write --json {args.json}: {exc.strerror}; choose a writable path") from None
    results = run_benchmarks(quick=args.quick, progress=lambda message: print(f"measuring {message} ...", file=sys.stderr))
    print(format_report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
    return 0
