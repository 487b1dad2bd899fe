"""An append-only folder of calibration records.

Each record is one file, ``<node>--<created>--<hash>.json``. A record is written to a temporary
file in the folder, flushed to disk, made read-only, and then hard-linked to its final name,
which fails if the name exists. So a crash leaves no partial record under a record's name, and
no record is ever replaced. Temporary files start with a dot and are never read as records.

Lookups read every record of the node: a corrupt file, or one of an unknown schema version,
raises an error naming the file rather than being skipped, because skipping it could silently
select an older calibration.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import CalibrationError, ConfigError
from ..nodes import Node
from .record import CalibrationRecord, identity_differences, read_record

__all__ = ["CalibrationStore"]

log = logging.getLogger(__name__)


def _file_stem(name: str) -> str:
    """Return a node name reduced to characters that are safe in a file name on every system."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "node"


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


class CalibrationStore:
    """Calibration records of many nodes in one folder; records are added, never changed.

    Parameters
    ----------
    path
        The folder; it is created on the first :meth:`append`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def file_name(self, record: CalibrationRecord) -> str:
        """Return the file name of ``record`` in the store."""
        stamp = record.created_at.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        digest = record.content_hash.split(":", 1)[1][:12]
        return f"{_file_stem(record.node)}--{stamp}--{digest}.json"

    def append(self, record: CalibrationRecord) -> Path:
        """Write ``record`` as a new, read-only file and return its path.

        Appending the same record twice returns the existing file.

        Raises
        ------
        CalibrationError
            If a different record already has the same file name (nothing is written), or the
            folder cannot be written.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CalibrationError(f"cannot create the calibration store {self.path}: {exc.strerror}") from None
        final = self.path / self.file_name(record)
        data = record.to_json().encode("utf-8")
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.path)
        except OSError as exc:
            raise CalibrationError(f"cannot write to the calibration store {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o444)
            self._publish(Path(temporary), final, record)
        finally:
            Path(temporary).unlink(missing_ok=True)
        _fsync_dir(self.path)
        log.info("calibration of node %r stored in %s (%s)", record.node, final, record.content_hash)
        return final

    def _publish(self, temporary: Path, final: Path, record: CalibrationRecord) -> None:
        """Give the finished temporary file its final name, never replacing an existing file."""
        try:
            os.link(temporary, final)
            return
        except FileExistsError:
            existing = read_record(final)
            if existing.content_hash == record.content_hash:
                return
            raise CalibrationError(
                f"{final} already contains another calibration record; the store never replaces a record"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise CalibrationError(f"cannot write {final}: {exc.strerror}") from None
        # NOTE: this file system has no hard links. The check and the rename are two steps, so
        # two processes storing the same name at the same instant could race. Record names
        # carry microseconds and a hash, which makes that practically impossible.
        if final.exists():
            raise CalibrationError(f"{final} already exists; the store never replaces a record")
        os.rename(temporary, final)

    # --------------------------------------------------------------------------- reading
    def paths(self, node: str | None = None) -> list[Path]:
        """Return the record files, of one node when ``node`` is given, in name order."""
        if not self.path.is_dir():
            return []
        pattern = "*.json" if node is None else f"{_file_stem(node)}--*.json"
        return sorted(p for p in self.path.glob(pattern) if not p.name.startswith("."))

    def records(self, node: str | None = None) -> list[CalibrationRecord]:
        """Return the records, of one node when ``node`` is given, oldest first.

        Raises
        ------
        CalibrationError
            Naming the file, if a record is corrupt or of an unknown schema version.
        """
        records = [read_record(path) for path in self.paths(node)]
        if node is not None:
            records = [r for r in records if r.node == node]
        return sorted(records, key=lambda r: r.created_at)

    def __iter__(self) -> Iterator[CalibrationRecord]:
        return iter(self.records())

    def get(self, content_hash: str) -> CalibrationRecord:
        """Return the record with this content hash (a unique prefix of it is enough)."""
        if not content_hash:
            raise ConfigError("give a content hash, for example sha256:3fa2b1c4")
        wanted = content_hash if content_hash.startswith("sha256:") else f"sha256:{content_hash}"
        found = [r for r in self.records() if r.content_hash.startswith(wanted)]
        if len(found) != 1:
            what = "no record" if not found else f"{len(found)} records"
            raise CalibrationError(f"{what} in {self.path} with content hash {content_hash}; give more of the hash")
        return found[0]

    def latest(
        self,
        node: Node,
        *,
        now: _dt.datetime | None = None,
        allow_expired: bool = False,
        allow_mismatch: bool = False,
        include_corrections: bool = False,
    ) -> CalibrationRecord:
        """Return the newest record of ``node`` that matches its identity and has not expired.

        Drift corrections (records fitted against a baseline twin, see
        :class:`~pnn.calibration.drift.DriftMonitor`) are skipped unless ``include_corrections``,
        because they only make sense on top of their baseline.

        Parameters
        ----------
        node
            The connected node; its name selects the records and its identity must match.
        now
            The present, for the expiry check (tests pass a fixed time).
        allow_expired, allow_mismatch
            Accept an expired record, or one made for another identity, when no valid record
            exists. Each override that lets a record through is logged as a warning.

        Raises
        ------
        CalibrationError
            If the node has no record, every record was made for another identity, or the
            newest matching record has expired. The message explains what to do.
        """
        records = self.records(node.name)
        if not include_corrections:
            records = [r for r in records if r.reference.get("kind") != "twin"]
        if not records:
            raise CalibrationError(
                f"no calibration record for node {node.name!r} in {self.path}; calibrate it first "
                "(pnn calibrate), or point to the right store"
            )
        identity = node.identity()
        matching = [r for r in records if not identity_differences(r.identity, identity)]
        current = [r for r in matching if not r.is_expired(now)]
        if current:
            return current[-1]
        # No valid record. Checking the newest one (a matching one if any) raises the error that
        # explains why, or logs the override that lets it through.
        newest = matching[-1] if matching else records[-1]
        newest.check_node(node, now=now, allow_expired=allow_expired, allow_mismatch=allow_mismatch,
                          source=str(self.path / self.file_name(newest)))
        return newest

    def __repr__(self) -> str:
        return f"<CalibrationStore {str(self.path)!r}: {len(self.paths())} record(s)>"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        if cycle:
            printer.text(repr(self))
            return
        lines = [repr(self)]
        for record in self.records():
            state = "expired" if record.is_expired() else f"valid until {record.expires[:19]}"
            lines.append(f"  {record.node:<16} {record.created[:19]}  {record.model:<8} {record.content_hash[:19]}  {state}")
        printer.text("\n".join(lines))
