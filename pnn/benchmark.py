"""Training-speed benchmark: pnn's DFA against PyTorch backprop and the matrix-multiply limit.

Everything is measured in one process, after a warm-up, as the median of several repeats, so the
ratios compare like with like on the machine at hand. ``pnn bench`` prints the tables and, with
``--json``, writes every figure with the versions and thread counts it was measured with.

Figures:

- the machine's float32 matrix-multiply rate (NumPy's BLAS on square matrices);
- training throughput in samples per second on MNIST-shaped random data for a
  784-256-256-10 tanh network: DFA on ideal digital layers and on the crossbar with its default
  imperfections, and PyTorch backprop with SGD on the same widths, at several batch sizes;
- the minimum floating-point work per sample of each method and the fraction of the
  matrix-multiply rate each achieves;
- peak memory allocated during one training step (tracemalloc) for DFA and backprop as the
  depth grows;
- the time from ``pnn train`` starting to its first training step, with a cold and a warm Numba
  cache, and the time of ``pnn --help``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_benchmarks", "matmul_rate", "flops_per_sample", "format_report"]

WIDTHS = (784, 256, 256, 10)


def _median_time(function: Callable[[], None], repeats: int) -> float:
    function()  # warm-up: Numba compilation, BLAS thread start, allocator
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """Return the float32 matrix-multiply rate of NumPy's BLAS, in FLOP/s (median of repeats)."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    seconds = _median_time(lambda: a @ b, repeats)
    return 2.0 * size**3 / seconds


def flops_per_sample(method: str, widths: Sequence[int] = WIDTHS) -> int:
    """Return the minimum floating-point operations per training example of ``method``.

    Counts multiply-adds of the matrix products only (two operations each): the forward pass,
    the weight gradients, and for ``dfa`` the projection of the error to each hidden layer, for
    ``bp`` the error sent back through every layer but the first.
    """
    layers = list(zip(widths[:-1], widths[1:]))
    forward = sum(n_in * n_out for n_in, n_out in layers)
    weight_gradients = forward
    if method == "dfa":
        extra = sum(n_out * widths[-1] for _, n_out in layers[:-1])
    elif method == "bp":
        extra = sum(n_in * n_out for n_in, n_out in layers[1:])
    else:
        raise ValueError(f"unknown method {method!r}; use 'dfa' or 'bp'")
    return 2 * (forward + weight_gradients + extra)


# ------------------------------------------------------------------------------ throughput
def _random_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, WIDTHS[0]), dtype=np.float32), rng.integers(0, WIDTHS[-1], n)


def _pnn_controller(device: str, preset: str | None, batch: int, widths: Sequence[int], rule: str = "dfa", seed: int = 0):
    from .controller import PhysicalNoProp  # noqa: PLC0415
    from .learning import make_rule  # noqa: PLC0415
    from .network import Encoder, PhysicalNetwork, Readout  # noqa: PLC0415
    from .simulators import get_device  # noqa: PLC0415

    kind = get_device(device)
    config = kind.config(preset)
    layers = [
        kind.build(widths[i], widths[i + 1], name=f"layer{i + 1}",
                   activation="linear" if i == len(widths) - 2 else "tanh", config=config,
                   rng=np.random.default_rng([seed, i]), preset=preset)
        for i in range(len(widths) - 1)
    ]
    network = PhysicalNetwork([Encoder(widths[0], method="none", lower=0.0, upper=1.0), *layers, Readout(widths[-1])])
    return PhysicalNoProp(network, make_rule(rule), batch_size=batch, epochs=1, lr=1e-3, lr_schedule="constant",
                          optimizer="sgd", momentum=0.0, progress=False)


def pnn_throughput(device: str, preset: str | None, batch: int, n_samples: int, repeats: int) -> float:
    """Return pnn's DFA training throughput, in samples per second, with plain SGD."""
    x, y = _random_mnist(n_samples)
    controller = _pnn_controller(device, preset, batch, WIDTHS)
    seconds = _median_time(lambda: controller.fit(x, y), repeats)
    return n_samples / seconds


def torch_throughput(batch: int, n_samples: int, repeats: int) -> float | None:
    """Return PyTorch backprop's throughput with SGD on the same widths, or None without torch."""
    try:
        import torch  # noqa: PLC0415 - optional baseline
    except ImportError:
        return None
    torch.manual_seed(0)
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_np, y_np = _random_mnist(n_samples)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)

    def epoch() -> None:
        for start in range(0, n_samples, batch):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[start : start + batch]), y[start : start + batch])
            loss.backward()
            optimizer.step()

    return n_samples / _median_time(epoch, repeats)


# ---------------------------------------------------------------------------------- memory
def pnn_step_memory(rule: str, depth: int, width: int = 256, batch: int = 64) -> int | None:
    """Return the peak bytes allocated during one training step, measured with tracemalloc.

    Returns None when ``rule`` is not available in this installation.
    """
    from .learning import RULES  # noqa: PLC0415

    if rule not in RULES:
        return None
    widths = (WIDTHS[0], *([width] * depth), WIDTHS[-1])
    x, y = _random_mnist(2 * batch)
    controller = _pnn_controller("digital", None, batch, widths, rule=rule)
    controller.fit(x[:batch], y[:batch])  # allocate optimizer state and caches first
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    controller._step(0, 0, x[batch:], y[batch:], controller.lr)
    peak = tracemalloc.get_traced_memory()[1] - baseline
    tracemalloc.stop()
    return int(peak)


