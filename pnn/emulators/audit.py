"""Audit of an emulator's command record: every level and batch row against the nodes' limits.

The audit is the check behind the promise that no command outside a parameter's limits, and no
step larger than its ramp limit, ever reaches an instrument. It reads what the emulator
received, not what the host meant to send, so it also catches a write that bypassed the node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..devices.instrument import Source
from ..devices.node import InstrumentNode
from ..errors import ConfigError
from .base import Emulator

__all__ = ["ChannelRule", "CommandAudit"]


@dataclass(frozen=True)
class ChannelRule:
    """Limits and ramp step that a node allows on one source channel."""

    where: str
    """Node and array, for messages."""
    lower: float
    upper: float
    max_step: float
    """Largest change per command, in the channel's unit; ``inf`` for channels that may jump."""
    safe: float | None
    readable: bool
    """False for a set-only channel. Its first write must be the safe value, and later writes may
    also jump to it, because after a reconnection the host no longer has a record of the level."""


class CommandAudit:
    """Replays an emulator's record against the limits and ramp steps of instrument nodes.

    Create it after the nodes are built and before anything is written. It takes the levels of
    the emulated hardware at that moment as the start of every ramp, and checks only commands
    received afterwards.

    Parameters
    ----------
    emulator
        The emulator the nodes talk to.
    nodes
        Instrument nodes; only their banks on ``instrument`` are checked.
    instrument
        Name of the emulator's instrument in the station file.
    """

    def __init__(self, emulator: Emulator, nodes: Sequence[InstrumentNode], *, instrument: str = "emulator") -> None:
        self.emulator = emulator
        self.rules: dict[int, ChannelRule] = {}
        for node in nodes:
            for bank in node.banks.values():
                if bank.group.instrument != instrument:
                    continue
                driver = node.instruments[instrument]
                readable = isinstance(driver, Source) and driver.can_read_levels
                spec = bank.spec
                for k, channel in enumerate(bank.group.channels):
                    self.rules[channel] = ChannelRule(
                        where=f"node {node.name!r} {bank.name}", lower=float(spec.lower_array.flat[k]),
                        upper=float(spec.upper_array.flat[k]), max_step=float(spec.max_step),
                        safe=spec.safe_value, readable=readable,
                    )
        if not self.rules:
            raise ConfigError(f"no node has channels on instrument {instrument!r}, so there is nothing to audit")
        self.start_levels = emulator.hardware.levels.copy()
        self.start_time = emulator.now()
        self.checked_levels = 0
        self.checked_rows = 0

    def violations(self) -> list[str]:
        """Return one line per command that left its limits or stepped too far; empty when none did.

        Level writes and batch rows are replayed in the order received, and what was checked is
        counted in :attr:`checked_levels` and :attr:`checked_rows`.
        """
        events: list[tuple[float, int, object, object]] = [
            (t, 0, channel, value) for t, channel, value in self.emulator.level_writes() if t >= self.start_time
        ]
        events += [(t, 1, channels, rows) for t, channels, rows in self.emulator.sequences if t >= self.start_time]
        events.sort(key=lambda event: (event[0], event[1]))
        last = {channel: float(self.start_levels[channel - 1]) for channel in self.rules}
        self._written: set[int] = set()
        problems: list[str] = []
        self.checked_levels = 0
        self.checked_rows = 0
        for t, kind, where, data in events:
            if kind == 0:
                self.checked_levels += 1
                self._check_level(t, int(where), float(data), last, problems)
            else:
                self.checked_rows += data.shape[0]
                self._check_rows(t, where, data, last, problems)
        for entry in self.emulator.commands("*RST"):
            if entry.t >= self.start_time:
                problems.append(f"t={entry.t:.3f} s: *RST sent, which sets every output to 0 without a ramp")
        return problems

    def _check_level(self, t: float, channel: int, value: float, last: dict[int, float], problems: list[str]) -> None:
        rule = self.rules.get(channel)
        if rule is None:
            problems.append(f"t={t:.3f} s: level {value!r} written to channel {channel}, which no node maps")
            return
        tol = 1e-9 * max(rule.upper - rule.lower, 1e-12)
        if not (math.isfinite(value) and rule.lower - tol <= value <= rule.upper + tol):
            problems.append(f"t={t:.3f} s: {rule.where} channel {channel} set to {value!r}, "
                            f"outside [{rule.lower:g}, {rule.upper:g}]")
        jump_to_safe = not rule.readable and rule.safe is not None and value == rule.safe
        if not rule.readable and channel not in self._written and not jump_to_safe and math.isfinite(rule.max_step):
            problems.append(f"t={t:.3f} s: {rule.where} channel {channel} cannot be read back, but its first "
                            f"write was {value:g}, not the safe value {rule.safe}")
        self._written.add(channel)
        step = abs(value - last[channel])
        if math.isfinite(rule.max_step) and not jump_to_safe and step > rule.max_step * (1 + 1e-9) + tol:
            problems.append(f"t={t:.3f} s: {rule.where} channel {channel} stepped by {step:g} "
                            f"(from {last[channel]:g} to {value:g}), more than max_step {rule.max_step:g}")
        last[channel] = value

    def _check_rows(self, t: float, channels: Sequence[int], rows: np.ndarray, last: dict[int, float],
                    problems: list[str]) -> None:
        for column, channel in enumerate(channels):
            rule = self.rules.get(channel)
            if rule is None:
                problems.append(f"t={t:.3f} s: batch rows sent to channel {channel}, which no node maps")
                continue
            values = rows[:, column]
            tol = 1e-9 * max(rule.upper - rule.lower, 1e-12)
            outside = ~np.isfinite(values) | (values < rule.lower - tol) | (values > rule.upper + tol)
            if np.any(outside):
                problems.append(f"t={t:.3f} s: batch row value {float(values[outside][0])!r} on {rule.where} "
                                f"channel {channel}, outside [{rule.lower:g}, {rule.upper:g}]")
            # A batch leaves each sequence channel at its last row's value, as a DAC does.
            last[channel] = float(values[-1])
