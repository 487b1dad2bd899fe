"""Run the trainings of a sweep as tasks on ``dask.distributed``.

The client submits one task per training that has no ``done`` row in the results table and
records each result as its task finishes. A failed training is submitted again until its
retries are used up. A progress bar shows finished, running and failed trainings. Dask is an
optional dependency (``pip install 'pnn-lab[sweep]'``); it is imported only when a sweep runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PnnError
from .spec import SweepSpec, Training
from .table import DONE, FAILED, ResultsTable, SweepLock

__all__ = ["SweepReport", "run_sweep", "run_training", "RESULTS_FILE", "RUNS_FOLDER", "FAILURES_FOLDER"]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
RUNS_FOLDER = "runs"
FAILURES_FOLDER = "failures"

# Files a run folder contains before its first checkpoint. Only such a folder is removed to
# start a training again.
_PARTIAL_RUN_FILES = {"config.json", "identity.json", "metrics.jsonl", "curves.png"}


@dataclass
class SweepReport:
    """Counts of one :func:`run_sweep` call."""

    total: int
    """Trainings in the grid."""
    skipped: int
    """Trainings already done in an earlier run of the sweep."""
    done: int = 0
    """Trainings finished in this run."""
    failed: int = 0
    """Trainings recorded as failed in this run, after their retries."""
    retried: int = 0
    """Failed attempts that were submitted again."""
    table: Path | None = None
    """The results table."""


def default_workers() -> int:
    """Return the number of CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _import_distributed():
    try:
        import distributed  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ConfigError(
            "pnn sweep needs dask.distributed, which is not installed; install it with "
            "pip install 'pnn-lab[sweep]'"
        ) from None
    return distributed


