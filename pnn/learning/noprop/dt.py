"""NoProp-DT: T blocks, each trained only on denoising its own noisy label.

Li, Teh and Pascanu (2025), "NoProp: Training Neural Networks without Back-propagation or
Forward-propagation", arXiv:2503.24322. Per batch, every block t gets z_{t-1} sampled directly
from q(z_{t-1} | y) = N(sqrt(alpha_bar_{t-1}) u_y, (1 - alpha_bar_{t-1}) I), so no block waits
for another and no forward pass runs through the whole network. The objective is

    sum_t (T eta / 2) (SNR(t) - SNR(t-1)) E || u_hat_t(z_{t-1}, x) - u_y ||^2
    + cross-entropy of the classifier on z_T ~ q(z_T | y)
    + KL(q(z_0 | y) || N(0, I)),

where block t's term reaches only block t's parameters (and a learned embedding, which every
term shares). Inference starts from z_0 ~ N(0, I) and applies
z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps before the classifier reads z_T.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import ConfigError
from ..base import RuleContext, StepResult, register_rule
from ..losses import one_hot
from .blocks import LocalBlocks
from .common import NoPropRule, kl_to_standard_normal
from .denoisers import build_denoiser
from .networks import DTNetwork
from .parallel import BlockPool
from .schedules import cosine_alpha_bar, snr

__all__ = ["NoPropDT", "block_weights"]


def block_weights(alpha_bar: np.ndarray, eta: float, cap: float | None = None) -> np.ndarray:
    """Return each block's loss weight (T eta / 2)(SNR(t) - SNR(t-1)), optionally capped, shape (T,).

    The SNR difference of the last step is near 1e4 under the capped cosine schedule and below
    1 for the first steps. Each block has its own optimizer, so with Adam the weight mostly
    matters for a learned embedding, which every block's loss reaches.
    """
    T = len(alpha_bar) - 1
    difference = np.diff(snr(alpha_bar))
    if cap is not None:
        difference = np.minimum(difference, cap)
    return 0.5 * T * eta * difference


@register_rule
class NoPropDT(NoPropRule):
    """NoProp with discrete time: T independently trained denoising blocks.

    Parameters
    ----------
    T, embedding, embedding_dim, learn_embedding, block, z_scale
        See :class:`~pnn.learning.noprop.common.NoPropRule`.
    eta
        Scale of the denoising terms (the paper's eta; 0.1 by default).
    snr_weight_cap
        Largest SNR difference used in a block's weight; None leaves the weights as derived.
        The default 1 changes only the last few blocks' weights (their differences reach 1e4),
        which would otherwise set a learned embedding alone: on the vowels, a learned
        embedding reached 92 and 96 % test accuracy with the cap at 1 and 69 and 35 % without
        it (two seeds, T = 5). Each block has its own optimizer, so under Adam the cap leaves
        the blocks' own updates nearly unchanged.
    inference_noise
        Sample the recursion's noise at inference, as the paper's recursion does. The default
        False takes posterior means (z_0 is still drawn from N(0, I)), which classified better:
        the same MNIST model (MLP blocks, 30 epochs) reached 98.53 % test accuracy with
        posterior means and 98.33 % with sampled noise. Training does not depend on this
        setting.
    workers
        Number of worker processes that train the blocks in parallel; 0 trains them in this
        process.
    """

    name = "noprop-dt"
    variant = "dt"

    def __init__(
        self,
        T: int = 10,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        learn_embedding: bool | None = None,
        block: str | None = None,
        z_scale: float = 3.0,
        eta: float = 0.1,
        snr_weight_cap: float | None = 1.0,
        inference_noise: bool = False,
        workers: int = 0,
    ) -> None:
        super().__init__(T, embedding, embedding_dim, learn_embedding, block, z_scale)
        self.eta = self._positive("eta", eta)
        self.snr_weight_cap = self._positive("snr_weight_cap", snr_weight_cap, allow_none=True)
        if not isinstance(inference_noise, bool):
            raise ConfigError(f"inference_noise must be true or false, got {inference_noise!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers must be a non-negative integer (0: no worker processes), got {workers!r}")
        if workers > self.T:
            raise ConfigError(f"workers = {workers} exceeds the T = {self.T} blocks; use at most {self.T}")
        self.inference_noise = inference_noise
        self.workers = workers
        self.weights_ = block_weights(cosine_alpha_bar(self.T), self.eta, self.snr_weight_cap)

    @classmethod
    def build_network(cls, config, dataset) -> tuple[DTNetwork, None]:
        """Build the encoder, T blocks (here or in worker processes), embedding and classifier."""
        settings = cls._settings(config)
        n_features = dataset.x_train.shape[1]
        probe = settings._spec(config, "block1", n_features, 1, dataset.n_classes, 0, [config.seed, 1])
        # The encoder needs the blocks' input range, which one block shows.
        first = build_denoiser(probe)
        encoder = cls._encoder(first.nodes[0].input_spec, config, dataset.x_train)
        for node in first.nodes:
            node.close()
        embedding = settings._embedding(config, dataset, encoder)
        classifier = cls._classifier(config, embedding.dim, dataset.n_classes)
        specs = [
            settings._spec(config, f"block{t}", n_features, embedding.dim, dataset.n_classes, 0, [config.seed, 100 + t])
            for t in range(1, settings.T + 1)
        ]
        if settings.workers:
            blocks = BlockPool(specs, settings.workers)
        else:
            blocks = LocalBlocks([build_denoiser(spec) for spec in specs])
        try:
            network = DTNetwork(
                encoder, embedding, classifier, blocks, seed=config.seed, inference_noise=settings.inference_noise
            )
        except BaseException:
            if settings.workers:
                blocks.close()
            raise
        return network, None

    def check(self, network) -> None:
        super().check(network)
        if network.parallel != bool(self.workers):
            where = "in worker processes" if network.parallel else "in this process"
            raise ConfigError(f"rule {self.name!r} has workers = {self.workers} but the network's blocks live {where}")

    def setup(self, network: DTNetwork, context: RuleContext) -> None:
        self.check(network)
        self.weights_ = block_weights(network.alpha_bar, self.eta, self.snr_weight_cap)
        if network.parallel:
            if not context.optimizers:
                raise ConfigError(
                    f"rule {self.name!r} with workers needs the controller's optimizers to copy for its blocks"
                )
            template = copy.deepcopy(next(iter(context.optimizers.values())))
            # A fresh copy: a resumed run restores the moments through load_state_dict.
            template.load_state_dict({})
            network.blocks.setup(template, context.clip_updates)
            self._network = network
            # The pool counts its clips since it started; this run's count starts here.
            self._clipped_offset = -network.blocks.clipped
        else:
            self._network = None

    def compute(self, network: DTNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        x_encoded = network.encode(x)
        batch, T = len(labels), network.steps
        embeddings = network.embedding.matrix
        onehot = one_hot(labels, network.n_classes)
        u = onehot @ embeddings  # (batch, dim)
        alpha_bar = network.alpha_bar
        learn_embedding = network.embedding.trainable

        # z_{t-1} ~ q(z_{t-1} | y) for every block, and z_T for the classifier: (T + 1, batch, dim).
        noise = context.rng.standard_normal((T + 1, batch, u.shape[1]))
        scale = np.sqrt(alpha_bar)[:, None, None]
        spread = np.sqrt(1.0 - alpha_bar)[:, None, None]
        latents = scale * u[None] + spread * noise

        outcomes = network.blocks.train(x_encoded, labels, latents[:T], embeddings, self.weights_, learn_embedding)

        gradients: dict[int, dict[str, np.ndarray]] = {}
        extras: dict[str, float] = {}
        total = 0.0
        for t, outcome in enumerate(outcomes, start=1):
            extras[f"block_{t}_loss"] = outcome.loss
            total += outcome.loss
            for name, grads in (outcome.gradients or {}).items():
                gradients[network.index_of(name)] = grads

        ce, classifier_grads, _, z_error = self._classify(network, latents[T], labels, context)
        gradients[network.index_of("classifier")] = classifier_grads
        kl, kl_gradient = kl_to_standard_normal(alpha_bar[0], u)
        extras.update(classifier_loss=ce, kl=kl)

        if learn_embedding:
            # Sum in block order so that any number of workers gives the same result.
            grad = np.zeros_like(embeddings)
            for t, outcome in enumerate(outcomes, start=1):
                grad += outcome.embedding_gradient + np.sqrt(alpha_bar[t - 1]) * onehot.T @ outcome.z_error / batch
            grad += np.sqrt(alpha_bar[T]) * onehot.T @ z_error / batch
            grad += onehot.T @ kl_gradient
            gradients[network.index_of(network.embedding.name)] = {"weight": grad}

        if network.parallel:
            # Values the workers clipped at their limits so far (the controller counts its own).
            extras["worker_clipped"] = float(self._clipped_offset + network.blocks.clipped)
        outputs = self._training_outputs(network, x_encoded, context, reuse_features=True)
        return StepResult(loss=total + ce + kl, outputs=outputs, gradients=gradients, extras=extras)

    def after_update(self, network: DTNetwork, context: RuleContext) -> None:
        if network.parallel:
            lr = next(iter(context.optimizers.values())).lr
            network.blocks.commit(lr)

    def state_dict(self) -> dict[str, Any]:
        network = getattr(self, "_network", None)
        if network is None:
            return {}
        optimizers = network.blocks.optimizer_states()  # applies a pending update first
        return {"worker_optimizers": optimizers, "worker_clipped": self._clipped_offset + network.blocks.clipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        network = getattr(self, "_network", None)
        if network is not None:
            network.blocks.load_optimizer_states(state["worker_optimizers"])
            self._clipped_offset = int(state["worker_clipped"]) - network.blocks.clipped

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            eta=self.eta, snr_weight_cap=self.snr_weight_cap, inference_noise=self.inference_noise,
            workers=self.workers, block_weights=self.weights_.tolist(),
        )
        return info
