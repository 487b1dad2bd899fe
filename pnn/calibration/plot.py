"""PNG plots of a calibration: measured points, fitted curve and residuals per output channel.

Needs matplotlib (``pip install 'pnn-lab[plot]'``).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from .calibrator import Calibrator  # noqa: E402

__all__ = ["plot_calibration"]

# Channels drawn at most; a wider node gets a note in the title.
MAX_CHANNELS = 12


def plot_calibration(calibrator: Calibrator, path: str | Path) -> Path:
    """Draw a fitted calibrator's data and fit into a PNG file and return its path.

    Each channel gets two panels: the readings (mean over repeats) against the stimulus with
    the fitted curve, and the residuals below. Points held out of the fit are drawn in orange
    and rejected outliers as red crosses.
    """
    if not hasattr(calibrator, "fit_"):
        raise ValueError("the calibrator has not been fitted; call fit(node) first")
    path = Path(path)
    result = calibrator.sweep_result_
    fit = calibrator.fit_
    stimulus = calibrator.reference_.stimulus(result.inputs, result.parameters())
    readings = result.mean_outputs()
    n_channels = min(fit.n_out, MAX_CHANNELS)
    n_cols = min(4, n_channels)
    n_rows = math.ceil(n_channels / n_cols)
    fig, axes = plt.subplots(
        2 * n_rows, n_cols, figsize=(3.4 * n_cols, 3.6 * n_rows), squeeze=False,
        gridspec_kw={"height_ratios": [3, 1] * n_rows}, constrained_layout=True,
    )
    train = calibrator.train_index_
    holdout = calibrator.holdout_index_
    for k in range(n_rows * n_cols):
        top, bottom = axes[2 * (k // n_cols), k % n_cols], axes[2 * (k // n_cols) + 1, k % n_cols]
        if k >= n_channels:
            top.axis("off")
            bottom.axis("off")
            continue
        channel = fit.channels[k]
        a, y = stimulus[:, k], readings[:, k]
        outliers = train[list(channel.outliers)] if channel.outliers else np.zeros(0, dtype=int)
        kept = np.setdiff1d(train, outliers)
        top.plot(a[kept], y[kept], ".", ms=3, color="tab:blue", label="fitted")
        if len(holdout):
            top.plot(a[holdout], y[holdout], ".", ms=3, color="tab:orange", label="held out")
        if len(outliers):
            top.plot(a[outliers], y[outliers], "x", ms=5, color="tab:red", label="outlier")
        finite = np.isfinite(a)
        grid = np.linspace(np.min(a[finite]), np.max(a[finite]), 400)
        top.plot(grid, channel.predict(grid), "-", lw=1.2, color="black", label=fit.model)
        top.set_title(f"channel {k}", fontsize=9)
        top.set_ylabel(f"reading [{fit.output_unit or '1'}]", fontsize=8)
        top.tick_params(labelsize=7)
        if k == 0:
            top.legend(fontsize=7, loc="best")

        residual = y - channel.predict(a)
        bottom.axhline(0.0, color="black", lw=0.8)
        bottom.plot(a[kept], residual[kept], ".", ms=2, color="tab:blue")
        if len(holdout):
            bottom.plot(a[holdout], residual[holdout], ".", ms=2, color="tab:orange")
        bottom.set_xlabel(f"stimulus a [{fit.stimulus_unit or '1'}]", fontsize=8)
        bottom.set_ylabel("residual", fontsize=8)
        bottom.tick_params(labelsize=7)

    record = calibrator.record_
    more = f" (first {n_channels} of {fit.n_out} channels)" if fit.n_out > n_channels else ""
    fig.suptitle(
        f"node {record.node!r}: {fit.model} against the {calibrator.reference_.kind} reference{more}\n"
        f"{record.created[:19]} UTC, {record.content_hash[:19]}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