def run_sweep(
    spec: SweepSpec,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> SweepReport:
    """Run every training of ``spec`` that is not done yet, and record each in the table.

    Parameters
    ----------
    spec
        The sweep; every training is built and checked before any task starts.
    workers
        Worker processes of the local cluster (one thread each); None uses one per CPU core.
        Ignored with ``scheduler``.
    scheduler
        Address of a running Dask scheduler (``tcp://host:8786``); None starts a local cluster
        bound to 127.0.0.1.
    out
        Sweep folder; None uses the specification's ``[sweep] out``.
    progress
        Show a progress bar on stderr.

    Returns
    -------
    SweepReport
        How many trainings were skipped, done and failed.

    Raises
    ------
    ConfigError
        On an invalid specification, a missing Dask, an unreachable scheduler, or a sweep
        folder that another sweep is writing.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    folder = Path(out) if out is not None else spec.out
    trainings = spec.trainings()

    with SweepLock(folder):
        table = ResultsTable.open(folder / RESULTS_FILE, [axis.name for axis in spec.axes])
        pending = [training for training in trainings if table.status(training.key) != DONE]
        report = SweepReport(total=len(trainings), skipped=len(trainings) - len(pending), table=table.path)
        if not pending:
            table.write()
            return report
        distributed = _import_distributed()
        with _connect(distributed, workers, scheduler) as client:
            _check_workers(client)
            _run_tasks(client, distributed, pending, table, folder, spec.retries, progress, report)
    return report


@contextlib.contextmanager
def _connect(distributed, workers: int | None, scheduler: str | None) -> Iterator[Any]:
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError, ValueError) as exc:
            # Dask raises ValueError for an address it cannot parse (no port, say).
            raise ConfigError(
                f"cannot connect to the Dask scheduler at {scheduler} ({exc}); check the address, for "
                "example tcp://10.0.0.5:8786, and that the scheduler is running"
            ) from None
        log.info("connected to the Dask scheduler at %s", scheduler)
        try:
            yield client
        finally:
            client.close()
        return

    n_workers = workers or default_workers()
    # Processes, not threads: a training holds the GIL in Python code between Numba kernels.
    # Scheduler, workers, nannies and the scheduler's HTTP server (the dashboard, where bokeh
    # is installed) listen on loopback only; the HTTP port is chosen free.
    cluster = distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
    )
    log.info(
        "started a local Dask cluster of %d workers at %s (dashboard %s)",
        n_workers, cluster.scheduler_address, cluster.dashboard_link,
    )
    try:
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
        log.info("stopped the local Dask cluster")


def _pnn_version() -> str:
    from .. import __version__  # noqa: PLC0415

    return __version__


def _check_workers(client) -> None:
    """Check that the workers connected so far can import pnn; warn about other versions."""
    from .. import __version__  # noqa: PLC0415

    try:
        versions = client.run(_pnn_version)
    except Exception as exc:  # noqa: BLE001 - any failure to run pnn code on a worker means the same
        raise PnnError(
            f"the Dask workers cannot run pnn ({type(exc).__name__}: {exc}); install pnn-lab on every worker"
        ) from None
    others = {address: version for address, version in versions.items() if version != __version__}
    if others:
        log.warning("workers run other pnn versions than this client's %s: %s", __version__, others)


def _running(client, outstanding: int) -> int:
    # Each training occupies one worker thread, so with more tasks than threads every thread
    # is busy. Workers that have not joined yet (a batch queue) count as no threads.
    threads = sum(client.nthreads().values())
    return min(outstanding, threads)


def _run_tasks(client, distributed, pending: list[Training], table: ResultsTable, folder: Path, retries: int,
               progress: bool, report: SweepReport) -> None:
    from tqdm.auto import tqdm  # noqa: PLC0415

    runs = (folder / RUNS_FOLDER).absolute()
    attempts = {training.key: 0 for training in pending}
    outstanding: dict[Any, Training] = {}

    def submit(training: Training):
        attempts[training.key] += 1
        settings = training.config.to_dict()
        settings["out"] = str(runs / training.key)
        future = client.submit(run_training, settings, key=f"train-{training.key}-{uuid.uuid4().hex[:8]}", pure=False)
        outstanding[future] = training
        return future

    completed = distributed.as_completed([submit(training) for training in pending])
    bar = tqdm(total=len(pending), desc="sweep", unit="training", disable=not progress, dynamic_ncols=True)

    def show() -> None:
        running = _running(client, len(outstanding))
        bar.set_postfix_str(f"done={report.done} running={running} failed={report.failed}")

    show()
    try:
        for future in completed:
            training = outstanding.pop(future)
            result = _collect(future)
            attempt = attempts[training.key]
            if result["ok"]:
                table.record(training.key, training.values, {**result, "status": DONE, "attempts": attempt})
                # A traceback from an earlier run of the sweep no longer describes this training.
                (folder / FAILURES_FOLDER / f"{training.key}.txt").unlink(missing_ok=True)
                report.done += 1
                bar.update()
            elif attempt <= retries:
                log.warning(
                    "training %s (%s) failed on attempt %d of %d, retrying: %s",
                    training.key, _describe(training), attempt, retries + 1, result["error"],
                )
                report.retried += 1
                completed.add(submit(training))
            else:
                log.warning(
                    "training %s (%s) failed on all %d attempts, recorded as failed: %s",
                    training.key, _describe(training), attempt, result["error"],
                )
                _write_failure(folder, training, result)
                table.record(training.key, training.values, {**result, "status": FAILED, "attempts": attempt})
                report.failed += 1
                bar.update()
            show()
    finally:
        if outstanding:
            client.cancel(list(outstanding))
        bar.close()


def _describe(training: Training) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in training.values.items())


def _collect(future) -> dict[str, Any]:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - a lost worker or an unpicklable task is one failed attempt
        return {"ok": False, "error": _one_line(exc), "traceback": traceback.format_exc()}


def _write_failure(folder: Path, training: Training, result: dict[str, Any]) -> None:
    """Keep the last traceback of a failed training in ``failures/<key>.txt``."""
    path = folder / FAILURES_FOLDER / f"{training.key}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{_describe(training)}\n\n{result.get('traceback') or result['error']}\n", encoding="utf-8")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------ worker side
def run_training(settings: dict[str, Any]) -> dict[str, Any]:
    """Run one training on a worker and return its outcome, with the error of a failed training.

    Parameters
    ----------
    settings
        A TrainConfig as plain data, with ``out`` set to the training's run folder.

    Returns
    -------
    dict
        ``ok``; on success ``train_accuracy``, ``test_accuracy``, ``wall_seconds``, ``run_dir``
        and ``host``; on failure ``error`` (one line), ``traceback`` and ``host``.
    """
    host = socket.gethostname()
    try:
        summary = _train_or_resume(settings)
    except Exception as exc:  # noqa: BLE001 - every failure of a training is recorded, not raised
        # The client logs the failure with the training's grid values; this line is for the
        # worker's own log.
        log.info("training in %s failed: %s", settings.get("out"), _one_line(exc))
        return {"ok": False, "error": _one_line(exc), "traceback": traceback.format_exc(), "host": host}
    return {
        "ok": True,
        "train_accuracy": summary["train_accuracy"],
        "test_accuracy": summary["test_accuracy"],
        # NOTE: for a run resumed from a checkpoint this counts the resumed part only.
        "wall_seconds": round(summary["wall_seconds"], 3),
        "run_dir": summary["run_dir"],
        "host": host,
    }


def _train_or_resume(settings: dict[str, Any]) -> dict[str, Any]:
    """Train, resume from a checkpoint, or read a finished run; return the run's summary."""
    from ..config import config_from_mapping  # noqa: PLC0415 - keeps the client light
    from ..experiment import train  # noqa: PLC0415

    config = config_from_mapping(settings, source="sweep task")
    run_dir = Path(config.out)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        # The run finished but the sweep stopped before recording it.
        return json.loads(summary_path.read_text())
    if (run_dir / "checkpoint.npz").is_file():
        log.info("resuming the run in %s from its checkpoint", run_dir)
        return train(resume=run_dir, progress=False)
    if run_dir.exists():
        _remove_partial_run(run_dir)
    return train(config, progress=False)


def _remove_partial_run(run_dir: Path) -> None:
    names = {path.name for path in run_dir.iterdir() if not path.name.endswith(".tmp")}
    if not names <= _PARTIAL_RUN_FILES:
        raise PnnError(
            f"{run_dir} contains files a run does not write before its first checkpoint "
            f"({', '.join(sorted(names - _PARTIAL_RUN_FILES))}); move them away and run the sweep again"
        )
    log.info("removing %s, a run that stopped before its first checkpoint", run_dir)
    shutil.rmtree(run_dir)
