"""Simulated free-space diffractive layer: an SLM phase mask, free-space propagation and a camera.

Model of one layer mapping n_in inputs to n_out outputs:

1. Input plane. The SLM window of ``n x n`` pixels (``slm_pixels``) is divided into a grid of
   square input regions, one per input plus ``bias_regions`` regions of constant light. An
   amplitude modulator imaged onto the SLM sets the real field amplitude of region k to the
   input x_k in [-1, 1] (a negative value is a pi phase), after an input DAC; bias regions carry
   ``bias_amplitude``. Pixels outside the regions are dark.
2. The SLM multiplies the field by ``exp(i phase)``, one trainable phase per pixel, in rad, with
   ``phase_levels`` levels over [0, 2 pi).
3. The field propagates ``distance_mm`` to the camera by the angular-spectrum method on a grid
   ``padding`` times wider than the window (:func:`propagate`). The grid is periodic, so light
   that leaves it re-enters on the other side. The default distance keeps the main diffraction
   lobe of every pixel inside the grid.
4. The camera images the central ``n x n`` window with pixels of the same pitch. Output j is the
   sum of the pixels of region 2j minus the sum of region 2j + 1 (differential detection), each
   region a square of ``region_pixels`` pixels on a grid of cells, divided by the signal of one
   region at the reference intensity::

       a_j = g (S_2j - S_2j+1) / (reference_e * region_pixels**2)

   where the reference intensity is the mean camera intensity with every input at full scale
   (total full-scale input power over the window's pixel count). The readout gain g is 1 for a
   bounded nonlinearity f and ``logit_gain`` for ``linear`` (an output layer). The node's output
   is ``f(a)``.

Camera stages, per pixel, in signal order (each switched off by :meth:`DiffractiveConfig.without`):
``shot_noise`` (Poisson statistics of the photoelectrons, Gaussian approximation),
``read_noise`` (Gaussian, ``read_noise_e`` electrons rms), ``saturation`` (the signal is clipped
to [0, ``full_well_e``]) and ``quantization`` (``bit_depth``-bit ADC steps of
``full_well_e / (2**bit_depth - 1)`` electrons). ``input_dac`` and ``phase_levels`` act on the
inputs and the mask. With every stage off, the node is its ideal model.

Because the layer is linear in the field, the camera field for any input is a sum of one field
per input region. Propagation from the mask to the output-region pixels is a fixed matrix (the
impulse response of the angular-spectrum transfer function, computed once), so a phase change
costs one small matrix product, and a forward pass one product of the inputs with the per-region
fields followed by the camera model. :meth:`DiffractiveNode.camera_fields` still propagates the
whole window by FFT, for inspection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
from numba import njit

from ..errors import ConfigError
from ._optics import FLOAT, TWO_PI, OpticalNode, StageConfigMixin, _activate, check_bits, check_positive, phase_spec

__all__ = [
    "DiffractiveConfig",
    "DiffractiveNode",
    "STAGES",
    "DIFFRACTIVE_PRESETS",
    "diffractive_preset",
    "angular_spectrum_transfer",
    "propagate",
]

#: Imperfection stages of the diffractive layer, in signal order.
STAGES = ("input_dac", "phase_levels", "shot_noise", "read_noise", "saturation", "quantization")


@dataclass(frozen=True)
class DiffractiveConfig(StageConfigMixin):
    """Optics and camera settings of a simulated diffractive layer."""

    _stages = STAGES
    _owner = "diffractive"

    slm_pixels: int | None = None
    """Side of the square phase mask, in mask pixels; None sizes it to the layer (at least 16,
    and enough for every input and output region). A layer that needs more raises."""
    pixel_pitch_um: float = 32.0
    """Pitch of one mask pixel, in micrometres (a macro-pixel of several SLM pixels driven
    together); the camera is sampled at the same pitch."""
    wavelength_nm: float = 532.0
    """Wavelength of the light, in nm."""
    distance_mm: float | None = None
    """Distance from the SLM to the camera, in mm; None uses n * pitch**2 / (2 * wavelength),
    where the main diffraction lobe of one pixel is as wide as the mask."""
    padding: int = 2
    """Width of the propagation grid, in multiples of the mask width."""
    phase_levels: int = 256
    """Number of phase levels of the SLM over [0, 2 pi) (``phase_levels`` stage)."""
    max_phase_step: float = math.pi / 4
    """Largest change of one mask phase per update, in rad."""
    input_dac_bits: int = 8
    """Resolution of the input amplitude modulator, in bits including sign (``input_dac``)."""
    bias_regions: int = 1
    """Number of input regions carrying constant bias light."""
    bias_amplitude: float = 1.0
    """Field amplitude of each bias region, relative to a full-scale input."""
    region_pixels: int = 1
    """Side of each square camera output region, in camera pixels; the signals of its pixels are
    summed. One pixel per region trained the vowel task to higher accuracy than 2 x 2 regions."""
    logit_gain: float = 4.0
    """Gain of the readout of a node without a bounded nonlinearity (an output layer producing
    logits): a is ``logit_gain`` times the region difference over the reference signal."""
    reference_e: float = 1000.0
    """Photoelectrons a camera pixel collects at the reference intensity (the mean camera
    intensity with every input at full scale); sets the exposure."""
    full_well_e: float = 10000.0
    """Full-well capacity of a camera pixel, in electrons (``saturation``)."""
    read_noise_e: float = 5.0
    """Read noise of a camera pixel, in electrons rms (``read_noise``)."""
    bit_depth: int = 12
    """Resolution of the camera's ADC, in bits (``quantization``)."""
    gradient_method: str = "adjoint"
    """Method of ``local_gradient``: ``"adjoint"`` (ideal model) or ``"perturbation"`` (in situ)."""
    perturbation_phase: float = 0.05
    """Size of each phase perturbation for ``"perturbation"``, in rad (rounded to whole levels)."""
    perturbation_samples: int | None = None
    """Number of perturbation codes; None uses a full orthogonal (Hadamard) set, one code per
    pixel rounded up to a power of two, and a number uses that many random sign codes."""
    disabled: frozenset[str] = field(default_factory=frozenset)
    """Names of the stages switched off, from :data:`STAGES`."""

    def __post_init__(self) -> None:
        self._check_stages()
        if self.slm_pixels is not None and (int(self.slm_pixels) != self.slm_pixels or self.slm_pixels < 2):
            raise ConfigError(f"diffractive slm_pixels must be None or an integer >= 2, got {self.slm_pixels}")
        for name in ("pixel_pitch_um", "wavelength_nm", "max_phase_step", "bias_amplitude", "reference_e", "full_well_e",
                     "logit_gain"):
            check_positive("diffractive", name, getattr(self, name))
        if self.distance_mm is not None:
            check_positive("diffractive", "distance_mm", self.distance_mm)
        check_positive("diffractive", "read_noise_e", self.read_noise_e, allow_zero=True)
        if int(self.padding) != self.padding or self.padding < 1:
            raise ConfigError(f"diffractive padding must be an integer >= 1, got {self.padding}")
        if int(self.phase_levels) != self.phase_levels or self.phase_levels < 2:
            raise ConfigError(f"diffractive phase_levels must be an integer >= 2, got {self.phase_levels}")
        if int(self.region_pixels) != self.region_pixels or self.region_pixels < 1:
            raise ConfigError(f"diffractive region_pixels must be an integer >= 1, got {self.region_pixels}")
        if int(self.bias_regions) != self.bias_regions or self.bias_regions < 0:
            raise ConfigError(f"diffractive bias_regions must be an integer >= 0, got {self.bias_regions}")
        check_bits("diffractive", "input_dac_bits", self.input_dac_bits)
        check_bits("diffractive", "bit_depth", self.bit_depth)
        self._check_gradient_settings()


