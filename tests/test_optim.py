"""Optimizer kernels against the textbook NumPy formulas, and learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pnn.errors import ConfigError
from pnn.learning.optim import SGD, Adam, lr_at_epoch, make_optimizer


def test_adam_matches_formula(rng):
    adam = Adam(0.01, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.1)
    params = rng.normal(size=(4, 5))
    m = np.zeros_like(params)
    v = np.zeros_like(params)
    for t in range(1, 6):
        grad = rng.normal(size=(4, 5))
        step = adam.step({"w": grad}, {"w": params})["w"]
        m = 0.8 * m + 0.2 * grad
        v = 0.99 * v + 0.01 * grad**2
        expected = -0.01 * (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-7) - 0.01 * 0.1 * params
        np.testing.assert_allclose(step, expected, rtol=1e-12)
        params = params + step


def test_sgd_momentum_matches_formula(rng):
    sgd = SGD(0.1, momentum=0.5, weight_decay=0.01)
    params = rng.normal(size=7)
    velocity = None
    for _ in range(4):
        grad = rng.normal(size=7)
        step = sgd.step({"b": grad}, {"b": params})["b"]
        g = grad + 0.01 * params
        velocity = g if velocity is None else 0.5 * velocity + g
        np.testing.assert_allclose(step, -0.1 * velocity, rtol=1e-12)


def test_state_round_trip(rng):
    adam = Adam(0.01)
    adam.step({"w": rng.normal(size=3)})
    copy = Adam(0.01)
    copy.load_state_dict(adam.state_dict())
    grad = rng.normal(size=3)
    np.testing.assert_array_equal(copy.step({"w": grad})["w"], adam.step({"w": grad})["w"])


def test_cosine_schedule():
    assert lr_at_epoch(1.0, 0, 10, "cosine") == 1.0
    assert lr_at_epoch(1.0, 5, 10, "cosine") == pytest.approx(0.5)
    assert lr_at_epoch(1.0, 9, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at_epoch(0.3, 7, 10, "constant") == 0.3


def test_bad_settings():
    with pytest.raises(ConfigError, match="learning rate must be a positive number"):
        Adam(0.0)
    with pytest.raises(ConfigError, match="momentum must be in"):
        SGD(0.1, momentum=1.0)
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", 0.1)
    with pytest.raises(ConfigError, match="unknown learning-rate schedule"):
        lr_at_epoch(0.1, 0, 10, "step")
