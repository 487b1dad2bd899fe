"""Simulated nonlinear resistive network: trainable conductances and diodes, settled by Newton.

The network follows the nonlinear resistive networks of Kendall et al. 2020 ("Training
end-to-end analog neural networks with equilibrium propagation", arXiv:2006.01981): the weights
are the conductances of programmable resistors, the nonlinearity comes from diodes, and the
state is the steady state that Kirchhoff's laws impose. That steady state minimises the
network's co-content, so equilibrium propagation can train it from voltage drops alone.

Topology (layered, chosen here so that positive conductances can still express signed weights):

- Inputs. Each input ``x_j`` (volts, within +-``v_input_max``) drives two ideal voltage
  sources, ``+x_j`` and ``-x_j``. A conductance to ``-x_j`` acts as a negative weight.
- Bias. Two sources at ``+v_bias`` and ``-v_bias`` connect to every free node through
  trainable conductances.
- Layers. Free nodes are grouped in layers: ``hidden`` layers, then the output layer. Every
  node of layer ``l`` connects to every node of layer ``l - 1`` (the sources, for the first
  layer) and to the two bias sources through one trainable conductance each. Nodes of one layer
  are not connected to each other. Passive layers attenuate, so more than one hidden layer per
  node rarely helps; chain nodes instead (each node's outputs drive the next node's sources).
- Diodes. A node with diodes has an antiparallel pair to two sources at +-``v_diode_bias``, a
  soft clamp of the node voltage (Shockley law). Hidden nodes always have them; output nodes
  have them unless ``diodes="hidden"``; ``diodes="none"`` makes the whole network linear.
- Outputs. With ``differential_outputs`` each output is a pair of nodes and reads
  ``y_k = V(k+) - V(k-)``, so a positive-only network still gives outputs of either sign.
  Without it, each output reads one node voltage.

Conductances are in microsiemens (uS), voltages in volts (V), currents in amperes (A) at the
public interface (the kernels use microamperes internally). Parameters are named ``g_layer1``,
``g_layer2``, ..., and ``g_layerL`` has shape (nodes in layer L, columns of layer L). The
columns of the first layer are ``x``, ``-x``, ``+v_bias`` and ``-v_bias``. Later layers have
the previous layer's nodes, then ``+v_bias`` and ``-v_bias``.

Imperfections (named stages, see :data:`STAGES`), each switched off by
:meth:`ResistiveConfig.without`:

1. ``conductance_levels``: each device is programmed to one of ``levels`` values between
   ``g_min`` and ``g_max``; updates smaller than a level accumulate in a per-device buffer and
   are programmed when they add up to whole levels.
2. ``device_variation``: each device's real conductance is its programmed value times a fixed
   log-normal factor with spread ``g_dtod``, unknown to the learner.
3. ``read_noise``: Gaussian noise with standard deviation ``read_noise_std`` (V) on every
   measured node voltage; outputs and voltage drops are computed from the noisy readings.

Solver: damped Newton iteration on Kirchhoff's current law in float64, with a backtracking line
search on the squared residual. An example whose largest residual stays above ``newton_tol``
after ``newton_max_iter`` steps is returned as an invalid state: its voltages are NaN (so
:attr:`NodeState.valid` is false and the controller rejects the batch) and a warning is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec
from ._stage_settings import StageSettings
from .resistive_kernels import adjoint_kernel, settle_kernel

__all__ = [
    "ResistiveConfig",
    "ResistiveNode",
    "RESISTIVE_STAGES",
    "RESISTIVE_PRESETS",
    "resistive_preset",
    "DIODE_PLACEMENTS",
]

log = logging.getLogger(__name__)

#: Float dtype of every signal, conductance and kernel array of the resistive network.
FLOAT = np.float64

#: Imperfection stages of the resistive network, each switched off by
#: :meth:`ResistiveConfig.without`.
RESISTIVE_STAGES = ("conductance_levels", "device_variation", "read_noise")

#: Diode placements: on every free node, on hidden nodes only, or nowhere (a linear network).
DIODE_PLACEMENTS = ("all", "hidden", "none")

# Microamperes per ampere: the kernels work in V, uS and uA.
_UA_PER_A = 1e6


@dataclass(frozen=True)
class ResistiveConfig(StageSettings):
    """Device, diode and solver settings of a simulated resistive network."""

    _stages = RESISTIVE_STAGES
    _owner = "resistive"

    g_min: float = 1.0
    """Lowest programmable conductance of one device, in microsiemens (typical value)."""
    g_max: float = 100.0
    """Highest programmable conductance of one device, in microsiemens (typical value)."""
    levels: int = 64
    """Number of programmable conductance levels per device (``conductance_levels`` stage)."""
    max_pulses_per_update: int = 16
    """Largest change of one conductance per update, in levels; sets the parameters' ``max_step``."""
    g_dtod: float = 0.05
    """Device-to-device spread: standard deviation of the log of each device's fixed conductance
    factor, relative (``device_variation`` stage)."""
    read_noise_std: float = 1e-3
    """Standard deviation of the noise on each measured node voltage, in volts (``read_noise``)."""
    v_input_max: float = 2.0
    """Largest input source voltage magnitude, in volts; inputs outside +-this raise LimitError.
    The default leaves room for the differential output of a diode layer (near +-1.2 V at
    milliampere diode currents with the default diodes), so diode layers can be chained."""
    v_bias: float = 1.0
    """Voltage of the two bias sources, +v_bias and -v_bias, in volts."""
    diode_i_sat: float = 2.495e-9
    """Diode saturation current, in amperes."""
    diode_ideality: float = 1.679
    """Diode ideality factor (emission coefficient), dimensionless."""
    v_thermal: float = 0.025852
    """Thermal voltage kT/q, in volts (0.025852 V at 300 K)."""
    v_diode_bias: float = 0.0
    """Voltage of the sources the diode pairs connect to, +-v_diode_bias, in volts; it shifts the
    clamp of each node voltage outwards by this much."""
    differential_outputs: bool = True
    """True: each output is the voltage difference of a pair of nodes; False: one node voltage."""
    newton_tol: float = 1e-15
    """Largest Kirchhoff residual at any node of a converged solve, in amperes."""
    newton_max_iter: int = 100
    """Newton steps allowed before an example is declared not converged."""
    disabled: frozenset[str] = field(default_factory=frozenset)
    """Names of the stages switched off, from :data:`RESISTIVE_STAGES`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "disabled", frozenset(self.disabled))
        for item in dataclasses.fields(self):
            if item.name == "disabled":
                continue
            value = getattr(self, item.name)
            if item.name == "differential_outputs":
                wrong_type = not isinstance(value, (bool, np.bool_))
            else:
                # bool is an int subclass, but True as a conductance is a mistake.
                wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Real)
            if wrong_type:
                raise ConfigError(f"resistive {item.name} must be of type {item.type}, got {value!r}")
        unknown = sorted(self.disabled - set(RESISTIVE_STAGES))
        if unknown:
            raise ConfigError(
                f"unknown resistive stage(s) {unknown}; the stages are {', '.join(RESISTIVE_STAGES)}"
            )
        if not (0 < self.g_min < self.g_max and math.isfinite(self.g_max)):
            raise ConfigError(
                f"resistive conductances need 0 < g_min < g_max, got g_min={self.g_min} and g_max={self.g_max} uS"
            )
        for name in ("levels", "max_pulses_per_update", "newton_max_iter"):
            minimum = 2 if name == "levels" else 1
            value = getattr(self, name)
            if int(value) != value or value < minimum:
                raise ConfigError(f"resistive {name} must be an integer of at least {minimum}, got {value!r}")
        for name in ("v_input_max", "diode_i_sat", "diode_ideality", "v_thermal", "newton_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"resistive {name} must be a positive number, got {value!r}")
        for name in ("g_dtod", "read_noise_std", "v_bias", "v_diode_bias"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"resistive {name} must be a finite number >= 0, got {value!r}")

    @property
    def level_step(self) -> float:
        """Conductance difference between neighbouring levels, in microsiemens."""
        return (self.g_max - self.g_min) / (self.levels - 1)


#: Named resistive-network presets.
#:
#: ``default``: diodes of type 1N4148, with the saturation current (2.495 nA) and emission
#: coefficient (1.679) of the 1N4148 model statement printed in the ngspice user manual
#: (section "Device Models"). The conductance range of 1 to 100 uS with 64 levels, the 5 %
#: device-to-device spread and the 1 mV read noise are typical values for programmable
#: resistors, not fitted to one publication.
#:
#: ``ideal``: the same circuit with every imperfection stage off.
RESISTIVE_PRESETS: dict[str, ResistiveConfig] = {
    "default": ResistiveConfig(),
    "ideal": ResistiveConfig().without("all"),
}


def resistive_preset(name: str) -> ResistiveConfig:
    """Return the resistive preset called ``name``, or raise ConfigError listing the presets."""
    try:
        return RESISTIVE_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown resistive preset {name!r}; choose one of {', '.join(RESISTIVE_PRESETS)}"
        ) from None


@dataclass(frozen=True)
class _Layout:
    """Index arithmetic of one network shape, in the form the kernels take."""

    n_in: int
    sizes: np.ndarray  # int64, free nodes per layer
    node_offset: np.ndarray  # int64, first free node of each layer
    n_columns: np.ndarray  # int64, conductance columns per layer
    g_offset: np.ndarray  # int64, first flat conductance of each layer

    @classmethod
    def build(cls, n_in: int, sizes: Sequence[int]) -> _Layout:
        sizes_array = np.asarray(sizes, dtype=np.int64)
        node_offset = np.concatenate([[0], np.cumsum(sizes_array)[:-1]]).astype(np.int64)
        previous = np.concatenate([[2 * n_in], sizes_array[:-1]]).astype(np.int64)
        n_columns = previous + 2
        counts = sizes_array * n_columns
        g_offset = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(n_in, sizes_array, node_offset, n_columns, g_offset)

    @property
    def n_free(self) -> int:
        return int(self.sizes.sum())

    @property
    def n_layers(self) -> int:
        return int(self.sizes.size)

    def layer_nodes(self, layer: int) -> slice:
        start = int(self.node_offset[layer])
        return slice(start, start + int(self.sizes[layer]))


class ResistiveNode(Node):
    """A simulated layered resistive network with diodes, settled to its steady state.

    ``forward`` applies the inputs as source voltages and returns the free equilibrium's output
    voltages. :meth:`settle` also returns the weakly clamped equilibrium for equilibrium
    propagation. The module docstring describes the circuit.

    Parameters
    ----------
    n_in, n_out
        Number of inputs (each a pair of sources +-x) and outputs (each a pair of nodes with
        differential outputs, one node otherwise).
    hidden
        Number of free nodes in each hidden layer, in order; empty for one layer of conductances.
    diodes
        ``"all"`` (hidden and output nodes), ``"hidden"`` (hidden nodes only, a linear output
        layer) or ``"none"`` (a linear resistor network).
    config
        Device settings; None takes the preset named ``preset``.
    preset
        Name of a preset in :data:`RESISTIVE_PRESETS`, used when ``config`` is None
        (``"default"`` if both are None) and kept in the run record.
    rng
        Generator or seed for the initial conductances, the device variation and the read noise.
    name
        Name in messages and the run record.

    Notes
    -----
    Signals and conductances are float64. Memory: the voltage-drop probes hold one number per
    conductance per example, 8 * batch * (number of conductances) bytes.
    """

    gradient_method = "adjoint"
    has_input_gradient = True
    has_preactivation = False
    #: This node reaches an equilibrium and offers :meth:`settle` for equilibrium propagation.
    can_settle = True
    #: Probe of a settled state that contains what :meth:`settle` accepts as ``initial``.
    settle_state_probe = "node_voltages"
    #: Nudge strength that equilibrium propagation uses when no beta is set, in amperes per
    #: unit of dLoss/dy. On the vowels (12-16-7, cross-entropy behind a readout of gain 8) it
    #: moved the outputs by 30 to 140 mV at the start, far above the 1 mV read noise. With
    #: centred EP, readout gain 4 and 60 epochs, beta of 3e-6, 1e-5 and 3e-5 A reached 91.8,
    #: 95.9 and 95.9 % test accuracy.
    default_beta = 1e-5

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        hidden: Sequence[int] = (),
        diodes: str = "all",
        config: ResistiveConfig | None = None,
        preset: str | None = None,
        rng: np.random.Generator | int | None = None,
        name: str = "resistive",
    ) -> None:
        if config is None:
            preset = preset or "default"
            config = resistive_preset(preset)
        if not isinstance(config, ResistiveConfig):
            raise ConfigError(f"node {name!r}: config must be a ResistiveConfig, got {type(config).__name__}")
        v_max = config.v_input_max
        super().__init__(
            name,
            n_in,
            n_out,
            input_spec=ParameterSpec((int(n_in),), -v_max, v_max, "V", description="input source voltage"),
            output_unit="V",
            dtype=FLOAT,
        )
        hidden = tuple(hidden)
        for width in hidden:
            if isinstance(width, bool) or int(width) != width or width < 1:
                raise ConfigError(f"node {name!r}: hidden layer widths must be positive integers, got {hidden!r}")
        if diodes not in DIODE_PLACEMENTS:
            raise ConfigError(f"node {name!r}: diodes must be one of {DIODE_PLACEMENTS}, got {diodes!r}")
        self.config = config
        self.preset = preset
        self.hidden = tuple(int(w) for w in hidden)
        self.diodes = diodes
        self.seed = rng if isinstance(rng, (int, np.integer)) else None
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

        self.n_out_nodes = 2 * self.n_out if config.differential_outputs else self.n_out
        self._layout = _Layout.build(self.n_in, (*self.hidden, self.n_out_nodes))
        layout = self._layout
        self._has_diode = np.zeros(layout.n_free, dtype=np.bool_)
        if diodes != "none":
            self._has_diode[: layout.n_free - self.n_out_nodes] = True
        if diodes == "all":
            self._has_diode[layout.n_free - self.n_out_nodes :] = True
        self._output_map = self._build_output_map()

        levels_on = config.enabled("conductance_levels")
        self._specs: dict[str, ParameterSpec] = {}
        for layer in range(layout.n_layers):
            shape = (int(layout.sizes[layer]), int(layout.n_columns[layer]))
            self._specs[f"g_layer{layer + 1}"] = ParameterSpec(
                shape, config.g_min, config.g_max, "uS",
                resolution=config.level_step if levels_on else 0.0,
                max_step=config.max_pulses_per_update * config.level_step,
                description=f"conductances of layer {layer + 1}, rows are its nodes",
            )

        # Programmed conductances (what the learner reads and writes), the fixed device factors
        # and the update buffers, all in microsiemens or relative.
        self._programmed: dict[str, np.ndarray] = {}
        self._factor: dict[str, np.ndarray] = {}
        self._buffer: dict[str, np.ndarray] = {}
        for key, spec in self._specs.items():
            initial = self.rng.uniform(config.g_min, config.g_max, spec.shape)
            self._programmed[key] = spec.quantize(initial)
            if config.enabled("device_variation") and config.g_dtod > 0:
                self._factor[key] = np.exp(config.g_dtod * self.rng.standard_normal(spec.shape))
            else:
                self._factor[key] = np.ones(spec.shape)
            self._buffer[key] = np.zeros(spec.shape)
        self._refresh()

    # ------------------------------------------------------------------------------- layout
    def _build_output_map(self) -> np.ndarray:
        """Return D, shape (n_out, n_free): outputs = node voltages @ D.T."""
        layout = self._layout
        out_start = layout.n_free - self.n_out_nodes
        mapping = np.zeros((self.n_out, layout.n_free))
        for k in range(self.n_out):
            mapping[k, out_start + k] = 1.0
            if self.config.differential_outputs:
                mapping[k, out_start + self.n_out + k] = -1.0
        return mapping

    @property
    def n_free_nodes(self) -> int:
        """Number of free (unknown-voltage) nodes: hidden nodes and output nodes."""
        return self._layout.n_free

    @property
    def output_map(self) -> np.ndarray:
        """Matrix D of shape (n_out, n_free_nodes) with outputs = node_voltages @ D.T."""
        return self._output_map.copy()

    @property
    def diode_mask(self) -> np.ndarray:
        """True for every free node that has a diode pair, array of shape (n_free_nodes,)."""
        return self._has_diode.copy()

    # ------------------------------------------------------------------------------ parameters
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return {key: value.copy() for key, value in self._programmed.items()}

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for key, value in values.items():
            self._programmed[key] = np.array(value, dtype=FLOAT)
            self._buffer[key][...] = 0.0
        self._refresh()
        return {key: self._programmed[key].copy() for key in values}

    def _refresh(self) -> None:
        """Rebuild the flat arrays of real (with device variation) and nominal conductances."""
        keys = list(self._specs)
        self._g_real = np.ascontiguousarray(
            np.concatenate([(self._programmed[k] * self._factor[k]).ravel() for k in keys]), dtype=FLOAT
        )
        self._g_nominal = np.ascontiguousarray(
            np.concatenate([self._programmed[k].ravel() for k in keys]), dtype=FLOAT
        )

    def physical_conductances(self) -> dict[str, np.ndarray]:
        """Return each layer's real conductances (programmed value times device factor), in uS."""
        return {key: self._programmed[key] * self._factor[key] for key in self._specs}

    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Program a change of the conductances and return the change actually programmed.

        Changes are checked against ``max_step`` and the limits like any node's. With the
        ``conductance_levels`` stage on, each change is added to the device's update buffer.
        Only the whole levels in the buffer are programmed and the rest stays there, so small
        learning-rate steps are not lost to rounding.
        """
        self._check_open()
        current = self._read_parameters()
        targets = {
            key: current[key] + request for key, request in self._checked_requests(current, delta, clip).items()
        }

        applied = {}
        for key, target in targets.items():
            if self.config.enabled("conductance_levels"):
                level = self.config.level_step
                buffer = self._buffer[key] + (target - current[key])
                # The buffer's remainder may not push a change past the maximum step.
                max_pulses = np.floor(self._specs[key].max_step / level + 1e-9)
                pulses = np.clip(np.trunc(buffer / level), -max_pulses, max_pulses)
                programmed = self._specs[key].quantize(current[key] + pulses * level)
                self._buffer[key] = buffer - (programmed - current[key])
            else:
                programmed = target
            self._programmed[key] = programmed
            applied[key] = programmed - current[key]
        self._refresh()
        return applied

    # ------------------------------------------------------------------------------- solving
    def _check_nudge(self, nudge: Any, batch: int) -> np.ndarray:
        where = f"node {self.name!r} nudge"
        try:
            array = np.asarray(nudge, dtype=FLOAT)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected numbers, got {type(nudge).__name__} ({exc})") from None
        if array.shape != (batch, self.n_out):
            raise ConfigError(
                f"{where}: expected an array of currents of shape ({batch}, {self.n_out}) in amperes, "
                f"got shape {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise ConfigError(f"{where}: contains NaN or infinite currents; send finite values")
        return array

    def _solve(self, x: np.ndarray, inject: np.ndarray, v_init: np.ndarray) -> np.ndarray:
        """Run the Newton kernel; return exact node voltages (batch, n_free), NaN where not converged."""
        cfg = self.config
        layout = self._layout
        v, iterations, residual, converged = settle_kernel(
            x, v_init, inject, self._g_real, layout.sizes, layout.node_offset, layout.g_offset,
            layout.n_columns, layout.n_in, cfg.v_bias, self._has_diode, cfg.diode_i_sat * _UA_PER_A,
            cfg.diode_ideality * cfg.v_thermal, cfg.v_diode_bias, cfg.newton_tol * _UA_PER_A,
            int(cfg.newton_max_iter),
        )
        self.last_iterations_ = iterations
        if not np.all(converged):
            failed = int(np.count_nonzero(~converged))
            worst = float(np.max(residual[~converged])) / _UA_PER_A
            log.warning(
                "node %r: the Newton solve did not converge for %d of %d example(s) within %d steps "
                "(largest Kirchhoff residual %.3g A, tolerance %.3g A); their voltages are NaN",
                self.name, failed, len(converged), cfg.newton_max_iter, worst, cfg.newton_tol,
            )
            v[~converged] = np.nan
        return v

    def _measure(self, x: np.ndarray, v_exact: np.ndarray) -> NodeState:
        """Turn exact node voltages into a measured state: read noise, outputs, voltage drops."""
        cfg = self.config
        v = v_exact.copy()
        if cfg.enabled("read_noise") and cfg.read_noise_std > 0:
            v += cfg.read_noise_std * self.rng.standard_normal(v.shape)
        outputs = v @ self._output_map.T
        probes: dict[str, np.ndarray] = {"node_voltages": v}
        probes.update(self.voltage_drops(x, v))
        return NodeState(inputs=x, outputs=outputs, probes=probes)

    def voltage_drops(self, inputs: np.ndarray, node_voltages: np.ndarray) -> dict[str, np.ndarray]:
        """Return the voltage across each conductance, ``V(node) - V(column)``, by parameter.

        Parameters
        ----------
        inputs
            Input source voltages, array of shape (batch, n_in), in V.
        node_voltages
            Free node voltages, array of shape (batch, n_free_nodes), in V.

        Returns
        -------
        dict of str to numpy.ndarray
            ``"dv_g_layerL"``: array of shape (batch, *shape of g_layerL), in V.
        """
        layout = self._layout
        batch = inputs.shape[0]
        bias = np.broadcast_to(np.array([self.config.v_bias, -self.config.v_bias]), (batch, 2))
        drops = {}
        for layer, key in enumerate(self._specs):
            if layer == 0:
                columns = np.concatenate([inputs, -inputs, bias], axis=1)
            else:
                columns = np.concatenate([node_voltages[:, layout.layer_nodes(layer - 1)], bias], axis=1)
            layer_voltages = node_voltages[:, layout.layer_nodes(layer)]
            # (batch, nodes, 1) - (batch, 1, columns) -> (batch, nodes, columns)
            drops[f"dv_{key}"] = layer_voltages[:, :, None] - columns[:, None, :]
        return drops

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        zeros = np.zeros((x.shape[0], self._layout.n_free))
        v = self._solve(x, zeros, zeros)
        state = self._measure(x, v)
        return state.outputs, x, dict(state.probes)

    def settle(self, inputs: Any, nudge: Any = None, *, initial: NodeState | None = None) -> NodeState:
        """Settle the network and return the measured equilibrium, free or weakly clamped.

        Parameters
        ----------
        inputs
            Input source voltages, array of shape (batch, n_in), in V.
        nudge
            None for the free equilibrium. Otherwise the current injected at the outputs, array
            of shape (batch, n_out), in amperes: with differential outputs, ``nudge[:, k]``
            flows into node ``k+`` and out of node ``k-`` (a current source between the pair).
            For equilibrium propagation use ``nudge = -beta * dLoss/dy``.
        initial
            A state from an earlier settle of the same batch (for example the free phase) whose
            ``node_voltages`` start the Newton iteration. The equilibrium is unique, so this
            changes only the number of steps (and the result within the solver tolerance).

        Returns
        -------
        NodeState
            ``outputs`` (batch, n_out) in V, and probes ``"node_voltages"`` (batch, n_free_nodes)
            and ``"dv_g_layerL"`` (batch, *shape of ``g_layerL``), the voltage drop across every
            conductance in V. With ``beta`` as above, in amperes per unit of dLoss/dy, the
            equilibrium propagation estimate of the loss gradient, in 1/uS, is
            ``1e-6 / (2 * beta) * mean over batch of (dv_nudged**2 - dv_free**2)``. Examples
            where the solve did not converge have NaN voltages (the state is then invalid).
            This call does not change what :meth:`measure_state` returns.
        """
        self._check_open()
        x = self.check_inputs(inputs)
        batch = x.shape[0]
        inject = np.zeros((batch, self._layout.n_free))
        if nudge is not None:
            # Current into each node in uA: the map D^T turns output currents into node currents.
            inject = self._check_nudge(nudge, batch) @ self._output_map * _UA_PER_A
        v_init = np.zeros((batch, self._layout.n_free))
        if initial is not None:
            start = np.asarray(initial.probes.get("node_voltages", v_init), dtype=FLOAT)
            if start.shape != v_init.shape:
                raise ConfigError(
                    f"node {self.name!r}: initial state has node voltages of shape {start.shape}, "
                    f"expected {v_init.shape}"
                )
            v_init = np.where(np.isfinite(start), start, 0.0)
        v = self._solve(x, np.ascontiguousarray(inject), np.ascontiguousarray(v_init))
        return self._measure(x, v)

    # ------------------------------------------------------------------------------ learning
    def energy_gradient(self, state: NodeState, reference: NodeState | None = None) -> dict[str, np.ndarray]:
        """Return the derivative of the co-content by each conductance, batch mean, in W per uS.

        The co-content of a conductance G with voltage drop dv is ``G dv^2 / 2``, so its
        derivative is ``dv^2 / 2`` (uW per uS, here converted to W per uS): it needs only the
        measured voltage drop across that conductance. Equilibrium propagation divides the
        difference of this at the nudged and the free state by beta (in A per unit of
        dLoss/dy) to estimate dLoss/dG in 1/uS. With ``reference`` (a state of the same batch)
        the result is that difference, ``energy_gradient(state) - energy_gradient(reference)``.
        """
        gradients = {}
        for key in self._specs:
            squared = np.asarray(state.probes[f"dv_{key}"], dtype=FLOAT) ** 2
            if reference is not None:
                squared = squared - np.asarray(reference.probes[f"dv_{key}"], dtype=FLOAT) ** 2
            gradients[key] = 0.5e-6 * np.mean(squared, axis=0)
        return gradients

    def _adjoint(self, state: NodeState, error: np.ndarray) -> np.ndarray:
        """Return lambda, shape (batch, n_free): J lambda = D^T error, J at the measured voltages."""
        cfg = self.config
        layout = self._layout
        v = np.ascontiguousarray(state.probes["node_voltages"], dtype=FLOAT)
        rhs = np.ascontiguousarray(error @ self._output_map)
        return adjoint_kernel(
            v, rhs, self._g_nominal, layout.sizes, layout.node_offset, layout.g_offset, layout.n_columns,
            layout.n_in, self._has_diode, cfg.diode_i_sat * _UA_PER_A, cfg.diode_ideality * cfg.v_thermal,
            cfg.v_diode_bias,
        )

    def local_gradient(
        self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output"
    ) -> dict[str, np.ndarray]:
        """Return the batch-mean loss gradient per conductance, in 1/uS, by the adjoint method.

        The network is linearised at the measured node voltages of ``state`` with the
        programmed (nominal) conductances and diode law, the adjoint system ``J lambda = D^T e``
        is solved, and ``dLoss/dG = -(lambda(node) - lambda(column)) * dv`` for every
        conductance, with ``lambda = 0`` at sources. Without read noise and device variation
        this is the exact gradient of the outputs' loss.
        """
        error = self.check_error(state, output_error, at=at)
        lam = self._adjoint(state, error)
        layout = self._layout
        batch = error.shape[0]
        gradients = {}
        for layer, key in enumerate(self._specs):
            lam_nodes = lam[:, layout.layer_nodes(layer)]
            n_columns = int(layout.n_columns[layer])
            lam_columns = np.zeros((batch, n_columns))
            if layer > 0:
                lam_columns[:, : int(layout.sizes[layer - 1])] = lam[:, layout.layer_nodes(layer - 1)]
            dv = np.asarray(state.probes[f"dv_{key}"], dtype=FLOAT)
            # (batch, nodes, 1) - (batch, 1, columns) -> (batch, nodes, columns)
            gradients[key] = -np.mean((lam_nodes[:, :, None] - lam_columns[:, None, :]) * dv, axis=0)
        return gradients

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Send an output error back to the input voltages through the linearised network.

        Returns
        -------
        numpy.ndarray
            dLoss/dx per example, array of shape (batch, n_in), in error units per V.
        """
        error = self.check_error(state, output_error)
        lam = self._adjoint(state, error)
        first = self._programmed["g_layer1"]
        n = self.n_in
        # Input x_j drives +x_j through column j and -x_j through column n + j.
        return lam[:, self._layout.layer_nodes(0)] @ (first[:, :n] - first[:, n : 2 * n])

    # ---------------------------------------------------------------------------- lifecycle
    def identity(self) -> dict[str, Any]:
        info = super().identity()
        cfg = dataclasses.asdict(self.config)
        cfg["disabled"] = sorted(self.config.disabled)
        info.update(
            preset=self.preset,
            seed=None if self.seed is None else int(self.seed),
            hidden=list(self.hidden),
            diodes=self.diodes,
            config=cfg,
        )
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "programmed": {k: v.copy() for k, v in self._programmed.items()},
            "factor": {k: v.copy() for k, v in self._factor.items()},
            "buffer": {k: v.copy() for k, v in self._buffer.items()},
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for part in ("programmed", "factor", "buffer"):
            for key, spec in self._specs.items():
                value = np.asarray(state[part][key], dtype=FLOAT)
                if value.shape != spec.shape:
                    raise ConfigError(f"{self._where(key)}: saved {part} has shape {value.shape}, expected {spec.shape}")
                if not np.all(np.isfinite(value)):
                    raise ConfigError(f"{self._where(key)}: saved {part} contains NaN or infinite values")
        for part in ("programmed", "factor", "buffer"):
            target = getattr(self, f"_{part}")
            for key in self._specs:
                target[key] = np.array(state[part][key], dtype=FLOAT)
        self.rng.bit_generator.state = state["rng"]
        self._refresh()