# --------------------------------------------------------------------------------- startup
def _first_step_seconds(env: dict[str, str], workdir: Path) -> float:
    out = workdir / f"run-{time.monotonic_ns()}"
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "pnn", "train", "--quiet", "--epochs", "1", "--out", str(out)],
        check=True, capture_output=True, env=env, cwd=workdir,
    )
    with open(out / "metrics.jsonl", encoding="utf-8") as handle:
        first = next(json.loads(line) for line in handle if '"kind": "step"' in line)
    return float(first["time"]) - started


def startup_times() -> dict[str, float]:
    """Return seconds for ``pnn --help`` and to the first training step, cold and warm cache."""
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        # The child processes import this same pnn, installed or not.
        package_root = str(Path(__file__).resolve().parents[1])
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, NUMBA_CACHE_DIR=str(workdir / "numba-cache"), PYTHONPATH=python_path)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pnn", "--help"], check=True, capture_output=True, env=env)
        help_seconds = time.perf_counter() - started
        cold = _first_step_seconds(env, workdir)
        warm = statistics.median(_first_step_seconds(env, workdir) for _ in range(3))
    return {"help_seconds": help_seconds, "first_step_cold_cache_seconds": cold, "first_step_warm_cache_seconds": warm}


# ------------------------------------------------------------------------------------ run
def _versions() -> dict[str, Any]:
    import numba  # noqa: PLC0415

    try:
        import torch  # noqa: PLC0415

        torch_version, torch_threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch_version, torch_threads = None, None
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch_version,
        "torch_threads": torch_threads,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "blas_threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def run_benchmarks(quick: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every benchmark and return the figures as a dict (see the module docstring)."""
    say = progress or (lambda message: None)
    batches = (1, 64, 256)
    repeats = 3 if quick else 5
    samples = {1: 256 if quick else 2000, 64: 2048 if quick else 12800, 256: 4096 if quick else 25600}
    results: dict[str, Any] = {"quick": quick, "date": time.strftime("%Y-%m-%d"), "versions": _versions()}

    say("matrix-multiply rate")
    rate = matmul_rate(1024 if quick else 2048, repeats)
    results["matmul_flops_per_second"] = rate
    flops = {"dfa": flops_per_sample("dfa"), "bp": flops_per_sample("bp")}
    results["flops_per_sample"] = flops

    rows = []
    for batch in batches:
        n = samples[batch]
        say(f"throughput at batch {batch}")
        figures = {
            "dfa_digital": pnn_throughput("digital", None, batch, n, repeats),
            "dfa_crossbar": pnn_throughput("crossbar", "default", batch, n, repeats),
            "bp_torch": torch_throughput(batch, n, repeats),
        }
        row: dict[str, Any] = {"batch": batch, "samples_per_second": figures}
        row["fraction_of_matmul"] = {
            key: (value * flops["bp" if key == "bp_torch" else "dfa"] / rate if value else None)
            for key, value in figures.items()
        }
        torch_value = figures["bp_torch"]
        row["ratio_to_torch"] = {
            key: (value / torch_value if torch_value else None) for key, value in figures.items() if key != "bp_torch"
        }
        rows.append(row)
    results["throughput"] = rows

    say("memory per step")
    depths = (2, 4) if quick else (2, 4, 8, 16)
    results["step_memory_bytes"] = [
        {"depth": depth, "dfa": pnn_step_memory("dfa", depth), "bp": pnn_step_memory("bp", depth)} for depth in depths
    ]

    say("start-up times")
    results["startup"] = startup_times()
    return results


def _fmt(value: float | None, pattern: str) -> str:
    return "missing" if value is None else format(value, pattern)


def format_report(results: dict[str, Any]) -> str:
    """Return the results as Markdown tables."""
    lines = [
        f"matrix-multiply rate (float32, NumPy BLAS): {results['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s",
        f"minimum work per sample: DFA {results['flops_per_sample']['dfa'] / 1e6:.3f} MFLOP, "
        f"backprop {results['flops_per_sample']['bp'] / 1e6:.3f} MFLOP",
        "",
        "| batch | DFA digital (samples/s) | DFA crossbar (samples/s) | PyTorch backprop (samples/s) "
        "| digital / PyTorch | crossbar / PyTorch | digital, share of matmul rate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["throughput"]:
        figures, ratios = row["samples_per_second"], row["ratio_to_torch"]
        lines.append(
            f"| {row['batch']} | {_fmt(figures['dfa_digital'], ',.0f')} | {_fmt(figures['dfa_crossbar'], ',.0f')} "
            f"| {_fmt(figures['bp_torch'], ',.0f')} | {_fmt(ratios['dfa_digital'], '.2f')} "
            f"| {_fmt(ratios['dfa_crossbar'], '.2f')} | {_fmt(row['fraction_of_matmul']['dfa_digital'], '.1%')} |"
        )
    lines += ["", "| hidden layers | DFA peak per step (MB) | backprop peak per step (MB) |", "| --- | --- | --- |"]
    for row in results["step_memory_bytes"]:
        dfa = None if row["dfa"] is None else row["dfa"] / 1e6
        bp = None if row["bp"] is None else row["bp"] / 1e6
        lines.append(f"| {row['depth']} | {_fmt(dfa, '.2f')} | {_fmt(bp, '.2f')} |")
    startup = results["startup"]
    lines += [
        "",
        f"pnn --help: {startup['help_seconds']:.2f} s; first training step: "
        f"{startup['first_step_cold_cache_seconds']:.1f} s with a cold Numba cache, "
        f"{startup['first_step_warm_cache_seconds']:.1f} s with a warm one",
    ]
    return "\n".join(lines)
