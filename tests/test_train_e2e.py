"""End to end: pnn train on the vowels and MNIST, resuming, and errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pnn.config import TrainConfig
from pnn.experiment import train
from pnn.runs import load_tree

REPO = Path(__file__).resolve().parents[1]


def run_pnn(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "pnn", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def final_parameters(run_dir: Path) -> dict:
    network = load_tree(run_dir / "checkpoint.npz")["network"]
    return {f"{node}/{key}": value for node, state in network.items() for key, value in _flat(state)}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}/{key}")
    elif isinstance(tree, np.ndarray):
        yield prefix, tree


@pytest.mark.slow
def test_default_train_reaches_93_percent(tmp_path):
    result = run_pnn("train", "--quiet", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[0]
    assert line.startswith("test accuracy: ")
    accuracy = float(line.split(": ")[1])
    assert accuracy >= 0.93
    run = tmp_path / "run"
    for name in ("config.json", "identity.json", "metrics.jsonl", "checkpoint.npz", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert summary["rejected_batches"] == 0


@pytest.mark.slow
def test_short_mnist_run_learns(tmp_path, mnist_dir):
    result = run_pnn(
        "train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--hidden", "64", "--epochs", "2",
        "--n-train", "10000", "--n-test", "1000", "--lr", "3e-3", "--quiet", "--out", str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr
    # Chance is 0.1; this run measured 0.891 on the crossbar's default preset.
    assert float(result.stdout.split(": ")[1]) > 0.85


class StopAfterFirstEpoch(Exception):
    pass


def stop_after_first_epoch(controller, record):
    raise StopAfterFirstEpoch


def test_resume_after_one_epoch_matches(tmp_path):
    config = dict(epochs=3, hidden=[16], seed=5)
    reference = train(TrainConfig(out=str(tmp_path / "full"), **config), progress=False)

    with pytest.raises(StopAfterFirstEpoch):
        train(TrainConfig(out=str(tmp_path / "cut"), **config), progress=False, callbacks=[stop_after_first_epoch])
    assert load_tree(tmp_path / "cut" / "checkpoint.npz")["position"] == [1, 0]
    resumed = train(resume=tmp_path / "cut", progress=False)

    assert resumed["test_accuracy"] == reference["test_accuracy"]
    full, cut = final_parameters(tmp_path / "full"), final_parameters(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for key in full:
        np.testing.assert_array_equal(cut[key], full[key], err_msg=key)
    epochs = [r for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resumes(tmp_path):
    args = ["train", "--quiet", "--epochs", "60", "--checkpoint-every", "7", "--seed", "3"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cut = tmp_path / "cut"
    process = subprocess.Popen(
        [sys.executable, "-m", "pnn", *args, "--out", str(cut)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )
    metrics = cut / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") > 200:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "checkpoint written" in stderr and f"--resume {cut}" in stderr
    assert "Traceback" not in stderr

    resumed = run_pnn("train", "--resume", str(cut), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    full = run_pnn(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert resumed.stdout == full.stdout
    a, b = final_parameters(tmp_path / "full"), final_parameters(cut)
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--dataset", "mnist", "--data-dir", "/no/such/folder"], "--data-dir"),
        (["--hidden", "16", "0"], "width 0 is invalid"),
        (["--rule", "magic"], "unknown rule 'magic'"),
        (["--device", "abacus"], "unknown device 'abacus'"),
        (["--preset", "perfect"], "unknown crossbar preset 'perfect'"),
        (["--device-option", "read_noise=0.1"], "no setting(s) ['read_noise']"),
        (["--device-option", "disabled=warp"], "unknown crossbar stage"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--lr", "-1"], "learning rate must be a positive number"),
        (["--feedback", "identity"], "identity feedback"),
        (["--resume", "/no/such/run"], "is not a run folder"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, args, message):
    out = tmp_path / "run"
    result = run_pnn("train", "--quiet", "--out", str(out), *args) if "--resume" not in args else run_pnn("train", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoint.npz").exists()


def test_bad_config_files(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = [\n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochs = 3\nlearning_rate = 0.1\n")
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('epochs = "ten"\n')
    for path, message in (
        (broken, "is not valid TOML"),
        (unknown, "unknown setting(s) learning_rate"),
        (wrong_type, "epochs must be an integer"),
        (tmp_path / "missing.toml", "not found"),
    ):
        result = run_pnn("train", "--config", str(path), "--out", str(tmp_path / "run"))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_mnist_file(tmp_path, mnist_dir):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in os.listdir(mnist_dir):
        (data / name).write_bytes((mnist_dir / name).read_bytes())
    labels = data / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:100])
    result = run_pnn("train", "--dataset", "mnist", "--data-dir", str(data), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "t10k-labels" in result.stderr
    assert not (tmp_path / "run").exists()


def test_config_file_and_options(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('hidden = [8]\nepochs = 2\nlr_schedule = "constant"\n[device_options]\nread_noise_std = 0.0\n')
    result = run_pnn("train", "--config", str(config), "--seed", "4", "--quiet", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert stored["hidden"] == [8]
    assert stored["epochs"] == 2
    assert stored["seed"] == 4
    assert stored["device_options"] == {"read_noise_std": 0.0}
    identity = json.loads((tmp_path / "run" / "identity.json").read_text())
    layer = next(node for node in identity["nodes"] if node["name"] == "layer1")
    assert layer["config"]["read_noise_std"] == 0.0
