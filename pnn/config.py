"""Training configuration: one dataclass, read from the command line or a TOML file.

A TOML file uses the same names as :class:`TrainConfig`'s fields (the command-line options with
underscores), plus tables for the device, rule and encoder settings::

    dataset = "mnist"
    data_dir = "../shared/data/mnist"
    hidden = [256, 256]
    epochs = 10

    [device_options]
    read_noise_std = 0.05
    disabled = ["dac"]

Unknown keys, wrong types and out-of-range values raise :class:`~pnn.errors.ConfigError` naming
the key and the fix. Settings left unset take the dataset's defaults (:data:`DATASET_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .errors import ConfigError

__all__ = ["TrainConfig", "DATASET_DEFAULTS", "load_config_file", "config_from_mapping", "resolve_config"]

#: Settings that depend on the dataset, used where the configuration leaves them unset.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "vowels": {"hidden": [64, 64], "epochs": 100, "batch_size": 8, "lr": 3e-3, "encoder": "standard"},
    "mnist": {"hidden": [256, 256], "epochs": 10, "batch_size": 64, "lr": 1e-3, "encoder": "none"},
}


@dataclass
class TrainConfig:
    """Everything that defines a training run; the run folder stores it resolved."""

    dataset: str = "vowels"
    """Dataset name: ``vowels`` (embedded) or ``mnist``."""
    data_dir: str | None = None
    """Folder with the MNIST IDX files (gzipped or not)."""
    download: bool = False
    """Download MNIST into the cache folder if it is missing, verified by SHA-256."""
    n_train: int | None = None
    """Use only the first n training examples (quick runs)."""
    n_test: int | None = None
    """Use only the first n test examples."""
    device: str = "crossbar"
    """Device kind of the physical layers (``pnn train --help`` lists them)."""
    preset: str | None = None
    """Device preset; None uses the device's default preset."""
    device_options: dict[str, Any] = field(default_factory=dict)
    """Device settings that override the preset, by field name; ``disabled`` lists stages to switch off."""
    station: str | None = None
    """Station file (TOML) describing instrument nodes; replaces the simulated device."""
    calibrations: str | None = None
    """Calibration store folder; by default ``calibrations/`` next to the station file (stations only)."""
    calibration: str = "use"
    """Calibration records of physical nodes: ``use`` the ones that exist, ``require`` one per node, or ``off``."""
    allow_expired_calibration: bool = False
    """Use an expired calibration record when no valid one exists (logged as a warning)."""
    allow_identity_mismatch: bool = False
    """Use a calibration record made for another device identity (logged as a warning)."""
    twin_gradients: bool = False
    """Compute the gradients of calibrated nodes through their digital twins (physics-aware training)."""
    drift_check: int = 0
    """Check calibrated nodes for drift every this many epochs; 0 never checks."""
    drift_action: str = "recalibrate"
    """Action when a drift check finds a node out of tolerance: ``recalibrate``, ``pause`` or ``warn``."""
    rule: str = "dfa"
    """Learning rule."""
    feedback: str = "random"
    """Feedback path of the alignment rules: random, identity, physical or learned."""
    rule_options: dict[str, Any] = field(default_factory=dict)
    """Extra options of the learning rule, by name."""
    hidden: list[int] | None = None
    """Widths of the hidden layers."""
    activation: str = "tanh"
    """Nonlinearity of the hidden layers."""
    encoder: str | None = None
    """Input encoding: ``standard`` (z-score, 3 standard deviations to the range edge), ``minmax`` or ``none``."""
    epochs: int | None = None
    """Passes over the training data."""
    batch_size: int | None = None
    """Examples per update."""
    lr: float | None = None
    """Base learning rate."""
    optimizer: str = "adam"
    """``adam`` or ``sgd``."""
    momentum: float = 0.9
    """Momentum of SGD."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for Adam)."""
    lr_schedule: str = "cosine"
    """``cosine`` or ``constant``."""
    loss: str = "cross_entropy"
    """``cross_entropy`` or ``mse``."""
    seed: int = 0
    """Seed of initial weights, device noise, feedback matrices and batch order."""
    clip_updates: bool = True
    """Clip updates at parameter limits (each clip is counted and logged) instead of stopping."""
    max_consecutive_invalid: int = 10
    """Stop after this many batches in a row without an update (invalid measurements or instrument faults)."""
    retry_backoff_s: float = 0.5
    """Pause after an instrument fault before the batch is tried again, in seconds; doubled per fault in a row."""
    retry_backoff_max_s: float = 30.0
    """Maximum pause between two tries of a batch, in seconds."""
    log_alignment: bool = False
    """Log per epoch the angle, in degrees, between each hidden node's update and the backprop gradient."""
    checkpoint_every: int = 0
    """Extra checkpoint every n steps (0: at the end of each epoch only)."""
    checkpoint_interval_s: float = 60.0
    """Extra checkpoint when this many seconds have passed since the last one (0: never)."""
    out: str | None = None
    """Run folder; default ``runs/<date>-<time>-<dataset>-<rule>``."""

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as plain data."""
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)


def _check_type(key: str, value: Any, source: str) -> Any:
    """Return ``value`` if it fits field ``key``'s type (ints accepted for floats), else raise."""
    hint = _TYPES[key]
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{source}: {key} must be set, got nothing")
    if "list[int]" in text:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{source}: {key} must be a list of integers, got {value!r}")
        return list(value)
    if "dict" in text:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a table of settings, got {value!r}")
        return dict(value)
    if "bool" in text:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if "int" in text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if "str" in text:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    return value


