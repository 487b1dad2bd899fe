"""One call from nothing to instrument nodes: start an emulator, write its station, load it.

Useful for trying the instrument stack without hardware, and for tests::

    with emulated_setup("scpi", "12x8:tanh,8x7:linear") as setup:
        nodes = setup.nodes        # InstrumentNode objects, through pyvisa-py over TCP
        setup.emulator.record      # every command the emulator received
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..devices.node import InstrumentNode
from ..devices.station import Station, load_station
from ..errors import ConfigError
from .base import Emulator
from .faults import FaultConfig
from .hardware import EmulatedHardware, parse_layers
from .scpi import ScpiEmulator
from .serial_board import SerialBoardEmulator

__all__ = ["EmulatedSetup", "emulated_setup", "emulated_node", "start_emulator"]

EMULATOR_KINDS = ("scpi", "serial")


def start_emulator(kind: str, layers: str = "6x4:tanh", *, preset: str = "default", seed: int = 0,
                   faults: FaultConfig | None = None, link: str | Path | None = None, port: int = 0) -> Emulator:
    """Build and start an emulator of ``kind`` (``"scpi"`` or ``"serial"``) with the given layers."""
    hardware = EmulatedHardware(parse_layers(layers), preset=preset, seed=seed)
    if kind == "scpi":
        return ScpiEmulator(hardware, port=port, faults=faults).start()
    if kind == "serial":
        return SerialBoardEmulator(hardware, faults=faults, link=link).start()
    raise ConfigError(f"unknown emulator {kind!r}; choose one of {', '.join(EMULATOR_KINDS)}")


@dataclass
class EmulatedSetup:
    """A running emulator, the station loaded from its generated file, and the built nodes."""

    emulator: Emulator
    station: Station
    nodes: list[InstrumentNode]
    directory: Path
    """Temporary folder holding the station file (removed by :meth:`close`)."""

    def close(self) -> None:
        """Apply the safe state, close the station, stop the emulator and remove the folder."""
        try:
            if not self.station.closed:
                self.station.__exit__(None, None, None)
        finally:
            self.emulator.stop()
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmulatedSetup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def emulated_setup(kind: str = "scpi", layers: str = "6x4:tanh", *, preset: str = "default", seed: int = 0,
                   faults: FaultConfig | None = None, **station_options: Any) -> EmulatedSetup:
    """Start an emulator, write a station file for it and build its nodes.

    ``station_options`` go to :meth:`~pnn.emulators.base.Emulator.station_toml` (``mode``,
    ``transfer``, ``timeout_s``, ``gradient`` ...).
    """
    directory = Path(tempfile.mkdtemp(prefix="pnn-emulator-"))
    link = directory / "board" if kind == "serial" else None
    emulator = start_emulator(kind, layers, preset=preset, seed=seed, faults=faults, link=link)
    try:
        path = emulator.write_station(directory / "station.toml", **station_options)
        station = load_station(path)
        try:
            nodes = station.build_nodes()
        except BaseException:
            station.close()
            raise
    except BaseException:
        emulator.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return EmulatedSetup(emulator, station, nodes, directory)


def emulated_node(kind: str = "scpi", n_in: int = 6, n_out: int = 4, activation: str = "tanh",
                  **options: Any) -> InstrumentNode:
    """Return one instrument node on a fresh emulator; closing the node stops everything.

    The node's ``emulator`` attribute gives access to the emulator's record and faults.
    """
    setup = emulated_setup(kind, f"{n_in}x{n_out}:{activation}", **options)
    node = setup.nodes[0]
    node.add_close_callback(setup.close)
    node.emulator = setup.emulator  # type: ignore[attr-defined]
    node.station = setup.station  # type: ignore[attr-defined]
    return node
