"""Plots of training runs (needs matplotlib: ``pip install 'pnn-lab[plot]'``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from .runs import atomic_write_bytes  # noqa: E402

__all__ = ["plot_training_curves"]


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Draw loss and accuracy per epoch from metrics records into a PNG file; return its path."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    path = Path(path)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    x = [r["epoch"] + 1 for r in epochs]
    ax_loss.plot(x, [r["train_loss"] for r in epochs], label="train (running)")
    if epochs and "test_loss" in epochs[0]:
        ax_loss.plot(x, [r["test_loss"] for r in epochs], label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(x, [r["train_accuracy"] for r in epochs], label="train (running)")
    if epochs and "test_accuracy" in epochs[0]:
        ax_acc.plot(x, [r["test_accuracy"] for r in epochs], label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    # Through memory and an atomic rename, so a killed run never leaves half a PNG.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
