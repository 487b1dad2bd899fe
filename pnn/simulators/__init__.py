"""Simulated devices behind the node interface, and the registry of device kinds.

Each device kind names its presets and a factory that builds one physical layer mapping n_in
inputs to n_out outputs. ``pnn train --device NAME --preset PRESET`` looks kinds up here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..network import DigitalLinear
from ..nodes import Node
from .crossbar import CROSSBAR_PRESETS, STAGES, CrossbarConfig, CrossbarNode, crossbar_preset
from .diffractive import DIFFRACTIVE_PRESETS, DiffractiveConfig, DiffractiveNode, diffractive_preset
from .mzi import MZI_PRESETS, MziConfig, MziNode, build_unitary, decompose, mzi_preset
from .resistive import (
    RESISTIVE_PRESETS,
    RESISTIVE_STAGES,
    ResistiveConfig,
    ResistiveNode,
    resistive_preset,
)

__all__ = [
    "DeviceKind",
    "DEVICES",
    "register_device",
    "get_device",
    "CrossbarConfig",
    "CrossbarNode",
    "CROSSBAR_PRESETS",
    "STAGES",
    "crossbar_preset",
    "DigitalConfig",
    "ResistiveConfig",
    "ResistiveNode",
    "RESISTIVE_PRESETS",
    "RESISTIVE_STAGES",
    "resistive_preset",
    "MziConfig",
    "MziNode",
    "MZI_PRESETS",
    "mzi_preset",
    "decompose",
    "build_unitary",
    "DiffractiveConfig",
    "DiffractiveNode",
    "DIFFRACTIVE_PRESETS",
    "diffractive_preset",
]

#: Builds one physical layer: (n_in, n_out, *, name, activation, config, rng, preset) -> Node.
LayerFactory = Callable[..., Node]


def _check_setting_type(device: str, key: str, value: Any, current: Any) -> None:
    """Raise ConfigError unless ``value`` has the type of the setting's present value ``current``."""
    if isinstance(current, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(current, (int, np.integer)):
        ok, expected = isinstance(value, (int, np.integer)) and not isinstance(value, bool), "a whole number"
    elif isinstance(current, (float, np.floating)):
        ok, expected = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool), "a number"
    else:
        return  # text and optional settings: the dataclass checks those itself
    if not ok:
        raise ConfigError(
            f"device {device!r} setting {key}={value!r} is invalid; give {expected}, for example {key}={current!r}"
        )


@dataclass(frozen=True)
class DeviceKind:
    """A family of simulated devices: its presets and how to build one layer."""

    name: str
    description: str
    presets: Mapping[str, Any]
    make_node: LayerFactory
    default_preset: str = "default"
    lr_scale: float = 1.0
    """Multiplier of the default learning rate, for parameters not of order one (microsiemens)."""

    def config(self, preset: str | None = None, options: Mapping[str, Any] | None = None) -> Any:
        """Return the preset's settings with ``options`` changed; unknown names raise ConfigError."""
        preset = preset or self.default_preset
        if preset not in self.presets:
            raise ConfigError(
                f"unknown {self.name} preset {preset!r}; choose one of {', '.join(self.presets)}"
            )
        config = self.presets[preset]
        if not options:
            return config
        options = dict(options)
        stages_off = options.pop("disabled", None)
        known = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"device {self.name!r} has no setting(s) {unknown}; its settings are {', '.join(sorted(known))}"
            )
        for key, value in options.items():
            _check_setting_type(self.name, key, value, getattr(config, key))
        try:
            config = dataclasses.replace(config, **options)
        except ConfigError:
            raise  # the settings' own check already names the value and the range
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"device {self.name!r}: invalid settings {options}: {exc}") from None
        if stages_off:
            config = config.without(*stages_off)
        return config

    def build(
        self,
        n_in: int,
        n_out: int,
        *,
        name: str,
        activation: str,
        config: Any,
        rng: np.random.Generator,
        preset: str | None = None,
    ) -> Node:
        """Build one layer of this device kind."""
        return self.make_node(n_in, n_out, name=name, activation=activation, config=config, rng=rng, preset=preset)


DEVICES: dict[str, DeviceKind] = {}


def register_device(kind: DeviceKind) -> DeviceKind:
    """Add a device kind to :data:`DEVICES`."""
    if kind.name in DEVICES:
        raise ValueError(f"device {kind.name!r} is already registered")
    DEVICES[kind.name] = kind
    return kind


