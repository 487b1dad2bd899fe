"""NoProp-FM: flow matching of the label embedding.

Li, Teh and Pascanu (2025), arXiv:2503.24322, flow-matching variant. With z_0 ~ N(0, I) and
t ~ U(0, 1), the latent z_t = t u_y + (1 - t) z_0 moves in a straight line from noise to the
label embedding at velocity u_y - z_0. One network v(z_t, x, t) learns that velocity:

    E_t || v(z_t, x, t) - (u_y - z_0) ||^2.

Inference integrates dz/dt = v(z, x, t) from z_0 ~ N(0, I) with T Euler steps and the
classifier reads z_1. The step's objective adds the classifier's cross-entropy on the one-step
estimate of the end point, z_1 ~ z_t + (1 - t) v(z_t, x, t), so the classifier learns on the
kind of latent inference gives it. That term also reaches the velocity network (through v) and
a learned embedding (through z_t), which keeps learned embeddings apart. It is still the loss
of one network, so no gradient crosses between networks.
"""

from __future__ import annotations

import numpy as np

from ..base import RuleContext, StepResult, register_rule
from ..losses import one_hot
from .common import NoPropRule
from .denoisers import N_TIME_FEATURES, build_denoiser, time_features
from .networks import FMNetwork

__all__ = ["NoPropFM"]


@register_rule
class NoPropFM(NoPropRule):
    """NoProp with flow matching; options as in :class:`~pnn.learning.noprop.common.NoPropRule`.

    T is the number of Euler steps at inference.
    """

    name = "noprop-fm"
    variant = "fm"

    @classmethod
    def build_network(cls, config, dataset) -> tuple[FMNetwork, None]:
        """Build the encoder, the velocity network, embedding and classifier."""
        settings = cls._settings(config)
        n_features = dataset.x_train.shape[1]
        probe = build_denoiser(settings._spec(config, "velocity", n_features, 1, 1, N_TIME_FEATURES, [config.seed, 1]))
        encoder = cls._encoder(probe.nodes[0].input_spec, config, dataset.x_train)
        embedding = settings._embedding(config, dataset, encoder)
        classifier = cls._classifier(config, embedding.dim, dataset.n_classes)
        velocity = build_denoiser(
            settings._spec(config, "velocity", n_features, embedding.dim, embedding.dim, N_TIME_FEATURES, [config.seed, 101])
        )
        return FMNetwork(encoder, embedding, classifier, velocity, steps=settings.T, seed=config.seed), None

    def compute(self, network: FMNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        x_encoded = network.encode(x)
        batch = len(labels)
        embeddings = network.embedding.matrix
        onehot = one_hot(labels, network.n_classes)
        u = onehot @ embeddings  # (batch, dim)
        velocity = network.denoiser
        learn_embedding = network.embedding.trainable
        gradients: dict[int, dict[str, np.ndarray]] = {}

        t = context.rng.uniform(0.0, 1.0, batch)
        z_0 = context.rng.standard_normal(u.shape)
        z_t = t[:, None] * u + (1.0 - t[:, None]) * z_0
        v_hat = velocity.forward(velocity.features(x_encoded), z_t, time_features(t))
        diff = v_hat - (u - z_0)
        flow = float(np.mean(np.sum(diff * diff, axis=1)))

        end_estimate = z_t + (1.0 - t[:, None]) * v_hat
        ce, classifier_grads, _, end_error = self._classify(network, end_estimate, labels, context)
        gradients[network.index_of("classifier")] = classifier_grads

        # Error at v: the flow term's, plus the cross-entropy's through the end estimate.
        flow_error = 2.0 * diff
        node_grads, z_error = velocity.backward(flow_error + (1.0 - t[:, None]) * end_error, want_z_error=learn_embedding)
        for name, grads in node_grads.items():
            gradients[network.index_of(name)] = grads

        if learn_embedding:
            # u enters the target u - z_0, and z_t (as t u) both inside v and in the end estimate.
            per_example = -flow_error + t[:, None] * (z_error + end_error)
            gradients[network.index_of(network.embedding.name)] = {"weight": onehot.T @ per_example / batch}

        outputs = self._training_outputs(network, x_encoded, context)
        extras = {"flow_loss": flow, "classifier_loss": ce}
        return StepResult(loss=flow + ce, outputs=outputs, gradients=gradients, extras=extras)
