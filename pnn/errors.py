"""Exceptions raised by pnn.

Every error pnn raises on purpose derives from :class:`PnnError`, so a script can catch them all
in one place. The command line turns :class:`ConfigError` (and its subclass :class:`DataError`)
into a one-line message with exit code 2.
"""

from __future__ import annotations

__all__ = [
    "PnnError",
    "ConfigError",
    "DataError",
    "LimitError",
    "InstrumentError",
    "InstrumentTimeout",
    "MeasurementError",
    "CalibrationError",
]


class PnnError(Exception):
    """Root of every exception pnn raises on purpose."""


class ConfigError(PnnError, ValueError):
    """Invalid user input: an option, a configuration or station file, a shape or a name."""


class DataError(ConfigError):
    """A dataset that is missing, unreadable, corrupt or contains non-finite values."""


class LimitError(PnnError, ValueError):
    """A requested value outside a parameter's limits, or a step larger than its ramp limit.

    Raised before anything reaches the device, so the device keeps its previous setting.
    """


class InstrumentError(PnnError):
    """A failure talking to an instrument: connection, protocol or identity.

    Parameters
    ----------
    message
        What failed and what to do next.
    instrument
        Name of the instrument in the station file, when known; the training loop names it
        when it stops after repeated failures.
    """

    #: True when the same exchange may succeed if tried again later (a timeout, a lost
    #: connection, a garbled reply); False when retrying cannot help (another instrument
    #: answers at the address).
    retryable: bool = True

    def __init__(self, message: str = "", *, instrument: str | None = None) -> None:
        super().__init__(message)
        self.instrument = instrument


class InstrumentTimeout(InstrumentError, TimeoutError):
    """An instrument did not reply within its timeout."""


class MeasurementError(PnnError):
    """A measurement that is invalid (NaN, infinite, overrange or incomplete).

    No update may be computed from it; the controller rejects the batch.
    """


class CalibrationError(PnnError):
    """A calibration that failed, is corrupt, expired or belongs to another instrument."""