#: Named presets. ``default`` (also ``slm-camera``) is a phase-only liquid-crystal SLM with 8-bit
#: phase (256 levels), driven in 4 x 4 groups of 8 um pixels (32 um mask pixels), and a 532 nm
#: laser. The camera is a 12-bit CMOS sensor with a 10,000 e- full well and 5 e- rms read noise,
#: exposed so that the mean pixel collects 1,000 e-. These are typical values for such a bench setup, not
#: figures fitted to one publication. ``ideal`` switches every stage off.
DIFFRACTIVE_PRESETS: dict[str, DiffractiveConfig] = {
    "default": DiffractiveConfig(),
    "slm-camera": DiffractiveConfig(),
    "ideal": DiffractiveConfig().without("all"),
}


def diffractive_preset(name: str) -> DiffractiveConfig:
    """Return the diffractive preset called ``name``, or raise ConfigError listing the presets."""
    try:
        return DIFFRACTIVE_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown diffractive preset {name!r}; choose one of {', '.join(DIFFRACTIVE_PRESETS)}"
        ) from None


# ----------------------------------------------------------------------------- propagation
def angular_spectrum_transfer(n_grid: int, pixel_pitch: float, wavelength: float, distance: float) -> np.ndarray:
    """Return the angular-spectrum transfer function on an FFT grid, complex array (n_grid, n_grid).

    H(fx, fy) = exp(i 2 pi distance sqrt(1 / wavelength**2 - fx**2 - fy**2)) with the spatial
    frequencies of ``numpy.fft.fftfreq``; evanescent components (negative radicand) decay as
    exp(-2 pi distance sqrt(fx**2 + fy**2 - 1 / wavelength**2)). Lengths are in metres.
    """
    for label, value in (("pixel_pitch", pixel_pitch), ("wavelength", wavelength)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"angular spectrum: {label} must be a positive length in metres, got {value}")
    if not math.isfinite(distance):
        raise ConfigError(f"angular spectrum: distance must be a finite length in metres, got {distance}")
    frequencies = np.fft.fftfreq(int(n_grid), d=pixel_pitch)
    fx, fy = np.meshgrid(frequencies, frequencies, indexing="xy")
    radicand = 1.0 / wavelength**2 - fx**2 - fy**2
    kz = np.sqrt(np.abs(radicand))
    return np.where(radicand >= 0, np.exp(2j * np.pi * distance * kz), np.exp(-2.0 * np.pi * abs(distance) * kz))


