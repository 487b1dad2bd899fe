"""Sweeps: grids of simulated trainings run as tasks on ``dask.distributed``.

:func:`load_spec` reads and checks a specification, :func:`run_sweep` runs its trainings and
streams the results into ``results.csv``, and ``pnn.sweep.plot.plot_sweep`` draws them (it
needs matplotlib, so it is not imported here). Dask is imported only when a sweep runs.
"""

from .runner import RESULTS_FILE, SweepReport, run_sweep, run_training
from .spec import Axis, SweepSpec, Training, load_spec, spec_from_mapping, training_key
from .table import RESULT_COLUMNS, ResultsTable, read_results

__all__ = [
    "Axis",
    "SweepSpec",
    "Training",
    "load_spec",
    "spec_from_mapping",
    "training_key",
    "run_sweep",
    "run_training",
    "SweepReport",
    "RESULTS_FILE",
    "RESULT_COLUMNS",
    "ResultsTable",
    "read_results",
]