def config_from_mapping(values: Mapping[str, Any], source: str = "configuration", base: TrainConfig | None = None) -> TrainConfig:
    """Return a TrainConfig with ``values`` applied on top of ``base`` (or the defaults)."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings are {', '.join(_FIELDS)}"
        )
    checked = {key: _check_type(key, value, source) for key, value in values.items()}
    return dataclasses.replace(base or TrainConfig(), **checked)


def load_config_file(path: str | Path) -> TrainConfig:
    """Read a TOML configuration file; errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found; check the path given to --config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        values = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {path} is not UTF-8 text; save it as a TOML text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    return config_from_mapping(values, source=str(path))


def resolve_config(config: TrainConfig, *, lr_scale: float = 1.0) -> TrainConfig:
    """Fill unset settings from the dataset defaults and check every value's range.

    ``lr_scale`` multiplies the default learning rate, for devices whose parameters are not
    weights of order one (conductances in microsiemens, for example).
    """
    if config.dataset not in DATASET_DEFAULTS:
        raise ConfigError(f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASET_DEFAULTS)}")
    defaults = dict(DATASET_DEFAULTS[config.dataset])
    defaults["lr"] = defaults["lr"] * lr_scale
    changes = {key: value for key, value in defaults.items() if getattr(config, key) is None}
    config = dataclasses.replace(config, **changes)

    for width in config.hidden:
        if width < 1:
            raise ConfigError(f"hidden layer width {width} is invalid; every width must be at least 1")
    if config.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {config.batch_size}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"learning rate must be a positive number, got {config.lr}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise ConfigError(f"weight decay must be >= 0, got {config.weight_decay}")
    for key in ("n_train", "n_test"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if config.seed < 0:
        raise ConfigError(f"seed must be a whole number >= 0, got {config.seed}")
    if config.max_consecutive_invalid < 1:
        raise ConfigError(f"max_consecutive_invalid must be at least 1, got {config.max_consecutive_invalid}")
    if config.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be 0 (off) or a number of steps, got {config.checkpoint_every}")
    for key in ("retry_backoff_s", "retry_backoff_max_s", "checkpoint_interval_s"):
        value = getattr(config, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key} must be a number of seconds >= 0, got {value}")
    if config.encoder not in ("standard", "minmax", "none"):
        raise ConfigError(f"unknown encoder {config.encoder!r}; choose standard, minmax or none")
    # The same names as pnn.calibration's CALIBRATION_MODES and DRIFT_ACTIONS, which this light
    # module does not import.
    if config.calibration not in ("require", "use", "off"):
        raise ConfigError(f"unknown calibration mode {config.calibration!r}; choose require, use or off")
    if config.drift_action not in ("recalibrate", "pause", "warn"):
        raise ConfigError(f"unknown drift action {config.drift_action!r}; choose recalibrate, pause or warn")
    if config.drift_check < 0:
        raise ConfigError(f"drift_check must be a number of epochs >= 0, got {config.drift_check}")
    return config
