"""Stage switches and checked copies for the frozen settings dataclasses of the simulators."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError


class StageSettings:
    """``without``, ``enabled`` and ``replace`` for frozen settings dataclasses with stages.

    Subclasses define the class attributes ``_stages`` (stage names) and ``_owner`` (the device
    name used in messages), and a ``disabled`` field.
    """

    _stages: tuple[str, ...] = ()
    _owner: str = "device"
    disabled: frozenset[str]

    def _check_stages(self) -> None:
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        unknown = sorted(self.disabled - set(self._stages))
        if unknown:
            raise ConfigError(f"unknown {self._owner} stage(s) {unknown}; the stages are {', '.join(self._stages)}")

    def without(self, *stages: str) -> Any:
        """Return a copy with the named stages switched off (``"all"`` for every stage)."""
        names = set(self._stages) if "all" in stages else set(stages)
        unknown = sorted(names - set(self._stages))
        if unknown:
            raise ConfigError(f"unknown {self._owner} stage(s) {unknown}; the stages are {', '.join(self._stages)}")
        return dataclasses.replace(self, disabled=self.disabled | names)

    def enabled(self, stage: str) -> bool:
        """True when ``stage`` is switched on."""
        return stage not in self.disabled

    def replace(self, **changes: Any) -> Any:
        """Return a copy with fields changed; unknown field names raise ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"unknown {self._owner} setting(s) {unknown}; the settings are {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)
