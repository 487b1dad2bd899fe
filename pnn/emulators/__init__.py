"""Instrument emulators: simulated crossbar layers served over real protocols.

- :class:`ScpiEmulator`: a SCPI source-meter on a TCP port of 127.0.0.1, for pyvisa-py
  (``TCPIP::127.0.0.1::PORT::SOCKET``).
- :class:`SerialBoardEmulator`: the pnn board protocol on a pseudo-terminal, for pyserial.

Both run in background threads (``start()``, ``stop()``, or a ``with`` block), record every
command they receive, and inject latency, noise and faults (:mod:`pnn.emulators.faults`). The
``pnn emulate scpi`` and ``pnn emulate serial`` commands run them from the shell.
"""

from .audit import ChannelRule, CommandAudit
from .base import CommandRecord, Emulator
from .faults import FAULT_KINDS, FaultConfig, FaultInjector
from .hardware import EmulatedHardware, LayerSpec, parse_layers
from .scpi import ScpiEmulator
from .serial_board import SerialBoardEmulator
from .setup import EmulatedSetup, emulated_node, emulated_setup, start_emulator

__all__ = [
    "Emulator",
    "CommandRecord",
    "CommandAudit",
    "ChannelRule",
    "ScpiEmulator",
    "SerialBoardEmulator",
    "EmulatedHardware",
    "LayerSpec",
    "parse_layers",
    "FaultConfig",
    "FaultInjector",
    "FAULT_KINDS",
    "EmulatedSetup",
    "emulated_setup",
    "emulated_node",
    "start_emulator",
]
