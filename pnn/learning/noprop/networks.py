"""NoProp networks: what the controller trains and evaluates for the NoProp rules.

A NoProp network is not a chain of layers: its blocks all read the input, and only inference
runs them in sequence. It offers the network interface the controller uses (``nodes``,
``trainable_indices``, ``predict``, ``state_dict``, ``apply_safe_state``, ``close``, ``n_in``,
``n_out``, ``identity``), with ``forward`` running the inference recursion from pure noise:

- :class:`DTNetwork`: T blocks, one per step, and the fixed cosine schedule (NoProp-DT).
- :class:`CTNetwork`: one denoiser with a time input and a learned schedule (NoProp-CT).
- :class:`FMNetwork`: one velocity network, integrated from noise with Euler steps (NoProp-FM).

All three share an encoder (data into the blocks' input range), the label embedding and a
digital linear classifier that reads the last latent. Inference draws its noise from a
generator seeded by the network's seed at each :meth:`NoPropNetwork.predict` call, so an
evaluation depends on the parameters only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from ...errors import ConfigError, MeasurementError, PnnError
from ...network import DigitalLinear, Encoder
from ...nodes import Node
from .blocks import LocalBlocks, simplex_prediction
from .denoisers import Denoiser, time_features
from .embeddings import LabelEmbedding
from .schedules import LearnedSchedule, check_steps, cosine_alpha_bar, denoising_step, posterior_coefficients

__all__ = ["NoPropNetwork", "DTNetwork", "CTNetwork", "FMNetwork"]

log = logging.getLogger(__name__)

# Second entropy word of the inference noise generator, so it differs from the weights' streams.
_INFERENCE_STREAM = 4099


class NoPropNetwork:
    """Shared parts: encoder, label embedding, classifier, node bookkeeping and state.

    Parameters
    ----------
    encoder
        Maps raw inputs into the blocks' input range.
    embedding
        The label embeddings u_y.
    classifier
        Digital linear layer from the last latent (``embedding.dim`` inputs) to class logits.
    steps
        Number of inference steps T (the number of blocks for NoProp-DT).
    seed
        Seed of the inference noise.
    inference_noise
        Sample the recursion's noise at inference (NoProp-DT and -CT); False takes posterior
        means.
    """

    variant: ClassVar[str] = ""

    def __init__(
        self,
        encoder: Encoder,
        embedding: LabelEmbedding,
        classifier: DigitalLinear,
        *,
        steps: int,
        seed: int = 0,
        inference_noise: bool = False,
    ) -> None:
        if classifier.n_in != embedding.dim:
            raise ConfigError(
                f"the embedding dimension {embedding.dim} does not match the classifier's {classifier.n_in} "
                "inputs; build the classifier with as many inputs as the embedding has dimensions"
            )
        if classifier.n_out != embedding.n_in:
            raise ConfigError(
                f"the classifier has {classifier.n_out} outputs but the embedding has {embedding.n_in} classes"
            )
        self.encoder = encoder
        self.embedding = embedding
        self.classifier = classifier
        self.steps = check_steps(steps)
        self.seed = int(seed)
        self.inference_noise = bool(inference_noise)
        self._last_outputs: np.ndarray | None = None

    # ------------------------------------------------------------------------- nodes
    def _main_nodes(self) -> list[Node]:
        """Nodes that live in this process, in a fixed order."""
        return [self.encoder, self.embedding, self.classifier]

    @property
    def nodes(self) -> list[Node]:
        """Every node held in this process (blocks in worker processes are not listed)."""
        return self._main_nodes()

    def _check_names(self) -> None:
        names = [node.name for node in self.nodes] + self._remote_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"node names must be unique; repeated: {duplicates}")
        self._index = {node.name: i for i, node in enumerate(self.nodes)}

    def _remote_names(self) -> list[str]:
        return []

    @property
    def n_in(self) -> int:
        """Number of input features."""
        return self.encoder.n_in

    @property
    def n_out(self) -> int:
        """Number of outputs (class logits)."""
        return self.classifier.n_out

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return self.classifier.n_out

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, key: int | str) -> Node:
        if isinstance(key, str):
            return self.nodes[self.index_of(key)]
        return self.nodes[key]

    def index_of(self, name: str) -> int:
        """Return the position in :attr:`nodes` of the node called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no node named {name!r} in this process; the nodes are {list(self._index)}") from None

    @property
    def trainable_indices(self) -> list[int]:
        """Positions of the nodes with trainable parameters."""
        return [i for i, node in enumerate(self.nodes) if node.trainable]

    # ------------------------------------------------------------------------- inference
    def encode(self, x: np.ndarray) -> np.ndarray:
        """Return the encoded inputs, float64 array of shape (batch, n_in)."""
        return np.asarray(self.encoder.forward(x), dtype=np.float64)

    def infer(self, x_encoded: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Run the inference procedure from pure noise; return the last latent (batch, dim)."""
        raise NotImplementedError

    def forward(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Return class logits (batch, n_classes) from the inference procedure.

        ``rng`` supplies the noise; None uses a generator seeded by the network's seed.
        """
        rng = rng if rng is not None else np.random.default_rng([self.seed, _INFERENCE_STREAM])
        z = self.infer(self.encode(x), rng)
        self._last_outputs = self.classifier.forward(z)
        return self._last_outputs

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Return the logits for many examples, in batches, with one noise generator per call.

        A batch whose measurement is invalid gets NaN logits, which the controller counts as
        invalid examples.
        """
        rng = np.random.default_rng([self.seed, _INFERENCE_STREAM])
        outputs = []
        for start in range(0, len(x), batch_size):
            try:
                outputs.append(self.forward(x[start : start + batch_size], rng))
            except MeasurementError as exc:
                log.warning("inference on examples %d..%d: %s", start, start + batch_size - 1, exc)
                outputs.append(np.full((len(x[start : start + batch_size]), self.n_out), np.nan))
        self._last_outputs = None
        return np.concatenate(outputs, axis=0)

    def invalid_reason(self) -> str | None:
        """Return why the last forward pass must not be used, or None."""
        if self._last_outputs is None:
            raise PnnError("the network has not run a forward pass yet")
        if not np.all(np.isfinite(self._last_outputs)):
            return "the logits contain NaN or infinite values"
        return None

    # ----------------------------------------------------------------------------- state
    def identity(self) -> list[dict[str, Any]]:
        """Return every node's identity, in order, then the settings of the NoProp variant."""
        return [node.identity() for node in self.nodes] + self._remote_identities() + [self._describe()]

    def _remote_identities(self) -> list[dict[str, Any]]:
        return []

    def _describe(self) -> dict[str, Any]:
        return {"name": "noprop", "variant": self.variant, "steps": self.steps, "inference_noise": self.inference_noise}

    def state_dict(self) -> dict[str, Any]:
        """Return every node's state, by name."""
        return {node.name: node.state_dict() for node in self.nodes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = [node.name for node in self.nodes if node.name not in state]
        if missing:
            raise ConfigError(f"saved network state has no entry for node(s) {missing}")
        for node in self.nodes:
            node.load_state_dict(state[node.name])

    def apply_safe_state(self) -> None:
        """Apply every node's safe state; a failure on one node does not stop the others."""
        for node in self.nodes:
            try:
                node.apply_safe_state()
            except Exception:  # noqa: BLE001 - every node must get its chance to go safe
                log.exception("node %r: applying the safe state failed", node.name)

    def close(self) -> None:
        """Close every node."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> NoPropNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DTNetwork(NoPropNetwork):
    """NoProp-DT: T blocks, block t denoising z_{t-1} into a prediction of u_y.

    Parameters
    ----------
    blocks
        The blocks, in this process (:class:`~pnn.learning.noprop.blocks.LocalBlocks`) or in
        worker processes (:class:`~pnn.learning.noprop.parallel.BlockPool`).
    alpha_bar
        The schedule, array of shape (T + 1,); None is the cosine schedule.
    **kwargs
        Passed to :class:`NoPropNetwork`.
    """

    variant = "dt"

    def __init__(self, encoder, embedding, classifier, blocks, *, alpha_bar: np.ndarray | None = None, **kwargs) -> None:
        super().__init__(encoder, embedding, classifier, steps=len(blocks), **kwargs)
        self.blocks = blocks
        self.alpha_bar = cosine_alpha_bar(self.steps) if alpha_bar is None else np.asarray(alpha_bar, dtype=np.float64)
        if self.alpha_bar.shape != (self.steps + 1,):
            raise ConfigError(f"alpha_bar must have {self.steps + 1} values for {self.steps} blocks, got {self.alpha_bar.shape}")
        self.coefficients = posterior_coefficients(self.alpha_bar)
        self._check_names()

    def _main_nodes(self) -> list[Node]:
        return [*super()._main_nodes(), *self.blocks.nodes]

    @property
    def parallel(self) -> bool:
        """True when the blocks live in worker processes."""
        return not isinstance(self.blocks, LocalBlocks)

    def _remote_names(self) -> list[str]:
        return list(self.blocks.node_names) if self.parallel else []

    def block_nodes(self, t: int) -> list[Node]:
        """Return the nodes of block ``t`` (1-based); only for blocks in this process."""
        if self.parallel:
            raise PnnError("the blocks live in worker processes; their nodes are not in this process")
        return list(self.blocks.denoisers[t - 1].nodes)

    def infer(self, x_encoded, rng, *, reuse_features: bool = False) -> np.ndarray:
        batch, dim = len(x_encoded), self.embedding.dim
        z0 = rng.standard_normal((batch, dim))
        noise = rng.standard_normal((self.steps, batch, dim)) if self.inference_noise else None
        return self.blocks.infer(x_encoded, z0, noise, self.coefficients, self.embedding.matrix, reuse_features)

    def _remote_identities(self) -> list[dict[str, Any]]:
        return self.blocks.identities() if self.parallel else []

    def _describe(self) -> dict[str, Any]:
        info = super()._describe()
        info.update(workers=len(self.blocks.ranges) if self.parallel else 0, alpha_bar=self.alpha_bar.tolist())
        return info

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.parallel:
            state.update(self.blocks.node_states())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.parallel:
            self.blocks.load_node_states(state)

    def apply_safe_state(self) -> None:
        super().apply_safe_state()
        if self.parallel:
            try:
                self.blocks.apply_safe_state()
            except Exception:  # noqa: BLE001 - every node must get its chance to go safe
                log.exception("NoProp workers: applying the safe state failed")

    def close(self) -> None:
        super().close()
        if self.parallel:
            self.blocks.close()


class CTNetwork(NoPropNetwork):
    """NoProp-CT: one denoiser u_hat(z_t, x, t) and a learned schedule.

    Inference runs the same Gaussian posterior recursion as NoProp-DT on the grid t_k = k / T,
    with alpha_bar from the learned schedule.
    """

    variant = "ct"

    def __init__(self, encoder, embedding, classifier, denoiser: Denoiser, schedule: LearnedSchedule, *, steps: int, **kwargs) -> None:
        super().__init__(encoder, embedding, classifier, steps=steps, **kwargs)
        self.denoiser = denoiser
        self.schedule = schedule
        self._check_names()

    def _main_nodes(self) -> list[Node]:
        return [*super()._main_nodes(), self.schedule, *self.denoiser.nodes]

    def grid(self) -> np.ndarray:
        """Return the inference times t_k = k / T, array of shape (T + 1,)."""
        return np.arange(self.steps + 1) / self.steps

    def infer(self, x_encoded, rng) -> np.ndarray:
        batch, dim = len(x_encoded), self.embedding.dim
        times = self.grid()
        a, b, c = posterior_coefficients(self.schedule.alpha_bar(times))
        z = rng.standard_normal((batch, dim))
        noise = rng.standard_normal((self.steps, batch, dim)) if self.inference_noise else None
        features = self.denoiser.features(x_encoded)
        for k in range(self.steps):
            time = time_features(np.full(batch, times[k]))
            logits = self.denoiser.forward(features, z, time)
            _, u_hat = simplex_prediction(logits, self.embedding.matrix)
            z = denoising_step(z, u_hat, a[k], b[k], c[k], None if noise is None else noise[k])
        return z


class FMNetwork(NoPropNetwork):
    """NoProp-FM: a velocity v(z_t, x, t) integrated from z_0 ~ N(0, I) to z_1 with T Euler steps."""

    variant = "fm"

    def __init__(self, encoder, embedding, classifier, denoiser: Denoiser, *, steps: int, **kwargs) -> None:
        super().__init__(encoder, embedding, classifier, steps=steps, **kwargs)
        self.denoiser = denoiser
        self._check_names()

    def _main_nodes(self) -> list[Node]:
        return [*super()._main_nodes(), *self.denoiser.nodes]

    def infer(self, x_encoded, rng) -> np.ndarray:
        batch, dim = len(x_encoded), self.embedding.dim
        z = rng.standard_normal((batch, dim))
        features = self.denoiser.features(x_encoded)
        dt = 1.0 / self.steps
        for k in range(self.steps):
            time = time_features(np.full(batch, k * dt))
            z = z + dt * self.denoiser.forward(features, z, time)
        return z
