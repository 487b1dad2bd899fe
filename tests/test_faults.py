"""Faults: the fault-injection suite on both emulators, and recovery in the training loop.

The suite (pnn/fault_suite.py) trains through the real pyvisa-py and pyserial stacks while each
kind of fault is injected, and audits every command the emulator received. Its summary lines
are printed at the end of the pytest run. The controller tests below use a digital node that
raises scripted instrument faults, so they check retries, backoff and stopping exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pnn.controller import PhysicalNoProp, TrainingStopped
from pnn.devices import IdentityMismatch, load_station
from pnn.emulators import CommandAudit, EmulatedHardware, FaultConfig, LayerSpec, ScpiEmulator
from pnn.errors import InstrumentTimeout, MeasurementError
from pnn.fault_suite import SCENARIOS, run_scenario
from pnn.learning import DFA
from pnn.network import DigitalLinear, Encoder, PhysicalNetwork, Readout
from pnn.runs import RunDir, load_tree

REPO = Path(__file__).resolve().parents[1]

#: Summary lines of the suite, printed by conftest.py at the end of the run.
FAULT_SUMMARY: list[str] = []

# Every fault the reliability promises name, and the suite scenario that injects it.
REQUIRED_KINDS = {
    "reply later than the timeout": "late",
    "reply split into pieces with pauses": "split",
    "line that never ends while bytes keep arriving": "trickle",
    "binary block fragmented across reads": "binary_fragments",
    "reply with a different terminator": "wrong_terminator",
    "overrange value": "overrange",
    "disconnect in the middle of a transfer": "disconnect",
    "serial port that disappears and comes back": "port_gone",
    "instrument that answers slowly for a while": "slow",
    "two threads sharing one instrument": "threads",
    "opening and closing many times": "open_close",
    "DAC read-back one step outside its limit": "readback_overshoot",
    "set-only output without a known start (safe)": "set_only_safe",
    "set-only output without a known start (refuse)": "set_only_refuse",
    "garbled reply": "garbled",
    "partial reply": "partial",
    "corrupted binary payload, checksum on": "bitflip",
}


def test_suite_covers_every_listed_fault():
    kinds = {scenario.kind for scenario in SCENARIOS}
    missing = {fault: kind for fault, kind in REQUIRED_KINDS.items() if kind not in kinds}
    assert not missing


@pytest.mark.parametrize("kind", [scenario.kind for scenario in SCENARIOS])
def test_fault_suite(kind):
    scenario = next(s for s in SCENARIOS if s.kind == kind)
    result = run_scenario(scenario)
    FAULT_SUMMARY.append(result.line())
    print(result.line())
    assert result.outside_limits == 0, result.problems
    assert result.injected > 0
    assert result.runs == len(scenario.emulators)
    assert result.ended_as_expected == result.runs, result.problems
    assert not result.problems
    if scenario.kind in ("disconnect", "port_gone"):
        assert result.reconnects >= 1
    if scenario.kind in ("overrange", "garbled", "persistent", "bitflip"):
        assert result.rejected >= 1
    if scenario.kind in ("late", "trickle", "wrong_terminator", "partial", "no_reply", "slow"):
        assert result.retried >= 1


# ------------------------------------------------------------------------- the audit
@pytest.fixture
def emulator():
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], seed=0)
    with ScpiEmulator(hardware) as emu:
        yield emu


def test_audit_catches_commands_that_bypass_the_node(emulator, tmp_path):
    path = emulator.write_station(tmp_path / "station.toml", timeout_s=1.0)
    with load_station(path) as station:
        node = station.build_nodes()[0]
        audit = CommandAudit(emulator, [node])
        weight = node.banks["weight"]
        first = weight.group.channels[0]
        instrument = station.instruments["emulator"]
        # Within the range but far more than one ramp step, then a level above the range.
        instrument.write_levels([first], np.array([float(weight.spec.upper_array.flat[0])]))
        instrument.write("level_set", channel=first, value=float(weight.spec.upper_array.flat[0]) + 1.0)
        # The error query's reply comes after the emulator has recorded the level command.
        assert instrument.read_errors()
        problems = audit.violations()
        node.set_parameters({"weight": np.zeros(weight.spec.shape)})
    assert any("more than max_step" in line for line in problems)
    assert any("outside" in line for line in problems)


def test_audit_passes_ramped_writes(emulator, tmp_path):
    path = emulator.write_station(tmp_path / "station.toml", timeout_s=1.0)
    with load_station(path) as station:
        node = station.build_nodes()[0]
        audit = CommandAudit(emulator, [node])
        spec = node.parameters["weight"]
        node.set_parameters({"weight": np.full(spec.shape, float(spec.upper_array.flat[0]))})
        assert audit.violations() == []
        assert audit.checked_levels > 10


# ---------------------------------------------------------------- training loop faults
class FlakyLinear(DigitalLinear):
    """A digital layer whose forward passes and updates raise scripted instrument faults."""

    def __init__(self, *, fail_forward=(), fail_update=(), error=InstrumentTimeout, **kwargs):
        super().__init__(3, 2, rng=0, name="flaky", dtype=np.float64, **kwargs)
        self.fail_forward = set(fail_forward)
        self.fail_update = set(fail_update)
        self.error = error
        self.forward_calls = 0
        self.update_calls = 0
        self.safe_state_calls = 0
        self.attempts = []

    def forward(self, inputs):
        self.forward_calls += 1
        self.attempts.append(np.array(inputs))
        if self.forward_calls in self.fail_forward or "always" in self.fail_forward:
            raise self.error("daq: no reply within 0.3 s", instrument="daq")
        return super().forward(inputs)

    def apply_update(self, delta, *, clip=False):
        self.update_calls += 1
        if self.update_calls in self.fail_update:
            raise self.error("daq: writing the update timed out", instrument="daq")
        return super().apply_update(delta, clip=clip)

    def apply_safe_state(self):
        self.safe_state_calls += 1


def _data(n=24):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)), rng.integers(0, 2, n)


def _controller(node, tmp_path=None, **options):
    x, _ = _data()
    network = PhysicalNetwork([Encoder(3).fit(x), node, Readout(2)])
    run = RunDir.create(tmp_path / "run", {}) if tmp_path is not None else None
    settings = dict(lr=0.01, epochs=2, batch_size=8, progress=False, retry_backoff_s=0.01,
                    retry_backoff_max_s=0.04, max_consecutive_invalid=4, run=run)
    settings.update(options)
    return PhysicalNoProp(network, DFA(), **settings)


def test_measurement_fault_retries_the_same_batch():
    node = FlakyLinear(fail_forward={2, 3})
    controller = _controller(node).fit(*_data())
    # Three batches per epoch, two epochs: six updates; the second batch took three tries.
    assert controller.n_steps_ == 6
    assert controller.n_faults_ == 2
    assert node.forward_calls == 6 + 2
    np.testing.assert_array_equal(node.attempts[2], node.attempts[1])
    np.testing.assert_array_equal(node.attempts[3], node.attempts[1])
    assert not np.array_equal(node.attempts[4], node.attempts[1])


def test_update_fault_moves_on_without_applying_twice():
    node = FlakyLinear(fail_update={2})
    controller = _controller(node).fit(*_data())
    assert controller.n_faults_ == 1
    assert controller.n_steps_ == 5
    # No batch runs twice, so no update is applied twice.
    assert node.forward_calls == 6


def test_backoff_doubles_up_to_its_cap(monkeypatch):
    controller = _controller(FlakyLinear(), retry_backoff_s=0.01, retry_backoff_max_s=0.05)
    clock = {"t": 0.0}
    monkeypatch.setattr("pnn.controller.time.monotonic", lambda: clock["t"])
    monkeypatch.setattr("pnn.controller.time.sleep", lambda seconds: clock.update(t=clock["t"] + seconds))
    pauses = []
    for faults in range(1, 6):
        controller._consecutive_faults = faults
        clock["t"] = 0.0
        controller._backoff(lambda: False)
        pauses.append(clock["t"])
    assert pauses == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])


def test_backoff_ends_early_on_a_stop_request(monkeypatch):
    controller = _controller(FlakyLinear(), retry_backoff_s=10.0, retry_backoff_max_s=10.0)
    clock = {"t": 0.0}
    monkeypatch.setattr("pnn.controller.time.monotonic", lambda: clock["t"])
    monkeypatch.setattr("pnn.controller.time.sleep", lambda seconds: clock.update(t=clock["t"] + seconds))
    controller._consecutive_faults = 1
    controller._backoff(lambda: clock["t"] >= 0.2)
    # Ctrl-C during a 10 s pause is seen within one polling slice.
    assert 0.2 <= clock["t"] < 0.3


def test_consecutive_faults_stop_cleanly(tmp_path):
    node = FlakyLinear(fail_forward={"always"})
    controller = _controller(node, tmp_path)
    started = time.monotonic()
    with pytest.raises(TrainingStopped) as info:
        controller.fit(*_data())
    message = str(info.value)
    assert "after 4 batches in a row" in message
    assert "instrument 'daq' failed" in message
    assert "no reply within 0.3 s" in message
    assert f"checkpoint written in {tmp_path / 'run'}" in message
    assert "safe state applied" in message
    assert node.safe_state_calls == 1
    # Pauses of 10, 20 and 40 ms between the four tries: bounded, and short.
    assert time.monotonic() - started < 5.0
    state = load_tree(tmp_path / "run" / "checkpoint.npz")
    assert state["position"] == [0, 0]
    assert state["n_faults"] == 4


def test_identity_mismatch_is_not_retried(tmp_path):
    node = FlakyLinear(fail_forward={1}, error=IdentityMismatch)
    with pytest.raises(IdentityMismatch):
        _controller(node, tmp_path).fit(*_data())
    assert node.forward_calls == 1
    assert node.safe_state_calls == 1


def test_stopped_run_resumes(tmp_path):
    node = FlakyLinear(fail_forward={2, 3, 4, 5})
    with pytest.raises(TrainingStopped):
        _controller(node, tmp_path).fit(*_data())
    resumed = _controller(FlakyLinear(), None, run=RunDir.open(tmp_path / "run"))
    resumed.fit(*_data(), resume=True)
    assert resumed.n_steps_ == 6
    assert resumed.n_faults_ == 4


def test_rejected_batches_are_logged(tmp_path):
    class Overrange(FlakyLinear):
        def forward(self, inputs):
            outputs = super().forward(inputs)
            if self.forward_calls == 2:
                outputs = outputs.copy()
                outputs[0, 0] = np.nan
                self._state = type(self._state)(self._state.inputs, outputs, self._state.probes)
            return outputs

    controller = _controller(Overrange(), tmp_path).fit(*_data())
    records = RunDir.open(tmp_path / "run").read_metrics()
    rejected = [r for r in records if r["kind"] == "rejected"]
    assert controller.n_rejected_ == 1
    assert len(rejected) == 1
    assert "node 'flaky'" in rejected[0]["reason"]


# -------------------------------------------------------------- instruments, end to end
def test_timeouts_stop_with_safe_state_and_checkpoint(tmp_path):
    hardware = EmulatedHardware([LayerSpec(3, 2, "tanh")], seed=0)
    with ScpiEmulator(hardware) as emulator:
        path = emulator.write_station(tmp_path / "station.toml", timeout_s=0.2, deadline_s=0.4,
                                      extra_instrument_lines=("reconnect_backoff_s = 0.01",))
        station = load_station(path)
        node = station.build_nodes()[0]
        node.set_parameters({"weight": np.full((2, 3), 8 * node.parameters["weight"].resolution)})
        x, y = _data()
        network = PhysicalNetwork([Encoder(3, lower=-1.0, upper=1.0).fit(x), node, Readout(2)])

        def break_after_first_step(controller, record):
            if controller.n_steps_ == 1 and not emulator.faults.counts:
                emulator.inject("no_reply", count=1000)

        # The instrument recovers when the run gives up, so the safe state can go through.
        original = network.apply_safe_state

        def recover_then_go_safe():
            emulator.faults.clear()
            time.sleep(0.3)
            return original()

        network.apply_safe_state = recover_then_go_safe
        controller = PhysicalNoProp(network, DFA(), lr=0.01, epochs=2, batch_size=8, progress=False,
                                    max_consecutive_invalid=3, retry_backoff_s=0.01,
                                    run=RunDir.create(tmp_path / "run", {}),
                                    step_callbacks=[break_after_first_step])
        try:
            with pytest.raises(TrainingStopped) as info:
                controller.fit(x, y, n_classes=2)
        finally:
            station.close()
    message = str(info.value)
    assert "instrument 'emulator' failed" in message
    assert "no reply to the resynchronisation query '*IDN?'" in message
    assert "safe state applied" in message
    assert load_tree(tmp_path / "run" / "checkpoint.npz")["position"] == [0, 1]
    weight_channels = np.asarray(node.banks["weight"].group.channels) - 1
    np.testing.assert_array_equal(hardware.levels[weight_channels], 0.0)


def test_cli_run_stops_with_exit_code_1(tmp_path):
    hardware = EmulatedHardware([LayerSpec(12, 7, "linear")], seed=0)
    # Parameters start away from their safe value 0, so going safe must write them.
    hardware.levels[12:] = 4 * hardware.resolution[12:]
    with ScpiEmulator(hardware, faults=FaultConfig(rates={"overrange": 1.0})) as emulator:
        station = emulator.write_station(tmp_path / "station.toml", timeout_s=1.0)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run(
            [sys.executable, "-m", "pnn", "train", "--station", str(station), "--epochs", "1", "--quiet",
             "--max-consecutive-invalid", "3", "--out", str(tmp_path / "run")],
            capture_output=True, text=True, env=env, timeout=120,
        )
    assert result.returncode == 1, result.stderr
    # Each rejected batch is logged as a warning; the error itself is one line.
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("pnn train:")]
    assert len(lines) == 1, result.stderr
    assert "training stopped after 3 batches in a row" in lines[0]
    assert "invalid measurement" in lines[0]
    assert "node 'layer1'" in lines[0]
    assert "instrument 'emulator' channel(s)" in lines[0]
    assert "safe state applied" in lines[0]
    assert f"--resume {tmp_path / 'run'}" in lines[0]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "checkpoint.npz").is_file()
    np.testing.assert_array_equal(hardware.levels[12:], 0.0)


def test_invalid_output_stops_the_forward_pass():
    outputs = np.array([[np.nan, 0.0], [0.0, 0.0]])

    class Broken(FlakyLinear):
        def _forward(self, x):
            return outputs[: len(x)], x, {}

    network = PhysicalNetwork([Broken(), Readout(2)])
    with pytest.raises(MeasurementError, match="node 'flaky'"):
        network.forward(np.zeros((2, 3)))
    predicted = network.predict(np.zeros((2, 3)))
    assert np.isnan(predicted[0]).all()
    assert np.isfinite(predicted[1]).all()


def _train_until(args, folder, lines, env):
    """Start ``pnn train ARGS`` and return the process once its metrics log has ``lines`` lines."""
    process = subprocess.Popen([sys.executable, "-m", "pnn", "train", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.01)
    return process


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupted_station_run_goes_safe_and_checkpoints(tmp_path, signal_name):
    import signal

    hardware = EmulatedHardware([LayerSpec(12, 7, "linear")], seed=0)
    with ScpiEmulator(hardware, faults=FaultConfig(latency_s=0.002)) as emulator:
        station = emulator.write_station(tmp_path / "station.toml", timeout_s=1.0)
        folder = tmp_path / "run"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        process = _train_until(["--station", str(station), "--epochs", "50", "--quiet", "--out", str(folder)],
                               folder, 5, env)
        process.send_signal(getattr(signal, signal_name))
        _, stderr = process.communicate(timeout=60)
        levels = hardware.levels.copy()
    assert process.returncode == 130, stderr
    assert "checkpoint written" in stderr
    assert "safe state applied" in stderr
    assert f"--resume {folder}" in stderr
    assert "Traceback" not in stderr
    assert (folder / "checkpoint.npz").is_file()
    # Every weight and bias channel is back at its safe value 0.
    np.testing.assert_array_equal(levels[12:], 0.0)
