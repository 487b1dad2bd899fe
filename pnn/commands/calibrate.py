"""``pnn calibrate``: sweep nodes, fit their transfer curves and store calibration records."""

from __future__ import annotations

import argparse
import datetime as _dt
import math
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pnn calibrate``."""
    from ..cli import add_common_options  # noqa: PLC0415
    from ..catalog import DEVICE_NAMES  # noqa: PLC0415

    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate the nodes of a station or a simulated node, and store the records",
        description=(
            "For each node: show its identity and live readings, sweep it with a progress bar, fit a "
            "transfer model per output channel, print the fit, save a PNG plot, and ask whether to accept, "
            "redo or skip before writing the record to the calibration store. --yes accepts without asking."
        ),
    )
    target = parser.add_argument_group("what to calibrate (give --station or --device)")
    source = target.add_mutually_exclusive_group(required=True)
    source.add_argument("--station", metavar="FILE", help="station file (TOML) whose instrument nodes are calibrated")
    source.add_argument("--device", metavar="NAME", help=f"calibrate one simulated node: {', '.join(DEVICE_NAMES)}")
    target.add_argument("--node", action="append", metavar="NAME", dest="nodes",
                        help="calibrate only this node of the station; repeatable (default: every node)")
    target.add_argument("--preset", metavar="NAME", help="device preset of the simulated node (default: the device's default)")
    target.add_argument("--device-option", action="append", metavar="KEY=VALUE", dest="device_options",
                        help="override one setting of the simulated device, for example read_noise_std=0.05; repeatable")
    target.add_argument("--size", type=int, nargs=2, metavar=("N_IN", "N_OUT"), default=(6, 4),
                        help="inputs and outputs of the simulated node (default: 6 4)")
    target.add_argument("--activation", default="tanh", metavar="NAME",
                        help="nonlinearity of the simulated node (default: tanh)")
    target.add_argument("--seed", type=int, default=0, help="seed of the simulated node (default: 0)")
    target.add_argument("--name", default=None, metavar="NAME", help="name of the simulated node (default: the device name)")

    fit = parser.add_argument_group("sweep and fit")
    fit.add_argument("--model", default="auto", metavar="NAME",
                     help="transfer model: auto, linear, poly2..poly5, tanh, sigmoid, cos2 (default: auto, the node's "
                          "saturating activation or linear)")
    fit.add_argument("--reference", default="auto", metavar="KIND",
                     help="stimulus of each output: auto, linear (W x + b), channel (output k follows input k) or "
                          "channel:M0,M1,... (default: auto)")
    fit.add_argument("--design", choices=("random", "grid"), default="random", help="sweep design (default: random)")
    fit.add_argument("--points", type=int, default=64, metavar="N", help="input rows per parameter setting (default: 64)")
    fit.add_argument("--repeats", type=int, default=3, metavar="N", help="passes over the points, for the noise level (default: 3)")
    fit.add_argument("--averages", type=int, default=1, metavar="N", help="readings averaged per point and pass (default: 1)")
    fit.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                     help="wait after each parameter setting and before each pass, in seconds (default: 0)")
    fit.add_argument("--input-range", type=float, nargs=2, metavar=("LOWER", "UPPER"),
                     help="range of the swept inputs, in the input unit (default: each channel's limits)")
    fit.add_argument("--sweep-parameter", action="append", metavar="NAME=LOWER:UPPER", dest="sweep_parameters",
                     help="sweep a parameter over a range, for example bias=-1:1; repeatable (default: for a node "
                          "computing f(W x + b), weight within +-3/sqrt(n_in) and bias within +-1)")
    fit.add_argument("--no-parameter-sweep", action="store_true",
                     help="keep the parameters at their present values during the sweep")
    fit.add_argument("--parameter-points", type=int, default=4, metavar="N",
                     help="parameter settings of a random design, or levels per parameter of a grid (default: 4)")
    fit.add_argument("--holdout", type=float, default=0.2, metavar="FRACTION",
                     help="fraction of the points kept out of the fit to measure the prediction error (default: 0.2)")
    fit.add_argument("--sweep-seed", type=int, default=0, help="seed of the sweep design, order and held-out split (default: 0)")

    record = parser.add_argument_group("records")
    record.add_argument("--store", metavar="DIR",
                        help="calibration store folder (default: calibrations/ next to the station file, or ./calibrations)")
    record.add_argument("--plots", metavar="DIR", help="folder for the PNG plots (default: STORE/plots)")
    record.add_argument("--valid-for", type=float, default=24.0, metavar="HOURS",
                        help="how long the records stay valid, in hours (default: 24)")
    record.add_argument("--notes", default="", metavar="TEXT", help="free text stored in every record")
    record.add_argument("--yes", action="store_true", help="accept every successful fit without asking (for scripts)")
    record.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common_options(parser)
    parser.set_defaults(func=run_calibrate)


def parse_parameter_range(text: str) -> tuple[str, tuple[float, float]]:
    """Parse ``NAME=LOWER:UPPER`` into a name and a range."""
    from ..errors import ConfigError  # noqa: PLC0415

    name, sep, bounds = text.partition("=")
    lower, colon, upper = bounds.partition(":")
    try:
        values = (float(lower), float(upper))
    except ValueError:
        values = None
    if not sep or not colon or not name.strip() or values is None:
        raise ConfigError(f"--sweep-parameter {text!r} is not NAME=LOWER:UPPER; write for example bias=-1:1")
    return name.strip(), values


def default_store(args: argparse.Namespace) -> Path:
    """Return the store folder: ``--store``, or ``calibrations`` beside the station file or here."""
    if args.store:
        return Path(args.store)
    if args.station:
        return Path(args.station).resolve().parent / "calibrations"
    return Path("calibrations")


def _simulated_node(args: argparse.Namespace) -> Any:
    from ..commands.train import parse_assignment  # noqa: PLC0415
    from ..errors import ConfigError  # noqa: PLC0415
    from ..simulators import get_device  # noqa: PLC0415

    if args.nodes:
        raise ConfigError("--node selects nodes of a station; with --device, name the node with --name")
    device = get_device(args.device)
    options = dict(parse_assignment(text) for text in args.device_options or [])
    config = device.config(args.preset, options)
    n_in, n_out = args.size
    if n_in < 1 or n_out < 1:
        raise ConfigError(f"--size needs positive widths, got {n_in} {n_out}")
    return device.build(n_in, n_out, name=args.name or args.device, activation=args.activation, config=config,
                        rng=args.seed, preset=args.preset or device.default_preset)


def run_calibrate(args: argparse.Namespace) -> int:
    """Run ``pnn calibrate`` with parsed arguments; return the exit code."""
    import sys  # noqa: PLC0415

    from ..calibration import (  # noqa: PLC0415
        Calibrator,
        CalibrationSession,
        CalibrationStore,
        Sweep,
        default_parameter_ranges,
        reference_for,
    )
    from ..errors import ConfigError  # noqa: PLC0415

    if not (math.isfinite(args.valid_for) and args.valid_for > 0):
        raise ConfigError(f"--valid-for must be a positive number of hours, got {args.valid_for}")
    if args.sweep_parameters and args.no_parameter_sweep:
        raise ConfigError("--sweep-parameter and --no-parameter-sweep contradict each other; give one")
    explicit_ranges = dict(parse_parameter_range(text) for text in args.sweep_parameters or [])
    store = CalibrationStore(default_store(args))
    plots = Path(args.plots) if args.plots else store.path / "plots"

    def make_calibrator(node: Any) -> Calibrator:
        if args.sweep_parameters or args.no_parameter_sweep:
            parameters = explicit_ranges
        else:
            parameters = default_parameter_ranges(node, reference_for(node, args.reference))
        sweep = Sweep(
            design=args.design, points=args.points, repeats=args.repeats, averages=args.averages,
            settle_s=args.settle, inputs=None if args.input_range is None else tuple(args.input_range),
            parameters=parameters, parameter_points=args.parameter_points, seed=args.sweep_seed,
        )
        return Calibrator(
            args.model, sweep=sweep, reference=args.reference, holdout=args.holdout,
            valid_for=_dt.timedelta(hours=args.valid_for), notes=args.notes, seed=args.sweep_seed,
        )

    if args.station:
        return _calibrate_station(args, make_calibrator, store, plots)

    node = _simulated_node(args)
    try:
        # Check everything on the node before the session prints anything.
        make_calibrator(node).check(node)
        session = CalibrationSession(
            [node], store=store, make_calibrator=make_calibrator, plot_dir=plots, assume_yes=args.yes,
            progress=not args.quiet, output=sys.stdout,
        )
        outcomes = session.run()
    finally:
        node.close()
    return 1 if any(outcome.status == "failed" for outcome in outcomes) else 0


def _calibrate_station(args: argparse.Namespace, make_calibrator: Any, store: Any, plots: Path) -> int:
    import sys  # noqa: PLC0415

    from ..calibration import CalibrationSession  # noqa: PLC0415
    from ..devices.station import load_station  # noqa: PLC0415
    from ..errors import ConfigError  # noqa: PLC0415

    with load_station(args.station) as station:
        nodes = station.build_nodes()
        if args.nodes:
            names = [node.name for node in nodes]
            unknown = [name for name in args.nodes if name not in names]
            if unknown:
                raise ConfigError(f"{args.station}: no node named {', '.join(unknown)}; the nodes are {', '.join(names)}")
            nodes = [node for node in nodes if node.name in args.nodes]
        if not nodes:
            raise ConfigError(f"{args.station}: the station file has no [[nodes]] to calibrate")
        print(f"station {station.name!r} from {args.station}", file=sys.stdout)
        for name, reply in station.identify().items():
            print(f"  {name}: {reply}", file=sys.stdout)
        # Check every node before the session measures anything.
        for node in nodes:
            make_calibrator(node).check(node)
        session = CalibrationSession(
            nodes, store=store, make_calibrator=make_calibrator, plot_dir=plots, assume_yes=args.yes,
            progress=not args.quiet, output=sys.stdout,
        )
        outcomes = session.run()
    return 1 if any(outcome.status == "failed" for outcome in outcomes) else 0