def get_device(name: str) -> DeviceKind:
    """Return the device kind called ``name``, or raise ConfigError listing the kinds."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}") from None


def _make_crossbar(n_in: int, n_out: int, *, name: str, activation: str, config: CrossbarConfig,
                   rng: np.random.Generator, preset: str | None = None) -> CrossbarNode:
    return CrossbarNode(n_in, n_out, activation=activation, config=config, rng=rng, name=name, preset=preset)


register_device(
    DeviceKind(
        name="crossbar",
        description="analog crossbar of differential conductance pairs with DAC, read noise and ADC",
        presets=CROSSBAR_PRESETS,
        make_node=_make_crossbar,
    )
)


#: Activations a resistive layer accepts, mapped to its diode placement. The diode pair is a
#: bounded, odd, saturating function, so it stands in for the bounded odd activations.
#: ``"linear"`` builds an output layer without diodes.
_RESISTIVE_ACTIVATIONS = {"diode": "all", "tanh": "all", "hardtanh": "all", "linear": "hidden"}


def _make_resistive(n_in: int, n_out: int, *, name: str, activation: str, config: ResistiveConfig,
                    rng: np.random.Generator, preset: str | None = None) -> ResistiveNode:
    try:
        diodes = _RESISTIVE_ACTIVATIONS[activation]
    except KeyError:
        raise ConfigError(
            f"node {name!r}: a resistive layer's nonlinearity is its diode pairs, so the activation must be "
            f"one of {', '.join(_RESISTIVE_ACTIVATIONS)}, got {activation!r}"
        ) from None
    return ResistiveNode(n_in, n_out, diodes=diodes, config=config, rng=rng, name=name, preset=preset)


register_device(
    DeviceKind(
        name="resistive",
        description="layered network of trainable conductances with diode nonlinearities, settled by Newton iteration",
        presets=RESISTIVE_PRESETS,
        make_node=_make_resistive,
        # Conductances span 1 to 100 uS, so a step of about 1 uS matches the 3e-3 default of
        # unit-scale weights; measured: 93.9 % on the vowels with DFA and lr 1.
        lr_scale=300.0,
    )
)


@dataclass(frozen=True)
class DigitalConfig:
    """Settings of an ideal digital layer, the reference every physical device is compared with."""

    init_scale: float = 1.0
    """Initial weights are uniform in +-init_scale / sqrt(n_in)."""

    def without(self, *stages: str) -> DigitalConfig:
        """Return self: a digital layer has no imperfection stages (``"all"`` is accepted)."""
        unknown = sorted(set(stages) - {"all"})
        if unknown:
            raise ConfigError(f"the digital device has no imperfection stages; cannot switch off {unknown}")
        return self


def _make_digital(n_in: int, n_out: int, *, name: str, activation: str, config: DigitalConfig,
                  rng: np.random.Generator, preset: str | None = None) -> DigitalLinear:
    return DigitalLinear(n_in, n_out, activation=activation, rng=rng, name=name, init_scale=config.init_scale)


# Registered here so that ``--device digital`` gives the ideal digital reference network.
register_device(
    DeviceKind(
        name="digital",
        description="ideal digital layers in float32 with exact gradients (the reference)",
        presets={"default": DigitalConfig(), "ideal": DigitalConfig()},
        make_node=_make_digital,
    )
)


def _make_mzi(n_in: int, n_out: int, *, name: str, activation: str, config: MziConfig,
              rng: np.random.Generator, preset: str | None = None) -> MziNode:
    return MziNode(n_in, n_out, activation=activation, config=config, rng=rng, name=name, preset=preset)


register_device(
    DeviceKind(
        name="mzi",
        description="rectangular mesh of Mach-Zehnder interferometers with balanced photodetection",
        presets=MZI_PRESETS,
        make_node=_make_mzi,
        # Adam moves every phase by about the learning rate per step. About 0.01 rad per step
        # trained the vowels to 96 % with the default 64-64 hidden layers (128-mode meshes).
        lr_scale=10.0 / 3.0,
    )
)


def _make_diffractive(n_in: int, n_out: int, *, name: str, activation: str, config: DiffractiveConfig,
                      rng: np.random.Generator, preset: str | None = None) -> DiffractiveNode:
    return DiffractiveNode(n_in, n_out, activation=activation, config=config, rng=rng, name=name, preset=preset)


register_device(
    DeviceKind(
        name="diffractive",
        description="SLM phase mask, angular-spectrum propagation and a camera with differential regions",
        presets=DIFFRACTIVE_PRESETS,
        make_node=_make_diffractive,
        # One mask pixel carries a small share of the light, so the mask needs larger phase
        # steps than the mesh: about 0.06 rad per step trained the vowels well.
        lr_scale=20.0,
    )
)
