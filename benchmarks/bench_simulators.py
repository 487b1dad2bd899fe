"""Forward-pass speed of each simulator against a vectorized NumPy implementation of its model.

For every simulator the script builds one node with the default preset and checks that its
NumPy reference gives the same outputs with the noise stages off. It then times both at the same
batch size (after warm-up, median of repeats) and prints samples per second and the ratio as a
Markdown table. Two cases per optical node:

- ``forward``: phases unchanged since the last call, so cached transfer matrices are reused.
- ``update + forward``: a parameter update before every forward pass, as in training, so the
  transfer matrices are rebuilt each time.

``pnn samples/s`` times the public calls (``forward``, ``apply_update``), which validate every
input and update first. ``pnn kernels`` times the same work without those checks
(``_forward`` and ``_write_parameters``), because the NumPy references do no checks either.

Two NumPy references per optical node: ``propagate`` simulates the light as the model describes
it (the mesh column by column; one angular-spectrum propagation per example, by FFT), and
``cached`` uses the same algorithm as the pnn kernels (a transfer matrix from the lit inputs to
the detectors, rebuilt when the phases change, then one matrix product per batch). Both give
the same outputs.

Usage::

    python benchmarks/bench_simulators.py [--batch 64] [--repeats 7] [--json PATH]

Run it with OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 on a shared machine so that neither side
gets more cores than the other.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.fft

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnn.simulators.crossbar import CROSSBAR_PRESETS, CrossbarNode  # noqa: E402
from pnn.simulators.diffractive import DIFFRACTIVE_PRESETS, DiffractiveNode  # noqa: E402
from pnn.simulators.mzi import MZI_PRESETS, MziNode, mesh_layout  # noqa: E402

Q = 1.602176634e-19


# ------------------------------------------------------------------------------ timing
def time_per_call(function: Callable[[], object], repeats: int, min_seconds: float = 0.2) -> float:
    """Return the median time of one call in seconds, after warm-up."""
    for _ in range(3):
        function()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            function()
        if time.perf_counter() - start > min_seconds / repeats or calls > 1e6:
            break
        calls *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


# ----------------------------------------------------------------------- crossbar reference
def crossbar_reference(node: CrossbarNode) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    cfg = node.config
    dac = 2 ** (cfg.dac_bits - 1) - 1
    adc = 2 ** (cfg.adc_bits - 1) - 1
    noise = cfg.read_noise_std * node.full_scale if cfg.enabled("read_noise") else 0.0

    def forward(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.round(x * dac) / dac if cfg.enabled("dac") else x
        a = x @ node._w.T + node._b
        if noise:
            a = a + noise * rng.standard_normal(a.shape).astype(a.dtype)
        if cfg.enabled("saturation"):
            a = np.clip(a, -node.full_scale, node.full_scale)
        if cfg.enabled("adc"):
            a = np.round(a / node.full_scale * adc) / adc * node.full_scale
        return np.tanh(a)

    return forward


# ---------------------------------------------------------------------------- MZI reference
def mzi_blocks(node: MziNode, theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Return every MZI's 2x2 transfer matrix, vectorized over MZIs, shape (n_mzi, 2, 2)."""
    cfg = node.config
    if cfg.enabled("crosstalk"):
        kappa = cfg.crosstalk
        upper = node._has_upper
        lower = np.zeros_like(upper)
        lower[:-1] = upper[1:]
        effective = []
        for value in (theta, phi):
            extra = np.zeros_like(value)
            extra[upper] += value[np.flatnonzero(upper) - 1]
            extra[lower] += value[np.flatnonzero(lower) + 1]
            effective.append(value + kappa * extra)
        theta, phi = effective
    c1, s1 = np.cos(np.pi / 4 + node.alpha_in), np.sin(np.pi / 4 + node.alpha_in)
    c2, s2 = np.cos(np.pi / 4 + node.alpha_out), np.sin(np.pi / 4 + node.alpha_out)
    et, ep, t = np.exp(1j * theta), np.exp(1j * phi), node.amplitude
    blocks = np.empty((theta.size, 2, 2), dtype=complex)
    blocks[:, 0, 0] = t * ep * (c2 * c1 * et - s2 * s1)
    blocks[:, 0, 1] = t * 1j * (c2 * s1 * et + s2 * c1)
    blocks[:, 1, 0] = t * 1j * ep * (s2 * c1 * et + c2 * s1)
    blocks[:, 1, 1] = t * (c2 * c1 - s2 * s1 * et)
    return blocks


