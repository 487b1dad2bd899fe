"""Run folders: configuration, metrics log, checkpoints and summary of one training run.

Layout of a run folder::

    config.json      the resolved configuration, written once when the run starts
    identity.json    every node's identity (kind, settings, seed or serial number)
    metrics.jsonl    one JSON object per line: a "step" record per batch, an "epoch" record per
                     epoch; appended and flushed as training goes
    checkpoint.npz   the latest checkpoint, replaced atomically (temporary file, fsync, rename)
    curves.png       loss and accuracy per epoch, drawn when the run ends (needs matplotlib)
    summary.json     final accuracies and timings, written atomically last, when the run ends

A checkpoint stores how many metrics lines existed when it was written; resuming truncates the
log to that length, so the log never holds steps that the resumed state has not seen.

Killing the process at any moment (SIGKILL included) leaves a folder that ``--resume`` continues:
every file but the metrics log is replaced atomically, so it holds either its old or its new
content, and the metrics log may end in a torn line, which resuming drops together with any
line written after the checkpoint. Temporary files of an interrupted write are removed when the
folder is opened again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["RunDir", "save_tree", "load_tree", "atomic_write_bytes", "atomic_write_json"]

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
IDENTITY = "identity.json"

# Version of the checkpoint layout; a checkpoint with another version is refused on resume.
CHECKPOINT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    text = json.dumps(value, indent=2, default=_json_default, sort_keys=False)
    atomic_write_bytes(path, (text + "\n").encode())


# ------------------------------------------------------------------------ state trees
def _split_tree(tree: Any, arrays: dict[str, np.ndarray], prefix: str) -> Any:
    """Replace every array in a nested structure by a reference, collecting the arrays."""
    if isinstance(tree, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = tree
        return {"__array__": key}
    if isinstance(tree, Mapping):
        for k in tree:
            if not isinstance(k, str):
                raise TypeError(f"state keys must be strings, got {k!r} at {prefix or 'top level'}")
        return {k: _split_tree(v, arrays, f"{prefix}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tree(v, arrays, f"{prefix}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _join_tree(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return arrays[tree["__array__"]]
        return {k: _join_tree(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tree(v, arrays) for v in tree]
    return tree


def save_tree(path: str | os.PathLike[str], tree: Mapping[str, Any]) -> None:
    """Save a nested dict of arrays, numbers and strings to an ``.npz`` file, atomically."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = _split_tree(tree, arrays, "")
    buffer = io.BytesIO()
    meta = np.frombuffer(json.dumps(skeleton, default=_json_default).encode(), dtype=np.uint8)
    np.savez(buffer, __tree__=meta, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load what :func:`save_tree` wrote."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} not found; check the run folder") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # np.load takes any file that is not a zip archive for a pickle, hence its odd messages.
        raise ConfigError(
            f"checkpoint {path} is damaged or not a NumPy .npz file ({type(exc).__name__}); "
            "resume from a copy of the run folder, or start the run again"
        ) from None
    if "__tree__" not in arrays:
        raise ConfigError(f"checkpoint {path} has no state tree, so pnn did not write it; start the run again")
    try:
        skeleton = json.loads(arrays.pop("__tree__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {path} has a damaged state tree ({exc}); start the run again") from None
    return _join_tree(skeleton, arrays)


# ---------------------------------------------------------------------------- run folder
def _remove_temporary_files(path: Path) -> None:
    """Delete what :func:`atomic_write_bytes` leaves when its process is killed mid-write."""
    for leftover in path.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


class RunDir:
    """One run's folder. Use :meth:`create` for a new run and :meth:`open` to resume one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._metrics = None

    @classmethod
    def create(cls, path: str | os.PathLike[str], config: Mapping[str, Any]) -> RunDir:
        """Create a new run folder and write its configuration.

        Raises
        ------
        ConfigError
            If the folder already holds a run (resume it with ``--resume`` instead).
        """
        path = Path(path)
        if (path / CONFIG).exists():
            raise ConfigError(
                f"{path} already holds a run; resume it with --resume {path}, or choose another --out"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run folder {path}: {exc.strerror}; choose another --out") from None
        # A run killed while writing its configuration leaves only temporary files behind.
        _remove_temporary_files(path)
        run = cls(path)
        atomic_write_json(path / CONFIG, dict(config))
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunDir:
        """Open an existing run folder for resuming, removing temporary files of interrupted writes."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise ConfigError(f"{path} is not a run folder (no {CONFIG}); pass the folder a run wrote with --out")
        _remove_temporary_files(path)
        return cls(path)

    def read_config(self) -> dict[str, Any]:
        """Return the contents of ``config.json``: the configuration under ``"config"``, and run details."""
        path = self.path / CONFIG
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); restore it from a copy of the run folder") from None
        if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
            raise ConfigError(f"{path} has no \"config\" table, so pnn did not write it; restore it from a copy of the run folder")
        return stored

    def write_identity(self, identity: Any) -> None:
        """Record the identity of every node used."""
        atomic_write_json(self.path / IDENTITY, identity)

    def has_identity(self) -> bool:
        """True when the folder contains the nodes' identity record."""
        return (self.path / IDENTITY).is_file()

    # metrics ------------------------------------------------------------------------
    def _metrics_file(self):
        if self._metrics is None:
            self._metrics = open(self.path / METRICS, "a", encoding="utf-8")
        return self._metrics

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record to the metrics log and flush it."""
        handle = self._metrics_file()
        handle.write(json.dumps(record, default=_json_default) + "\n")
        handle.flush()

    def metrics_lines(self, *, sync: bool = False) -> int:
        """Number of complete lines in the metrics log; ``sync`` also writes them to disk first."""
        if self._metrics is not None:
            self._metrics.flush()
            if sync:
                os.fsync(self._metrics.fileno())
        path = self.path / METRICS
        if not path.exists():
            return 0
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.endswith(b"\n"))

    def truncate_metrics(self, lines: int) -> None:
        """Keep only the first ``lines`` lines of the metrics log (drops a torn last line too)."""
        self.close()
        path = self.path / METRICS
        if not path.exists():
            return
        kept = []
        with open(path, "rb") as handle:
            for line in handle:
                if len(kept) == lines or not line.endswith(b"\n"):
                    break
                kept.append(line)
        if len(kept) < lines:
            # Only a crash of the machine (not of the process) loses lines the checkpoint counted.
            log.warning("%s contains %d complete line(s), fewer than the %d the checkpoint counted; "
                        "the missing ones were lost", path, len(kept), lines)
        atomic_write_bytes(path, b"".join(kept))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Return every complete record of the metrics log."""
        path = self.path / METRICS
        if not path.exists():
            return []
        records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith("\n"):
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path} line {number} is not valid JSON ({exc}); the file was changed or damaged") from None
        return records

    # checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Write a checkpoint atomically; it records the current metrics log length."""
        tree = dict(state)
        tree["checkpoint_version"] = CHECKPOINT_VERSION
        # The lines the checkpoint counts reach the disk before the checkpoint does.
        tree["metrics_lines"] = self.metrics_lines(sync=True)
        tree["saved_at"] = time.time()
        save_tree(self.path / CHECKPOINT, tree)

    def has_checkpoint(self) -> bool:
        """True when the folder holds a checkpoint."""
        return (self.path / CHECKPOINT).is_file()

    def load_checkpoint(self) -> dict[str, Any]:
        """Return the latest checkpoint, and truncate the metrics log to match it."""
        tree = load_tree(self.path / CHECKPOINT)
        version = tree.get("checkpoint_version")
        if version != CHECKPOINT_VERSION:
            raise ConfigError(
                f"checkpoint {self.path / CHECKPOINT} has layout version {version}, this pnn reads "
                f"version {CHECKPOINT_VERSION}; resume it with the pnn version that wrote it"
            )
        self.truncate_metrics(int(tree["metrics_lines"]))
        return tree

    # summary ------------------------------------------------------------------------
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write the final summary atomically."""
        atomic_write_json(self.path / SUMMARY, dict(summary))

    def read_summary(self) -> dict[str, Any] | None:
        """Return the summary, or None if the run has not finished."""
        path = self.path / SUMMARY
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); the run finished, so start a new one") from None

    def close(self) -> None:
        """Close the metrics log."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
