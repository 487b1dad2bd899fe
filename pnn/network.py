"""A physical network: nodes in order, physical and digital mixed freely.

The network runs a forward pass node by node and keeps every node's measured state, which is
all a learning rule needs. Digital nodes live here too: :class:`DigitalLinear` (a trainable
layer with an exact gradient), :class:`Encoder` (maps data into the first node's input range)
and :class:`Readout` (turns the last node's outputs into logits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .activations import get_activation
from .errors import ConfigError, LimitError, MeasurementError, PnnError
from .nodes import ErrorSite, Node, NodeState, ParameterSpec

__all__ = ["PhysicalNetwork", "DigitalLinear", "Encoder", "Readout"]

log = logging.getLogger(__name__)


def _unbounded(n: int, unit: str = "1") -> ParameterSpec:
    big = np.finfo(np.float64).max / 4
    return ParameterSpec((n,), -big, big, unit)


class DigitalLinear(Node):
    """A digital layer ``f(W x + b)`` computed exactly in float64 or float32.

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    activation
        Name of the nonlinearity (see :mod:`pnn.activations`).
    rng
        Generator or seed for the initial weights.
    init_scale
        Initial weights are uniform in +-``init_scale / sqrt(n_in)``.
    weight_limit
        Bound on every weight and bias; digital weights have no physical range, so the default
        only guards against divergence.
    dtype
        Float dtype of signals and weights.
    """

    gradient_method = "exact"
    has_input_gradient = True
    has_preactivation = True

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        activation: str = "tanh",
        rng: np.random.Generator | int | None = None,
        name: str = "linear",
        init_scale: float = 1.0,
        weight_limit: float = 1e6,
        dtype: type = np.float32,
    ) -> None:
        super().__init__(name, n_in, n_out, input_spec=_unbounded(n_in), output_unit="1", dtype=dtype)
        self.activation = get_activation(activation)
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        limit = init_scale / math.sqrt(n_in)
        self.weight = rng.uniform(-limit, limit, (n_out, n_in)).astype(self.dtype)
        self.bias = np.zeros(n_out, dtype=self.dtype)
        self._specs = {
            "weight": ParameterSpec((n_out, n_in), -weight_limit, weight_limit, "1", description="weight"),
            "bias": ParameterSpec((n_out,), -weight_limit, weight_limit, "1", description="bias"),
        }

    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in values.items():
            setattr(self, name, np.ascontiguousarray(value, dtype=self.dtype))
        return {name: getattr(self, name).astype(np.float64) for name in values}

    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Add ``delta`` in place; the digital weights have no resolution to round to.

        Every change is checked before any is written. The check and the addition are one
        Numba pass each over the weights, without the float64 copies of the generic path.
        """
        self._check_open()
        from ._validation_kernels import add_check_kernel, add_kernel  # noqa: PLC0415 - loads Numba on first use

        steps = {}
        for name, value in self._known(delta).items():
            spec = self._specs[name]
            where = self._where(name)
            try:
                step = np.ascontiguousarray(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: expected numbers, got {type(value).__name__} ({exc})") from None
            if step.dtype.kind != "f":
                step = spec.check_shape(step, where)
            if step.shape != spec.shape:
                raise ConfigError(f"{where}: expected shape {spec.shape}, got {step.shape}")
            lower, upper = float(spec.lower), float(spec.upper)
            n_bad, n_range, worst = add_check_kernel(
                getattr(self, name).reshape(-1), step.reshape(-1), lower, upper, spec.tolerance()
            )
            if n_bad:
                raise LimitError(f"{where}: {n_bad} value(s) are NaN or infinite; send finite values")
            if n_range and not clip:
                raise LimitError(
                    f"{where}: {n_range} value(s) outside the allowed range {spec.range_text()}, "
                    f"for example {worst:g}; send values inside the range, or pass clip=True "
                    "to clip them (every clip is logged)"
                )
            steps[name] = (step, lower, upper)
        applied = {}
        for name, (step, lower, upper) in steps.items():
            if not getattr(self, name).flags.c_contiguous:
                # The kernel writes through a flat view; a strided array would give it a copy.
                setattr(self, name, np.ascontiguousarray(getattr(self, name)))
            out = np.empty(step.shape)
            clamped = add_kernel(getattr(self, name).reshape(-1), step.reshape(-1), lower, upper, out.reshape(-1))
            if clamped:
                log.debug("%s: clipped %d value(s) into %s", self._where(name), clamped,
                          self._specs[name].range_text())
            applied[name] = out
        return applied

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        a = x @ self.weight.T + self.bias
        return self.activation.f(a), x, {"preactivation": a}

    def _delta(self, state: NodeState, error: np.ndarray, at: ErrorSite) -> np.ndarray:
        if at == "preactivation":
            return error
        # The derivative in the layer's own dtype (float32 by default) is several times faster
        # than in float64; the product with the float64 error is float64 again.
        return error * self.activation.df(np.asarray(state.probes["preactivation"], dtype=self.dtype))

    def local_gradient(
        self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output"
    ) -> dict[str, np.ndarray]:
        error = self.check_error(state, output_error, at=at)
        delta = self._delta(state, error, at).astype(self.dtype)
        batch = delta.shape[0]
        weight = delta.T @ state.inputs.astype(self.dtype, copy=False)
        if batch > 1:
            weight *= np.float32(1.0 / batch) if weight.dtype == np.float32 else 1.0 / batch  # in place: one pass fewer
        return {"weight": weight.astype(np.float64), "bias": delta.mean(axis=0).astype(np.float64)}

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        error = self.check_error(state, output_error)
        return self._delta(state, error, "output") @ self.weight.astype(np.float64)

    def preactivation_error(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        return self._delta(state, self.check_error(state, output_error), "output")

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info["activation"] = self.activation.name
        return info


class Encoder(Node):
    """Maps raw data into a node's input range: ``clip((x - offset) * scale, lower, upper)``.

    Fit ``offset`` and ``scale`` on training data with :meth:`fit`; values beyond the range are
    clipped, which is an explicit choice of this encoder (the count is logged at DEBUG level).

    Parameters
    ----------
    n
        Number of features.
    lower, upper
        Target input range, usually the first node's ``input_spec``.
    method
        ``"minmax"`` maps the training minimum and maximum onto the range; ``"standard"`` maps
        the mean to the centre and ``spread`` standard deviations to each edge; ``"none"``
        passes the data through unchanged (data already in range, such as pixels in [0, 1]).
    spread
        Standard deviations that reach the range edge, for ``method="standard"``.
    """

    def __init__(
        self,
        n: int,
        *,
        lower: float = -1.0,
        upper: float = 1.0,
        method: str = "standard",
        spread: float = 3.0,
        name: str = "encoder",
    ) -> None:
        super().__init__(name, n, n, input_spec=_unbounded(n), output_unit="1", dtype=np.float32)
        if method not in ("standard", "minmax", "none"):
            raise ConfigError(f"encoder method must be 'standard', 'minmax' or 'none', got {method!r}")
        if not lower < upper:
            raise ConfigError(f"encoder range needs lower < upper, got [{lower}, {upper}]")
        self.lower, self.upper, self.method, self.spread = float(lower), float(upper), method, float(spread)
        self.offset_ = np.zeros(n)
        self.scale_ = np.ones(n)

    def fit(self, x: np.ndarray) -> Encoder:
        """Set ``offset_`` and ``scale_`` from training data of shape (n_samples, n)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ConfigError(f"encoder {self.name!r}: expected data of shape (n, {self.n_in}), got {x.shape}")
        centre = 0.5 * (self.lower + self.upper)
        half = 0.5 * (self.upper - self.lower)
        if self.method == "none":
            self.offset_ = np.zeros(self.n_in)
            self.scale_ = np.ones(self.n_in)
        elif self.method == "standard":
            std = x.std(axis=0)
            std[std == 0] = 1.0
            self.scale_ = half / (self.spread * std)
            self.offset_ = x.mean(axis=0) - centre / self.scale_
        else:
            lo, hi = x.min(axis=0), x.max(axis=0)
            width = np.where(hi > lo, hi - lo, 1.0)
            self.scale_ = (self.upper - self.lower) / width
            self.offset_ = lo - self.lower / self.scale_
        return self

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        z = (x - self.offset_) * self.scale_
        clipped = int(np.count_nonzero((z < self.lower) | (z > self.upper)))
        if clipped:
            log.debug("encoder %r: clipped %d value(s) into [%g, %g]", self.name, clipped, self.lower, self.upper)
        return np.clip(z, self.lower, self.upper).astype(self.dtype), x, {}

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(method=self.method, lower=self.lower, upper=self.upper)
        return info

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.offset_.copy(), "scale": self.scale_.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.offset_ = np.asarray(state["offset"], dtype=np.float64).copy()
        self.scale_ = np.asarray(state["scale"], dtype=np.float64).copy()


class Readout(Node):
    """Turns the last node's outputs into logits: ``gain * (y - offset)``, with no parameters."""

    has_input_gradient = True

    def __init__(self, n: int, *, gain: float = 1.0, offset: float = 0.0, name: str = "readout") -> None:
        # float64 logits: the loss and its gradient checks need the full precision.
        super().__init__(name, n, n, input_spec=_unbounded(n), output_unit="1", dtype=np.float64)
        if not (math.isfinite(gain) and gain != 0):
            raise ConfigError(f"readout gain must be a finite non-zero number, got {gain}")
        self.gain, self.offset = float(gain), float(offset)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        return (self.gain * (x - self.offset)).astype(self.dtype), x, {}

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        return self.check_error(state, output_error) * self.gain

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(gain=self.gain, offset=self.offset)
        return info


class PhysicalNetwork:
    """Nodes applied in order; the output of each is the input of the next.

    Parameters
    ----------
    nodes
        The stages, first to last. Names must be unique; the widths of neighbours must match.
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        nodes = list(nodes)
        if not nodes:
            raise ConfigError("a network needs at least one node")
        names = [node.name for node in nodes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"node names must be unique; repeated: {duplicates}")
        for before, after in zip(nodes, nodes[1:]):
            if before.n_out != after.n_in:
                raise ConfigError(
                    f"node {before.name!r} has {before.n_out} outputs but the next node "
                    f"{after.name!r} has {after.n_in} inputs"
                )
        self.nodes = nodes
        self._states: list[NodeState] | None = None
        #: Perturbations actually added in the last :meth:`forward`, by node position, each of
        #: shape (batch, n_out); empty when that pass had none.
        self.applied_perturbations: dict[int, np.ndarray] = {}

    @property
    def n_in(self) -> int:
        """Number of input features."""
        return self.nodes[0].n_in

    @property
    def n_out(self) -> int:
        """Number of outputs (logits)."""
        return self.nodes[-1].n_out

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, key: int | str) -> Node:
        if isinstance(key, str):
            for node in self.nodes:
                if node.name == key:
                    return node
            raise KeyError(f"no node named {key!r}; the nodes are {[n.name for n in self.nodes]}")
        return self.nodes[key]

    @property
    def trainable_indices(self) -> list[int]:
        """Positions of the nodes that have trainable parameters."""
        return [i for i, node in enumerate(self.nodes) if node.trainable]

    def forward(self, x: np.ndarray, perturbations: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        """Run every node in order, measure each one's state, and return the last outputs.

        Parameters
        ----------
        x
            Inputs of the first node, array of shape (batch, n_in).
        perturbations
            Optional additive perturbations of node outputs, by node position (node perturbation
            uses them). Each is an array of shape (batch, n_out) or (n_out,) of that node, added
            to the node's measured outputs before they reach the next node. The sum is clipped
            into the next node's input range, and the values actually added are stored in
            :attr:`applied_perturbations`. Each node's own measured state stays unperturbed.
            On hardware this addition is digital, in the host between two nodes, or an analog
            adder (a DAC summed into the next node's input) where the signal does not pass
            through the host.

        Raises
        ------
        MeasurementError
            If a node other than the last measures a NaN or infinite output (an overrange
            reading, say): the nodes after it do not run, because no instrument may be sent an
            invalid value. :attr:`states` then ends with that node's state.
        """
        checked = self._check_perturbations(perturbations, np.shape(x)[0] if np.ndim(x) == 2 else 0)
        signal = x
        states = []
        applied: dict[int, np.ndarray] = {}
        last = len(self.nodes) - 1
        for position, node in enumerate(self.nodes):
            signal = node.forward(signal)
            state = node.measure_state()
            states.append(state)
            if position < last and not np.all(np.isfinite(signal)):
                self._states = states
                raise MeasurementError(
                    f"invalid measurement, batch rejected: node {node.name!r}: {node.describe_invalid(state)}"
                )
            if position in checked:
                signal, applied[position] = self._perturb(position, signal, checked[position])
        self._states = states
        self.applied_perturbations = applied
        return signal

    def _check_perturbations(self, perturbations: Mapping[int, np.ndarray] | None, batch: int) -> dict[int, np.ndarray]:
        if not perturbations:
            return {}
        checked = {}
        for position, value in perturbations.items():
            if not (isinstance(position, (int, np.integer)) and 0 <= position < len(self.nodes)):
                raise ConfigError(
                    f"perturbation given for node position {position!r}; positions run from 0 to {len(self.nodes) - 1}"
                )
            node = self.nodes[position]
            array = np.asarray(value, dtype=np.float64)
            if array.shape not in ((batch, node.n_out), (node.n_out,)):
                raise ConfigError(
                    f"perturbation of node {node.name!r} has shape {array.shape}; expected ({batch}, {node.n_out}) "
                    f"or ({node.n_out},)"
                )
            if not np.all(np.isfinite(array)):
                raise ConfigError(f"perturbation of node {node.name!r} contains NaN or infinite values")
            checked[int(position)] = array
        return checked

    def _perturb(self, position: int, signal: np.ndarray, perturbation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add a perturbation to a node's outputs; return the new signal and what was added."""
        signal = np.asarray(signal, dtype=np.float64)
        perturbed = signal + perturbation
        if position + 1 < len(self.nodes):
            # The next node rejects inputs outside its range, so the sum stays inside it.
            spec = self.nodes[position + 1].input_spec
            clipped = np.clip(perturbed, spec.lower_array, spec.upper_array)
            n_clipped = int(np.count_nonzero(clipped != perturbed))
            if n_clipped:
                log.debug("node %r: %d perturbed output(s) clipped into the next node's input range",
                          self.nodes[position].name, n_clipped)
            perturbed = clipped
        return perturbed, perturbed - np.broadcast_to(signal, perturbed.shape)

    @property
    def states(self) -> list[NodeState]:
        """Each node's state from the last :meth:`forward`."""
        if self._states is None:
            raise PnnError("the network has not run a forward pass yet")
        return self._states

    def invalid_reason(self) -> str | None:
        """Return why the last forward pass must not be used for an update, or None."""
        for node, state in zip(self.nodes, self.states):
            reason = node.describe_invalid(state)
            if reason is not None:
                return f"node {node.name!r}: {reason}"
        return None

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Return the outputs for many examples, in batches; states are not kept.

        An example whose signal becomes NaN or infinite at some node (an overrange reading)
        is not sent to the nodes after it, and its outputs are NaN; the other examples of the
        batch go on.
        """
        outputs = []
        for start in range(0, len(x), batch_size):
            signal = np.asarray(x[start : start + batch_size])
            valid = np.ones(len(signal), dtype=bool)
            for node in self.nodes:
                out = np.full((len(signal), node.n_out), np.nan)
                if valid.any():
                    out[valid] = node.forward(signal[valid])
                valid &= np.all(np.isfinite(out), axis=1)
                signal = out
            outputs.append(signal)
        self._states = None
        return np.concatenate(outputs, axis=0)

    def backward_to(self, index: int, error: np.ndarray) -> np.ndarray:
        """Send an error at the network output back to the output of node ``index``.

        Uses each later node's :meth:`Node.input_gradient`, so those nodes need a model.
        """
        for position in range(len(self.nodes) - 1, index, -1):
            error = self.nodes[position].input_gradient(self.states[position], error)
        return error

    def identity(self) -> list[dict[str, Any]]:
        """Every node's identity, in order."""
        return [node.identity() for node in self.nodes]

    def state_dict(self) -> dict[str, Any]:
        """Every node's state, by name."""
        return {node.name: node.state_dict() for node in self.nodes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = [node.name for node in self.nodes if node.name not in state]
        if missing:
            raise ConfigError(f"saved network state has no entry for node(s) {missing}")
        for node in self.nodes:
            node.load_state_dict(state[node.name])

    def apply_safe_state(self) -> list[tuple[str, BaseException]]:
        """Apply every node's safe state; a failure on one node does not stop the others.

        Returns the (node name, exception) of every node whose safe state failed, each also
        logged; an empty list when all went safe.
        """
        failures = []
        for node in self.nodes:
            try:
                node.apply_safe_state()
            except Exception as exc:  # noqa: BLE001 - every node must get its chance to go safe
                log.error("node %r: applying the safe state failed: %s", node.name, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                failures.append((node.name, exc))
        return failures

    def close(self) -> None:
        """Close every node."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> PhysicalNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        chain = " -> ".join(f"{n.name}({n.n_in}->{n.n_out})" for n in self.nodes)
        return f"<PhysicalNetwork {chain}>"