def mzi_detect(node: MziNode, fields: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Balanced detection and readout of output fields (batch, >= 2 n_out)."""
    cfg = node.config
    power = np.abs(fields[:, : 2 * node.n_out]) ** 2
    plus, minus = power[:, 0::2], power[:, 1::2]
    a = (plus - minus) * node.detector_scale
    variance = node._shot_coefficient * (plus + minus) + node._dark_variance
    if node._shot_coefficient or node._dark_variance:
        a = a + np.sqrt(variance) * rng.standard_normal(a.shape)
    if cfg.enabled("saturation"):
        a = np.clip(a, -node.full_scale, node.full_scale)
    if cfg.enabled("adc"):
        steps = 2 ** (cfg.adc_bits - 1) - 1
        a = np.round(a / node.full_scale * steps) / steps * node.full_scale
    return np.tanh(a)


def mzi_inputs(node: MziNode, x: np.ndarray) -> np.ndarray:
    cfg = node.config
    if cfg.enabled("input_dac"):
        steps = 2 ** (cfg.input_dac_bits - 1) - 1
        x = np.round(x * steps) / steps
    lit = np.zeros((x.shape[0], node.n_modes), dtype=complex)
    lit[:, : node.n_in] = x
    lit[:, node.n_in : node.n_in + cfg.bias_modes] = cfg.bias_amplitude
    return lit


class MziPropagateReference:
    """The mesh column by column: gather the MZI pairs of a column and apply their 2x2 blocks."""

    def __init__(self, node: MziNode) -> None:
        self.node = node
        self.column_start, self.top_mode = mesh_layout(node.n_modes)
        self.set_phases(node.phases["theta"], node.phases["phi"])

    def set_phases(self, theta: np.ndarray, phi: np.ndarray) -> None:
        self.blocks = mzi_blocks(self.node, theta, phi)

    def forward(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        fields = mzi_inputs(self.node, x)
        for c in range(len(self.column_start) - 1):
            rows = slice(self.column_start[c], self.column_start[c + 1])
            top = self.top_mode[rows]
            block = self.blocks[rows]
            u, v = fields[:, top], fields[:, top + 1]
            fields[:, top] = block[:, 0, 0] * u + block[:, 0, 1] * v
            fields[:, top + 1] = block[:, 1, 0] * u + block[:, 1, 1] * v
        return mzi_detect(self.node, fields, rng)


class MziCachedReference(MziPropagateReference):
    """The mesh's full matrix, rebuilt from the blocks when the phases change, then one matmul."""

    def set_phases(self, theta: np.ndarray, phi: np.ndarray) -> None:
        super().set_phases(theta, phi)
        n = self.node.n_modes
        u = np.eye(n, dtype=complex)
        for c in range(len(self.column_start) - 1):
            rows = slice(self.column_start[c], self.column_start[c + 1])
            top = self.top_mode[rows]
            block = self.blocks[rows]
            upper, lower = u[top, :], u[top + 1, :]
            u[top, :] = block[:, 0, 0, None] * upper + block[:, 0, 1, None] * lower
            u[top + 1, :] = block[:, 1, 0, None] * upper + block[:, 1, 1, None] * lower
        self.matrix_t = np.ascontiguousarray(u[: 2 * self.node.n_out].T)

    def forward(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return mzi_detect(self.node, mzi_inputs(self.node, x) @ self.matrix_t, rng)


# -------------------------------------------------------------------- diffractive reference
def diffractive_camera(node: DiffractiveNode, fields: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera stages on the region pixels (batch, regions * pixels) and differential readout."""
    cfg = node.config
    electrons = np.abs(fields) ** 2 * node._electrons_per_unit
    if cfg.enabled("shot_noise"):
        electrons = electrons + np.sqrt(electrons) * rng.standard_normal(electrons.shape)
    if cfg.enabled("read_noise"):
        electrons = electrons + cfg.read_noise_e * rng.standard_normal(electrons.shape)
    if cfg.enabled("saturation"):
        electrons = np.clip(electrons, 0.0, cfg.full_well_e)
    if cfg.enabled("quantization"):
        step = cfg.full_well_e / (2**cfg.bit_depth - 1)
        electrons = np.round(electrons / step) * step
    sums = electrons.reshape(fields.shape[0], 2 * node.n_out, -1).sum(axis=2)
    a = (sums[:, 0::2] - sums[:, 1::2]) * node._region_scale
    return np.tanh(a)


def diffractive_amplitudes(node: DiffractiveNode, x: np.ndarray) -> np.ndarray:
    cfg = node.config
    if cfg.enabled("input_dac"):
        steps = 2 ** (cfg.input_dac_bits - 1) - 1
        x = np.round(x * steps) / steps
    bias = np.full((x.shape[0], cfg.bias_regions), cfg.bias_amplitude)
    return np.concatenate([x, bias], axis=1)


class DiffractivePropagateReference:
    """One angular-spectrum propagation per example, vectorized over the batch."""

    def __init__(self, node: DiffractiveNode) -> None:
        self.node = node
        self.masks = node.input_masks.astype(float)
        self.set_phases(node.phases["phase"])

    def set_phases(self, phase: np.ndarray) -> None:
        self.modulation = np.exp(1j * phase)

    def forward(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        node = self.node
        n, m = node.slm_pixels, node.n_grid
        start = (m - n) // 2
        slm = np.tensordot(diffractive_amplitudes(node, x), self.masks, axes=1) * self.modulation
        grid = np.zeros((x.shape[0], m, m), dtype=complex)
        grid[:, start : start + n, start : start + n] = slm
        camera = scipy.fft.ifft2(node._transfer_function * scipy.fft.fft2(grid))[:, start : start + n, start : start + n]
        return diffractive_camera(node, camera.reshape(x.shape[0], -1)[:, node._pixel_index], rng)


class DiffractiveCachedReference(DiffractivePropagateReference):
    """The kernels' algorithm: a fixed mask-to-region propagator, per-region fields, one matmul."""

    def set_phases(self, phase: np.ndarray) -> None:
        node = self.node
        sources = self.masks.reshape(self.masks.shape[0], -1) * np.exp(1j * phase.ravel())
        self.transfer = sources @ node._propagator

    def forward(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return diffractive_camera(self.node, diffractive_amplitudes(self.node, x) @ self.transfer, rng)


# -------------------------------------------------------------------------------- driver
def check_same(label: str, ours: np.ndarray, reference: np.ndarray) -> None:
    """Stop the benchmark if the reference does not compute the same model."""
    if not np.allclose(ours, reference, rtol=1e-6, atol=1e-6):
        worst = float(np.max(np.abs(ours - reference)))
        raise SystemExit(f"{label}: the NumPy reference differs from the kernel by up to {worst:g}")


def small_update(spec_shapes: dict, rng: np.random.Generator, size: float) -> dict:
    return {name: rng.uniform(-size, size, shape) for name, shape in spec_shapes.items()}


def run(batch: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []

    def record(simulator: str, shape: str, case: str, reference: str, public: float, kernels: float,
               theirs: float) -> None:
        rows.append(
            {
                "simulator": simulator,
                "shape": shape,
                "case": case,
                "reference": reference,
                "pnn_samples_per_s": batch / public,
                "pnn_kernels_samples_per_s": batch / kernels,
                "numpy_samples_per_s": batch / theirs,
                "speedup": theirs / public,
                "speedup_kernels": theirs / kernels,
            }
        )

    # Crossbar: 256 -> 128, default preset.
    crossbar = CrossbarNode(256, 128, rng=1, config=CROSSBAR_PRESETS["default"])
    x = rng.uniform(-1, 1, (batch, 256)).astype(np.float32)
    quiet = CrossbarNode(256, 128, rng=1, config=CROSSBAR_PRESETS["default"].without("read_noise"))
    check_same("crossbar", quiet.forward(x), crossbar_reference(quiet)(x, rng))
    reference = crossbar_reference(crossbar)
    public = time_per_call(lambda: crossbar.forward(x), repeats)
    kernels = time_per_call(lambda: crossbar._forward(x), repeats)
    theirs = time_per_call(lambda: reference(x, rng), repeats)
    record("crossbar", "256 -> 128", "forward", "same algorithm", public, kernels, theirs)

    # MZI mesh: 31 inputs + 1 bias mode, 16 balanced outputs: 32 modes, 496 MZIs.
    config = MZI_PRESETS["default"]
    mesh = MziNode(31, 16, rng=2, config=config)
    x = rng.uniform(-1, 1, (batch, 31))
    quiet = MziNode(31, 16, rng=2, config=config.without("shot_noise", "dark_noise"))
    for cls in (MziPropagateReference, MziCachedReference):
        check_same(f"mzi {cls.__name__}", quiet.forward(x), cls(quiet).forward(x, rng))
    shapes = {name: spec.shape for name, spec in mesh.parameters.items()}
    public_forward = time_per_call(lambda: mesh.forward(x), repeats)
    kernels_forward = time_per_call(lambda: mesh._forward(x), repeats)

    def mesh_step() -> None:
        mesh.apply_update(small_update(shapes, rng, 0.01))
        mesh.forward(x)

    def mesh_step_kernels() -> None:
        mesh._write_parameters({k: v + rng.uniform(-0.01, 0.01, v.shape) for k, v in mesh.setpoints.items()})
        mesh._forward(x)

    public_step = time_per_call(mesh_step, repeats)
    kernels_step = time_per_call(mesh_step_kernels, repeats)
    for cls, label in ((MziPropagateReference, "propagate"), (MziCachedReference, "cached")):
        ref = cls(mesh)

        def ref_step(ref=ref) -> None:
            phases = {k: v + rng.uniform(-0.01, 0.01, v.shape) for k, v in mesh.phases.items()}
            ref.set_phases(phases["theta"], phases["phi"])
            ref.forward(x, rng)

        theirs = time_per_call(lambda ref=ref: ref.forward(x, rng), repeats)
        record("mzi", "31 -> 16 (32 modes)", "forward", label, public_forward, kernels_forward, theirs)
        theirs = time_per_call(ref_step, repeats)
        record("mzi", "31 -> 16 (32 modes)", "update + forward", label, public_step, kernels_step, theirs)

    # Diffractive layer: 12 -> 7, default preset (16 x 16 mask on a 32 x 32 grid).
    config = DIFFRACTIVE_PRESETS["default"]
    layer = DiffractiveNode(12, 7, rng=3, config=config)
    x = rng.uniform(-1, 1, (batch, 12))
    quiet = DiffractiveNode(12, 7, rng=3, config=config.without("shot_noise", "read_noise"))
    for cls in (DiffractivePropagateReference, DiffractiveCachedReference):
        check_same(f"diffractive {cls.__name__}", quiet.forward(x), cls(quiet).forward(x, rng))
    shape_text = f"12 -> 7 ({layer.slm_pixels}x{layer.slm_pixels} mask)"
    public_forward = time_per_call(lambda: layer.forward(x), repeats)
    kernels_forward = time_per_call(lambda: layer._forward(x), repeats)

    def layer_step() -> None:
        layer.apply_update({"phase": rng.uniform(-0.01, 0.01, layer.parameters["phase"].shape)})
        layer.forward(x)

    def layer_step_kernels() -> None:
        setpoint = layer.setpoints["phase"]
        layer._write_parameters({"phase": setpoint + rng.uniform(-0.01, 0.01, setpoint.shape)})
        layer._forward(x)

    public_step = time_per_call(layer_step, repeats)
    kernels_step = time_per_call(layer_step_kernels, repeats)
    for cls, label in ((DiffractivePropagateReference, "propagate"), (DiffractiveCachedReference, "cached")):
        ref = cls(layer)

        def ref_step(ref=ref) -> None:
            ref.set_phases(layer.phases["phase"] + rng.uniform(-0.01, 0.01, layer.phases["phase"].shape))
            ref.forward(x, rng)

        theirs = time_per_call(lambda ref=ref: ref.forward(x, rng), repeats)
        record("diffractive", shape_text, "forward", label, public_forward, kernels_forward, theirs)
        theirs = time_per_call(ref_step, repeats)
        record("diffractive", shape_text, "update + forward", label, public_step, kernels_step, theirs)
    return rows


def markdown(rows: list[dict], batch: int) -> str:
    lines = [
        f"| simulator | layer | case (batch {batch}) | NumPy reference | pnn samples/s | pnn kernels samples/s "
        "| NumPy samples/s | speed-up | speed-up of kernels |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['simulator']} | {row['shape']} | {row['case']} | {row['reference']} | "
            f"{row['pnn_samples_per_s']:,.0f} | {row['pnn_kernels_samples_per_s']:,.0f} | "
            f"{row['numpy_samples_per_s']:,.0f} | {row['speedup']:.1f}x | {row['speedup_kernels']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="examples per forward pass (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported (default 7)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    rows = run(args.batch, args.repeats)
    print(markdown(rows, args.batch))
    if args.json:
        record = {
            "batch": args.batch,
            "repeats": args.repeats,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "results": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
