"""NoProp-DT blocks: the per-block loss, its gradients, and the inference recursion.

Each block t is trained on its own loss, with z_{t-1} drawn directly from q(z_{t-1} | y) rather
than produced by the blocks before it:

    L_t = w_t * mean_i || u_hat_t(z_{t-1,i}, x_i) - u_{y_i} ||^2,
    w_t = (T eta / 2) (SNR(t) - SNR(t-1)),

where the block outputs class logits and u_hat is their softmax-weighted sum of the label
embeddings (Li, Teh and Pascanu 2025, arXiv:2503.24322). :func:`train_block` evaluates one
block's loss and gradients touching only that block's nodes; :class:`LocalBlocks` holds every
block in this process, and :class:`~pnn.learning.noprop.parallel.BlockPool` spreads them over
worker processes with the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .denoisers import Denoiser
from .schedules import denoising_step

__all__ = ["BlockOutcome", "LocalBlocks", "train_block", "simplex_prediction", "simplex_backward", "denoise_range"]


@dataclass
class BlockOutcome:
    """Result of training one block on one batch.

    Attributes
    ----------
    loss
        The block's weighted loss L_t on the batch.
    gradients
        Batch-mean gradient per parameter, by node name; None when the block lives in a worker
        process that keeps its gradients until the update is committed.
    embedding_gradient
        Gradient of L_t with respect to the embedding matrix through the prediction and the
        target, array (n_classes, dim); None unless requested.
    z_error
        Per-example derivative of the block's per-example loss at its input z_{t-1}, array
        (batch, dim); None unless requested.
    """

    loss: float
    gradients: dict[str, dict[str, np.ndarray]] | None
    embedding_gradient: np.ndarray | None = None
    z_error: np.ndarray | None = None


def simplex_prediction(logits: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (class probabilities, u_hat = probabilities @ embeddings) from logits (batch, n_classes)."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    return p, p @ embeddings


def simplex_backward(p: np.ndarray, embeddings: np.ndarray, u_error: np.ndarray) -> np.ndarray:
    """Return the per-example error at the logits for an error ``u_error`` (batch, dim) at u_hat."""
    g = u_error @ embeddings.T  # (batch, n_classes), error at the probabilities
    return p * (g - np.sum(p * g, axis=1, keepdims=True))


def train_block(
    denoiser: Denoiser,
    x: np.ndarray,
    z_in: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray,
    weight: float,
    want_embedding_gradient: bool,
) -> tuple[BlockOutcome, np.ndarray]:
    """Evaluate one block's loss and gradients; return (outcome, the block's features of x).

    Parameters
    ----------
    denoiser
        The block.
    x
        Encoded inputs, array (batch, n_features).
    z_in
        Noisy latents z_{t-1} drawn from q(z_{t-1} | y), array (batch, dim).
    labels
        Integer labels, array (batch,).
    embeddings
        Label embeddings, array (n_classes, dim).
    weight
        The block's loss weight w_t.
    want_embedding_gradient
        Also return the gradient for a learned embedding (and the error at z_{t-1}).

    Raises
    ------
    MeasurementError
        If a node of the block measured an invalid value.
    """
    features = denoiser.features(x)
    logits = denoiser.forward(features, z_in)
    p, u_hat = simplex_prediction(logits, embeddings)
    diff = u_hat - embeddings[labels]  # (batch, dim)
    loss = float(weight * np.mean(np.sum(diff * diff, axis=1)))

    u_error = 2.0 * weight * diff  # per-example derivative of the loss at u_hat
    grads, z_error = denoiser.backward(simplex_backward(p, embeddings, u_error), want_embedding_gradient)

    embedding_gradient = None
    if want_embedding_gradient:
        # u_hat = p @ E and the target is E[y], so dL/dE = (p - onehot(y))^T u_error / batch.
        p[np.arange(len(labels)), labels] -= 1.0
        embedding_gradient = p.T @ u_error / len(labels)
    return BlockOutcome(loss, grads, embedding_gradient, z_error), features


def denoise_range(
    denoisers: list[Denoiser],
    features: list[np.ndarray],
    z: np.ndarray,
    noise: np.ndarray | None,
    coefficients: tuple[np.ndarray, np.ndarray, np.ndarray],
    embeddings: np.ndarray,
) -> np.ndarray:
    """Run consecutive steps of the inference recursion and return the last latent.

    ``denoisers[k]``, ``features[k]``, ``noise[k]`` and the k-th entries of ``coefficients``
    (a, b, c) belong to the same step; ``noise=None`` takes posterior means.

    Raises
    ------
    MeasurementError
        If a block measured an invalid value.
    """
    a, b, c = coefficients
    for k, denoiser in enumerate(denoisers):
        logits = denoiser.forward(features[k], z)
        _, u_hat = simplex_prediction(logits, embeddings)
        z = denoising_step(z, u_hat, a[k], b[k], c[k], None if noise is None else noise[k])
    return z


class LocalBlocks:
    """Every block in this process; the controller's optimizers update their nodes.

    Parameters
    ----------
    denoisers
        One denoiser per step, block 1 first.
    """

    def __init__(self, denoisers: list[Denoiser]) -> None:
        self.denoisers = list(denoisers)
        self._features: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.denoisers)

    @property
    def nodes(self) -> list:
        """Every block's nodes, block 1 first."""
        return [node for denoiser in self.denoisers for node in denoiser.nodes]

    def train(self, x, labels, z_inputs, embeddings, weights, want_embedding_gradient) -> list[BlockOutcome]:
        """Train-step every block: ``z_inputs`` is an array (T, batch, dim), ``weights`` (T,)."""
        outcomes, features = [], []
        for t, denoiser in enumerate(self.denoisers):
            outcome, feats = train_block(
                denoiser, x, z_inputs[t], labels, embeddings, float(weights[t]), want_embedding_gradient
            )
            outcomes.append(outcome)
            features.append(feats)
        self._features = features
        return outcomes

    def commit(self, lr: float) -> int:
        """Nothing to do: the controller applied the updates. Returns 0 clipped values."""
        return 0

    def infer(self, x, z0, noise, coefficients, embeddings, reuse_features: bool = False) -> np.ndarray:
        """Run the whole recursion from z_0 (batch, dim) and return z_T.

        ``reuse_features`` takes each block's features of x from the last :meth:`train` call,
        which is valid only while the parameters have not changed since.
        """
        if reuse_features and self._features is not None:
            features = self._features
        else:
            features = [denoiser.features(x) for denoiser in self.denoisers]
        return denoise_range(self.denoisers, features, z0, noise, coefficients, embeddings)
