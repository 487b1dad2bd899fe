"""``pnn devices``: list instrument ports, or identify a station's instruments.

Without options it lists serial ports (pyserial) and local VISA resources (pyvisa-py: serial,
GPIB, USB where their libraries are installed). ``--network`` adds VISA discovery on the local
network (VXI-11 broadcast and mDNS). ``--station FILE`` connects to every instrument of the
station file, checks its identity and reads its channel ranges, and changes no output.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pnn devices``."""
    from ..cli import add_common_options  # noqa: PLC0415 - light module

    parser = subparsers.add_parser(
        "devices",
        help="list serial ports and VISA resources, or identify the instruments of a station file",
        description=__doc__.splitlines()[2],
    )
    parser.add_argument("--station", metavar="FILE",
                        help="identify every instrument of this station file and show its limits (changes no output)")
    parser.add_argument("--network", action="store_true",
                        help="also discover VISA instruments on the local network (sends VXI-11 broadcasts and mDNS queries)")
    add_common_options(parser)
    parser.set_defaults(func=run)
    return parser


def list_serial_ports() -> list[tuple[str, str, str]]:
    """Return (device, description, hardware id) of every serial port pyserial finds."""
    from serial.tools import list_ports

    return [(port.device, port.description, port.hwid) for port in sorted(list_ports.comports())]


def list_visa_resources(network: bool = False) -> tuple[list[str], list[str]]:
    """Return (resources, notes): VISA resources found by pyvisa-py, and why some kinds were skipped.

    Without ``network`` the TCP/IP session kinds are left out, because listing them sends
    broadcast discovery on every network interface.
    """
    import pyvisa
    from pyvisa import constants

    manager = pyvisa.ResourceManager("@py")
    if network:
        return list(manager.list_resources("?*")), []
    resources: list[str] = []
    notes: list[str] = []
    try:
        # pyvisa's public listing always includes network discovery, so the local session
        # kinds of pyvisa-py are asked one by one.
        from pyvisa_py.sessions import Session
    except ImportError as exc:
        return [], [f"pyvisa-py internals unavailable ({exc}); use --network to list through pyvisa"]
    network_kinds = {constants.InterfaceType.tcpip, getattr(constants.InterfaceType, "prlgx_tcpip", None)}
    for (interface, resource_class), session_class in Session.iter_valid_session_classes():
        if interface in network_kinds:
            continue
        try:
            resources.extend(session_class.list_resources())
        except Exception as exc:  # noqa: BLE001 - one missing driver must not hide the others
            notes.append(f"{interface.name} {resource_class}: {exc}")
    for (interface, resource_class), issue in Session.iter_session_classes_issues():
        notes.append(f"{interface.name} {resource_class}: {issue.splitlines()[0]}")
    return sorted(set(resources)), notes


def run(args: argparse.Namespace) -> int:
    """List ports and resources, or identify a station's instruments."""
    if args.station:
        return _identify_station(args.station)
    ports = list_serial_ports()
    print("serial ports (pyserial):")
    for device, description, hwid in ports:
        print(f"  {device}  {description}  [{hwid}]")
    if not ports:
        print("  none found")
    resources, notes = list_visa_resources(args.network)
    print("VISA resources (pyvisa-py" + (", with network discovery):" if args.network else ", local only; --network to search the LAN):"))
    for resource in resources:
        print(f"  {resource}")
    if not resources:
        print("  none found")
    for note in notes:
        print(f"  not searched: {note}")
    return 0


def _identify_station(path: str) -> int:
    from ..devices.station import open_station

    station = open_station(path)
    try:
        print(f"station {station.name!r} from {station.path}")
        for name, instrument in station.instruments.items():
            print(f"  {name}: {instrument.transport.resource} ({instrument.driver_name}) -> {instrument.identity_}")
        for row in station.limits_report():
            low, high = row["instrument_range"]
            lim_low, lim_high = row["limits"]
            print(
                f"  node {row['node']} {row['array']}: {row['instrument']} channels {row['channels']}: "
                f"instrument [{low:g}, {high:g}] step {row['instrument_step']:g} {row['unit']}; "
                f"allowed [{lim_low:g}, {lim_high:g}] step {row['resolution']:g}, "
                f"max step {row['max_step']:g}, safe {row['safe']:g}"
            )
    finally:
        # close() only: the safe state would write outputs, and this command changes none.
        station.close()
    return 0
