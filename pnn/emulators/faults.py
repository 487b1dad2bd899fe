"""Latency, noise and fault injection for the instrument emulators.

Faults come from two places: random rates (the command-line options, for soak runs) and a queue
of faults injected one by one (:meth:`FaultInjector.inject`, for tests that need a fault at an
exact point). Queued faults go first. Every injected fault is counted by kind.

Reply faults, applied to the next reply sent:

- ``no_reply``: the reply is dropped (a timeout at the host).
- ``late``: the reply is sent ``late_s`` seconds late, after the host's timeout.
- ``split``: the reply is sent in ``split_pieces`` pieces with ``split_pause_s`` between them
  (valid, only slow; a binary block arrives fragmented).
- ``partial``: only the first half of the reply is sent, without the terminator.
- ``garbled``: some characters of the reply are replaced by junk; the terminator stays.
- ``wrong_terminator``: the reply ends with ``"\\r"`` instead of ``"\\n"``.
- ``trickle``: junk bytes arrive one by one for ``trickle_s`` seconds without a terminator,
  then the real reply follows.
- ``disconnect``: half of the reply is sent and the connection is closed (a serial port
  disappears and comes back after ``reappear_s``).
- ``slow``: starts a slow period: for ``slow_s`` seconds every reply is ``slow_latency_s`` late.
- ``bitflip``: one bit of the payload of the next binary block reply flips, as line noise on
  a serial cable would do; replies that carry no block are left alone.

Measurement fault:

- ``overrange``: one reading of the next measurement reply becomes 9.9E37.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["FaultConfig", "FaultInjector", "REPLY_FAULTS", "MEASUREMENT_FAULTS", "FAULT_KINDS", "parse_fault_rates"]

REPLY_FAULTS = ("no_reply", "late", "split", "partial", "garbled", "wrong_terminator", "trickle", "disconnect", "slow",
                "bitflip")
MEASUREMENT_FAULTS = ("overrange",)
FAULT_KINDS = REPLY_FAULTS + MEASUREMENT_FAULTS


@dataclass(frozen=True)
class FaultConfig:
    """Latency, noise and fault settings of an emulator."""

    latency_s: float = 0.0
    """Delay before every reply, in seconds."""
    noise_std: float = 0.0
    """Standard deviation of Gaussian noise added to every reading, in the reading's unit."""
    rates: Mapping[str, float] = field(default_factory=dict)
    """Probability of each fault kind per reply (per measurement reply for ``overrange``)."""
    late_s: float = 1.0
    """Delay of a ``late`` reply, in seconds; set it above the host's timeout."""
    split_pieces: int = 3
    """Pieces of a ``split`` reply."""
    split_pause_s: float = 0.05
    """Pause between the pieces of a ``split`` reply, in seconds."""
    trickle_s: float = 3.0
    """Duration of a ``trickle``, in seconds."""
    trickle_interval_s: float = 0.01
    """Time between trickled bytes, in seconds."""
    slow_s: float = 2.0
    """Duration of a slow period, in seconds."""
    slow_latency_s: float = 0.2
    """Extra delay of each reply during a slow period, in seconds."""
    reappear_s: float = 0.5
    """Time before a disconnected serial port comes back, in seconds."""
    seed: int = 0
    """Seed of the fault and noise generator."""

    def __post_init__(self) -> None:
        for name in ("latency_s", "noise_std", "late_s", "split_pause_s", "trickle_s", "trickle_interval_s",
                     "slow_s", "slow_latency_s", "reappear_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ConfigError(f"emulator setting {name} must be a number >= 0, got {value!r}")
        if int(self.split_pieces) < 2:
            raise ConfigError(f"emulator setting split_pieces must be at least 2, got {self.split_pieces}")
        for kind, rate in self.rates.items():
            if kind not in FAULT_KINDS:
                raise ConfigError(f"unknown fault kind {kind!r}; choose from {', '.join(FAULT_KINDS)}")
            if not 0 <= rate <= 1:
                raise ConfigError(f"fault rate of {kind!r} must be between 0 and 1, got {rate}")


def parse_fault_rates(items: list[str] | None) -> dict[str, float]:
    """Parse command-line fault options ``KIND=RATE`` (for example ``late=0.01``)."""
    rates: dict[str, float] = {}
    for item in items or []:
        kind, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"fault {item!r}: write KIND=RATE, for example late=0.01")
        try:
            rates[kind.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"fault {item!r}: {value!r} is not a number") from None
    FaultConfig(rates=rates)
    return rates


class FaultInjector:
    """Decides which fault, if any, hits each reply and measurement."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.counts: Counter[str] = Counter()
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._slow_until = 0.0
        self._lock = threading.Lock()

    def inject(self, kind: str, count: int = 1, **options: Any) -> None:
        """Queue ``count`` faults of ``kind``; ``options`` override the config for them (``late_s=0.5``)."""
        if kind not in FAULT_KINDS:
            raise ConfigError(f"unknown fault kind {kind!r}; choose from {', '.join(FAULT_KINDS)}")
        with self._lock:
            for _ in range(int(count)):
                self._queue.append((kind, dict(options)))

    def clear(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._queue.clear()

    def _take(self, kinds: tuple[str, ...]) -> tuple[str | None, dict[str, Any]]:
        with self._lock:
            for index, (kind, options) in enumerate(self._queue):
                if kind in kinds:
                    del self._queue[index]
                    self.counts[kind] += 1
                    return kind, options
            for kind in kinds:
                rate = self.config.rates.get(kind, 0.0)
                if rate and self.rng.random() < rate:
                    self.counts[kind] += 1
                    return kind, {}
        return None, {}

    def next_reply_fault(self, *, block: bool = False) -> tuple[str | None, dict[str, Any]]:
        """Return the fault for the next reply, or (None, {}). ``block`` is True for a binary block reply."""
        kinds = REPLY_FAULTS if block else tuple(kind for kind in REPLY_FAULTS if kind != "bitflip")
        kind, options = self._take(kinds)
        if kind == "slow":
            duration = float(options.get("slow_s", self.config.slow_s))
            self._slow_until = time.monotonic() + duration
            return None, {}
        return kind, options

    def reply_delay(self) -> float:
        """Return the delay before the next reply: latency plus any slow period."""
        delay = self.config.latency_s
        if time.monotonic() < self._slow_until:
            delay += self.config.slow_latency_s
        return delay

    def corrupt_readings(self, values: np.ndarray) -> np.ndarray:
        """Add measurement noise and any overrange fault to readings (a copy is returned)."""
        values = np.array(values, dtype=np.float64)
        if self.config.noise_std > 0:
            values += self.rng.normal(0.0, self.config.noise_std, values.shape)
        kind, options = self._take(MEASUREMENT_FAULTS)
        if kind == "overrange" and values.size:
            index = int(options.get("index", self.rng.integers(values.size)))
            values.flat[index % values.size] = 9.9e37
        return values

    def option(self, options: Mapping[str, Any], name: str) -> Any:
        """Return an option of a queued fault, or the config's value."""
        return options.get(name, getattr(self.config, name))
