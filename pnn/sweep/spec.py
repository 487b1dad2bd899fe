"""Sweep specifications: a TOML file that expands into a grid of trainings.

A specification has three tables (``docs/sweeps.md`` has the full guide)::

    [sweep]                      # optional
    out = "results/noise"        # folder for results.csv and runs/; relative to this file
    retries = 2                  # extra attempts for a failed training (default 1)

    [fixed]                      # TrainConfig settings shared by every training
    dataset = "vowels"
    epochs = 30

    [fixed.device_options]       # device settings shared by every training
    adc_bits = 6

    [grid]                       # one axis per setting, each a list of values
    rule = ["dfa"]
    seed = [0, 1, 2]

    [grid.device_options]        # device settings swept as axes
    read_noise_std = [0.0, 0.02, 0.05]

The trainings are every combination of the axes' values. :func:`load_spec` checks the file's
structure and :meth:`SweepSpec.trainings` builds and checks every training, so bad input raises
:class:`~pnn.errors.ConfigError` before any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from ..config import TrainConfig, config_from_mapping, resolve_config
from ..errors import ConfigError

__all__ = ["Axis", "Training", "SweepSpec", "load_spec", "spec_from_mapping", "training_key", "DEFAULT_RETRIES"]

DEFAULT_RETRIES = 1

_SECTIONS = ("sweep", "fixed", "grid")
_SWEEP_KEYS = ("out", "retries")

# Tables of named settings; their entries become axes named "<table>.<setting>".
_OPTION_TABLES = ("device_options", "rule_options")

# TrainConfig fields a specification may not set, with the reason shown in the error.
_NOT_IN_SPEC = {
    "out": "each training gets its own folder under the sweep's folder; set [sweep] out instead",
    "station": "a station of instruments cannot run trainings in parallel; sweep simulated devices",
}

# Fields that set where things are stored or how often to checkpoint, not what is trained.
# They stay out of a training's key, so moving the data or the sweep folder reruns nothing.
_NOT_IN_KEY = ("out", "data_dir", "download", "checkpoint_every")


@dataclass(frozen=True)
class Axis:
    """One grid axis: a setting and the values it takes."""

    name: str
    """Setting name: a TrainConfig field, or ``device_options.NAME`` / ``rule_options.NAME``."""
    values: tuple[Any, ...]
    """Values in the order the specification lists them."""

    @property
    def is_numeric(self) -> bool:
        """True when every value is a number (booleans are not numbers here)."""
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


@dataclass(frozen=True)
class Training:
    """One point of the grid."""

    key: str
    """Hash of the resolved settings (see :func:`training_key`); names the run folder."""
    values: dict[str, Any]
    """The value of each axis at this point, by axis name."""
    config: TrainConfig
    """Resolved configuration, without a run folder (``out`` is None)."""


@dataclass(frozen=True)
class SweepSpec:
    """A parsed and structurally checked sweep specification."""

    source: str
    """Where the specification came from, for error messages (a file path)."""
    out: Path
    """Sweep folder: ``results.csv`` and ``runs/<key>/`` go here."""
    retries: int
    """Extra attempts for a training that fails, before it is recorded as failed."""
    fixed: dict[str, Any]
    """TrainConfig settings shared by every training, type-checked."""
    axes: tuple[Axis, ...]
    """Grid axes in the order the specification lists them."""

    @property
    def size(self) -> int:
        """Number of trainings in the grid."""
        size = 1
        for axis in self.axes:
            size *= len(axis.values)
        return size

    def trainings(self) -> list[Training]:
        """Build and check every training of the grid, in grid order (last axis fastest).

        Raises
        ------
        ConfigError
            If a training's settings are invalid (a range, an unknown rule or preset, a device
            setting of the wrong type), naming the training by its axis values, or if two grid
            points resolve to the same settings.
        """
        trainings = []
        seen: dict[str, dict[str, Any]] = {}
        names = [axis.name for axis in self.axes]
        for combination in itertools.product(*(axis.values for axis in self.axes)):
            values = dict(zip(names, combination))
            config = self._config_for(values)
            key = training_key(config)
            if key in seen:
                raise ConfigError(
                    f"{self.source}: grid points {_describe(seen[key])} and {_describe(values)} are the "
                    f"same training (they differ only in {', '.join(_NOT_IN_KEY)}, or in values that equal "
                    "the defaults); remove one of the values"
                )
            seen[key] = values
            trainings.append(Training(key=key, values=values, config=config))
        return trainings

    def _config_for(self, values: Mapping[str, Any]) -> TrainConfig:
        settings = dict(self.fixed)
        for table in _OPTION_TABLES:
            settings[table] = dict(self.fixed.get(table, {}))
        for name, value in values.items():
            table, _, option = name.partition(".")
            if option:
                settings[table][option] = value
            else:
                settings[name] = value
        try:
            config = _resolve(config_from_mapping(settings, source=self.source))
            _check_training(config)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: training {_describe(values)}: {exc}") from None
        return config


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in values.items()) or "(no axes)"


def _resolve(config: TrainConfig) -> TrainConfig:
    """Fill the dataset's defaults as training does, with the device's learning-rate scale."""
    from ..simulators import get_device  # noqa: PLC0415 - imports the Numba kernels

    return resolve_config(config, lr_scale=get_device(config.device).lr_scale)


def _check_training(config: TrainConfig) -> None:
    """Build the rule and the device settings, as training would, to catch invalid values."""
    from ..experiment import make_rule_for  # noqa: PLC0415 - imports the learning rules
    from ..simulators import get_device  # noqa: PLC0415 - imports the Numba kernels

    make_rule_for(config)
    device = get_device(config.device)
    try:
        device.config(config.preset, config.device_options)
    except TypeError as exc:
        # A value of the wrong type can reach a device's own range checks (math.isfinite("x")).
        raise ConfigError(f"device {config.device!r}: invalid setting value ({exc})") from None


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash a setting of type {type(value).__name__}")


def training_key(config: TrainConfig) -> str:
    """Return a stable hash of what a resolved configuration trains, as 16 hex digits.

    The hash covers every setting except where things are stored and how often to checkpoint
    (``out``, ``data_dir``, ``download``, ``checkpoint_every``). The device settings enter
    fully resolved, so ``read_noise_std = 0.02`` given explicitly and the same value taken from
    the preset give the same key. The pnn version is not part of it.
    """
    from ..simulators import get_device  # noqa: PLC0415 - imports the Numba kernels

    settings = config.to_dict()
    for name in _NOT_IN_KEY:
        settings.pop(name)
    device = get_device(config.device)
    settings["preset"] = config.preset or device.default_preset
    settings["device_options"] = dataclasses.asdict(device.config(config.preset, config.device_options))
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- parsing
def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep specification from a TOML file and check its structure.

    A relative ``[sweep] out`` or ``data_dir`` is taken relative to the file's folder, so the
    sweep finds its earlier results from any working directory. Without ``out`` the sweep
    folder is the file's path without ``.toml``.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"sweep specification {path} not found; check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read sweep specification {path}: {exc.strerror}") from None
    try:
        values = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"sweep specification {path} is not UTF-8 text; save it as a TOML text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep specification {path} is not valid TOML: {exc}") from None
    return spec_from_mapping(values, source=str(path), base_dir=path.parent, default_out=path.with_suffix(""))


def spec_from_mapping(
    values: Mapping[str, Any],
    source: str = "sweep specification",
    base_dir: str | Path = ".",
    default_out: str | Path | None = None,
) -> SweepSpec:
    """Check a specification given as nested mappings (parsed TOML) and return it.

    Parameters
    ----------
    values
        The specification's tables: ``sweep`` (optional), ``fixed`` (optional) and ``grid``.
    source
        Name used in error messages, usually the file path.
    base_dir
        Folder that relative paths in the specification are relative to.
    default_out
        Sweep folder when ``[sweep] out`` is not set; None makes ``out`` required.

    Raises
    ------
    ConfigError
        On an unknown table or key, a value of the wrong type, a setting both fixed and swept,
        an empty grid or axis, a repeated value, or a device setting that a device of the grid
        does not have. The message names the key and the fix.
    """
    base_dir = Path(base_dir)
    _reject_unknown(values, _SECTIONS, source, "table")
    sweep = _table(values, "sweep", source)
    fixed = _table(values, "fixed", source)
    grid = _table(values, "grid", source)
    _reject_unknown(sweep, _SWEEP_KEYS, f"{source} [sweep]", "key")

    out = sweep.get("out", default_out)
    if out is None:
        raise ConfigError(f"{source}: [sweep] out is missing; set the folder for the results, for example out = \"results\"")
    if not isinstance(out, (str, Path)) or not str(out):
        raise ConfigError(f"{source} [sweep]: out must be a folder path (a string), got {out!r}")
    retries = sweep.get("retries", DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{source} [sweep]: retries must be an integer >= 0, got {retries!r}")

    fixed = _check_fixed(fixed, source, base_dir)
    axes = _check_grid(grid, fixed, source, base_dir)
    _check_device_settings(fixed, axes, source)
    # normpath removes the "folder/../" that a relative out often contains; it is lexical only.
    folder = Path(os.path.normpath(base_dir / out))
    return SweepSpec(source=source, out=folder, retries=retries, fixed=fixed, axes=tuple(axes))


def _reject_unknown(values: Mapping[str, Any], known: tuple[str, ...], where: str, what: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown {what}(s) {', '.join(unknown)}; valid ones are {', '.join(known)}")


def _table(values: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    table = values.get(name, {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: {name} must be a table ([{name}]), got {table!r}")
    return dict(table)


def _check_settable(key: str, where: str) -> None:
    if key in _NOT_IN_SPEC:
        raise ConfigError(f"{where}: {key} cannot be set in a sweep: {_NOT_IN_SPEC[key]}")


def _absolute_data_dir(settings: dict[str, Any], base_dir: Path) -> None:
    value = settings.get("data_dir")
    if isinstance(value, str):
        settings["data_dir"] = str((base_dir / value).absolute())


def _check_fixed(fixed: dict[str, Any], source: str, base_dir: Path) -> dict[str, Any]:
    where = f"{source} [fixed]"
    for key in fixed:
        _check_settable(key, where)
    config_from_mapping(fixed, source=where)
    _absolute_data_dir(fixed, base_dir)
    return fixed


def _check_grid(grid: dict[str, Any], fixed: dict[str, Any], source: str, base_dir: Path) -> list[Axis]:
    axes = []
    for key, entry in grid.items():
        _check_settable(key, f"{source} [grid]")
        if key in _OPTION_TABLES:
            if not isinstance(entry, Mapping):
                raise ConfigError(
                    f"{source} [grid]: {key} must be a table of axes ([grid.{key}]) with a list of values "
                    f"per setting, got {entry!r}"
                )
            for option, values in entry.items():
                if option in fixed.get(key, {}):
                    raise ConfigError(
                        f"{source}: {key}.{option} is both fixed and swept; keep it in [fixed.{key}] or [grid.{key}], not both"
                    )
                axes.append(_axis(f"{key}.{option}", values, source))
            continue
        if key in fixed:
            raise ConfigError(f"{source}: {key} is both fixed and swept; keep it in [fixed] or [grid], not both")
        axis = _axis(key, grid[key], source)
        for value in axis.values:
            # Type-check each value against the TrainConfig field; this also rejects unknown names.
            try:
                config_from_mapping({key: value}, source=f"{source} [grid]")
            except ConfigError as exc:
                raise ConfigError(f"{exc} (a grid axis is a list of values for that setting)") from None
        if key == "data_dir":
            axis = Axis(key, tuple(str((base_dir / v).absolute()) for v in axis.values))
        axes.append(axis)
    if not axes:
        raise ConfigError(
            f"{source}: the grid has no axes; add at least one under [grid], for example seed = [0, 1, 2]"
        )
    return axes


def _axis(name: str, values: Any, source: str) -> Axis:
    if not isinstance(values, list):
        raise ConfigError(f"{source} [grid]: {name} must be a list of values, got {values!r}; write {name} = [{values!r}]")
    if not values:
        raise ConfigError(f"{source} [grid]: axis {name} is empty; give it at least one value or remove it")
    for i, value in enumerate(values):
        if any(type(other) is type(value) and other == value for other in values[:i]):
            raise ConfigError(f"{source} [grid]: axis {name} lists {value!r} twice; remove the repeat")
    return Axis(name, tuple(values))


# --------------------------------------------------------------------- device settings
def _swept_or_fixed(name: str, fixed: Mapping[str, Any], axes: list[Axis]) -> tuple[Any, ...]:
    for axis in axes:
        if axis.name == name:
            return axis.values
    return (fixed.get(name, getattr(TrainConfig(), name)),)


def _check_device_settings(fixed: dict[str, Any], axes: list[Axis], source: str) -> None:
    """Check every device setting against every device of the grid, and coerce its type."""
    from ..simulators import get_device  # noqa: PLC0415 - imports the Numba kernels

    prefix = "device_options."
    settings = {name: (value,) for name, value in fixed.get("device_options", {}).items()}
    settings.update({axis.name[len(prefix):]: axis.values for axis in axes if axis.name.startswith(prefix)})
    if not settings:
        return
    for device_name in _swept_or_fixed("device", fixed, axes):
        try:
            device = get_device(device_name)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        hints = _setting_types(device)
        for option, values in settings.items():
            if option == "disabled":
                for value in values:
                    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                        raise ConfigError(
                            f"{source}: device_options.disabled must be a list of stage names, for example "
                            f"[\"dac\", \"adc\"], got {value!r}"
                        )
                continue
            if option not in hints:
                raise ConfigError(
                    f"{source}: device {device.name!r} has no setting {option!r}; its settings are "
                    f"{', '.join(sorted(hints))} (remove it, or sweep this device in its own specification)"
                )
            for value in values:
                _check_setting_type(option, value, hints[option], source)
    _coerce_floats(fixed, axes, prefix)


def _setting_types(device) -> dict[str, Any]:
    config_class = type(device.presets[device.default_preset])
    return {name: hint for name, hint in typing.get_type_hints(config_class).items() if name != "disabled"}


def _allowed_types(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for t in typing.get_args(hint) if t is not type(None))
    return (hint,)


def _check_setting_type(option: str, value: Any, hint: Any, source: str) -> None:
    allowed = _allowed_types(hint)
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    elif float in allowed:
        ok = isinstance(value, (int, float))
    else:
        ok = any(isinstance(t, type) and isinstance(value, t) for t in allowed)
    if not ok:
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
        raise ConfigError(f"{source}: device_options.{option} must be of type {names}, got {value!r}")


def _coerce_floats(fixed: dict[str, Any], axes: list[Axis], prefix: str) -> None:
    # TOML reads 0 as an integer; a float setting given as 0 must hash like 0.0.
    def coerce(value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    float_settings = _float_settings(fixed, axes)
    options = fixed.get("device_options", {})
    for name in list(options):
        if name in float_settings:
            options[name] = coerce(options[name])
    for i, axis in enumerate(axes):
        name = axis.name[len(prefix):]
        if axis.name.startswith(prefix) and name in float_settings:
            axes[i] = Axis(axis.name, tuple(coerce(v) for v in axis.values))


def _float_settings(fixed: dict[str, Any], axes: list[Axis]) -> set[str]:
    from ..simulators import get_device  # noqa: PLC0415

    names = set()
    for device_name in _swept_or_fixed("device", fixed, axes):
        for name, hint in _setting_types(get_device(device_name)).items():
            if float in _allowed_types(hint):
                names.add(name)
    return names
