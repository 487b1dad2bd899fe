"""DigitalLinear's fused update path and its kernels, against plain NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pnn import _allocator
from pnn._validation_kernels import add_check_kernel, add_kernel
from pnn.errors import ConfigError, LimitError
from pnn.network import DigitalLinear


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(min_value=1e-3, max_value=3.0), n=st.integers(1, 50))
def test_kernels_match_numpy(seed, scale, n):
    rng = np.random.default_rng(seed)
    values = rng.uniform(-1, 1, n).astype(np.float32)
    delta = rng.normal(0, scale, n)
    lower, upper, tol = -1.5, 1.5, 1e-6
    target = values.astype(np.float64) + delta
    outside = (target < lower - tol) | (target > upper + tol)
    n_bad, n_range, worst = add_check_kernel(values, delta, lower, upper, tol)
    assert n_bad == 0
    assert n_range == int(np.count_nonzero(outside))
    if n_range:
        assert worst == pytest.approx(target[outside][np.argmax(np.abs(target[outside]))])
    expected = np.clip(target, lower, upper).astype(np.float32)
    before = values.copy()
    applied = np.empty(n)
    clamped = add_kernel(values, delta, lower, upper, applied)
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(applied, values.astype(np.float64) - before.astype(np.float64))
    assert clamped == int(np.count_nonzero((target < lower) | (target > upper)))


def test_check_kernel_counts_non_finite_changes():
    values = np.zeros(4, dtype=np.float32)
    n_bad, n_range, _ = add_check_kernel(values, np.array([0.1, np.nan, np.inf, -np.inf]), -1.0, 1.0, 0.0)
    assert (n_bad, n_range) == (3, 0)


def _layer() -> DigitalLinear:
    return DigitalLinear(5, 3, rng=0, weight_limit=1.0)


def test_update_outside_the_limits_writes_nothing():
    node = _layer()
    before = node.get_parameters()
    delta = {"weight": np.zeros((3, 5)), "bias": np.zeros(3)}
    delta["bias"][1] = 2.5  # the bias starts at 0, so this target is 2.5, outside +-1
    with pytest.raises(LimitError, match=r"bias.*1 value\(s\) outside the allowed range \[-1, 1\].*2\.5"):
        node.apply_update(delta)
    after = node.get_parameters()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_clip_limits_and_reports_applied():
    node = _layer()
    before = node.get_parameters()
    delta = {"weight": np.full((3, 5), 0.01), "bias": np.array([2.5, -0.5, -3.0])}
    applied = node.apply_update(delta, clip=True)
    after = node.get_parameters()
    np.testing.assert_allclose(after["bias"], [1.0, -0.5, -1.0], atol=1e-7)
    for name in before:
        np.testing.assert_array_equal(applied[name], after[name] - before[name])
        assert applied[name].dtype == np.float64


def test_non_finite_update_is_refused():
    node = _layer()
    with pytest.raises(LimitError, match="NaN or infinite"):
        node.apply_update({"bias": np.array([0.0, np.nan, 0.0])})


def test_wrong_shape_and_non_numbers_are_named():
    node = _layer()
    with pytest.raises(ConfigError, match=r"expected shape \(3,\), got \(4,\)"):
        node.apply_update({"bias": np.zeros(4)})
    with pytest.raises(ConfigError, match="expected numbers"):
        node.apply_update({"bias": ["a", "b", "c"]})


def test_integer_and_list_updates_are_accepted():
    node = _layer()
    before = node.get_parameters()["bias"]
    node.apply_update({"bias": [0, 1, 0]})
    node.apply_update({"bias": np.array([0.25, 0.0, 0.0])})
    np.testing.assert_allclose(node.get_parameters()["bias"], before + [0.25, 1.0, 0.0])


def test_allocator_thresholds_opt_out_and_set_once(monkeypatch):
    monkeypatch.setattr(_allocator, "_done", False)
    monkeypatch.setenv("PNN_DEFAULT_MALLOC", "1")
    assert _allocator.keep_freed_memory() is False
    # A second call does nothing, whatever the environment contains by then.
    monkeypatch.delenv("PNN_DEFAULT_MALLOC")
    assert _allocator.keep_freed_memory() is False


def test_update_reaches_weights_assigned_as_a_transposed_view():
    node = _layer()
    node.weight = np.ascontiguousarray(node.weight.T).T  # same values, Fortran order
    before = node.get_parameters()["weight"]
    node.apply_update({"weight": np.full((3, 5), 0.125)})
    np.testing.assert_allclose(node.get_parameters()["weight"], before + 0.125, atol=1e-7)