def propagate(field: Any, pixel_pitch: float, wavelength: float, distance: float) -> np.ndarray:
    """Propagate a sampled field over ``distance`` by the angular-spectrum method.

    Parameters
    ----------
    field
        Complex field of shape (..., n, n) on a square grid. The grid is periodic, so pad it
        with zeros where light must not wrap around.
    pixel_pitch, wavelength, distance
        Grid pitch, wavelength and propagation distance, in metres.

    Returns
    -------
    numpy.ndarray
        The propagated field, complex128, same shape.
    """
    array = np.asarray(field, dtype=np.complex128)
    if array.ndim < 2 or array.shape[-1] != array.shape[-2]:
        raise ConfigError(f"propagate: expected a field of shape (..., n, n), got {array.shape}")
    transfer = angular_spectrum_transfer(array.shape[-1], pixel_pitch, wavelength, distance)
    return scipy.fft.ifft2(transfer * scipy.fft.fft2(array))


# ---------------------------------------------------------------------------------- layout
def _grid_side(count: int) -> int:
    return max(1, math.ceil(math.sqrt(count)))


def _input_regions(n: int, count: int) -> np.ndarray:
    """Return a boolean mask of shape (count, n, n): one square block per input region."""
    side = _grid_side(count)
    block = n // side
    offset = (n - side * block) // 2
    masks = np.zeros((count, n, n), dtype=bool)
    for k in range(count):
        row, col = divmod(k, side)
        top, left = offset + row * block, offset + col * block
        masks[k, top : top + block, left : left + block] = True
    return masks


def _output_pixels(n: int, count: int, region: int) -> np.ndarray:
    """Return the flat window index of every output pixel, int64 array of shape (count, region**2)."""
    side = _grid_side(count)
    cell = n // side
    offset = (n - side * cell) // 2
    pixels = np.empty((count, region * region), dtype=np.int64)
    for r in range(count):
        row, col = divmod(r, side)
        top = offset + row * cell + (cell - region) // 2
        left = offset + col * cell + (cell - region) // 2
        rows, cols = np.meshgrid(np.arange(top, top + region), np.arange(left, left + region), indexing="ij")
        pixels[r] = (rows * n + cols).ravel()
    return pixels


