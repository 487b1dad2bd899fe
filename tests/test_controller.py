"""The controller rejects batches with invalid measurements and stops after too many."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.controller import PhysicalNoProp, TrainingStopped
from pnn.errors import MeasurementError
from pnn.learning import DFA
from pnn.network import DigitalLinear, PhysicalNetwork, Readout
from pnn.runs import RunDir


class FlakyLinear(DigitalLinear):
    """A digital layer whose forward passes listed in ``fail_on`` return NaN, like an overrange.

    Passes listed in ``corrupt_on`` raise MeasurementError instead, like a reply whose checksum
    does not match.
    """

    def __init__(self, *args, fail_on: set[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_on = fail_on
        self.corrupt_on: set[int] = set()
        self.calls = 0

    def _forward(self, x):
        self.calls += 1
        if self.calls in self.corrupt_on:
            raise MeasurementError(f"node {self.name!r}: corrupted reply")
        outputs, applied, probes = super()._forward(x)
        if self.calls in self.fail_on:
            outputs = np.full_like(outputs, np.nan)
        return outputs, applied, probes


def network_with_flaky_middle(fail_on):
    flaky = FlakyLinear(4, 8, rng=0, name="flaky", fail_on=fail_on, dtype=np.float64)
    out = DigitalLinear(8, 3, activation="linear", rng=1, name="out", dtype=np.float64)
    return PhysicalNetwork([flaky, out, Readout(3)]), flaky, out


def data(rng, n=64):
    x = rng.uniform(-1, 1, (n, 4))
    return x, np.argmax(x[:, :3], axis=1)


def test_invalid_middle_measurement_rejects_batch(rng):
    network, flaky, out = network_with_flaky_middle({2})
    x, y = data(rng)
    before = {}

    def remember(controller, record):
        before["epoch"] = record

    controller = PhysicalNoProp(network, DFA(), epochs=1, batch_size=16, progress=False, callbacks=[remember])
    controller.fit(x, y)
    assert controller.n_rejected_ == 1
    assert controller.n_steps_ == 3
    assert before["epoch"]["rejected"] == 1


def test_rejected_batch_changes_nothing(rng):
    network, flaky, out = network_with_flaky_middle({1})
    x, y = data(rng, 16)
    weights = {node.name: node.get_parameters() for node in (flaky, out)}
    controller = PhysicalNoProp(network, DFA(), epochs=1, batch_size=16, progress=False)
    controller.fit(x, y)
    assert controller.n_rejected_ == 1
    for node in (flaky, out):
        for name, value in node.get_parameters().items():
            np.testing.assert_array_equal(value, weights[node.name][name])


def test_stops_after_consecutive_invalid(rng, tmp_path):
    network, _, _ = network_with_flaky_middle(set(range(1, 100)))
    x, y = data(rng)
    run = RunDir.create(tmp_path / "run", {"config": {}})
    controller = PhysicalNoProp(
        network, DFA(), epochs=2, batch_size=8, progress=False, max_consecutive_invalid=3, run=run
    )
    with pytest.raises(TrainingStopped, match="3 batches in a row without an update.*'flaky'"):
        controller.fit(x, y)
    assert (tmp_path / "run" / "checkpoint.npz").is_file()


def test_evaluate_counts_invalid_examples(rng):
    network, flaky, _ = network_with_flaky_middle(set())
    x, y = data(rng, 30)
    controller = PhysicalNoProp(network, DFA(), epochs=1, batch_size=10, progress=False, eval_batch_size=10)
    flaky.fail_on = {flaky.calls + 2}
    result = controller.evaluate(x, y)
    assert result["invalid"] == 10
    assert 0 <= result["accuracy"] <= 20 / 30


def test_evaluate_measures_corrupted_chunk_again(rng):
    network, flaky, _ = network_with_flaky_middle(set())
    x, y = data(rng, 30)
    controller = PhysicalNoProp(network, DFA(), epochs=1, batch_size=10, progress=False, eval_batch_size=10)
    clean = controller.evaluate(x, y)
    flaky.corrupt_on = {flaky.calls + 2}
    calls_before = flaky.calls
    result = controller.evaluate(x, y)
    assert result == clean
    assert flaky.calls == calls_before + 4


def test_evaluate_raises_after_repeated_corruption(rng):
    network, flaky, _ = network_with_flaky_middle(set())
    x, y = data(rng, 30)
    controller = PhysicalNoProp(network, DFA(), epochs=1, batch_size=10, progress=False, eval_batch_size=10,
                                max_consecutive_invalid=3)
    flaky.corrupt_on = set(range(1, 100))
    with pytest.raises(MeasurementError, match="corrupted reply"):
        controller.evaluate(x, y)
    assert flaky.calls == 3
