"""pnn bench: the work counts, and a smoke run of --quick --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pnn.benchmark import flops_per_sample

REPO = Path(__file__).resolve().parents[1]


def test_flops_per_sample_counts():
    # 784-256-256-10: forward and weight gradients each 784*256 + 256*256 + 256*10 multiply-adds.
    products = 784 * 256 + 256 * 256 + 256 * 10
    assert flops_per_sample("dfa") == 2 * (2 * products + 2 * 256 * 10)
    assert flops_per_sample("bp") == 2 * (2 * products + 256 * 256 + 256 * 10)
    with pytest.raises(ValueError, match="unknown method"):
        flops_per_sample("ep")


@pytest.mark.slow
def test_quick_bench_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "pnn", "bench", "--quick", "--json", str(path)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(path.read_text())
    assert data["quick"] is True
    assert data["matmul_flops_per_second"] > 0
    assert {row["batch"] for row in data["throughput"]} == {1, 64, 256}
    for row in data["throughput"]:
        assert row["samples_per_second"]["dfa_digital"] > 0
        assert row["samples_per_second"]["dfa_crossbar"] > 0
    for key in ("numpy", "numba", "torch", "cpu_count"):
        assert key in data["versions"]
    startup = data["startup"]
    assert 0 < startup["help_seconds"] < 30
    assert 0 < startup["first_step_warm_cache_seconds"] < startup["first_step_cold_cache_seconds"] + 30
    assert "PyTorch backprop" in result.stdout
