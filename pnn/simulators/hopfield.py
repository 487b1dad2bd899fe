"""Layered Hopfield network: a digital energy-based model that settles to equilibrium.

The model is the one equilibrium propagation was introduced on (Scellier and Bengio 2017,
"Equilibrium propagation: bridging the gap between energy-based models and backpropagation",
Frontiers in Computational Neuroscience 11:24; Laborieux et al. 2021, "Scaling equilibrium
propagation to deep ConvNets by drastically reducing its gradient estimator bias", Frontiers in
Neuroscience 15:633674). Units are arranged in layers: the inputs (clamped), the hidden layers
and the output layer, with symmetric weights between neighbouring layers and none inside a
layer. The energy of the free units' states ``s`` is::

    E = 1/2 sum_i s_i^2 - sum_i b_i rho(s_i) - sum_l rho(s_l) . W_l rho(s_{l-1})

with ``rho(s) = clip(s, 0, 1)`` the hard sigmoid and ``rho(s_0) = x`` the inputs. Settling runs
projected gradient descent, ``s <- clip(s - step * dF/ds, 0, 1)``, on ``F = E - force .
rho(s_out)``: the free phase has no force, and the nudged phase of equilibrium propagation
pushes the outputs with ``force = -beta * dLoss/dy``. The node's outputs are ``rho(s_out)``.

Parameters are ``weight1`` (first hidden layer from the inputs, shape (n_1, n_in)), ``bias1``,
..., up to ``weightL`` and ``biasL`` of the output layer. Everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..nodes import ErrorSite, Node, NodeState, ParameterSpec
from ._hopfield_kernels import settle_kernel

__all__ = ["HopfieldNode"]

#: Float dtype of every state, weight and kernel array of the Hopfield network.
FLOAT = np.float64


class HopfieldNode(Node):
    """A layered Hopfield network with hard-sigmoid units, settled by projected gradient descent.

    ``forward`` settles from zero states with no force and returns the output activations;
    :meth:`settle` also runs the nudged phase of equilibrium propagation and can start from an
    earlier state. The module docstring gives the energy.

    Parameters
    ----------
    n_in, n_out
        Number of inputs (clamped units, activations in [0, 1]) and of output units.
    hidden
        Number of units in each hidden layer, in order.
    step
        Step size of the settling gradient descent, in (0, 1]; 0.5 in the MNIST settings of
        Scellier and Bengio 2017.
    iterations
        Steps of a settle without a force (the free phase, and ``forward``); 20 in those
        settings.
    nudged_iterations
        Steps of a settle with a force (the nudged phase, started from the free state). Those
        settings use 4. The default of 10 settles the nudged phase further: on MNIST
        (784-500-10, centred EP, 25 epochs) it reached 97.67 and 97.58 % test accuracy for two
        seeds, against 97.52 and 97.16 % with 4.
    init_scale
        Initial weights are uniform in +-``init_scale * sqrt(6 / (fan_in + fan_out))`` (the
        Glorot range); biases start at zero.
    weight_limit
        Bound on every weight and bias; digital weights have no physical range, so the default
        only guards against divergence.
    rng
        Generator or seed for the initial weights.
    name
        Name in messages and the run record.
    """

    gradient_method = "adjoint"
    has_input_gradient = True
    has_preactivation = False
    #: This node reaches an equilibrium and offers :meth:`settle` for equilibrium propagation.
    can_settle = True
    #: Probe of a settled state that contains what :meth:`settle` accepts as ``initial``.
    settle_state_probe = "state"
    #: Nudge strength that equilibrium propagation uses when no beta is set (dimensionless:
    #: the force is ``beta`` times dLoss/dy); 0.5 in the MNIST settings of Scellier and Bengio
    #: 2017.
    default_beta = 0.5

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        hidden: Sequence[int] = (),
        step: float = 0.5,
        iterations: int = 20,
        nudged_iterations: int = 10,
        init_scale: float = 1.0,
        weight_limit: float = 1e6,
        rng: np.random.Generator | int | None = None,
        name: str = "hopfield",
    ) -> None:
        super().__init__(
            name, n_in, n_out,
            input_spec=ParameterSpec((int(n_in),), 0.0, 1.0, "1", description="clamped input activation"),
            output_unit="1",
            dtype=FLOAT,
        )
        hidden = tuple(hidden)
        for width in hidden:
            if isinstance(width, bool) or int(width) != width or width < 1:
                raise ConfigError(f"node {name!r}: hidden layer widths must be positive integers, got {hidden!r}")
        self.step = self._check_step(step)
        self.iterations = self._check_iterations(iterations, "iterations")
        self.nudged_iterations = self._check_iterations(nudged_iterations, "nudged_iterations")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ConfigError(f"node {name!r}: init_scale must be a positive number, got {init_scale!r}")
        if not (math.isfinite(weight_limit) and weight_limit > 0):
            raise ConfigError(f"node {name!r}: weight_limit must be a positive number, got {weight_limit!r}")
        self.hidden = tuple(int(w) for w in hidden)
        self.init_scale = float(init_scale)
        self.seed = rng if isinstance(rng, (int, np.integer)) else None
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

        sizes = np.array([*self.hidden, self.n_out], dtype=np.int64)
        fan_in = np.concatenate([[self.n_in], sizes[:-1]]).astype(np.int64)
        self._sizes = sizes
        self._unit_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._weight_offset = np.concatenate([[0], np.cumsum(sizes * fan_in)[:-1]]).astype(np.int64)
        self._weights = np.empty(int(np.sum(sizes * fan_in)), dtype=FLOAT)
        self._biases = np.zeros(int(sizes.sum()), dtype=FLOAT)

        # Views into the flat arrays, by parameter name, so that the kernel and the node share
        # one copy of the weights.
        self._views: dict[str, np.ndarray] = {}
        self._specs: dict[str, ParameterSpec] = {}
        for layer in range(sizes.size):
            rows, columns = int(sizes[layer]), int(fan_in[layer])
            start = int(self._weight_offset[layer])
            weight = self._weights[start : start + rows * columns].reshape(rows, columns)
            limit = self.init_scale * math.sqrt(6.0 / (rows + columns))
            weight[...] = rng.uniform(-limit, limit, (rows, columns))
            bias = self._biases[int(self._unit_offset[layer]) : int(self._unit_offset[layer]) + rows]
            self._views[f"weight{layer + 1}"] = weight
            self._views[f"bias{layer + 1}"] = bias
            self._specs[f"weight{layer + 1}"] = ParameterSpec(
                (rows, columns), -weight_limit, weight_limit, "1",
                description=f"weights into layer {layer + 1}, rows are its units",
            )
            self._specs[f"bias{layer + 1}"] = ParameterSpec(
                (rows,), -weight_limit, weight_limit, "1", description=f"biases of layer {layer + 1}"
            )
        # W_1 x of the last settled batch, reused while the inputs and weights stay the same (the
        # nudged phases settle the same batch as the free phase).
        self._drive_cache: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------------------ settings
    def _check_step(self, step: Any) -> float:
        if isinstance(step, bool) or not isinstance(step, (int, float, np.floating)) or not 0 < step <= 1:
            raise ConfigError(f"node {self.name!r}: the settling step must be a number in (0, 1], got {step!r}")
        return float(step)

    def _check_iterations(self, value: Any, label: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"node {self.name!r}: {label} must be a positive integer, got {value!r}")
        return int(value)

    @property
    def n_free_units(self) -> int:
        """Number of free (settling) units: hidden units and output units."""
        return int(self._sizes.sum())

    def layer_units(self, layer: int) -> slice:
        """Return the columns of layer ``layer`` (0-based, hidden layers first) in a state probe."""
        start = int(self._unit_offset[layer])
        return slice(start, start + int(self._sizes[layer]))

    # ----------------------------------------------------------------------------- parameters
    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return dict(self._views)

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._drive_cache = None
        for key, value in values.items():
            self._views[key][...] = value
        return {key: self._views[key].copy() for key in values}

    def apply_update(self, delta: Mapping[str, Any], *, clip: bool = False) -> dict[str, np.ndarray]:
        """Add ``delta`` in place; the digital weights have no resolution to round to."""
        self._check_open()
        current = self._read_parameters()
        steps = self._checked_requests(current, delta, clip)
        self._drive_cache = None
        for key, step in steps.items():
            self._views[key] += step
        return steps

    # ------------------------------------------------------------------------------- settling
    def _check_force(self, nudge: Any, batch: int) -> np.ndarray:
        where = f"node {self.name!r} nudge"
        try:
            array = np.asarray(nudge, dtype=FLOAT)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected numbers, got {type(nudge).__name__} ({exc})") from None
        if array.shape != (batch, self.n_out):
            raise ConfigError(f"{where}: expected a force of shape ({batch}, {self.n_out}), got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ConfigError(f"{where}: contains NaN or infinite values; send a finite force")
        return array

    def _check_initial(self, initial: NodeState, batch: int) -> np.ndarray:
        where = f"node {self.name!r} initial state"
        start = initial.probes.get(self.settle_state_probe) if isinstance(initial, NodeState) else None
        if start is None:
            raise ConfigError(f"{where}: expected a NodeState with a {self.settle_state_probe!r} probe, as settle returns")
        start = np.asarray(start, dtype=FLOAT)
        if start.shape != (batch, self.n_free_units):
            raise ConfigError(f"{where}: expected states of shape ({batch}, {self.n_free_units}), got {start.shape}")
        if not np.all(np.isfinite(start)) or np.any(start < 0.0) or np.any(start > 1.0):
            raise ConfigError(f"{where}: states must be finite and inside [0, 1]")
        return start

    def settle(
        self,
        inputs: Any,
        nudge: Any = None,
        *,
        initial: NodeState | None = None,
        iterations: int | None = None,
        step: float | None = None,
    ) -> NodeState:
        """Settle the network and return its state, free or nudged.

        Parameters
        ----------
        inputs
            Input activations, array of shape (batch, n_in), within [0, 1].
        nudge
            None for the free phase. Otherwise the force on the output units, array of shape
            (batch, n_out): for equilibrium propagation ``-beta * dLoss/dy`` at the free state.
        initial
            A state from an earlier settle of the same examples (the free state, for the nudged
            phase; the last free state, for persistent states) to start from; None starts from
            zero states.
        iterations
            Number of steps; None takes ``iterations`` for a free settle and
            ``nudged_iterations`` for a nudged one.
        step
            Step size in (0, 1]; None takes the node's ``step``.

        Returns
        -------
        NodeState
            ``outputs`` ``rho(s_out)`` of shape (batch, n_out), and the probe ``"state"``, the
            states of every free unit, array of shape (batch, n_free_units), hidden layers first.
            This call does not change what :meth:`measure_state` returns.
        """
        self._check_open()
        x = self.check_inputs(inputs)
        batch = x.shape[0]
        force = np.zeros((batch, self.n_out)) if nudge is None else self._check_force(nudge, batch)
        if iterations is None:
            iterations = self.iterations if nudge is None else self.nudged_iterations
        iterations = self._check_iterations(iterations, "iterations")
        step = self.step if step is None else self._check_step(step)
        start = np.zeros((batch, self.n_free_units)) if initial is None else self._check_initial(initial, batch)

        # (batch, units) -> (units, batch): the kernel multiplies whole layers at once.
        state = np.ascontiguousarray(start.T)
        settle_kernel(
            self._input_drive(x), state, np.ascontiguousarray(force.T), self._weights, self._biases,
            self._sizes, self._unit_offset, self._weight_offset, step, iterations,
        )
        states = np.ascontiguousarray(state.T)
        outputs = states[:, self.layer_units(self._sizes.size - 1)].copy()
        return NodeState(inputs=x, outputs=outputs, probes={self.settle_state_probe: states})

    def _input_drive(self, x: np.ndarray) -> np.ndarray:
        """Return W_1 x of shape (n_1, batch), from the cache when x is the last batch settled."""
        cached = self._drive_cache
        if cached is not None and cached[0].shape == x.shape and np.array_equal(cached[0], x):
            return cached[1]
        drive = np.ascontiguousarray(self._views["weight1"] @ x.T)
        self._drive_cache = (x.copy(), drive)
        return drive

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        state = self.settle(x)
        return state.outputs, x, dict(state.probes)

    def energy(self, state: NodeState) -> np.ndarray:
        """Return the energy E of each example's state, array of shape (batch,)."""
        s = np.asarray(state.probes[self.settle_state_probe], dtype=FLOAT)
        rho = np.clip(s, 0.0, 1.0)
        below = np.asarray(state.inputs, dtype=FLOAT)
        energy = 0.5 * np.sum(s**2, axis=1) - rho @ self._biases
        for layer in range(self._sizes.size):
            here = rho[:, self.layer_units(layer)]
            energy -= np.einsum("bi,ij,bj->b", here, self._views[f"weight{layer + 1}"], below)
            below = here
        return energy

    # ------------------------------------------------------------------------------- learning
    def energy_gradient(self, state: NodeState, reference: NodeState | None = None) -> dict[str, np.ndarray]:
        """Return dE/dtheta at a settled state, averaged over the batch, by parameter.

        ``dE/dW_l = -rho(s_l) rho(s_{l-1})^T`` and ``dE/db_l = -rho(s_l)``: each weight needs
        only the activations of the two units it joins. Equilibrium propagation's gradient
        estimate is the difference of this at the nudged and the free state, divided by beta.

        Parameters
        ----------
        state
            A state from :meth:`settle`.
        reference
            Another state of the same batch; if given, the result is ``dE/dtheta(state) -
            dE/dtheta(reference)``, computed with one product per layer instead of two.
        """
        rho = np.clip(np.asarray(state.probes[self.settle_state_probe], dtype=FLOAT), 0.0, 1.0)
        batch = rho.shape[0]
        below = np.asarray(state.inputs, dtype=FLOAT)
        if reference is None:
            gradients = {}
            for layer in range(self._sizes.size):
                here = rho[:, self.layer_units(layer)]
                gradients[f"weight{layer + 1}"] = -(here.T @ below) / batch
                gradients[f"bias{layer + 1}"] = -here.mean(axis=0)
                below = here
            return gradients

        rho_ref = np.clip(np.asarray(reference.probes[self.settle_state_probe], dtype=FLOAT), 0.0, 1.0)
        below_ref = np.asarray(reference.inputs, dtype=FLOAT)
        if rho_ref.shape != rho.shape or below_ref.shape != below.shape:
            raise ConfigError(f"node {self.name!r}: the reference state must come from the same batch as the state")
        # a_l a_{l-1}^T - b_l b_{l-1}^T = (a_l - b_l) a_{l-1}^T + b_l (a_{l-1} - b_{l-1})^T; the
        # second term vanishes for the first layer when both states saw the same inputs.
        same_inputs = np.array_equal(below, below_ref)
        gradients = {}
        for layer in range(self._sizes.size):
            units = self.layer_units(layer)
            here, here_ref = rho[:, units], rho_ref[:, units]
            change = here - here_ref
            weight = change.T @ below
            if layer > 0 or not same_inputs:
                weight += here_ref.T @ (below - below_ref)
            gradients[f"weight{layer + 1}"] = -weight / batch
            gradients[f"bias{layer + 1}"] = -change.mean(axis=0)
            below, below_ref = here, here_ref
        return gradients

    def _coupling_matrix(self) -> np.ndarray:
        """Return the symmetric matrix A of shape (n_free, n_free) with E = 1/2 s.s - b.s - 1/2 s.A s - ..."""
        n_free = self.n_free_units
        coupling = np.zeros((n_free, n_free))
        for layer in range(1, self._sizes.size):
            weight = self._views[f"weight{layer + 1}"]
            here, below = self.layer_units(layer), self.layer_units(layer - 1)
            coupling[here, below] = weight
            coupling[below, here] = weight.T
        return coupling

    def _adjoint(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Return lambda of shape (batch, n_free): H lambda = dLoss/ds on the units inside (0, 1).

        At an equilibrium the units strictly inside (0, 1) satisfy ``s = drive`` and those at a
        bound stay there under a small change of the parameters, so only the inside units move.
        There ``E`` is quadratic with Hessian ``H = I - A``; lambda is zero at the bounds.
        """
        s = np.asarray(state.probes[self.settle_state_probe], dtype=FLOAT)
        batch, n_free = s.shape
        coupling = self._coupling_matrix()
        rhs = np.zeros((batch, n_free))
        rhs[:, self.layer_units(self._sizes.size - 1)] = output_error
        lam = np.zeros((batch, n_free))
        inside = (s > 0.0) & (s < 1.0)
        for b in range(batch):
            free = np.flatnonzero(inside[b])
            if free.size == 0:
                continue
            hessian = np.eye(free.size) - coupling[np.ix_(free, free)]
            lam[b, free] = np.linalg.solve(hessian, rhs[b, free])
        return lam

    def local_gradient(
        self, state: NodeState, output_error: np.ndarray, *, at: ErrorSite = "output"
    ) -> dict[str, np.ndarray]:
        """Return the batch-mean loss gradient per parameter by implicit differentiation.

        The state is taken as an equilibrium: ``lambda = H^-1 dLoss/ds`` on the units inside
        (0, 1), then ``dLoss/dW_l = lambda_l rho(s_{l-1})^T + rho(s_l) lambda_{l-1}^T`` and
        ``dLoss/db_l = lambda_l`` (``lambda`` is zero at the inputs). On a state that has not
        converged this is the gradient of the nearest equilibrium's linearisation, not exact.
        """
        error = self.check_error(state, output_error, at=at)
        lam = self._adjoint(state, error)
        rho = np.clip(np.asarray(state.probes[self.settle_state_probe], dtype=FLOAT), 0.0, 1.0)
        batch = error.shape[0]
        below_rho = np.asarray(state.inputs, dtype=FLOAT)
        below_lam = np.zeros_like(below_rho)
        gradients = {}
        for layer in range(self._sizes.size):
            units = self.layer_units(layer)
            here_rho, here_lam = rho[:, units], lam[:, units]
            gradients[f"weight{layer + 1}"] = (here_lam.T @ below_rho + here_rho.T @ below_lam) / batch
            gradients[f"bias{layer + 1}"] = here_lam.mean(axis=0)
            below_rho, below_lam = here_rho, here_lam
        return gradients

    def input_gradient(self, state: NodeState, output_error: np.ndarray) -> np.ndarray:
        """Return dLoss/dx of shape (batch, n_in) by implicit differentiation, ``lambda_1 W_1``."""
        error = self.check_error(state, output_error)
        lam = self._adjoint(state, error)
        return lam[:, self.layer_units(0)] @ self._views["weight1"]

    # ------------------------------------------------------------------------------ lifecycle
    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(
            hidden=list(self.hidden),
            step=self.step,
            iterations=self.iterations,
            nudged_iterations=self.nudged_iterations,
            init_scale=self.init_scale,
            seed=None if self.seed is None else int(self.seed),
        )
        return info
