"""Sweeps: specification checks, training keys, the results table, Dask runs and the plot.

The Dask tests run real trainings on local clusters bound to 127.0.0.1. They need
``dask.distributed`` (``pip install '.[sweep]'``); the import below fails the module, rather
than skipping it, where Dask is missing.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path

import distributed  # noqa: F401 - the sweep tests must fail, not skip, without Dask
import numpy as np
import pytest

from pnn.cli import main
from pnn.config import TrainConfig, resolve_config
from pnn.errors import ConfigError
from pnn.sweep import (
    RESULT_COLUMNS, ResultsTable, load_spec, read_results, run_sweep, run_training, spec_from_mapping, training_key,
)
from pnn.sweep.plot import plot_sweep, sweep_series
from pnn.sweep.table import SweepLock

# Two feedback strategies stand for two rules while dfa is the only registered rule. Identity
# feedback needs hidden layers as wide as the output (7 vowels), so with hidden = [8] it fails
# in the rule's network check on the worker, after the specification passed every check.
SPEC_TOML = """
[sweep]
retries = 1

[fixed]
dataset = "vowels"
hidden = [8]
epochs = 2
lr = 0.01

[grid]
feedback = ["random", "physical", "identity"]
seed = [0, 1]

[grid.device_options]
read_noise_std = [0, 0.1]
"""
AXES = ["feedback", "seed", "device_options.read_noise_std"]


def write_spec(folder: Path, text: str = SPEC_TOML, name: str = "noise.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def rows_by_key(path: Path) -> dict[str, dict[str, str]]:
    return {row["key"]: row for row in read_results(path)}


# ------------------------------------------------------------------- Dask, end to end
@pytest.fixture(scope="module")
def scheduler():
    """A running two-worker cluster on loopback, for the ``--scheduler`` path."""
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
    )
    yield cluster.scheduler_address
    cluster.close()


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """The test sweep run once on a local cluster of two workers."""
    folder = tmp_path_factory.mktemp("sweep")
    spec = load_spec(write_spec(folder))
    report = run_sweep(spec, workers=2, progress=False)
    return spec, report


def test_sweep_counts(finished_sweep):
    spec, report = finished_sweep
    assert spec.size == 12
    assert report.total == 12
    assert report.skipped == 0
    assert report.done == 8
    assert report.failed == 4
    assert report.retried == 4


def test_sweep_table_has_row_per_training(finished_sweep):
    spec, report = finished_sweep
    with open(report.table, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["key", *AXES, *RESULT_COLUMNS]
        rows = list(reader)
    assert sorted(row["key"] for row in rows) == sorted(t.key for t in spec.trainings())
    points = {(row["feedback"], row["seed"], row["device_options.read_noise_std"]) for row in rows}
    assert points == {(f, s, n) for f in ("random", "physical", "identity") for s in ("0", "1") for n in ("0.0", "0.1")}


def test_sweep_done_rows_match_runs(finished_sweep):
    _, report = finished_sweep
    done = [row for row in read_results(report.table) if row["status"] == "done"]
    assert {row["feedback"] for row in done} == {"random", "physical"}
    for row in done:
        run = Path(row["run_dir"])
        assert run.name == row["key"]
        summary = json.loads((run / "summary.json").read_text())
        config = json.loads((run / "config.json").read_text())["config"]
        assert float(row["test_accuracy"]) == summary["test_accuracy"]
        assert float(row["train_accuracy"]) == summary["train_accuracy"]
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert float(row["wall_seconds"]) > 0
        assert row["attempts"] == "1"
        assert row["error"] == ""
        assert config["feedback"] == row["feedback"]
        assert config["seed"] == int(row["seed"])
        assert config["device_options"]["read_noise_std"] == float(row["device_options.read_noise_std"])
        assert config["hidden"] == [8]


def test_sweep_failure_retried_and_recorded(finished_sweep):
    _, report = finished_sweep
    failed = [row for row in read_results(report.table) if row["status"] == "failed"]
    assert len(failed) == 4
    for row in failed:
        assert row["feedback"] == "identity"
        assert row["attempts"] == "2"
        assert row["error"].startswith("ConfigError: rule 'dfa' with identity feedback")
        assert "\n" not in row["error"]
        assert row["test_accuracy"] == ""
        traceback_file = report.table.parent / "failures" / f"{row['key']}.txt"
        assert "Traceback" in traceback_file.read_text()


def test_sweep_rerun_skips_done(finished_sweep, scheduler):
    spec, report = finished_sweep
    before = rows_by_key(report.table)
    # Drop one finished row, as if the sweep had stopped after that training finished but
    # before its row was written: the rerun must take it from the run folder, not train again.
    lost_key = next(key for key, row in before.items() if row["status"] == "done")
    table = ResultsTable.open(report.table, AXES)
    del table.rows[lost_key]
    table.write()
    summary_mtime = (Path(before[lost_key]["run_dir"]) / "summary.json").stat().st_mtime_ns

    again = run_sweep(spec, scheduler=scheduler, progress=False)

    assert again.skipped == 7
    assert again.done == 1
    assert again.failed == 4
    after = rows_by_key(report.table)
    assert set(after) == set(before)
    for key, row in before.items():
        if row["status"] == "done" and key != lost_key:
            assert after[key] == row
    assert after[lost_key]["test_accuracy"] == before[lost_key]["test_accuracy"]
    assert after[lost_key]["wall_seconds"] == before[lost_key]["wall_seconds"]
    assert (Path(before[lost_key]["run_dir"]) / "summary.json").stat().st_mtime_ns == summary_mtime
    assert all(after[key]["attempts"] == "2" for key, row in before.items() if row["status"] == "failed")
    assert not (report.table.parent / ".sweep.lock").exists()


def test_sweep_cli_plot_and_dry_run(finished_sweep, capsys):
    spec, report = finished_sweep
    assert main(["sweep", spec.source, "--plot"]) == 0
    png = report.table.parent / "test_accuracy.png"
    assert capsys.readouterr().out.strip() == f"plot: {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["sweep", spec.source, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 13
    assert lines[-1].startswith("12 trainings, 4 to run")


# ------------------------------------------------------------- specification checks
BASE = {"fixed": {"hidden": [8], "epochs": 2}, "grid": {"seed": [0, 1]}}


def spec_error(values, tmp_path) -> str:
    with pytest.raises(ConfigError) as info:
        spec_from_mapping(values, source="s.toml", base_dir=tmp_path, default_out=tmp_path / "out").trainings()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({**BASE, "grids": {}}, "unknown table(s) grids"),
        ({**BASE, "sweep": {"retry": 2}}, "unknown key(s) retry"),
        ({**BASE, "sweep": {"retries": -1}}, "retries must be an integer >= 0"),
        ({**BASE, "fixed": {"epoch": 3}}, "unknown setting(s) epoch"),
        ({**BASE, "fixed": {"out": "x"}}, "out cannot be set in a sweep"),
        ({**BASE, "fixed": {"station": "lab.toml"}}, "station cannot be set in a sweep"),
        ({"grid": {"lr_rate": [0.1]}}, "unknown setting(s) lr_rate"),
        ({"grid": {}}, "the grid has no axes"),
        ({"fixed": {"epochs": 2}}, "the grid has no axes"),
        ({"grid": {"seed": []}}, "axis seed is empty"),
        ({"grid": {"seed": 3}}, "seed must be a list of values"),
        ({"grid": {"seed": [0, 0]}}, "lists 0 twice"),
        ({"grid": {"epochs": ["ten"]}}, "epochs must be an integer, got 'ten'"),
        ({"grid": {"hidden": [8, 16]}}, "hidden must be a list of integers, got 8"),
        ({"fixed": {"seed": 1}, "grid": {"seed": [0, 1]}}, "seed is both fixed and swept"),
        ({"grid": {"device_options": [1]}}, "device_options must be a table of axes"),
        ({"grid": {"device_options": {"read_nose_std": [0.1]}}}, "device 'crossbar' has no setting 'read_nose_std'"),
        ({"grid": {"device_options": {"read_noise_std": ["high"]}}}, "read_noise_std must be of type float"),
        ({"grid": {"device_options": {"levels": [1.5]}}}, "levels must be of type int"),
        ({"grid": {"device_options": {"disabled": ["dac"]}}}, "disabled must be a list of stage names"),
        ({"fixed": {"device_options": {"read_noise_std": 0.1}}, "grid": {"device_options": {"read_noise_std": [0.2]}}},
         "device_options.read_noise_std is both fixed and swept"),
        ({"grid": {"device": ["crossbar", "digital"], "device_options": {"read_noise_std": [0.1]}}},
         "device 'digital' has no setting 'read_noise_std'"),
        ({"fixed": {"device": "digital", "device_options": {"adc_bits": 6}}, "grid": {"seed": [0]}},
         "device 'digital' has no setting 'adc_bits'"),
        ({"grid": {"device": ["crossbar", "optical"]}}, "unknown device 'optical'"),
        ({"grid": {"rule": ["dfa", "nosuchrule"]}}, "training rule='nosuchrule': unknown rule 'nosuchrule'"),
        ({"grid": {"lr": [0.01, -1.0]}}, "training lr=-1.0: learning rate must be a positive number"),
        ({"grid": {"preset": ["default", "noisy"]}}, "unknown crossbar preset 'noisy'"),
        ({"grid": {"device_options": {"read_noise_std": [-0.1]}}}, "training device_options.read_noise_std=-0.1: crossbar read_noise_std must be"),
        ({"grid": {"device_options": {"disabled": [["dac"], ["optics"]]}}}, "unknown crossbar stage(s) ['optics']"),
        ({"grid": {"epochs": [100, 5]}, "fixed": {"dataset": "vowels"}, "sweep": {}}, None),
    ],
)
def test_spec_rejects_bad_input(values, expected, tmp_path):
    if expected is None:
        # The control case: a valid specification passes every check.
        spec = spec_from_mapping(values, source="s.toml", base_dir=tmp_path, default_out=tmp_path / "out")
        assert len(spec.trainings()) == 2
        return
    assert expected in spec_error(values, tmp_path)


def test_spec_same_training_twice(tmp_path):
    message = spec_error({"grid": {"checkpoint_every": [0, 5]}}, tmp_path)
    assert "checkpoint_every=0" in message
    assert "checkpoint_every=5" in message
    assert "are the same training" in message


def test_spec_default_equals_explicit(tmp_path):
    explicit = {"fixed": {"epochs": 100, "device_options": {"read_noise_std": 0.02}}, "grid": {"seed": [0]}}
    implicit = {"grid": {"seed": [0]}}
    first = spec_from_mapping(explicit, default_out=tmp_path).trainings()
    second = spec_from_mapping(implicit, default_out=tmp_path).trainings()
    assert first[0].key == second[0].key


def test_spec_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "missing.toml")
    broken = write_spec(tmp_path, "[grid\nseed = [0]\n", "broken.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_spec(broken)


def test_spec_paths_relative_to_file(tmp_path):
    (tmp_path / "specs").mkdir()
    text = '[sweep]\nout = "results"\n[fixed]\ndata_dir = "data"\n[grid]\nseed = [0]\n'
    spec = load_spec(write_spec(tmp_path / "specs", text))
    assert spec.out == tmp_path / "specs" / "results"
    assert spec.fixed["data_dir"] == str((tmp_path / "specs" / "data").absolute())
    default = load_spec(write_spec(tmp_path / "specs", "[grid]\nseed = [0]\n", "plain.toml"))
    assert default.out == tmp_path / "specs" / "plain"
    assert default.retries == 1


def test_run_sweep_checks_before_start(tmp_path):
    spec = load_spec(write_spec(tmp_path, "[grid]\nlr = [0.01, -1.0]\n", "bad.toml"))
    with pytest.raises(ConfigError, match="learning rate"):
        run_sweep(spec, workers=1, progress=False)
    assert not spec.out.exists()


def test_cli_bad_spec_is_one_line(tmp_path, capsys):
    path = write_spec(tmp_path, "[grid]\n[grid.device_options]\nread_nose_std = [0.1]\n", "typo.toml")
    assert main(["sweep", str(path), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "read_nose_std" in err[0]


def test_missing_dask_names_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)
    path = write_spec(tmp_path, "[fixed]\nepochs = 1\n[grid]\nseed = [0]\n", "nodask.toml")
    assert main(["sweep", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pnn-lab[sweep]'" in err
    assert not (tmp_path / "nodask" / ".sweep.lock").exists()


# ----------------------------------------------------------------------- training keys
def test_training_key_stable():
    config = resolve_config(TrainConfig(hidden=[8], seed=3))
    assert training_key(config) == training_key(resolve_config(TrainConfig(hidden=[8], seed=3)))
    assert len(training_key(config)) == 16


def test_training_key_ignores_storage():
    config = resolve_config(TrainConfig(hidden=[8]))
    moved = resolve_config(TrainConfig(hidden=[8], out="elsewhere", data_dir="/data", checkpoint_every=5))
    assert training_key(config) == training_key(moved)


@pytest.mark.parametrize(
    "change",
    [{"seed": 1}, {"hidden": [9]}, {"rule_options": {"feedback_scale": 2.0}}, {"preset": "ideal"},
     {"device_options": {"read_noise_std": 0.05}}, {"device_options": {"disabled": ["adc"]}}, {"lr": 0.02}],
)
def test_training_key_changes(change):
    base = resolve_config(TrainConfig(hidden=[8]))
    changed = resolve_config(TrainConfig(**{"hidden": [8], **change}))
    assert training_key(base) != training_key(changed)


def test_training_key_resolves_device_defaults():
    implicit = resolve_config(TrainConfig(hidden=[8]))
    explicit = resolve_config(TrainConfig(hidden=[8], preset="default", device_options={"read_noise_std": 0.02}))
    assert training_key(implicit) == training_key(explicit)


def test_spec_int_and_float_same_key(tmp_path):
    as_int = spec_from_mapping({"grid": {"device_options": {"read_noise_std": [0]}}}, default_out=tmp_path)
    as_float = spec_from_mapping({"grid": {"device_options": {"read_noise_std": [0.0]}}}, default_out=tmp_path)
    assert as_int.axes[0].values == (0.0,)
    assert as_int.trainings()[0].key == as_float.trainings()[0].key


# ----------------------------------------------------------------------- table and lock
def test_table_replaces_row(tmp_path):
    path = tmp_path / "results.csv"
    table = ResultsTable.open(path, ["seed"])
    table.record("k1", {"seed": 0}, {"status": "failed", "error": "boom", "attempts": 2})
    table.record("k2", {"seed": 1}, {"status": "done", "test_accuracy": 0.5, "attempts": 1})
    table.record("k1", {"seed": 0}, {"status": "done", "test_accuracy": 0.75, "attempts": 1})
    rows = read_results(path)
    assert [row["key"] for row in rows] == ["k2", "k1"]
    assert rows[1]["status"] == "done"
    assert rows[1]["error"] == ""
    assert rows[1]["test_accuracy"] == "0.75"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_table_keeps_old_columns(tmp_path):
    path = tmp_path / "results.csv"
    old = ResultsTable.open(path, ["seed", "lr"])
    old.record("k1", {"seed": 0, "lr": 0.1}, {"status": "done"})
    new = ResultsTable.open(path, ["seed", "epochs"])
    new.record("k2", {"seed": 1, "epochs": 5}, {"status": "done"})
    rows = read_results(path)
    assert rows[0]["lr"] == "0.1"
    assert rows[1]["epochs"] == "5"
    assert rows[1]["lr"] == ""


def test_table_rejects_foreign_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="not a sweep results table"):
        ResultsTable.open(path, ["seed"])


def test_lock_rejects_second_sweep(tmp_path):
    with SweepLock(tmp_path):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with SweepLock(tmp_path):
                pass
    assert not (tmp_path / ".sweep.lock").exists()


def test_lock_removes_stale(tmp_path):
    import socket  # noqa: PLC0415

    # A pid above the kernel's maximum (4194304) never runs.
    (tmp_path / ".sweep.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))
    with SweepLock(tmp_path):
        assert json.loads((tmp_path / ".sweep.lock").read_text())["pid"] == os.getpid()


# -------------------------------------------------------------------------------- plot
def test_plot_series_mean_and_band(tmp_path):
    values = {"grid": {"rule": ["dfa"], "seed": [0, 1], "device_options": {"read_noise_std": [0.0, 0.1]}}}
    spec = spec_from_mapping(values, default_out=tmp_path)
    table = ResultsTable.open(tmp_path / "results.csv", [axis.name for axis in spec.axes])
    accuracy = {(0, 0.0): 0.9, (1, 0.0): 0.7, (0, 0.1): 0.5, (1, 0.1): 0.4}
    for training in spec.trainings():
        point = (training.values["seed"], training.values["device_options.read_noise_std"])
        table.record(training.key, training.values, {"status": "done", "test_accuracy": accuracy[point]})
    rows = read_results(table.path)

    noise = spec.axes[2]
    series = sweep_series(rows, noise, [], "dfa")
    assert list(series) == ["dfa"]
    xs, mean, low, high = series["dfa"]
    np.testing.assert_allclose(xs, [0.0, 0.1])
    np.testing.assert_allclose(mean, [0.8, 0.45])
    np.testing.assert_allclose(low, [0.7, 0.4])
    np.testing.assert_allclose(high, [0.9, 0.5])

    png = plot_sweep(spec, table.path, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_needs_numeric_axis(tmp_path):
    spec = spec_from_mapping({"grid": {"seed": [0, 1], "feedback": ["random", "physical"]}}, default_out=tmp_path)
    with pytest.raises(ConfigError, match="no numeric axis besides seed"):
        plot_sweep(spec, tmp_path / "results.csv", tmp_path / "plot.png")


# ------------------------------------------------------------------ worker-side task
def task_settings(run_dir: Path) -> dict:
    return resolve_config(TrainConfig(hidden=[8], epochs=2, out=str(run_dir))).to_dict()


def test_task_resumes_from_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    first = run_training(task_settings(run_dir))
    assert first["ok"], first.get("error")
    # A run stopped after its last checkpoint but before its summary resumes, not restarts.
    (run_dir / "summary.json").unlink()
    config_mtime = (run_dir / "config.json").stat().st_mtime_ns
    again = run_training(task_settings(run_dir))
    assert again["ok"], again.get("error")
    assert again["test_accuracy"] == first["test_accuracy"]
    assert (run_dir / "config.json").stat().st_mtime_ns == config_mtime


def test_task_restarts_partial_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    result = run_training(task_settings(run_dir))
    assert result["ok"], result.get("error")
    assert json.loads((run_dir / "config.json").read_text())["config"]["hidden"] == [8]


def test_task_keeps_foreign_files(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    result = run_training(task_settings(run_dir))
    assert not result["ok"]
    assert "notes.txt" in result["error"]
    assert (run_dir / "notes.txt").read_text() == "mine"
