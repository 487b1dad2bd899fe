"""Noise schedules of NoProp and the Gaussian posterior step of its inference recursion.

NoProp (Li, Teh and Pascanu 2025, "NoProp: Training Neural Networks without Back-propagation
or Forward-propagation", arXiv:2503.24322) counts time from noise to label: z_0 is pure noise and
z_T the cleanest latent, with marginals q(z_t | y) = N(sqrt(alpha_bar_t) u_y, (1 - alpha_bar_t) I).
The signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t) therefore increases with t.

- :func:`cosine_alpha_bar`: the fixed cosine schedule of NoProp-DT.
- :func:`posterior_coefficients` and :func:`denoising_step`: one step of the inference
  recursion, z_t = a_t u_hat + b_t z_{t-1} + sqrt(c_t) eps.
- :class:`LearnedSchedule`: the learned, strictly monotone log-SNR schedule of NoProp-CT.

Schedules are float64 throughout; the latents they produce are float64 too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...nodes import Node, NodeState, ParameterSpec

__all__ = [
    "cosine_alpha_bar",
    "snr",
    "posterior_coefficients",
    "denoising_step",
    "check_steps",
    "LearnedSchedule",
    "sigmoid",
]

#: Largest alpha_bar of the cosine schedule. The unclipped schedule reaches 1 at t = T, where the
#: SNR is infinite; 1 - 1e-4 caps SNR(T) near 1e4.
MAX_ALPHA_BAR = 1.0 - 1e-4


def check_steps(T: Any, label: str = "T") -> int:
    """Return ``T`` as an int, or raise ConfigError unless it is an integer of at least 2."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 2:
        raise ConfigError(
            f"{label} must be an integer of at least 2 (the number of denoising steps), got {T!r}"
        )
    return int(T)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Return the logistic function of ``x``, without overflow for large ``|x|``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def cosine_alpha_bar(T: int, *, offset: float = 0.008, max_alpha_bar: float = MAX_ALPHA_BAR) -> np.ndarray:
    """Return alpha_bar_t for t = 0..T under the cosine schedule, array of shape (T + 1,).

    With tau = 1 - t / T (tau = 1 is pure noise), alpha_bar = f(tau) / f(0) where
    f(tau) = cos^2(pi/2 (tau + offset) / (1 + offset)) (Nichol and Dhariwal 2021, "Improved
    denoising diffusion probabilistic models", ICML). alpha_bar_0 is exactly 0, so z_0 ~ N(0, I)
    is exactly q(z_0 | y), and values are capped at ``max_alpha_bar``.

    Raises
    ------
    ConfigError
        If T is below 2, or so large that the cap makes two steps equal (SNR not strictly
        increasing).
    """
    T = check_steps(T)
    if not 0.0 < max_alpha_bar < 1.0:
        raise ConfigError(f"max_alpha_bar must lie in (0, 1), got {max_alpha_bar}")
    tau = 1.0 - np.arange(T + 1) / T
    f = np.cos(0.5 * math.pi * (tau + offset) / (1.0 + offset)) ** 2
    alpha_bar = np.minimum(f / f[-1], max_alpha_bar)
    alpha_bar[0] = 0.0
    if not np.all(np.diff(alpha_bar) > 0):
        first = int(np.argmax(np.diff(alpha_bar) <= 0)) + 1
        raise ConfigError(
            f"T = {T} is too large for the cosine schedule capped at alpha_bar = {max_alpha_bar}: "
            f"steps {first} and {first + 1} have the same noise level; use a smaller T"
        )
    return alpha_bar


def snr(alpha_bar: np.ndarray) -> np.ndarray:
    """Return the signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    alpha_bar = np.asarray(alpha_bar, dtype=np.float64)
    return alpha_bar / (1.0 - alpha_bar)


def posterior_coefficients(alpha_bar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the coefficients (a, b, c) of q(z_t | z_{t-1}, y), each of shape (T,).

    Entry t - 1 belongs to step t = 1..T. With alpha_{t-1} = alpha_bar_{t-1} / alpha_bar_t, the
    Gaussian posterior of the cleaner latent given the noisier one and the label is
    N(a_t u_y + b_t z_{t-1}, c_t I) with

        a_t = sqrt(alpha_bar_t) (1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})
        b_t = sqrt(alpha_{t-1}) (1 - alpha_bar_t) / (1 - alpha_bar_{t-1})
        c_t = (1 - alpha_bar_t) (1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})

    Parameters
    ----------
    alpha_bar
        Strictly increasing values in [0, 1), array of shape (T + 1,).
    """
    alpha_bar = np.asarray(alpha_bar, dtype=np.float64)
    if alpha_bar.ndim != 1 or alpha_bar.size < 3:
        raise ConfigError(f"alpha_bar must be a 1-D array of at least 3 values, got shape {alpha_bar.shape}")
    if not (np.all(np.diff(alpha_bar) > 0) and alpha_bar[0] >= 0 and alpha_bar[-1] < 1):
        raise ConfigError("alpha_bar must increase strictly within [0, 1)")
    before, after = alpha_bar[:-1], alpha_bar[1:]
    alpha = before / after
    a = np.sqrt(after) * (1.0 - alpha) / (1.0 - before)
    b = np.sqrt(alpha) * (1.0 - after) / (1.0 - before)
    c = (1.0 - after) * (1.0 - alpha) / (1.0 - before)
    return a, b, c


