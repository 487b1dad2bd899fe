"""``pnn calibrate`` driven through its prompts on standard input: accept, redo, skip and --yes."""

from __future__ import annotations

import io
import sys

import pytest

from pnn.calibration import CalibrationStore, read_record
from pnn.cli import main


def calibrate(tmp_path, monkeypatch, answers: str, *options: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    return main([
        "calibrate", "--device", "crossbar", "--points", "30", "--repeats", "2", "--quiet",
        "--store", str(tmp_path / "store"), *options,
    ])


def test_accept_writes_record_and_plot(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "a\n") == 0
    out = capsys.readouterr().out
    # By default a node computing f(W x + b) is swept over weights and bias too.
    assert "sweep       random design, 30 input point(s) at 4 parameter setting(s), weight in [-1.225, 1.225], bias in [-1, 1]" in out
    assert "== node 'crossbar' ==" in out
    assert "device      CrossbarNode, preset default, seed 0, activation tanh" in out
    assert "live        3 reading(s) at the hold input" in out
    assert "amplitude" in out
    assert "Accept, redo or skip this calibration? [a/r/s] a" in out
    records = CalibrationStore(tmp_path / "store").records()
    assert len(records) == 1
    assert records[0].content_hash in out
    plots = list((tmp_path / "store" / "plots").glob("crossbar-*.png"))
    assert len(plots) == 1
    assert plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_redo_measures_again(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "r\na\n") == 0
    out = capsys.readouterr().out
    assert out.count("  measured    120 point(s) x 2 repeat(s)") == 2
    assert out.count("Accept, redo or skip this calibration?") == 2
    assert len(CalibrationStore(tmp_path / "store").records()) == 1


def test_skip_writes_nothing(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "s\n") == 0
    out = capsys.readouterr().out
    assert "skipped: no record written for node 'crossbar'" in out
    assert CalibrationStore(tmp_path / "store").records() == []


def test_unclear_answer_is_asked_again(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "maybe\naccept\n") == 0
    out = capsys.readouterr().out
    assert "please answer a (accept) or r (redo) or s (skip)" in out
    assert len(CalibrationStore(tmp_path / "store").records()) == 1


def test_end_of_input_skips(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "") == 0
    assert "end of input: skipping" in capsys.readouterr().out
    assert CalibrationStore(tmp_path / "store").records() == []


def test_yes_accepts_without_asking(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "", "--yes", "--model", "linear", "--notes", "bench 3") == 0
    out = capsys.readouterr().out
    assert "accept (--yes)" in out
    (record,) = CalibrationStore(tmp_path / "store").records()
    assert record.model == "linear"
    assert record.notes == "bench 3"
    assert read_record(next((tmp_path / "store").glob("*.json"))) == record


def test_parameter_sweep_and_grid(tmp_path, monkeypatch, capsys):
    code = calibrate(tmp_path, monkeypatch, "", "--yes", "--design", "grid", "--sweep-parameter", "bias=-1:1",
                     "--parameter-points", "3", "--valid-for", "2")
    assert code == 0
    (record,) = CalibrationStore(tmp_path / "store").records()
    assert record.sweep["parameters"] == {"bias": [-1.0, 1.0]}
    assert record.sweep["n_points"] == 90
    assert (record.expires_at - record.created_at).total_seconds() == pytest.approx(7200)


def test_failed_fit_with_yes_exits_with_error(tmp_path, monkeypatch, capsys):
    code = calibrate(tmp_path, monkeypatch, "", "--yes", "--points", "2", "--no-parameter-sweep")
    out = capsys.readouterr().out
    assert code == 1
    assert "error: node 'crossbar': 2 sweep point(s) leave too few to fit the tanh model" in out
    assert "crossbar         failed" in out


def test_failed_fit_can_be_skipped(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "s\n", "--points", "2", "--no-parameter-sweep") == 0
    assert "Redo or skip this node? [r/s] s" in capsys.readouterr().out


def test_range_outside_limits_names_the_node(tmp_path, monkeypatch, capsys):
    assert calibrate(tmp_path, monkeypatch, "", "--input-range", "-3", "3") == 1
    err = capsys.readouterr().err
    assert "node 'crossbar': the sweep range [-3, 3] of the inputs leaves their allowed range [-1, 1]" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sweep-parameter", "bias"], "is not NAME=LOWER:UPPER"),
        (["--valid-for", "0"], "--valid-for must be a positive number"),
        (["--model", "spline"], "unknown transfer model 'spline'"),
        (["--sweep-parameter", "gain=0:1"], "no parameter 'gain' to sweep"),
        (["--node", "layer1"], "--node selects nodes of a station"),
        (["--no-parameter-sweep", "--sweep-parameter", "bias=0:1"], "contradict each other"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, monkeypatch, capsys, options, message):
    assert calibrate(tmp_path, monkeypatch, "", *options) == 2
    assert message in capsys.readouterr().err


def test_needs_station_or_device(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate"])
    assert exit_info.value.code == 2
    assert "one of the arguments --station --device is required" in capsys.readouterr().err
