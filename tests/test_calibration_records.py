"""Calibration records and the append-only store: hashing, versions, identity, expiry, failures."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pnn.calibration import (
    SCHEMA_VERSION,
    CalibrationRecord,
    CalibrationStore,
    Calibrator,
    ChannelFit,
    Sweep,
    get_model,
    read_record,
)
from pnn.errors import CalibrationError
from pnn.simulators import CROSSBAR_PRESETS, CrossbarNode

from .calibration_nodes import TransferNode


def crossbar(seed: int = 0) -> CrossbarNode:
    return CrossbarNode(4, 3, config=CROSSBAR_PRESETS["ideal"], rng=seed, name="xbar", activation="linear")


def calibrate(node, **options) -> CalibrationRecord:
    return Calibrator("linear", sweep=Sweep(points=20, repeats=2), **options).fit(node, progress=False).record_


@pytest.fixture(scope="module")
def record() -> CalibrationRecord:
    return calibrate(crossbar())


def test_record_fields(record):
    assert record.node == "xbar"
    assert record.schema_version == SCHEMA_VERSION
    assert record.identity["seed"] == 0
    assert record.identity["kind"] == "CrossbarNode"
    assert record.content_hash.startswith("sha256:")
    assert len(record.content_hash) == len("sha256:") + 64
    assert record.expires_at - record.created_at == dt.timedelta(hours=24)
    assert len(record.channels) == 3
    assert set(record.channels[0]) >= {"parameters", "uncertainties", "covariance", "residuals", "rms"}
    assert record.units == {"stimulus": "1", "output": "1", "input": "1"}


def test_json_round_trip_keeps_the_hash(record, tmp_path):
    path = tmp_path / "record.json"
    path.write_text(record.to_json())
    loaded = read_record(path)
    assert loaded == record
    assert loaded.content_hash == record.content_hash
    assert loaded.compute_hash() == record.content_hash


def test_hash_covers_the_content(record):
    data = json.loads(record.to_json())
    data["notes"] = "changed"
    del data["content_hash"]
    data.pop("schema")
    other = CalibrationRecord(**data)
    assert other.content_hash != record.content_hash


def test_changed_file_is_rejected(record, tmp_path):
    data = json.loads(record.to_json())
    data["channels"][0]["parameters"]["gain"] += 0.01
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=f"{path}.*changed after it was written"):
        read_record(path)


def test_corrupt_file_names_the_file(record, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(record.to_json()[:200])
    with pytest.raises(CalibrationError, match=f"calibration record {path} is corrupt: not valid JSON at line"):
        read_record(path)


def test_unknown_schema_version_names_the_file(record, tmp_path):
    data = json.loads(record.to_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=f"{path} has schema version {SCHEMA_VERSION + 1}.*upgrade pnn"):
        read_record(path)
    data["schema_version"] = "one"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="schema version 'one'.*calibrate the node again"):
        read_record(path)


def test_missing_field_names_the_file(record, tmp_path):
    data = json.loads(record.to_json())
    del data["channels"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=r"partial.json is corrupt: missing field\(s\) \['channels'\]"):
        read_record(path)


def test_incomplete_channel_is_corrupt(record, tmp_path):
    data = json.loads(record.to_json())
    del data["channels"][1]["covariance"]
    body = {k: v for k, v in data.items() if k not in ("schema", "content_hash")}
    rehashed = CalibrationRecord(**{**body, "channels": tuple(body["channels"])}).content_hash
    data["content_hash"] = rehashed
    path = tmp_path / "nocov.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="nocov.json is corrupt: a channel fit is incomplete"):
        read_record(path)


def test_other_json_is_not_a_record(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epochs": 3}))
    with pytest.raises(CalibrationError, match="is not a pnn calibration record"):
        read_record(path)


# ---------------------------------------------------------------------------------- store
def test_store_appends_read_only_files(record, tmp_path):
    store = CalibrationStore(tmp_path / "calibrations")
    path = store.append(record)
    assert path.parent == store.path
    assert path.name.startswith("xbar--")
    assert not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert store.append(record) == path
    assert store.paths() == [path]
    assert store.get(record.content_hash[:15]) == record


def test_store_never_replaces_a_record(record, tmp_path):
    store = CalibrationStore(tmp_path)
    other = calibrate(crossbar(seed=5))
    occupied = tmp_path / store.file_name(record)
    occupied.write_text(other.to_json())
    with pytest.raises(CalibrationError, match="already contains another calibration record"):
        store.append(record)
    assert read_record(occupied) == other
    assert store.paths() == [occupied]


def test_store_detects_a_changed_record(record, tmp_path):
    store = CalibrationStore(tmp_path)
    path = store.append(record)
    os.chmod(path, 0o644)
    path.write_text(path.read_text().replace('"notes": ""', '"notes": "x"'))
    with pytest.raises(CalibrationError, match="changed after it was written"):
        store.append(record)


def test_latest_matching_record(tmp_path):
    node = crossbar()
    store = CalibrationStore(tmp_path)
    first = calibrate(node)
    second = calibrate(node)
    store.append(second)
    store.append(first)
    assert store.latest(node) == max((first, second), key=lambda r: r.created_at)
    assert [r.content_hash for r in store.records("xbar")] == [first.content_hash, second.content_hash]


def test_mismatched_identity_is_refused(tmp_path):
    store = CalibrationStore(tmp_path)
    store.append(calibrate(crossbar(seed=0)))
    other = crossbar(seed=1)
    with pytest.raises(CalibrationError, match=r"made for another device than the connected node 'xbar': seed: 0 -> 1"):
        store.latest(other)
    assert store.latest(other, allow_mismatch=True).identity["seed"] == 0


def test_mismatch_checked_against_record_directly():
    node = TransferNode("linear", np.array([[1.0, 0.0]]), seed=3)
    record = calibrate(node)
    other = TransferNode("linear", np.array([[1.0, 0.0]]), seed=4)
    with pytest.raises(CalibrationError, match="allow_mismatch=True"):
        record.check_node(other)
    record.check_node(other, allow_mismatch=True)
    record.check_node(node)


def test_expired_record_is_refused(tmp_path):
    node = crossbar()
    store = CalibrationStore(tmp_path)
    store.append(calibrate(node, valid_for=dt.timedelta(hours=1)))
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    with pytest.raises(CalibrationError, match=r"expired at .*calibrate the node again, or pass allow_expired=True"):
        store.latest(node, now=later)
    assert store.latest(node, now=later, allow_expired=True).node == "xbar"
    assert store.latest(node).node == "xbar"


def test_missing_record_says_what_to_do(tmp_path):
    with pytest.raises(CalibrationError, match="no calibration record for node 'xbar'.*pnn calibrate"):
        CalibrationStore(tmp_path).latest(crossbar())


def test_corrupt_record_blocks_lookup(record, tmp_path):
    store = CalibrationStore(tmp_path)
    store.append(record)
    broken = tmp_path / "xbar--20000101T000000.000000Z--000000000000.json"
    broken.write_text("{not json")
    with pytest.raises(CalibrationError, match=f"{broken} is corrupt"):
        store.latest(crossbar())


def test_volatile_identity_fields_are_ignored(record):
    identity = dict(record.identity)
    identity["instruments"] = [{"name": "dmm", "identity": "ACME,DMM1,42,1.0", "resource": "TCPIP::1::INSTR", "reconnects": 0}]
    moved = json.loads(json.dumps(identity))
    moved["instruments"][0]["resource"] = "TCPIP::2::INSTR"
    moved["instruments"][0]["reconnects"] = 3
    from pnn.calibration import identity_differences

    assert identity_differences(identity, moved) == []
    moved["instruments"][0]["identity"] = "ACME,DMM1,43,1.0"
    assert identity_differences(identity, moved) == ['instruments[0].identity: "ACME,DMM1,42,1.0" -> "ACME,DMM1,43,1.0"']


def test_failed_write_leaves_no_partial_record(record, tmp_path, monkeypatch):
    store = CalibrationStore(tmp_path / "store")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        store.append(record)
    monkeypatch.undo()
    assert list((tmp_path / "store").iterdir()) == []


def test_failed_link_leaves_no_partial_record(record, tmp_path, monkeypatch):
    store = CalibrationStore(tmp_path)

    def failing_link(source, target):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(CalibrationError, match="cannot write"):
        store.append(record)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_partial_record(record, tmp_path, monkeypatch):
    store = CalibrationStore(tmp_path)
    real_fdopen = os.fdopen

    class Interrupting:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Interrupting(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        store.append(record)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert store.records() == []


def test_store_summary(record, tmp_path):
    store = CalibrationStore(tmp_path)
    store.append(record)
    printed = []

    class Printer:
        def text(self, value):
            printed.append(value)

    store._repr_pretty_(Printer(), cycle=False)
    assert "1 record(s)" in printed[0]
    assert "xbar" in printed[0]
    record._repr_pretty_(Printer(), cycle=False)
    assert "Calibration record of node 'xbar'" in printed[1]
    assert "held-out" in printed[1]


# ------------------------------------------------------------------- unit conversion
def channel_fit(model: str, parameters, stimulus_range=(-1.0, 1.0)) -> ChannelFit:
    names = get_model(model).parameter_names
    n = len(names)
    return ChannelFit(
        channel=0, model=model, parameters=dict(zip(names, map(float, parameters))),
        uncertainties=dict.fromkeys(names, 0.0), covariance=np.zeros((n, n)), stimulus_range=stimulus_range,
        n_points=10, outliers=(), residuals=np.zeros(10), rms=0.0, r_squared=1.0, noise_std=None, reduced_chi2=None,
    )


finite = st.floats(-10, 10, allow_nan=False)
nonzero = st.floats(0.1, 10).flatmap(lambda v: st.sampled_from([v, -v]))
stimulus = st.floats(-1.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(gain=nonzero, offset=finite, value=stimulus)
def test_linear_conversion_round_trips(gain, offset, value):
    fit = channel_fit("linear", [gain, offset])
    raw = fit.to_raw(np.array([value]))
    assert fit.to_physical(raw)[0] == pytest.approx(value, abs=1e-9 * (1 + abs(offset / gain)))


@settings(max_examples=200, deadline=None)
@given(model=st.sampled_from(["tanh", "sigmoid"]), amplitude=st.floats(0.1, 5), gain=st.floats(0.2, 2).flatmap(
    lambda v: st.sampled_from([v, -v])), shift=st.floats(-1, 1), offset=finite, value=stimulus)
def test_saturating_conversion_round_trips(model, amplitude, gain, shift, offset, value):
    fit = channel_fit(model, [amplitude, gain, shift, offset])
    raw = fit.to_raw(np.array([value]))
    assert fit.to_physical(raw)[0] == pytest.approx(value, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(c0=finite, c1=st.floats(0.8, 3), c2=st.floats(-0.2, 0.2), c3=st.floats(-0.1, 0.1), value=stimulus)
def test_polynomial_conversion_round_trips(c0, c1, c2, c3, value):
    # c1 >= 0.8 > 3 |c3| + 2 |c2| keeps the cubic monotonic on [-1, 1], so it has an inverse there.
    fit = channel_fit("poly3", [c0, c1, c2, c3])
    raw = fit.to_raw(np.array([value]))
    assert fit.to_physical(raw)[0] == pytest.approx(value, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(amplitude=st.floats(0.1, 5), a_pi=st.floats(1.0, 5.0), offset=finite, fraction=st.floats(0.0, 1.0))
def test_cos2_conversion_round_trips(amplitude, a_pi, offset, fraction):
    # One falling half fringe: the stimulus from 0 to a_pi with zero phase.
    fit = channel_fit("cos2", [amplitude, a_pi, 0.0, offset], stimulus_range=(0.0, a_pi))
    value = fraction * a_pi
    raw = fit.to_raw(np.array([value]))
    assert fit.to_physical(raw)[0] == pytest.approx(value, abs=1e-6 * a_pi)


def test_conversion_outside_calibrated_range_is_refused():
    fit = channel_fit("tanh", [1.0, 1.0, 0.0, 0.0])
    with pytest.raises(CalibrationError, match="output channel 0: output 1.5 lies outside"):
        fit.to_physical(np.array([1.5]))


def test_non_monotonic_range_is_refused():
    fit = channel_fit("cos2", [1.0, 1.0, 0.0, 0.0], stimulus_range=(-1.0, 1.0))
    with pytest.raises(CalibrationError, match="not monotonic"):
        fit.to_physical(np.array([0.5]))


def test_conversion_through_stored_calibration(tmp_path):
    truth = np.array([[2.0, -0.3], [0.5, 0.1]])
    node = TransferNode("linear", truth, noise_std=0.001, seed=2)
    store = CalibrationStore(tmp_path)
    store.append(calibrate(node))
    fit = store.latest(node).fit()
    volts = np.array([-0.8, 0.0, 0.6])
    for k, channel in enumerate(fit.channels):
        raw = volts * truth[k, 0] + truth[k, 1]
        np.testing.assert_allclose(channel.to_physical(raw), volts, atol=0.01)
        np.testing.assert_allclose(channel.to_physical(channel.to_raw(volts)), volts, atol=1e-9)
