"""Calibration records: versioned JSON files that tie a fitted model to one node and one time.

A record contains the node's identity: an instrument's ``*IDN?`` reply, serial number and
firmware, or the simulator kind, settings and seed. It also contains the UTC time it was made
and the time it expires, the transfer model with every channel's fitted parameters,
uncertainties, covariance and residuals, the sweep settings, the error on held-out points, and a
content hash.

The hash is ``sha256:`` followed by the SHA-256 of the record's canonical serialisation: JSON
with sorted keys, no spaces, ASCII only and no NaN, of every field but the hash itself. A file
whose content no longer matches its hash was changed after it was written and is rejected.

Layout version: :data:`SCHEMA_VERSION`. A record of another version is rejected with a message
that names the file; a newer version needs a newer pnn.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..errors import CalibrationError, ConfigError
from ..nodes import Node
from .fit import ChannelFit, TransferFit
from .models import MODEL_NAMES

if TYPE_CHECKING:
    from .twin import DigitalTwin

__all__ = [
    "CalibrationRecord",
    "SCHEMA",
    "SCHEMA_VERSION",
    "DEFAULT_VALIDITY",
    "identity_key",
    "identity_differences",
    "read_record",
    "identity_summary",
]

log = logging.getLogger(__name__)

#: Value of the ``schema`` field of every calibration record.
SCHEMA = "pnn-calibration"
#: Layout version of the records this pnn writes and reads.
SCHEMA_VERSION = 1
#: How long a new record stays valid unless the caller says otherwise.
DEFAULT_VALIDITY = _dt.timedelta(hours=24)

# Identity fields that may change while the hardware stays the same: the address of an
# instrument (a USB port, an emulator's TCP port) and the count of reconnections. The
# identification reply, serial number and firmware still pin the instrument.
VOLATILE_IDENTITY_KEYS = frozenset({"resource", "reconnects"})


def _plain(value: Any) -> Any:
    """Return ``value`` as JSON data: dicts, lists, str, int, float, bool and None only.

    Non-finite floats become the strings "nan", "inf" and "-inf", so the canonical JSON needs no
    extension.
    """
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isfinite(number):
            return number
        if math.isnan(number):
            return "nan"
        return "inf" if number > 0 else "-inf"
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def identity_key(identity: Mapping[str, Any]) -> Any:
    """Return the part of an identity that must match: everything but volatile fields."""

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE_IDENTITY_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(_plain(identity))


def identity_differences(recorded: Mapping[str, Any], connected: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Return a line per field where two identities differ, as ``path: recorded -> connected``."""
    differences: list[str] = []

    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}.{key}" if path else key)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            differences.append(f"{path or 'identity'}: {short(a)} -> {short(b)}")

    walk(identity_key(recorded), identity_key(connected), "")
    if len(differences) > limit:
        differences = differences[:limit] + [f"... and {len(differences) - limit} more"]
    return differences