def denoising_step(
    z_prev: np.ndarray, u_hat: np.ndarray, a: float, b: float, c: float, noise: np.ndarray | None
) -> np.ndarray:
    """Return z_t = a u_hat + b z_{t-1} + sqrt(c) noise, arrays of shape (batch, d).

    ``noise=None`` takes the posterior mean (no sampling).
    """
    z = a * u_hat + b * z_prev
    if noise is not None:
        z = z + math.sqrt(c) * noise
    return z


class LearnedSchedule(Node):
    """A learned, strictly increasing log-SNR schedule on t in [0, 1] (NoProp-CT).

    ``log SNR(t) = log_snr_min + (log_snr_max - log_snr_min) F(t)``, where F rises piecewise
    linearly from F(0) = 0 to F(1) = 1 over ``n_segments`` equal segments. The rise of segment k
    is ``0.05 / K + 0.95 softmax(segment_logits)_k``. Every rise is positive and ``log_snr_min`` and
    ``log_snr_max`` have disjoint limits (below -1 and above 1), so the schedule increases
    strictly for any parameter values the limits allow. The schedule starts linear in log SNR.
    Learning a schedule jointly with the model follows Kingma et al. (2021, "Variational
    diffusion models", NeurIPS), who parameterise it with a monotone network instead.

    As a node, ``forward`` maps times of shape (batch, 1) to log SNR of shape (batch, 1).

    Parameters
    ----------
    n_segments
        Number of linear pieces of F.
    log_snr_min, log_snr_max
        Initial log SNR at t = 0 and t = 1.
    """

    gradient_method = "exact"

    #: Share of the total rise spread evenly over the segments.
    MIN_RISE_SHARE = 0.05

    def __init__(
        self, n_segments: int = 16, *, log_snr_min: float = -7.0, log_snr_max: float = 7.0, name: str = "schedule"
    ) -> None:
        super().__init__(
            name, 1, 1, input_spec=ParameterSpec((1,), 0.0, 1.0, "1", description="time, 0 = noise, 1 = label"),
            output_unit="1", dtype=np.float64,
        )
        if isinstance(n_segments, bool) or not isinstance(n_segments, (int, np.integer)) or n_segments < 1:
            raise ConfigError(f"schedule n_segments must be a positive integer, got {n_segments!r}")
        if not -15.0 <= log_snr_min <= -1.0:
            raise ConfigError(f"log_snr_min must lie in [-15, -1], got {log_snr_min}")
        if not 1.0 <= log_snr_max <= 15.0:
            raise ConfigError(f"log_snr_max must lie in [1, 15], got {log_snr_max}")
        self.n_segments = int(n_segments)
        # Limits: the end points may move but never cross, and the logits stay where softmax
        # is well conditioned.
        self._specs = {
            "segment_logits": ParameterSpec((self.n_segments,), -20.0, 20.0, "1", description="log rise of each segment"),
            "log_snr_min": ParameterSpec((1,), -15.0, -1.0, "1", description="log SNR at t = 0"),
            "log_snr_max": ParameterSpec((1,), 1.0, 15.0, "1", description="log SNR at t = 1"),
        }
        self.values = {
            "segment_logits": np.zeros(self.n_segments),
            "log_snr_min": np.array([float(log_snr_min)]),
            "log_snr_max": np.array([float(log_snr_max)]),
        }

    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return self.values

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in values.items():
            self.values[name] = np.array(value, dtype=np.float64).reshape(self._specs[name].shape)
        return {name: self.values[name].copy() for name in values}

    # ------------------------------------------------------------------------------ evaluation
    def _softmax(self) -> np.ndarray:
        logits = self.values["segment_logits"]
        e = np.exp(logits - logits.max())
        return e / e.sum()

    def _rises(self) -> np.ndarray:
        # A floor of MIN_RISE_SHARE / K per segment keeps every rise far above rounding, so the
        # schedule increases strictly in floating point too, whatever the logits.
        return self.MIN_RISE_SHARE / self.n_segments + (1.0 - self.MIN_RISE_SHARE) * self._softmax()

    def _locate(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return (segment index, position in segment in [0, 1], F(t), rises) for times ``t``."""
        t = np.asarray(t, dtype=np.float64)
        if np.any((t < 0) | (t > 1)) or not np.all(np.isfinite(t)):
            raise ConfigError("schedule times must lie in [0, 1]")
        rises = self._rises()
        scaled = t * self.n_segments
        segment = np.minimum(scaled.astype(np.int64), self.n_segments - 1)
        within = scaled - segment
        before = np.concatenate([[0.0], np.cumsum(rises)[:-1]])
        F = before[segment] + rises[segment] * within
        return segment, within, F, rises

    def log_snr(self, t: np.ndarray) -> np.ndarray:
        """Return log SNR(t) for times in [0, 1], same shape as ``t``."""
        _, _, F, _ = self._locate(t)
        low, high = self.values["log_snr_min"][0], self.values["log_snr_max"][0]
        return low + (high - low) * F

    def alpha_bar(self, t: np.ndarray) -> np.ndarray:
        """Return alpha_bar(t) = sigmoid(log SNR(t))."""
        return sigmoid(self.log_snr(t))

    def snr_derivative(self, t: np.ndarray) -> np.ndarray:
        """Return dSNR/dt at times ``t``; positive everywhere."""
        segment, _, F, rises = self._locate(t)
        low, high = self.values["log_snr_min"][0], self.values["log_snr_max"][0]
        lam = low + (high - low) * F
        return np.exp(lam) * (high - low) * self.n_segments * rises[segment]

    def log_snr_gradient(self, t: np.ndarray, upstream: np.ndarray) -> dict[str, np.ndarray]:
        """Return the gradient of sum_i upstream_i * log SNR(t_i) with respect to each parameter."""
        segment, within, F, rises = self._locate(t)
        upstream = np.asarray(upstream, dtype=np.float64)
        span = self.values["log_snr_max"][0] - self.values["log_snr_min"][0]
        # dF_i/drise_k is 1 for segments before t_i's, the position within it for its own.
        dF = np.zeros(self.n_segments)
        counts = np.bincount(segment, weights=upstream, minlength=self.n_segments)
        dF += np.cumsum(counts[::-1])[::-1] - counts  # sum over examples in later segments
        dF += np.bincount(segment, weights=upstream * within, minlength=self.n_segments)
        return {
            "segment_logits": self._softmax_backward(rises, span * dF),
            "log_snr_min": np.array([float(np.sum(upstream * (1.0 - F)))]),
            "log_snr_max": np.array([float(np.sum(upstream * F))]),
        }

    def snr_derivative_gradient(self, t: np.ndarray, upstream: np.ndarray) -> dict[str, np.ndarray]:
        """Return the gradient of sum_i upstream_i * dSNR/dt(t_i) with respect to each parameter.

        dSNR/dt = exp(lambda) * span * K * rise_j, with lambda the log SNR, span =
        log_snr_max - log_snr_min, K segments and j the segment of t.
        """
        segment, within, F, rises = self._locate(t)
        upstream = np.asarray(upstream, dtype=np.float64)
        low, high = self.values["log_snr_min"][0], self.values["log_snr_max"][0]
        span = high - low
        lam = low + span * F
        value = np.exp(lam) * span * self.n_segments * rises[segment]
        # Through lambda (every parameter), then through span and the rise of t's own segment.
        grads = self.log_snr_gradient(t, upstream * value)
        per_span = upstream * np.exp(lam) * self.n_segments * rises[segment]
        grads["log_snr_min"] -= np.sum(per_span)
        grads["log_snr_max"] += np.sum(per_span)
        d_rise = np.bincount(
            segment, weights=upstream * np.exp(lam) * span * self.n_segments, minlength=self.n_segments
        )
        grads["segment_logits"] += self._softmax_backward(rises, d_rise)
        return grads

    def _softmax_backward(self, rises: np.ndarray, d_rises: np.ndarray) -> np.ndarray:
        """Return the gradient at the logits for a gradient ``d_rises`` at the rises."""
        share = self._softmax()
        d_share = (1.0 - self.MIN_RISE_SHARE) * d_rises
        return share * (d_share - np.dot(share, d_share))

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        return self.log_snr(x.astype(np.float64)), x, {}

    def local_gradient(self, state: NodeState, output_error: np.ndarray, *, at: str = "output") -> dict[str, np.ndarray]:
        """Return the batch-mean gradient for an error at the log-SNR output."""
        error = self.check_error(state, output_error, at=at)
        grads = self.log_snr_gradient(state.inputs[:, 0], error[:, 0])
        return {name: value / error.shape[0] for name, value in grads.items()}

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info["n_segments"] = self.n_segments
        return info
