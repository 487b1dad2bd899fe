"""Plot a sweep's accuracy against each swept numeric setting (needs matplotlib).

One panel per numeric axis other than ``seed``. Each line is one rule, split further by every
non-numeric axis (feedback, device, preset, ...). A point is the mean over seeds, and the band
spans the lowest to the highest seed. Where the grid has more than one numeric axis, a panel
averages each seed's accuracy over the other numeric axes first, and its title names them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .spec import Axis, SweepSpec  # noqa: E402
from .table import DONE, read_results  # noqa: E402

__all__ = ["plot_sweep", "sweep_series", "METRICS"]

METRICS = ("test_accuracy", "train_accuracy")


def _label(name: str) -> str:
    return name.split(".", 1)[1] if "." in name else name


def plot_sweep(spec: SweepSpec, table: str | Path, path: str | Path, metric: str = "test_accuracy") -> Path:
    """Draw ``metric`` against each numeric axis of ``spec`` from its results table into a PNG.

    Only rows of trainings in the current grid with status ``done`` are drawn.

    Parameters
    ----------
    spec
        The sweep specification that wrote the table.
    table
        Path of its ``results.csv``.
    path
        PNG file to write.
    metric
        ``test_accuracy`` or ``train_accuracy``.

    Returns
    -------
    Path
        The PNG file.

    Raises
    ------
    ConfigError
        If the grid has no numeric axis besides ``seed``, or the table has no finished training
        of this grid.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    numeric = [axis for axis in spec.axes if axis.is_numeric and axis.name != "seed"]
    if not numeric:
        raise ConfigError(
            f"{spec.source}: the grid has no numeric axis besides seed to plot against; "
            "sweep a number such as device_options.read_noise_std"
        )
    keys = {training.key for training in spec.trainings()}
    rows = [row for row in read_results(table) if row["key"] in keys and row["status"] == DONE]
    if not rows:
        raise ConfigError(f"{table} has no finished training of this grid yet; run the sweep first")

    fixed_rule = spec.fixed.get("rule", "dfa")
    categorical = [axis for axis in spec.axes if not axis.is_numeric and axis.name not in ("rule", "seed")]
    fig, panels = plt.subplots(1, len(numeric), figsize=(5.2 * len(numeric), 3.8), squeeze=False, constrained_layout=True)
    for panel, axis in zip(panels[0], numeric):
        others = [other for other in numeric if other is not axis]
        _draw_panel(panel, rows, axis, others, categorical, fixed_rule, metric)
    n_seeds = len({row.get("seed", "") for row in rows})
    fig.suptitle(
        f"{Path(spec.source).name}: {len(rows)} trainings\nline: mean over {n_seeds} seed(s); band: lowest to highest seed",
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def sweep_series(rows: Sequence[dict[str, str]], axis: Axis, categorical: Sequence[Axis], fixed_rule: str,
                 metric: str = "test_accuracy") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Return the lines of one panel: label -> (x, mean over seeds, lowest seed, highest seed).

    Each seed's value at one x is first averaged over the rows that differ only in other
    numeric axes. Labels are the rule, then ``name=value`` for each non-numeric axis.
    """
    # label -> x -> seed -> values over the other numeric axes
    grouped: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        parts = [row.get("rule") or fixed_rule]
        parts += [f"{_label(other.name)}={row[other.name]}" for other in categorical]
        grouped[", ".join(parts)][float(row[axis.name])][row.get("seed", "")].append(float(row[metric]))

    series = {}
    # Sorted labels, not the order rows finished in, so one table always gives one figure.
    for label in sorted(grouped):
        xs = sorted(grouped[label])
        per_seed = [[float(np.mean(values)) for values in grouped[label][x].values()] for x in xs]
        series[label] = (
            np.array(xs),
            np.array([np.mean(values) for values in per_seed]),
            np.array([np.min(values) for values in per_seed]),
            np.array([np.max(values) for values in per_seed]),
        )
    return series


def _draw_panel(panel, rows: Sequence[dict[str, str]], axis: Axis, others: Sequence[Axis],
                categorical: Sequence[Axis], fixed_rule: str, metric: str) -> None:
    for label, (xs, mean, low, high) in sweep_series(rows, axis, categorical, fixed_rule, metric).items():
        (line,) = panel.plot(xs, mean, marker="o", label=label)
        panel.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)

    panel.set_xlabel(_label(axis.name))
    panel.set_ylabel(metric.replace("_", " "))
    if others:
        panel.set_title(f"averaged over {', '.join(_label(o.name) for o in others)}", fontsize=9)
    panel.grid(alpha=0.3)
    panel.legend(fontsize=8)
