"""Simulated nodes with a known transfer curve, for calibration tests.

:class:`TransferNode` reads ``y_k = f(x_k; p_k) + noise`` on every output channel ``k``, with
``f`` one of the calibration's transfer models and ``p_k`` known parameters, so a fit can be
compared with the truth. It models a DAC-to-ADC loop, a saturating amplifier or an
interferometer driven through its phase shifter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pnn.calibration.models import get_model
from pnn.nodes import Node, ParameterSpec


class TransferNode(Node):
    """A node whose output channel k reads ``model(x_k; truth[k]) + noise``.

    Parameters
    ----------
    model
        Transfer model name.
    truth
        True parameters, array of shape (n_channels, n_parameters).
    noise_std
        Standard deviation of the Gaussian read noise, in output units.
    lower, upper
        Input limits, in volts.
    seed
        Seed of the read noise.
    """

    def __init__(self, model: str, truth: np.ndarray, *, noise_std: float = 0.01, lower: float = -1.0,
                 upper: float = 1.0, seed: int = 0, name: str = "transfer") -> None:
        truth = np.atleast_2d(np.asarray(truth, dtype=np.float64))
        n = truth.shape[0]
        super().__init__(name, n, n, input_spec=ParameterSpec((n,), lower, upper, "V"), output_unit="V")
        self.model = get_model(model)
        self.truth = truth
        self.noise_std = float(noise_std)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        #: Readings to corrupt on the next forward passes: (row, channel, added value).
        self.glitches: list[tuple[int, int, float]] = []

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        y = self.model.function(x, *self.truth.T) + self.noise_std * self.rng.standard_normal(x.shape)
        for row, channel, value in self.glitches:
            if row < len(y):
                y[row, channel] += value
        self.glitches = []
        return y, x, {}

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(model=self.model.name, seed=self.seed, noise_std=self.noise_std)
        return info
