"""Denoisers: the trainable blocks of NoProp, built from pnn nodes.

A denoiser maps an input x, a noisy label latent z and, in the continuous-time variants, time
features to an output (class logits for NoProp-DT and -CT, a velocity for NoProp-FM). It is a
small group of nodes, trained with backpropagation inside the group only; no error ever crosses
from one denoiser to another.

- :class:`MLPDenoiser` (digital): an x branch and a z branch (and a time branch), each a ReLU
  layer, concatenated and followed by a ReLU head, as in the MLP blocks of reimplementations of
  NoProp for MNIST.
- :class:`DeviceDenoiser` (physical): one or more nodes of a registered device kind (a crossbar,
  say) on the concatenated input [x, z / z_scale, time], followed by a digital linear readout.
  The device learns with its own ``local_gradient`` (the crossbar's outer product).

:class:`DenoiserSpec` is a picklable recipe, so a worker process builds the same denoiser from
the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import ConfigError, MeasurementError
from ...network import DigitalLinear
from ...nodes import Node

__all__ = [
    "DenoiserSpec",
    "Denoiser",
    "MLPDenoiser",
    "DeviceDenoiser",
    "build_denoiser",
    "measure",
    "ARCHITECTURES",
    "time_features",
    "N_TIME_FEATURES",
]

ARCHITECTURES = ("mlp", "device")

#: Sine and cosine pairs of the time features, at frequencies pi * 2**k for k = 0..3.
_TIME_FREQUENCIES = math.pi * 2.0 ** np.arange(4)
N_TIME_FEATURES = 2 * len(_TIME_FREQUENCIES)


def time_features(t: np.ndarray) -> np.ndarray:
    """Return sinusoidal features of times in [0, 1], array of shape (batch, 8) in [-1, 1]."""
    angles = np.asarray(t, dtype=np.float64)[:, None] * _TIME_FREQUENCIES[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@dataclass(frozen=True)
class DenoiserSpec:
    """Everything needed to build one denoiser, in a form that pickles."""

    name: str
    """Prefix of the node names, for example ``"block3"``."""
    architecture: str
    """``"mlp"`` (digital branches and head) or ``"device"`` (device nodes and a digital readout)."""
    n_features: int
    """Width of the encoded input x."""
    dim: int
    """Width of the label latent z (the embedding dimension)."""
    n_out: int
    """Outputs: the number of classes (logits), or ``dim`` for a velocity."""
    hidden: tuple[int, ...]
    """Hidden widths: branch width then head widths (mlp), or device layer widths (device)."""
    seed: tuple[int, ...]
    """Entropy of the generator that draws the initial weights."""
    n_time: int = 0
    """Width of the time features; 0 for NoProp-DT."""
    activation: str = "relu"
    """Hidden nonlinearity (device layers must support it)."""
    device: str = "digital"
    """Device kind of the physical layers, for ``architecture="device"``."""
    preset: str | None = None
    """Device preset; None is the device's default."""
    device_options: Mapping[str, Any] = field(default_factory=dict)
    """Device settings that override the preset."""
    z_scale: float = 3.0
    """Latent value mapped to the edge of a device's input range."""
    dtype: str = "float32"
    """Float dtype of the digital layers (the MLP and the readout)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown block architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if not self.hidden or any(int(w) != w or w < 1 for w in self.hidden):
            raise ConfigError(f"block hidden widths must be positive integers, got {list(self.hidden)}")
        if not (math.isfinite(self.z_scale) and self.z_scale > 0):
            raise ConfigError(f"z_scale must be a positive number, got {self.z_scale}")


def measure(node: Node, signal: np.ndarray) -> np.ndarray:
    """Run ``node`` on ``signal`` and return its outputs; raise MeasurementError if they are invalid.

    The check comes before the outputs reach another node, which would reject NaN inputs.
    """
    outputs = node.forward(signal)
    reason = node.measure_state().invalid_reason()
    if reason is not None:
        raise MeasurementError(f"invalid measurement, batch rejected: node {node.name!r}: {reason}")
    return outputs


class Denoiser:
    """Base class: a group of nodes with a forward pass and backpropagation inside the group."""

    nodes: list[Node]

    def features(self, x: np.ndarray) -> np.ndarray:
        """Return what the denoiser keeps of x; reusable for every z at the same parameters."""
        raise NotImplementedError

    def forward(self, features: np.ndarray, z: np.ndarray, time: np.ndarray | None = None) -> np.ndarray:
        """Return the outputs, array of shape (batch, n_out), from :meth:`features` of x and z.

        Raises MeasurementError when a node measures an invalid value (so does
        :meth:`features`).
        """
        raise NotImplementedError

    def backward(self, output_error: np.ndarray, want_z_error: bool) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray | None]:
        """Return (gradients by node name, per-example error at z or None) for the last forward.

        ``output_error`` is the per-example loss derivative at the outputs, shape (batch, n_out).
        """
        raise NotImplementedError


class MLPDenoiser(Denoiser):
    """Digital denoiser: ReLU branches for x, z (and time), concatenated, then a ReLU head.

    ``hidden[0]`` is the width of each branch; ``hidden[1:]`` are the head's hidden widths.
    """

    def __init__(self, spec: DenoiserSpec) -> None:
        rng = np.random.default_rng(list(spec.seed))
        width = int(spec.hidden[0])
        act, dtype = spec.activation, np.dtype(spec.dtype)
        self.x_branch = DigitalLinear(spec.n_features, width, activation=act, rng=rng, name=f"{spec.name}.x", dtype=dtype)
        self.z_branch = DigitalLinear(spec.dim, width, activation=act, rng=rng, name=f"{spec.name}.z", dtype=dtype)
        self.t_branch = (
            DigitalLinear(spec.n_time, width, activation=act, rng=rng, name=f"{spec.name}.t", dtype=dtype)
            if spec.n_time else None
        )
        branches = [b for b in (self.x_branch, self.z_branch, self.t_branch) if b is not None]
        widths = [width * len(branches), *(int(w) for w in spec.hidden[1:]), spec.n_out]
        self.head = [
            DigitalLinear(
                widths[i], widths[i + 1], activation="linear" if i == len(widths) - 2 else act,
                rng=rng, name=f"{spec.name}.head{i + 1}", dtype=dtype,
            )
            for i in range(len(widths) - 1)
        ]
        self.width = width
        self.nodes = [*branches, *self.head]

    def features(self, x: np.ndarray) -> np.ndarray:
        return measure(self.x_branch, x)

    def forward(self, features: np.ndarray, z: np.ndarray, time: np.ndarray | None = None) -> np.ndarray:
        parts = [features, measure(self.z_branch, z)]
        if self.t_branch is not None:
            if time is None:
                raise ConfigError(f"denoiser {self.x_branch.name[:-2]!r} has a time branch; pass time features")
            parts.append(measure(self.t_branch, time))
        signal = np.concatenate(parts, axis=1)  # (batch, width * branches)
        for node in self.head:
            signal = measure(node, signal)
        return signal

    def backward(self, output_error, want_z_error):
        grads = {}
        error = output_error
        for node in reversed(self.head):
            state = node.measure_state()
            grads[node.name] = node.local_gradient(state, error)
            error = node.input_gradient(state, error)
        # error: (batch, width * branches), split back into the branches in forward order.
        w = self.width
        x_state = self.x_branch.measure_state()
        z_state = self.z_branch.measure_state()
        grads[self.x_branch.name] = self.x_branch.local_gradient(x_state, error[:, :w])
        grads[self.z_branch.name] = self.z_branch.local_gradient(z_state, error[:, w : 2 * w])
        if self.t_branch is not None:
            grads[self.t_branch.name] = self.t_branch.local_gradient(self.t_branch.measure_state(), error[:, 2 * w :])
        z_error = self.z_branch.input_gradient(z_state, error[:, w : 2 * w]) if want_z_error else None
        return grads, z_error


class DeviceDenoiser(Denoiser):
    """Physical denoiser: device nodes on [x, z, time], then a digital linear readout.

    The latent z and the time features enter the first node mapped linearly into its input
    range: z = +-z_scale and features = +-1 go to the range edges (for a crossbar's [-1, 1],
    z becomes z / z_scale). Latent values beyond the edges are clipped and pass no error back.
    """

    def __init__(self, spec: DenoiserSpec) -> None:
        from ...simulators import get_device  # noqa: PLC0415 - the registry imports Numba kernels

        device = get_device(spec.device)
        config = device.config(spec.preset, spec.device_options)
        preset = spec.preset or device.default_preset
        seeds = np.random.SeedSequence(list(spec.seed)).spawn(len(spec.hidden) + 1)
        sizes = [spec.n_features + spec.dim + spec.n_time, *(int(w) for w in spec.hidden)]
        self.layers = [
            device.build(
                sizes[i], sizes[i + 1], name=f"{spec.name}.layer{i + 1}", activation=spec.activation,
                config=config, rng=np.random.default_rng(seeds[i]), preset=preset,
            )
            for i in range(len(sizes) - 1)
        ]
        for i, node in enumerate(self.layers):
            if not node.trainable:
                raise ConfigError(f"device {spec.device!r} node {node.name!r} has no trainable parameters")
            if i > 0 and not node.has_input_gradient:
                raise ConfigError(
                    f"device node {node.name!r} cannot pass an error back to the layer before it; "
                    "use one device layer per block (--hidden with one width)"
                )
        self.readout = DigitalLinear(
            sizes[-1], spec.n_out, activation="linear", rng=np.random.default_rng(seeds[-1]), name=f"{spec.name}.readout",
            dtype=np.dtype(spec.dtype),
        )
        self.nodes = [*self.layers, self.readout]
        self.n_features, self.dim, self.z_scale = spec.n_features, spec.dim, float(spec.z_scale)
        first = self.layers[0].input_spec
        lower = first.lower_array[spec.n_features :]
        upper = first.upper_array[spec.n_features :]
        # Each extra input channel c maps v to centre_c + half_c * v.
        self._centre = 0.5 * (lower + upper)
        self._half = 0.5 * (upper - lower)
        self._lower, self._upper = lower, upper
        self._z_inside: np.ndarray | None = None

    def features(self, x: np.ndarray) -> np.ndarray:
        return x

    def forward(self, features: np.ndarray, z: np.ndarray, time: np.ndarray | None = None) -> np.ndarray:
        extra = z / self.z_scale if time is None else np.concatenate([z / self.z_scale, time], axis=1)
        extra = self._centre + self._half * extra  # (batch, dim [+ n_time])
        self._z_inside = (extra[:, : self.dim] > self._lower[: self.dim]) & (extra[:, : self.dim] < self._upper[: self.dim])
        signal = np.concatenate([features, np.clip(extra, self._lower, self._upper)], axis=1)
        for node in self.nodes:
            signal = measure(node, signal)
        return signal

    def backward(self, output_error, want_z_error):
        if want_z_error and not self.layers[0].has_input_gradient:
            raise ConfigError(
                f"device node {self.layers[0].name!r} cannot pass an error back to the latent z, "
                "which a learned embedding needs; use embedding='onehot'"
            )
        grads = {}
        state = self.readout.measure_state()
        grads[self.readout.name] = self.readout.local_gradient(state, output_error)
        error = self.readout.input_gradient(state, output_error)
        z_error = None
        for i in range(len(self.layers) - 1, -1, -1):
            node = self.layers[i]
            state = node.measure_state()
            grads[node.name] = node.local_gradient(state, error)
            if i > 0 or want_z_error:
                error = node.input_gradient(state, error)
        if want_z_error:
            z_part = error[:, self.n_features : self.n_features + self.dim]
            z_error = z_part * self._z_inside * (self._half[: self.dim] / self.z_scale)
        return grads, z_error


def build_denoiser(spec: DenoiserSpec) -> Denoiser:
    """Return a new denoiser built from ``spec``; the same spec always gives the same weights."""
    if spec.architecture == "mlp":
        return MLPDenoiser(spec)
    return DeviceDenoiser(spec)