def required_slm_pixels(n_inputs: int, n_regions: int, region_pixels: int) -> int:
    """Return the smallest mask side that fits the input regions (2 x 2 pixels at least each)
    and the output regions (each in a cell one pixel wider than the region)."""
    return max(2 * _grid_side(n_inputs), (region_pixels + 1) * _grid_side(n_regions))


# --------------------------------------------------------------------------------- kernels
@njit(cache=True)
def _camera_kernel(x, bias_amplitude, n_bias, transfer_real, transfer_imag, n_out, pixels_per_region,
                   electrons_per_unit, shot_noise, read_noise_e, saturate, full_well_e, electrons_per_count,
                   region_scale, activation, rng):
    """Form the camera image in the output regions and read it out; return (pre-activation, outputs).

    x : float64 array of shape (batch, n_in), input amplitudes as applied.
    transfer_real, transfer_imag : float64 arrays of shape (n_in + n_bias, 2 * n_out *
        pixels_per_region), the camera field of each input region at unit amplitude, region by
        region.
    electrons_per_count : ADC step in electrons, 0 when quantization is off.
    """
    batch, n_in = x.shape
    n_sources = transfer_real.shape[0]
    a = np.empty((batch, n_out))
    y = np.empty((batch, n_out))
    sums = np.empty(2 * n_out)
    # Camera fields on the region pixels for the whole batch, as two real matrix products (BLAS).
    amplitudes = np.empty((batch, n_sources))
    amplitudes[:, :n_in] = x
    amplitudes[:, n_in:] = bias_amplitude
    fields_real = np.dot(amplitudes, transfer_real)
    fields_imag = np.dot(amplitudes, transfer_imag)
    for b in range(batch):
        field_real = fields_real[b]
        field_imag = fields_imag[b]
        for r in range(2 * n_out):
            total = 0.0
            for q in range(pixels_per_region):
                p = r * pixels_per_region + q
                electrons = (field_real[p] ** 2 + field_imag[p] ** 2) * electrons_per_unit
                if shot_noise:
                    electrons += np.sqrt(electrons) * rng.standard_normal()
                if read_noise_e > 0:
                    electrons += read_noise_e * rng.standard_normal()
                if saturate:
                    electrons = min(full_well_e, max(0.0, electrons))
                if electrons_per_count > 0:
                    electrons = np.round(electrons / electrons_per_count) * electrons_per_count
                total += electrons
            sums[r] = total
        for j in range(n_out):
            v = (sums[2 * j] - sums[2 * j + 1]) * region_scale
            a[b, j] = v
            y[b, j] = _activate(v, activation)
    return a, y


@njit(cache=True)
def _camera_adjoint_kernel(x, bias_amplitude, n_bias, transfer, delta, pixels_per_region, intensity_scale):
    """Differentiate sum(delta * a) of the ideal camera with respect to the camera fields.

    Returns the batch sum of input amplitude times adjoint field per source, complex array of
    shape (n_in + n_bias, n_pixels), and the per-example input gradient, shape (batch, n_in).
    """
    batch, n_in = x.shape
    n_sources, n_pixels = transfer.shape
    n_out = delta.shape[1]
    weighted = np.zeros((n_sources, n_pixels), dtype=np.complex128)
    grad_x = np.zeros((batch, n_in))
    for b in range(batch):
        for r in range(2 * n_out):
            j = r // 2
            sign = 1.0 if r % 2 == 0 else -1.0
            weight = sign * delta[b, j] * intensity_scale
            for q in range(pixels_per_region):
                p = r * pixels_per_region + q
                field = 0.0 + 0.0j
                for k in range(n_in):
                    field += x[b, k] * transfer[k, p]
                for k in range(n_bias):
                    field += bias_amplitude * transfer[n_in + k, p]
                # dL/d(conj field) = dL/dI * field.
                adjoint = weight * field
                for k in range(n_in):
                    weighted[k, p] += x[b, k] * adjoint
                    grad_x[b, k] += 2.0 * (np.conj(adjoint) * transfer[k, p]).real
                for k in range(n_bias):
                    weighted[n_in + k, p] += bias_amplitude * adjoint
    return weighted, grad_x


