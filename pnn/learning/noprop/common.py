"""Settings and network parts shared by the three NoProp rules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError, MeasurementError
from ...network import DigitalLinear, Encoder
from ..base import LearningRule, make_rule
from .denoisers import ARCHITECTURES, DenoiserSpec
from .embeddings import EMBEDDING_KINDS, LabelEmbedding, prototype_embeddings
from .networks import NoPropNetwork
from .schedules import check_steps

if TYPE_CHECKING:
    from ...config import TrainConfig
    from ...datasets import Dataset

__all__ = ["NoPropRule", "kl_to_standard_normal"]


def kl_to_standard_normal(alpha_bar_0: float, u: np.ndarray) -> tuple[float, np.ndarray]:
    """Return (batch-mean KL(q(z_0 | y) || N(0, I)), its gradient with respect to each u_y row).

    q(z_0 | y) = N(sqrt(alpha_bar_0) u_y, (1 - alpha_bar_0) I) with u of shape (batch, dim); the
    gradient has the same shape and is already divided by the batch size.
    """
    dim = u.shape[1]
    kl = 0.5 * (alpha_bar_0 * np.sum(u * u, axis=1) - dim * alpha_bar_0 - dim * math.log1p(-alpha_bar_0))
    return float(np.mean(kl)), alpha_bar_0 * u / len(u)


class NoPropRule(LearningRule):
    """Options every NoProp variant shares, validation, and the network parts they build.

    Parameters
    ----------
    T
        Number of denoising steps (NoProp-DT: blocks); at least 2.
    embedding
        Label embedding: ``"onehot"``, ``"learned"`` or ``"prototype"``.
    embedding_dim
        Dimension of a learned embedding (default: the number of classes).
    learn_embedding
        Train the embedding; default True for ``learned``, False otherwise.
    block
        Block architecture: ``"mlp"`` (digital) or ``"device"`` (the configured device kind,
        then a digital readout); default ``mlp`` on ``--device digital``, else ``device``.
    z_scale
        Latent value mapped to the edge of a device's input range.
    """

    def __init__(
        self,
        T: int = 10,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        learn_embedding: bool | None = None,
        block: str | None = None,
        z_scale: float = 3.0,
    ) -> None:
        self.T = check_steps(T)
        if embedding not in EMBEDDING_KINDS:
            raise ConfigError(f"unknown embedding {embedding!r} for rule {self.name!r}; choose one of {', '.join(EMBEDDING_KINDS)}")
        if embedding_dim is not None and (
            isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1
        ):
            raise ConfigError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        if learn_embedding is not None and not isinstance(learn_embedding, bool):
            raise ConfigError(f"learn_embedding must be true or false, got {learn_embedding!r}")
        if block is not None and block not in ARCHITECTURES:
            raise ConfigError(f"unknown block {block!r} for rule {self.name!r}; choose one of {', '.join(ARCHITECTURES)}")
        if isinstance(z_scale, bool) or not isinstance(z_scale, (int, float)) or not (math.isfinite(z_scale) and z_scale > 0):
            raise ConfigError(f"z_scale must be a positive number, got {z_scale!r}")
        self.embedding = embedding
        self.embedding_dim = embedding_dim
        self.learn_embedding = learn_embedding
        self.block = block
        self.z_scale = float(z_scale)

    @staticmethod
    def _positive(name: str, value: Any, *, allow_none: bool = False) -> float | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
        return float(value)

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name, "T": self.T, "embedding": self.embedding, "embedding_dim": self.embedding_dim,
            "learn_embedding": self.learn_embedding, "block": self.block, "z_scale": self.z_scale,
        }

    #: ``"dt"``, ``"ct"`` or ``"fm"``.
    variant = ""

    def check(self, network) -> None:
        super().check(network)
        if not isinstance(network, NoPropNetwork) or network.variant != self.variant:
            raise ConfigError(
                f"rule {self.name!r} trains a NoProp-{self.variant.upper()} network, got {type(network).__name__}; "
                f"build it with {type(self).__name__}.build_network"
            )
        if network.steps != self.T:
            raise ConfigError(f"rule {self.name!r} has T = {self.T} but the network has {network.steps} steps")

    # ---------------------------------------------------------------- building the network
    @classmethod
    def _settings(cls, config: TrainConfig) -> NoPropRule:
        if config.station:
            raise ConfigError(
                f"rule {cls.name!r} builds its blocks from a simulated device; a station file is not supported yet"
            )
        # make_rule turns an unknown option into a ConfigError that names it.
        return make_rule(cls.name, **config.rule_options)

    def _architecture(self, config: TrainConfig) -> str:
        return self.block or ("mlp" if config.device == "digital" else "device")

    def _spec(self, config: TrainConfig, name: str, n_features: int, dim: int, n_out: int, n_time: int, seed: list[int]) -> DenoiserSpec:
        architecture = self._architecture(config)
        return DenoiserSpec(
            name=name, architecture=architecture, n_features=n_features, dim=dim, n_out=n_out,
            hidden=tuple(config.hidden), seed=tuple(seed), n_time=n_time,
            activation="relu" if architecture == "mlp" else config.activation,
            device=config.device, preset=config.preset, device_options=dict(config.device_options),
            z_scale=self.z_scale,
        )

    @staticmethod
    def _encoder(first_input, config: TrainConfig, x_train: np.ndarray) -> Encoder:
        # Data goes to [-1, 1], or to the first node's input range where that is narrower.
        n = x_train.shape[1]
        lower = max(float(np.max(first_input.lower_array[:n])), -1.0)
        upper = min(float(np.min(first_input.upper_array[:n])), 1.0)
        return Encoder(n, lower=lower, upper=upper, method=config.encoder).fit(x_train)

    def _embedding(self, config: TrainConfig, dataset: Dataset, encoder: Encoder) -> LabelEmbedding:
        prototypes = None
        if self.embedding == "prototype":
            x_encoded = encoder.forward(dataset.x_train)
            prototypes = prototype_embeddings(x_encoded, dataset.y_train, dataset.n_classes)
        return LabelEmbedding(
            dataset.n_classes, self.embedding, dim=self.embedding_dim, trainable=self.learn_embedding,
            prototypes=prototypes, rng=np.random.default_rng([config.seed, 3001]),
        )

    @staticmethod
    def _classifier(config: TrainConfig, dim: int, n_classes: int) -> DigitalLinear:
        # Zero initial weights: random ones would decide the class until the cross-entropy,
        # which starts slowly on the near-clean z_T, has outgrown them.
        return DigitalLinear(
            dim, n_classes, activation="linear", rng=np.random.default_rng([config.seed, 3002]), name="classifier",
            init_scale=0.0, dtype=np.float64,
        )

    # ------------------------------------------------------------------ shared step parts
    @staticmethod
    def _classify(network: NoPropNetwork, z: np.ndarray, labels: np.ndarray, context) -> tuple[float, dict, np.ndarray, np.ndarray]:
        """Cross-entropy of the classifier on latents z; return (loss, grads, logits, error at z)."""
        logits = network.classifier.forward(z)
        state = network.classifier.measure_state()
        reason = state.invalid_reason()
        if reason is not None:
            raise MeasurementError(f"invalid measurement, batch rejected: node 'classifier': {reason}")
        loss, error = context.loss(logits, labels)
        grads = network.classifier.local_gradient(state, error)
        return loss, grads, logits, network.classifier.input_gradient(state, error)

    @staticmethod
    def _training_outputs(network: NoPropNetwork, x_encoded: np.ndarray, context, **kwargs) -> np.ndarray:
        """Return the logits of the inference procedure on the training batch (for the training accuracy).

        The procedure's noise comes from a generator seeded by one draw of the rule's generator,
        so the training noise that follows does not depend on how much noise inference uses.
        """
        rng = np.random.default_rng(context.rng.integers(2**63))
        z = network.infer(x_encoded, rng, **kwargs)
        return network.classifier.forward(z)
