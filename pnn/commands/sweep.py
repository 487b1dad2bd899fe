"""``pnn sweep``: run a grid of trainings on Dask, or plot the results of one."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pnn sweep``."""
    from ..cli import add_common_options  # noqa: PLC0415

    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of trainings on Dask and collect their accuracies in one table",
        description=(
            "Expand the grid of a sweep specification (TOML) into trainings, run each as a task on "
            "dask.distributed, and write one row per training to results.csv in the sweep folder as "
            "each finishes. Running the same specification again skips the trainings already done "
            "and retries the failed ones. Needs Dask: pip install 'pnn-lab[sweep]'. The format is "
            "described in docs/sweeps.md."
        ),
    )
    parser.add_argument("spec", metavar="SPEC", help="sweep specification file (TOML)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="worker processes of the local cluster, one thread each (default: one per CPU core)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="address of a running Dask scheduler, for example tcp://10.0.0.5:8786, instead of a local cluster")
    parser.add_argument("--out", metavar="DIR", help="sweep folder (default: [sweep] out of the specification)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the specification and list the trainings with their status, without running any")
    parser.add_argument("--plot", action="store_true",
                        help="run nothing; draw accuracy against each swept numeric setting from the results table")
    parser.add_argument("--plot-file", metavar="PNG", help="where --plot writes the figure (default: SWEEP_FOLDER/<metric>.png)")
    parser.add_argument("--metric", choices=("test_accuracy", "train_accuracy"), default="test_accuracy",
                        help="accuracy that --plot draws (default: test_accuracy)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common_options(parser)
    parser.set_defaults(func=run_sweep_command)


def _quiet_dask() -> None:
    # Dask logs every worker start and connection at INFO. Its import sets the level of the
    # "distributed" logger, so lowering it must come after the import.
    try:
        import distributed  # noqa: F401, PLC0415 - optional dependency
    except ImportError:
        return
    logging.getLogger("distributed").setLevel(logging.WARNING)


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run ``pnn sweep`` with parsed arguments; return the exit code."""
    from ..cli import EXIT_INTERRUPTED  # noqa: PLC0415
    from ..sweep import RESULTS_FILE, ResultsTable, load_spec, run_sweep  # noqa: PLC0415

    if not (args.verbose or args.debug):
        _quiet_dask()
    spec = load_spec(args.spec)
    folder = Path(args.out) if args.out else spec.out

    if args.plot:
        try:
            from ..sweep.plot import plot_sweep  # noqa: PLC0415 - needs matplotlib
        except ImportError as exc:
            raise ConfigError(
                f"pnn sweep --plot needs matplotlib ({exc}); install it with: pip install 'pnn-lab[plot]'"
            ) from None

        target = Path(args.plot_file) if args.plot_file else folder / f"{args.metric}.png"
        print(f"plot: {plot_sweep(spec, folder / RESULTS_FILE, target, metric=args.metric)}")
        return 0

    if args.dry_run:
        trainings = spec.trainings()
        table = ResultsTable.open(folder / RESULTS_FILE, [axis.name for axis in spec.axes])
        for training in trainings:
            values = " ".join(f"{name}={value!r}" for name, value in training.values.items())
            print(f"{training.key}  {table.status(training.key) or 'to run':6}  {values}")
        to_run = sum(table.status(training.key) != "done" for training in trainings)
        print(f"{len(trainings)} trainings, {to_run} to run; sweep folder {folder}")
        return 0

    try:
        report = run_sweep(spec, workers=args.workers, scheduler=args.scheduler, out=folder, progress=not args.quiet)
    except KeyboardInterrupt:
        print(
            f"pnn sweep: interrupted; the finished trainings are in {folder / RESULTS_FILE}, and running "
            "the same command again continues with the others",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(
        f"{report.total} trainings: {report.done} done now, {report.skipped} done before, "
        f"{report.failed} failed ({report.retried} attempts retried)"
    )
    print(f"results: {report.table}")
    if report.failed:
        print(f"tracebacks of the failed trainings: {folder / 'failures'}")
        return 1
    return 0
