"""Property: a run interrupted at any point and resumed ends exactly where an uninterrupted run ends.

Runs train a small network on the simulated crossbar with a fixed seed. Hypothesis chooses where
to interrupt: a crash inside the process at a given step (an exception from a step callback, so
the run ends without its own checkpoint), or a real SIGKILL of a ``pnn train`` subprocess, either
at a given step or after a given time (which can land anywhere: during start-up, in the middle
of writing the metrics log or a checkpoint, or after the run finished). Each run folder is then
resumed until it finishes, and its final parameters must equal the uninterrupted run's, bit for
bit, with a metrics log that holds every step exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnn.config import TrainConfig
from pnn.experiment import train
from pnn.runs import RunDir, load_tree

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(epochs=2, hidden=[8], seed=3, batch_size=16)
CLI_SETTINGS = ["--epochs", "2", "--hidden", "8", "--seed", "3", "--batch-size", "16"]
STEPS = 28  # 210 vowel examples in batches of 16, twice


class Crash(Exception):
    """Stands for a crash at a chosen step."""


def _parameters(folder: Path) -> dict[str, np.ndarray]:
    def flat(tree, prefix):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield from flat(value, f"{prefix}/{key}")
        elif isinstance(tree, np.ndarray):
            yield prefix, tree

    return dict(flat(load_tree(folder / "checkpoint.npz")["network"], ""))


class Reference(dict):
    """The uninterrupted run's parameters and summary, with a short repr for failure reports."""

    def __repr__(self) -> str:
        return "<uninterrupted reference run>"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    summary = train(TrainConfig(out=str(folder), **SETTINGS), progress=False)
    return Reference(parameters=_parameters(folder), summary=summary)


def _crash_at(step: int):
    def callback(controller, record):
        if controller.n_steps_ >= step:
            raise Crash(f"crash at step {controller.n_steps_}")
    return callback


def _continue(folder: Path, checkpoint_every: int, callbacks=()) -> None:
    """Start the run, or resume it, the way a person would after an interruption."""
    if (folder / "config.json").is_file():
        if (folder / "summary.json").is_file():
            return
        train(resume=folder, progress=False, step_callbacks=list(callbacks))
    else:
        config = TrainConfig(out=str(folder), checkpoint_every=checkpoint_every, **SETTINGS)
        train(config, progress=False, step_callbacks=list(callbacks))


def _check_against(reference, folder: Path) -> None:
    final = _parameters(folder)
    assert final.keys() == reference["parameters"].keys()
    for key, value in reference["parameters"].items():
        np.testing.assert_array_equal(final[key], value, err_msg=key)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["test_accuracy"] == reference["summary"]["test_accuracy"]
    assert summary["steps"] == STEPS
    records = RunDir(folder).read_metrics()
    steps = [record["step"] for record in records if record["kind"] == "step"]
    assert steps == list(range(1, STEPS + 1))
    assert [record["epoch"] for record in records if record["kind"] == "epoch"] == [0, 1]
    assert not list(folder.glob(".*.tmp"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(crashes=st.lists(st.integers(1, STEPS), min_size=1, max_size=3), checkpoint_every=st.sampled_from([0, 3, 5]))
def test_crashes_then_resume_match(reference, tmp_path_factory, crashes, checkpoint_every):
    folder = tmp_path_factory.mktemp("crash") / "run"
    for step in crashes:
        try:
            _continue(folder, checkpoint_every, [_crash_at(step)])
        except Crash:
            pass
    _continue(folder, checkpoint_every)
    _check_against(reference, folder)


# ------------------------------------------------------------------------ real SIGKILLs
_KILL_AT_STEP = textwrap.dedent("""
    import os, signal, sys
    from pnn.config import TrainConfig
    from pnn.experiment import train

    folder, step, checkpoint_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def kill(controller, record):
        if controller.n_steps_ >= step:
            os.kill(os.getpid(), signal.SIGKILL)

    if os.path.isfile(os.path.join(folder, "summary.json")):
        sys.exit(0)
    if os.path.isfile(os.path.join(folder, "config.json")):
        train(resume=folder, progress=False, step_callbacks=[kill])
    else:
        train(TrainConfig(out=folder, checkpoint_every=checkpoint_every, epochs=2, hidden=[8], seed=3,
                          batch_size=16), progress=False, step_callbacks=[kill])
""")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")


def _sigkill_at_step(folder: Path, step: int, checkpoint_every: int, script: Path) -> int:
    result = subprocess.run([sys.executable, str(script), str(folder), str(step), str(checkpoint_every)],
                            capture_output=True, text=True, env=_env(), timeout=120)
    return result.returncode


def _sigkill_after(folder: Path, seconds: float, checkpoint_every: int) -> int | None:
    if (folder / "config.json").is_file():
        args = ["train", "--resume", str(folder), "--quiet"]
    else:
        args = ["train", *CLI_SETTINGS, "--checkpoint-every", str(checkpoint_every), "--quiet", "--out", str(folder)]
    process = subprocess.Popen([sys.executable, "-m", "pnn", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env())
    try:
        process.wait(timeout=seconds)
        return process.returncode
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        return None


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kills=st.lists(
        st.one_of(st.tuples(st.just("step"), st.integers(1, STEPS)), st.tuples(st.just("time"), st.floats(0.5, 6.0))),
        min_size=1, max_size=2,
    ),
    checkpoint_every=st.sampled_from([0, 4]),
)
def test_sigkill_then_resume_match(reference, tmp_path_factory, kills, checkpoint_every):
    base = tmp_path_factory.mktemp("sigkill")
    folder = base / "run"
    script = base / "kill_at_step.py"
    script.write_text(_KILL_AT_STEP)
    for kind, when in kills:
        if kind == "step":
            code = _sigkill_at_step(folder, int(when), checkpoint_every, script)
            # The process killed itself, unless the run had already finished.
            assert code in (-signal.SIGKILL, 0)
            assert code == -signal.SIGKILL or (folder / "summary.json").is_file()
        else:
            _sigkill_after(folder, float(when), checkpoint_every)
    _continue(folder, checkpoint_every)
    _check_against(reference, folder)


def test_sigkill_mid_run_leaves_a_resumable_folder(reference, tmp_path):
    """A kill from outside at a fixed step count, with the process in the middle of its work."""
    folder = tmp_path / "run"
    args = ["train", *CLI_SETTINGS, "--checkpoint-every", "5", "--quiet", "--out", str(folder)]
    process = subprocess.Popen([sys.executable, "-m", "pnn", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=_env())
    metrics = folder / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (folder / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "pnn", "train", "--resume", str(folder), "--quiet"],
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    _check_against(reference, folder)


# ----------------------------------------------------------------- run folder details
def test_resume_before_the_first_checkpoint_starts_over(reference, tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(Crash):
        _continue(folder, 0, [_crash_at(2)])
    assert not (folder / "checkpoint.npz").exists()
    assert (folder / "metrics.jsonl").read_text().count("\n") >= 2
    _continue(folder, 0)
    _check_against(reference, folder)


def test_torn_metrics_line_and_stray_temporary_files(reference, tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(Crash):
        _continue(folder, 3, [_crash_at(10)])
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"kind": "step", "epoch": 0, "ba')
    (folder / ".checkpoint.npz.abc123.tmp").write_bytes(b"half a checkpoint")
    (folder / "identity.json").unlink()
    _continue(folder, 3)
    _check_against(reference, folder)
    assert (folder / "identity.json").is_file()
