"""The results table of a sweep (one CSV row per training) and the lock on its folder.

Every change rewrites the whole file atomically (temporary file, fsync, rename), so a crash
leaves the table as it was before or after a row, never with a torn row. Rewriting costs
O(rows) per finished training, which stays small for sweeps of thousands of trainings.

Columns: ``key`` (the training's hash), one column per grid axis, then :data:`RESULT_COLUMNS`.
Axis values are written as TOML-like text: strings as they are, numbers, booleans and lists as
JSON (``0.05``, ``true``, ``[64, 64]``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runs import atomic_write_bytes

__all__ = ["ResultsTable", "SweepLock", "read_results", "RESULT_COLUMNS", "DONE", "FAILED"]

DONE = "done"
FAILED = "failed"

#: Columns after the axes: outcome, final accuracies (fractions of 1), wall time of the
#: training in seconds (from its run summary), number of attempts, run folder, worker host,
#: the last error (one line), and when the row was written (UTC).
RESULT_COLUMNS = (
    "status", "train_accuracy", "test_accuracy", "wall_seconds", "attempts", "run_dir", "host", "error",
    "finished_at",
)


def format_value(value: Any) -> str:
    """Return the table text of an axis value."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def read_results(path: str | Path) -> list[dict[str, str]]:
    """Return the rows of a results table, each a mapping from column to text.

    Raises
    ------
    ConfigError
        If the file is unreadable or has no ``key`` column.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"results table {path} not found; run the sweep first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"results table {path} is unreadable ({exc}); move it away to start the table anew") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    missing = [name for name in ("key", "status") if name not in reader.fieldnames]
    if missing:
        raise ConfigError(
            f"{path} has no column(s) {', '.join(missing)}, so it is not a sweep results table; "
            "choose another sweep folder"
        )
    return list(reader)


class ResultsTable:
    """The CSV table of a sweep, kept in memory and rewritten atomically on every change.

    Use :meth:`open`, which reads the rows an earlier run of the sweep wrote.
    """

    def __init__(self, path: Path, axis_names: Sequence[str], rows: Mapping[str, dict[str, str]] | None = None,
                 extra_columns: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, str]] = dict(rows or {})
        # Columns of an earlier version of the specification stay, so no recorded value is lost.
        axes = [*axis_names, *(name for name in extra_columns if name not in axis_names)]
        self.columns = ["key", *axes, *RESULT_COLUMNS]

    @classmethod
    def open(cls, path: str | Path, axis_names: Sequence[str]) -> ResultsTable:
        """Open the table at ``path``, reading its rows if it exists."""
        path = Path(path)
        if not path.exists():
            return cls(path, axis_names)
        rows = read_results(path)
        extra = []
        if rows:
            extra = [name for name in rows[0] if name != "key" and name not in RESULT_COLUMNS]
        return cls(path, axis_names, {row["key"]: row for row in rows}, extra)

    def status(self, key: str) -> str | None:
        """Return the recorded status of a training, or None if it has no row."""
        row = self.rows.get(key)
        return None if row is None else row.get("status")

    def record(self, key: str, values: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Write or replace a training's row, then rewrite the file atomically.

        Parameters
        ----------
        key
            The training's hash.
        values
            Its axis values, by axis name.
        result
            Entries of :data:`RESULT_COLUMNS`; missing ones are left empty.
        """
        row = {"key": key}
        row.update({name: format_value(value) for name, value in values.items()})
        for name in RESULT_COLUMNS:
            value = result.get(name)
            row[name] = "" if value is None else str(value)
        if not row["finished_at"]:
            row["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.rows.pop(key, None)
        self.rows[key] = row
        self.write()

    def write(self) -> None:
        """Rewrite the whole file atomically."""
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows.values())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, buffer.getvalue().encode("utf-8"))


class SweepLock:
    """A lock file that stops two sweeps from writing one sweep folder at the same time.

    A lock left by a process that no longer runs on this host is removed. A lock from another
    host cannot be checked, so the error asks the user to delete it if that sweep has stopped.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / ".sweep.lock"

    def __enter__(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._remove_if_stale():
                    raise self._busy_error() from None
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            return self
        raise self._busy_error()

    def __exit__(self, *exc_info: object) -> None:
        self.path.unlink(missing_ok=True)

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _remove_if_stale(self) -> bool:
        owner = self._owner()
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            self.path.unlink(missing_ok=True)
            return True
        except PermissionError:
            return False
        return False

    def _busy_error(self) -> ConfigError:
        owner = self._owner()
        return ConfigError(
            f"another sweep (pid {owner.get('pid', '?')} on {owner.get('host', '?')}) is writing to "
            f"{self.path.parent}; wait for it to finish, or delete {self.path} if it no longer runs"
        )
