"""``pnn emulate scpi|serial``: serve an emulated instrument until Ctrl-C.

``pnn emulate scpi --port N`` serves a SCPI source-meter on 127.0.0.1 (port 0 picks a free one);
``pnn emulate serial`` serves the board protocol on a new pseudo-terminal. Both print the
address to give pyvisa or pyserial, and the channel map, then run until Ctrl-C (or
``--duration`` seconds).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_LAYERS = "12x16:tanh,16x7:linear"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pnn emulate`` and its two kinds."""
    from ..cli import add_common_options  # noqa: PLC0415 - light module

    parser = subparsers.add_parser(
        "emulate",
        help="serve an emulated instrument: SCPI over TCP on 127.0.0.1, or the board protocol on a pseudo-terminal",
        description=__doc__.splitlines()[2],
    )
    kinds = parser.add_subparsers(dest="emulator", metavar="KIND")
    kinds.required = True
    scpi = kinds.add_parser("scpi", help="SCPI source-meter on a TCP port of 127.0.0.1 (for pyvisa-py)")
    scpi.add_argument("--port", type=int, default=5025, help="TCP port on 127.0.0.1; 0 picks a free one (default 5025)")
    serial = kinds.add_parser("serial", help="serial analog board on a pseudo-terminal (for pyserial)")
    serial.add_argument("--link", metavar="PATH",
                        help="symbolic link kept pointing at the device, so the port keeps its path after a disconnect")
    serial.add_argument("--max-rows", type=int, default=4096, help="largest batch the board accepts (default 4096)")
    for sub in (scpi, serial):
        sub.add_argument("--layers", default=DEFAULT_LAYERS,
                         help=f"crossbar layers as N_INxN_OUT:ACTIVATION, comma-separated (default {DEFAULT_LAYERS})")
        sub.add_argument("--preset", default="default", help="crossbar preset: default or ideal (default: default)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the crossbars' read noise (default 0)")
        sub.add_argument("--serial-number", default="SN0001", help="serial number in the identity reply")
        sub.add_argument("--latency", type=float, default=0.0, metavar="S", help="delay before every reply, in seconds")
        sub.add_argument("--noise", type=float, default=0.0, metavar="STD",
                         help="standard deviation of extra Gaussian noise on every reading, in volts")
        sub.add_argument("--fault", action="append", metavar="KIND=RATE",
                         help="inject a fault with this probability per reply, repeatable; kinds: no_reply, late, "
                              "split, partial, garbled, wrong_terminator, trickle, disconnect, slow, bitflip, "
                              "overrange")
        sub.add_argument("--late-delay", type=float, default=1.0, metavar="S", help="delay of a late reply (default 1 s)")
        sub.add_argument("--slow-latency", type=float, default=0.2, metavar="S",
                         help="extra delay per reply during a slow period (default 0.2 s)")
        sub.add_argument("--fault-seed", type=int, default=0, help="seed of the fault and noise generator")
        sub.add_argument("--readback-overshoot", action="store_true",
                         help="read a level at a channel's range limit back as one step beyond it, as a rounding DAC does")
        sub.add_argument("--record", metavar="FILE", help="append every command received to FILE as JSON lines")
        sub.add_argument("--write-station", metavar="FILE", help="write a station file for this emulator to FILE")
        sub.add_argument("--mode", choices=("buffered", "point"), default="buffered",
                         help="batch mode in the written station file (default buffered)")
        sub.add_argument("--transfer", choices=("binary", "ascii"), default="binary",
                         help="bulk transfer format in the written station file (default binary)")
        sub.add_argument("--no-probes", action="store_true",
                         help="leave the pre-activation probes out of the written station file")
        sub.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: run until Ctrl-C)")
        add_common_options(sub)
        sub.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Start the emulator, print its address and channel map, and serve until stopped."""
    import threading

    from ..emulators import EmulatedHardware, FaultConfig, ScpiEmulator, SerialBoardEmulator, parse_layers
    from ..emulators.faults import parse_fault_rates
    from ..errors import ConfigError

    if args.duration is not None and not (args.duration > 0 and args.duration < float("inf")):
        raise ConfigError(f"--duration must be a positive number of seconds, got {args.duration}")

    faults = FaultConfig(
        latency_s=args.latency,
        noise_std=args.noise,
        rates=parse_fault_rates(args.fault),
        late_s=args.late_delay,
        slow_latency_s=args.slow_latency,
        seed=args.fault_seed,
    )
    hardware = EmulatedHardware(parse_layers(args.layers), preset=args.preset, seed=args.seed,
                                readback_overshoot=args.readback_overshoot)
    if args.emulator == "scpi":
        emulator: Any = ScpiEmulator(hardware, port=args.port, faults=faults, serial_number=args.serial_number,
                                     record_path=args.record)
    else:
        emulator = SerialBoardEmulator(hardware, faults=faults, link=args.link, serial_number=args.serial_number,
                                       max_rows=args.max_rows, record_path=args.record)
    try:
        emulator.start()
        if args.emulator == "scpi":
            print(f"SCPI emulator listening on 127.0.0.1 port {emulator.port}")
            print(f"resource: {emulator.resource}")
        else:
            print(f"serial board emulator on {emulator.device_path}")
            print(f"resource: {emulator.resource}")
        print(f"identity: {emulator.identity}")
        print(hardware.describe_channels())
        if args.write_station:
            path = emulator.write_station(args.write_station, mode=args.mode, transfer=args.transfer,
                                          probes=not args.no_probes)
            print(f"station file written to {path}")
        print("press Ctrl-C to stop", flush=True)
        if args.duration is not None:
            threading.Timer(args.duration, emulator._stop.set).start()
        emulator.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        emulator.stop()
    return 0
