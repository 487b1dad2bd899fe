"""Real instruments behind the node interface: transports, SCPI helpers, drivers and stations.

Typical use::

    from pnn.devices import load_station

    with load_station("station.toml") as station:
        nodes = station.build_nodes()
        ...  # train; the safe state is applied when the block ends, on error and on Ctrl-C

Importing this package does not import pyvisa or pyserial; they load when a link opens.
"""

from .board import SerialBoard
from .instrument import (
    DRIVERS,
    BatchRunner,
    ChannelRanges,
    IdentityMismatch,
    Instrument,
    Meter,
    Source,
    get_driver,
    register_driver,
)
from .node import ChannelGroup, InstrumentNode, OutputBank, PerturbationSettings
from .replay import Exchange, ReplayTransport
from .scpi import OVERRANGE, Range, Choice, Setting, encode_block, parse_values, read_block, ramp_path
from .scpi_drivers import ScpiInstrument, ScpiMeter, ScpiSource, ScpiSourceMeter
from .station import Station, build_station_layers, load_station, parse_station
from .traffic import TrafficRecorder, read_recording
from .transport import (
    ConnectionLost,
    SerialOptions,
    SerialTransport,
    Transport,
    TransportSettings,
    UsbIdentity,
    VisaTransport,
    open_transport,
)

__all__ = [
    "load_station",
    "parse_station",
    "build_station_layers",
    "Station",
    "InstrumentNode",
    "ChannelGroup",
    "OutputBank",
    "PerturbationSettings",
    "Instrument",
    "Source",
    "Meter",
    "BatchRunner",
    "ChannelRanges",
    "DRIVERS",
    "get_driver",
    "register_driver",
    "ScpiInstrument",
    "ScpiSource",
    "ScpiMeter",
    "ScpiSourceMeter",
    "SerialBoard",
    "Transport",
    "TransportSettings",
    "VisaTransport",
    "SerialTransport",
    "SerialOptions",
    "UsbIdentity",
    "ConnectionLost",
    "IdentityMismatch",
    "open_transport",
    "TrafficRecorder",
    "read_recording",
    "ReplayTransport",
    "Exchange",
    "OVERRANGE",
    "Setting",
    "Range",
    "Choice",
    "encode_block",
    "read_block",
    "parse_values",
    "ramp_path",
]