# ------------------------------------------------------------------------------------ node
class DiffractiveNode(OpticalNode):
    """A simulated SLM-and-camera layer with differential detection, ``f(a)`` with ``a`` as above.

    Parameters
    ----------
    n_in, n_out
        Number of inputs (input regions) and outputs (pairs of camera regions).
    activation
        Nonlinearity applied to the measured pre-activation: ``"tanh"``, ``"hardtanh"``,
        ``"sigmoid"`` or ``"linear"``.
    config
        Optics and camera settings; :data:`DIFFRACTIVE_PRESETS` has named ones.
        ``config.gradient_method`` selects the local gradient.
    rng
        Generator or seed for the initial mask and the camera noise.
    name
        Name in messages and the run record.
    preset
        Name of the preset the config came from, for the run record.

    Raises
    ------
    ConfigError
        If the regions do not fit a fixed ``config.slm_pixels``, or a setting is invalid.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        activation: str = "tanh",
        config: DiffractiveConfig | None = None,
        rng: np.random.Generator | int | None = None,
        name: str = "diffractive",
        preset: str | None = None,
    ) -> None:
        config = config if config is not None else DiffractiveConfig()
        super().__init__(
            name, n_in, n_out, activation=activation, config=config, rng=rng, preset=preset,
            output_unit="1 (region signal difference relative to one region's signal at the reference intensity)",
        )
        cfg = self.config
        n_sources = self.n_in + cfg.bias_regions
        n_regions = 2 * self.n_out
        needed = required_slm_pixels(n_sources, n_regions, cfg.region_pixels)
        if cfg.slm_pixels is not None and cfg.slm_pixels < needed:
            raise ConfigError(
                f"node {name!r}: {n_sources} input regions and {n_regions} camera regions of "
                f"{cfg.region_pixels} x {cfg.region_pixels} pixels need a mask of at least {needed} x {needed} "
                f"pixels, but slm_pixels={cfg.slm_pixels}; use a larger mask or a narrower layer"
            )
        n = int(cfg.slm_pixels) if cfg.slm_pixels is not None else max(16, needed)
        self.slm_pixels = n
        self.n_grid = cfg.padding * n
        pitch = cfg.pixel_pitch_um * 1e-6
        wavelength = cfg.wavelength_nm * 1e-9
        self.distance = cfg.distance_mm * 1e-3 if cfg.distance_mm is not None else n * pitch**2 / (2 * wavelength)
        self._transfer_function = angular_spectrum_transfer(self.n_grid, pitch, wavelength, self.distance)

        self.input_masks = _input_regions(n, n_sources)
        self._input_masks_flat = self.input_masks.reshape(n_sources, n * n).astype(FLOAT)
        self.region_pixels = _output_pixels(n, n_regions, cfg.region_pixels)
        self._pixel_index = np.ascontiguousarray(self.region_pixels.ravel())
        self._pixels_per_region = cfg.region_pixels**2
        self._propagator = self._region_propagator()

        # Reference intensity: total full-scale input power spread evenly over the window.
        input_power = float(np.sum(self.input_masks[: self.n_in])) + cfg.bias_amplitude**2 * float(
            np.sum(self.input_masks[self.n_in :])
        )
        self.reference_intensity = input_power / (n * n)
        self._electrons_per_unit = cfg.reference_e / self.reference_intensity
        # A node without a bounded nonlinearity produces logits, read with the logit gain.
        self.readout_gain = 1.0 if self.activation.upper < np.inf else cfg.logit_gain
        self._region_scale = self.readout_gain / (cfg.reference_e * self._pixels_per_region)
        self._model_intensity_scale = self.readout_gain / (self.reference_intensity * self._pixels_per_region)

        levels = cfg.phase_levels if cfg.enabled("phase_levels") else None
        self._specs = {"phase": phase_spec((n, n), levels, cfg.max_phase_step, "SLM phase of each mask pixel")}
        initial = self.rng.uniform(0.0, TWO_PI, (n, n))
        self.set_parameters({"phase": initial})

    # ------------------------------------------------------------------------------ physics
    def _pad(self, window: np.ndarray) -> np.ndarray:
        """Embed arrays of shape (..., n, n) in the centre of zero grids of shape (..., M, M)."""
        n, m = self.slm_pixels, self.n_grid
        start = (m - n) // 2
        grid = np.zeros(window.shape[:-2] + (m, m), dtype=np.complex128)
        grid[..., start : start + n, start : start + n] = window
        return grid

    def _crop(self, grid: np.ndarray) -> np.ndarray:
        n, m = self.slm_pixels, self.n_grid
        start = (m - n) // 2
        return grid[..., start : start + n, start : start + n]

    def _region_propagator(self) -> np.ndarray:
        """Return the field on each output-region pixel per unit field on each mask pixel.

        Propagation on the periodic grid is a circular convolution with the impulse response
        ``ifft2(H)``, so entry (q, p) is that response at the grid offset from mask pixel q to
        camera pixel p. Complex array of shape (n * n, n_region_pixels).
        """
        n, m = self.slm_pixels, self.n_grid
        impulse = scipy.fft.ifft2(self._transfer_function)
        mask_rows, mask_cols = np.divmod(np.arange(n * n), n)
        pixel_rows, pixel_cols = np.divmod(self._pixel_index, n)
        row_offset = (pixel_rows[None, :] - mask_rows[:, None]) % m
        col_offset = (pixel_cols[None, :] - mask_cols[:, None]) % m
        return np.ascontiguousarray(impulse[row_offset, col_offset])

    def camera_fields(self, phase: np.ndarray | None = None) -> np.ndarray:
        """Return the camera-window field of every input region at unit amplitude.

        Returns
        -------
        numpy.ndarray
            Complex array of shape (n_in + bias_regions, n, n).
        """
        phase = self.phases["phase"] if phase is None else phase
        sources = self.input_masks * np.exp(1j * phase)[None, :, :]
        spectrum = scipy.fft.fft2(self._pad(sources))
        return self._crop(scipy.fft.ifft2(self._transfer_function * spectrum))

    def _region_transfer(self, phase: np.ndarray) -> np.ndarray:
        """Camera fields of every input region on the output-region pixels, (n_sources, n_pixels)."""
        sources = self._input_masks_flat * np.exp(1j * phase.ravel())[None, :]
        return sources @ self._propagator

    def _phases_changed(self) -> None:
        self._transfer = self._region_transfer(self.phases["phase"])
        self._transfer_parts = (np.ascontiguousarray(self._transfer.real), np.ascontiguousarray(self._transfer.imag))

    def _measure(self, x_applied: np.ndarray, phases: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        if phases is self.phases:
            transfer_real, transfer_imag = self._transfer_parts
        else:
            transfer = self._region_transfer(phases["phase"])
            transfer_real, transfer_imag = np.ascontiguousarray(transfer.real), np.ascontiguousarray(transfer.imag)
        electrons_per_count = cfg.full_well_e / (2**cfg.bit_depth - 1) if cfg.enabled("quantization") else 0.0
        return _camera_kernel(
            x_applied, float(cfg.bias_amplitude), cfg.bias_regions, transfer_real, transfer_imag, self.n_out,
            self._pixels_per_region,
            self._electrons_per_unit, cfg.enabled("shot_noise"),
            float(cfg.read_noise_e) if cfg.enabled("read_noise") else 0.0,
            cfg.enabled("saturation"), float(cfg.full_well_e), electrons_per_count, self._region_scale,
            self._activation_code, self.rng,
        )

    def _model_gradient(self, x_applied: np.ndarray, delta: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        cfg = self.config
        weighted, grad_x = _camera_adjoint_kernel(
            x_applied, float(cfg.bias_amplitude), cfg.bias_regions, self._transfer, delta,
            self._pixels_per_region, self._model_intensity_scale,
        )
        # Back-propagate: the adjoint of the propagator is its conjugate transpose.
        back = (weighted @ self._propagator.conj().T).reshape(self.input_masks.shape)
        slm_field = self.input_masks * np.exp(1j * self.phases["phase"])[None, :, :]
        grad_phase = -2.0 * np.sum((np.conj(back) * slm_field).imag, axis=0)
        return {"phase": grad_phase}, grad_x

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(slm_pixels=self.slm_pixels, distance_m=self.distance)
        return info