def _parse_time(text: Any, label: str, source: str) -> _dt.datetime:
    if not isinstance(text, str):
        raise CalibrationError(f"calibration record {source} is corrupt: {label} is not a time ({text!r})")
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise CalibrationError(f"calibration record {source} is corrupt: {label} {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise CalibrationError(f"calibration record {source} is corrupt: {label} {text!r} has no time zone")
    return moment


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


@dataclass(frozen=True)
class CalibrationRecord:
    """One calibration of one node, with its content hash.

    Build one from a fit with :meth:`from_fit`, read one with :func:`read_record`, and keep them
    in a :class:`~pnn.calibration.store.CalibrationStore`. Every field is plain JSON data.
    """

    node: str
    """Name of the node."""
    identity: dict[str, Any]
    """The node's identity when it was calibrated (:meth:`~pnn.nodes.Node.identity`)."""
    created: str
    """UTC time of the calibration, ISO 8601."""
    expires: str
    """UTC time after which the record is rejected unless the caller allows expired records."""
    model: str
    """Transfer model of every channel (see :mod:`pnn.calibration.models`)."""
    reference: dict[str, Any]
    """Description of the reference that gave the stimulus (see :mod:`pnn.calibration.reference`)."""
    units: dict[str, str]
    """Units of the stimulus, the outputs and the inputs."""
    sweep: dict[str, Any]
    """Settings of the sweep, with its point count and invalid readings."""
    channels: tuple[dict[str, Any], ...]
    """Per output channel: parameters, uncertainties, covariance, residuals, fit quality."""
    holdout: dict[str, Any] | None = None
    """Prediction error of the fitted model on held-out points, per channel."""
    pnn_version: str = __version__
    """Version of pnn that made the record."""
    notes: str = ""
    """Free text, for example who calibrated and why."""
    schema_version: int = SCHEMA_VERSION
    """Layout version of the record."""
    content_hash: str = field(default="", compare=False)
    """``sha256:`` and the hex digest of the canonical serialisation; computed when empty."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "content_hash":
                object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
        object.__setattr__(self, "channels", tuple(self.channels))
        computed = self.compute_hash()
        if not self.content_hash:
            object.__setattr__(self, "content_hash", computed)
        elif self.content_hash != computed:
            raise CalibrationError(
                f"calibration record of node {self.node!r} has content hash {self.content_hash}, but its "
                f"content hashes to {computed}; it was changed after it was written, so it cannot be trusted"
            )

    # ------------------------------------------------------------------------- building
    @classmethod
    def from_fit(
        cls,
        fit: TransferFit,
        *,
        node: Node,
        reference: Mapping[str, Any],
        sweep: Mapping[str, Any],
        holdout: Mapping[str, Any] | None = None,
        valid_for: _dt.timedelta = DEFAULT_VALIDITY,
        created: _dt.datetime | None = None,
        identity: Mapping[str, Any] | None = None,
        notes: str = "",
    ) -> CalibrationRecord:
        """Build a record of ``fit`` for ``node``, valid for ``valid_for`` from ``created`` (now)."""
        if valid_for.total_seconds() <= 0:
            raise ConfigError(f"a calibration must stay valid for a positive time, got {valid_for}")
        created = created or _now()
        return cls(
            node=node.name,
            identity=dict(identity if identity is not None else node.identity()),
            created=created.isoformat(timespec="microseconds"),
            expires=(created + valid_for).isoformat(timespec="microseconds"),
            model=fit.model,
            reference=dict(reference),
            units={"stimulus": fit.stimulus_unit, "output": fit.output_unit, "input": node.input_spec.unit},
            sweep=dict(sweep),
            channels=tuple(channel.to_dict() for channel in fit.channels),
            holdout=None if holdout is None else dict(holdout),
            notes=notes,
        )

    # ---------------------------------------------------------------------- serialising
    def body(self) -> dict[str, Any]:
        """Return every field but the content hash, as plain data."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "content_hash"}

    def compute_hash(self) -> str:
        """Return the hash of the canonical serialisation of :meth:`body`."""
        body = self.body()
        body["channels"] = list(body["channels"])
        return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()

    def to_json(self) -> str:
        """Return the record as indented JSON, the hash last."""
        data = self.body()
        data["channels"] = list(data["channels"])
        data = {"schema": SCHEMA, **data, "content_hash": self.content_hash}
        return json.dumps(data, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<data>") -> CalibrationRecord:
        """Rebuild a record from its JSON data, checking schema, fields and hash.

        Raises
        ------
        CalibrationError
            Naming ``source``, for data that is not a calibration record, of an unknown schema
            version, corrupt, or changed after it was written.
        """
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise CalibrationError(
                f"{source} is not a pnn calibration record (its 'schema' field is not {SCHEMA!r}); "
                "move it out of the calibration store"
            )
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
            advice = "upgrade pnn to read it" if newer else "calibrate the node again to write a current record"
            raise CalibrationError(
                f"calibration record {source} has schema version {version!r}, but this pnn reads version "
                f"{SCHEMA_VERSION} only; {advice}"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"holdout", "notes"})
        unknown = sorted(set(data) - names - {"schema"})
        if missing or unknown:
            detail = f"missing field(s) {missing}" if missing else f"unknown field(s) {unknown}"
            raise CalibrationError(
                f"calibration record {source} is corrupt: {detail}; move it out of the store and calibrate again"
            )
        values = {key: value for key, value in data.items() if key != "schema"}
        if not values["content_hash"]:
            raise CalibrationError(f"calibration record {source} is corrupt: it has no content hash")
        try:
            record = cls(**values)
        except CalibrationError as exc:
            raise CalibrationError(f"calibration record {source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"calibration record {source} is corrupt ({exc}); move it out of the store") from None
        record._check_fields(source)
        return record

    def _check_fields(self, source: str) -> None:
        def corrupt(detail: str) -> CalibrationError:
            return CalibrationError(
                f"calibration record {source} is corrupt: {detail}; move it out of the store and calibrate again"
            )

        if not isinstance(self.node, str) or not self.node:
            raise corrupt("the node name is missing")
        if not isinstance(self.identity, dict):
            raise corrupt("the identity is not a table")
        _parse_time(self.created, "created", source)
        _parse_time(self.expires, "expires", source)
        if self.model not in MODEL_NAMES:
            raise corrupt(f"unknown transfer model {self.model!r}")
        if not isinstance(self.reference, dict) or not self.channels:
            raise corrupt("the reference or the channel fits are missing")
        try:
            self.fit()
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise corrupt(f"a channel fit is incomplete ({type(exc).__name__}: {exc})") from None

    # ----------------------------------------------------------------------- using
    @property
    def created_at(self) -> _dt.datetime:
        """Time of the calibration."""
        return _parse_time(self.created, "created", self.node)

    @property
    def expires_at(self) -> _dt.datetime:
        """Time after which the record is expired."""
        return _parse_time(self.expires, "expires", self.node)

    def is_expired(self, now: _dt.datetime | None = None) -> bool:
        """True when ``now`` (the present by default) is past the expiry time."""
        return (now or _now()) > self.expires_at

    def fit(self) -> TransferFit:
        """Return the fitted transfer curves."""
        channels = tuple(ChannelFit.from_dict(data) for data in self.channels)
        for k, channel in enumerate(channels):
            if channel.channel != k or channel.model != self.model:
                raise ValueError(f"channel entry {k} is for channel {channel.channel} with model {channel.model}")
        return TransferFit(
            node=self.node, model=self.model, channels=channels,
            stimulus_unit=self.units.get("stimulus", ""), output_unit=self.units.get("output", ""),
        )

    def check_node(
        self,
        node: Node,
        *,
        now: _dt.datetime | None = None,
        allow_expired: bool = False,
        allow_mismatch: bool = False,
        source: str | None = None,
    ) -> None:
        """Raise CalibrationError unless this record may be used for ``node``.

        The identity must match, apart from volatile fields such as an instrument's address, and
        the record must not have expired. ``allow_mismatch`` and ``allow_expired`` override each
        check explicitly. An override that lets the record through is logged as a warning.
        """
        where = source or f"the calibration record {self.content_hash[:19]}"
        if len(self.channels) != node.n_out:
            raise CalibrationError(
                f"node {node.name!r} has {node.n_out} output(s), but {where} calibrates {len(self.channels)}; "
                "calibrate this node"
            )
        differences = identity_differences(self.identity, node.identity())
        if differences and not allow_mismatch:
            raise CalibrationError(
                f"{where} was made for another device than the connected node {node.name!r}: "
                + "; ".join(differences)
                + ". Calibrate the connected node, or pass allow_mismatch=True "
                "(--allow-identity-mismatch) if you are sure it is the same device"
            )
        if differences:
            log.warning("node %r: using %s although it was made for another identity (%s), as requested",
                        node.name, where, "; ".join(differences))
        expired = self.is_expired(now)
        if expired and not allow_expired:
            raise CalibrationError(
                f"{where} for node {node.name!r} expired at {self.expires}; calibrate the node again, "
                "or pass allow_expired=True (--allow-expired-calibration) to use it anyway"
            )
        if expired:
            log.warning("node %r: using %s, which expired at %s, as requested", node.name, where, self.expires)

    def twin(self, node: Node | None = None) -> DigitalTwin:
        """Return the digital twin this record describes (see :class:`~pnn.calibration.twin.DigitalTwin`)."""
        from .twin import DigitalTwin  # noqa: PLC0415 - twin imports this module

        return DigitalTwin.from_record(self, node)

    # -------------------------------------------------------------------------- display
    def summary(self) -> str:
        """Return a readable description: node, identity, times, fit table and held-out error."""
        lines = [
            f"Calibration record of node {self.node!r} ({self.content_hash[:19]}...)",
            f"  device   {identity_summary(self.identity)}",
            f"  created  {self.created}",
            f"  expires  {self.expires}{'  (expired)' if self.is_expired() else ''}",
            f"  sweep    {self.sweep.get('design')} design, {self.sweep.get('n_points')} point(s) x "
            f"{self.sweep.get('repeats')} repeat(s); reference {self.reference.get('kind')}",
        ]
        lines.append("  " + self.fit().summary().replace("\n", "\n  "))
        if self.holdout:
            rms = self.holdout.get("rms", [])
            lines.append(
                f"  held-out: {self.holdout.get('n_points')} point(s), rms prediction error per channel "
                + ", ".join(f"{v:.3g}" for v in rms)
                + ("" if self.units.get("output", "") in ("", "1") else f" {self.units['output']}")
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<CalibrationRecord {self.node!r} {self.model} x{len(self.channels)} created {self.created[:19]} "
                f"{self.content_hash[:19]}>")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self) if cycle else self.summary())


def identity_summary(identity: Mapping[str, Any]) -> str:
    """Return the most telling fields of an identity on one line."""
    parts = [str(identity.get("kind", "node"))]
    instruments = identity.get("instruments")
    if isinstance(instruments, Sequence) and not isinstance(instruments, str):
        for instrument in instruments:
            if isinstance(instrument, Mapping):
                parts.append(f"{instrument.get('name')}: {instrument.get('identity')}")
    for key in ("preset", "seed", "activation"):
        if key in identity and identity[key] is not None:
            parts.append(f"{key} {identity[key]}")
    return ", ".join(parts)


def read_record(path: str | Path) -> CalibrationRecord:
    """Read and check one record file.

    Raises
    ------
    CalibrationError
        Naming the file, when it cannot be read, is not JSON, is of an unknown schema version,
        is corrupt, or was changed after it was written.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"calibration record {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"calibration record {path} cannot be read ({exc}); move it out of the store") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(
            f"calibration record {path} is corrupt: not valid JSON at line {exc.lineno}, column {exc.colno} "
            f"({exc.msg}); move it out of the store and calibrate the node again"
        ) from None
    return CalibrationRecord.from_dict(data, source=str(path))
