"""Property: no sequence of updates leaves a parameter's limits or exceeds its maximum step."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnn.errors import LimitError
from pnn.simulators.crossbar import CROSSBAR_PRESETS, CrossbarNode

from .node_factories import NODE_FACTORIES

# Each update is a random array scaled to between 1e-3 and 10 times the parameter's max step
# (or its range, where the step is unlimited), so both small and far too large requests occur.
update_scales = st.lists(st.floats(min_value=1e-3, max_value=10.0), min_size=1, max_size=25)


def scale_of(spec):
    span = float(np.max(spec.upper_array - spec.lower_array))
    return spec.max_step if np.isfinite(spec.max_step) else min(span, 10.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scales=update_scales, seed=st.integers(0, 2**16), clip=st.booleans(),
       factory=st.sampled_from(sorted(NODE_FACTORIES)))
def test_updates_stay_within_limits(scales, seed, clip, factory):
    node = NODE_FACTORIES[factory]()
    rng = np.random.default_rng(seed)
    try:
        for scale in scales:
            before = node.get_parameters()
            delta = {name: rng.normal(0, scale * scale_of(spec), spec.shape) for name, spec in node.parameters.items()}
            try:
                applied = node.apply_update(delta, clip=clip)
            except LimitError:
                assert not clip
                after = node.get_parameters()
                for name in before:
                    np.testing.assert_array_equal(after[name], before[name])
                continue
            after = node.get_parameters()
            for name, spec in node.parameters.items():
                tol = spec.tolerance()
                assert np.all(after[name] >= spec.lower_array - tol)
                assert np.all(after[name] <= spec.upper_array + tol)
                assert np.all(np.abs(after[name] - before[name]) <= spec.max_step * (1 + 1e-9) + tol)
                np.testing.assert_allclose(applied[name], after[name] - before[name], atol=1e-9)
    finally:
        node.close()


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=24, max_size=24))
def test_set_never_writes_out_of_range(values):
    node = CrossbarNode(6, 4, rng=0, config=CROSSBAR_PRESETS["default"])
    spec = node.parameters["weight"]
    request = np.asarray(values).reshape(4, 6)
    inside = np.all((request >= spec.lower_array) & (request <= spec.upper_array))
    before = node.get_parameters()["weight"]
    try:
        applied = node.set_parameters({"weight": request})
    except LimitError:
        assert not inside
        np.testing.assert_array_equal(node.get_parameters()["weight"], before)
    else:
        assert np.all(np.abs(applied["weight"]) <= node.w_max + spec.tolerance())
