"""Flight-recorder records, their canonical encoding and the hash chain.

What a record's hash covers, how the chain is verified and how retention anchors keep it
verifiable after pruning: ``docs/control-plane.md`` (The flight recorder and its hash chain).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final, NamedTuple

import msgspec

from agent_os.control_plane.errors import TamperDetected
from agent_os.control_plane.recorder.heads import HeadRecords

GENESIS: Final = "0" * 64
ANCHOR_EVENT: Final = "retention_anchor"
TRACE_EVENT: Final = "flight_recorder.append"
"""While tracing is on, each record is this event on the span of what it records (no span per
append: ``docs/observability.md``, "Tracing")."""
FREQUENT_EVENTS: Final = ("policy_decision",)
"""The event type of most records: every governed message has two, every action one (beside its
``action_outcome``), so it is at least every other record the kernel writes. The SQLite storage
keeps it out of its event-type index, which then holds the rest (outcomes, violations, signals,
lifecycle, anchors, heads): a query for those finds them through the index, one for this type
reads by ``seq`` (docs/control-plane.md, "The event-type index")."""
SEVERITIES: Final = ("debug", "info", "warning", "error", "critical")
COLUMNS: Final = (
    "seq",
    "id",
    "ts",
    "event_type",
    "agent_id",
    "execution_id",
    "severity",
    "data",
    "prev_hash",
    "hash",
)


def normalize(value: Any) -> Any:
    """Turn ``value`` into plain JSON data (docs/control-plane.md)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalize(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((normalize(v) for v in value), key=repr)
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return normalize(value.name)
    return repr(value)


_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_canonical = _encoder.encode  # the last resort: integers beyond 64 bits, which msgspec refuses
# msgspec's JSON encoder: the same text as the standard library's with sorted keys, compact
# separators and ensure_ascii=False (strings are escaped alike), except for the exponent of
# floats (1e16, not 1e+16); several times faster. Encoders keep no state between calls.
_json: Final = msgspec.json.Encoder(order="sorted").encode
json_bytes: Final = _json
"""Compact JSON with sorted keys (msgspec), the encoder of data and chain headers."""
_sha256 = hashlib.sha256
_FLAT: Final = frozenset({str, int, bool, type(None)})
_isfinite = math.isfinite


def _plain_flat(data: dict[Any, Any]) -> bool:
    for key, value in data.items():
        if type(key) is not str:
            return False
        kind = type(value)
        if kind not in _FLAT and not (kind is float and _isfinite(value)):
            return False
    return True


def canonical_bytes(data: Mapping[str, Any], *, plain: bool = False) -> bytes:
    """``data`` as canonical JSON (sorted keys, compact, UTF-8; docs/control-plane.md).

    ``plain=True`` promises that ``data`` is a dict of plain JSON (string keys; strings,
    integers, finite floats, booleans, null, and lists and dicts of them) and skips the check.
    """
    # The text only has to be a deterministic function of ``data``: the chain hashes the
    # stored text, it never re-encodes the original.
    if plain or (type(data) is dict and _plain_flat(data)):
        try:
            return _json(data)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            pass
    normalized = normalize(data)
    try:
        return _json(normalized)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return _canonical(normalized).encode()


def canonical_data(data: Mapping[str, Any]) -> str:
    """``data`` as canonical JSON text (see :func:`canonical_bytes`)."""
    return canonical_bytes(data).decode()


def chain_hash(
    seq: int,
    id: str,
    ts: int,
    event_type: str,
    agent_id: str,
    execution_id: str | None,
    severity: str,
    data: bytes,
    prev_hash: str,
) -> str:
    """:func:`record_hash` for data already encoded to UTF-8 bytes."""
    head = _json([seq, id, ts, event_type, agent_id, execution_id, severity, prev_hash])
    return _sha256(head + data).hexdigest()


def record_hash(
    seq: int,
    id: str,
    ts: int,
    event_type: str,
    agent_id: str,
    execution_id: str | None,
    severity: str,
    data_json: str,
    prev_hash: str,
) -> str:
    """The hash of one record's complete canonical content: sha256 of the compact JSON array
    ``[seq, id, ts, event_type, agent_id, execution_id, severity, prev_hash]`` immediately
    followed by ``data_json`` (the array is self-delimiting, so the two cannot be confused)."""
    data = data_json.encode()
    return chain_hash(seq, id, ts, event_type, agent_id, execution_id, severity, data, prev_hash)


class Record(NamedTuple):
    """One flight-recorder record. ``ts`` is nanoseconds since the epoch; ``data_json`` is the
    canonical JSON of ``data``. A tuple in column order, so it is also a storage row."""

    seq: int
    id: str
    ts: int
    event_type: str
    agent_id: str
    execution_id: str | None
    severity: str
    data_json: str
    prev_hash: str
    hash: str

    @property
    def data(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.data_json)
        return result

    @property
    def timestamp(self) -> datetime:
        from datetime import UTC

        return datetime.fromtimestamp(self.ts / 1e9, tz=UTC)

    def row(self) -> tuple[Any, ...]:
        return tuple(self)

    def as_dict(self, include_metadata: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "timestamp": self.timestamp.isoformat(),
            "event_type": self.event_type,
            "agent_id": self.agent_id,
            "execution_id": self.execution_id,
            "severity": self.severity,
            "data": self.data,
        }
        if include_metadata:
            out.update(seq=self.seq, ts=self.ts, prev_hash=self.prev_hash, hash=self.hash)
        return out

    @classmethod
    def from_row(cls, row: Iterable[Any]) -> Record:
        seq, id, ts, et, agent, exe, sev, data, prev, h = row
        return cls(int(seq), id, int(ts), et, agent, exe, sev, data, prev, h)


Decode = Callable[[int, Any], str]
"""Turns a stored ``data`` value of record ``seq`` back into canonical JSON (see .codec)."""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :meth:`FlightRecorder.verify`: ``ok``, how many records were checked, and
    for a broken chain the first bad record's ``seq`` (or where one is missing) and why;
    ``signed_heads``: how many signed-head records were checked."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    first_bad_id: str | None = None
    reason: str = ""
    signed_heads: int = 0

    def __bool__(self) -> bool:
        return self.ok


def verify_rows(
    rows: Iterable[tuple[Any, ...]],
    anchor: tuple[int, str] | None,
    head: tuple[int, str] | None = None,
    decode: Decode | None = None,
    heads: HeadRecords | None = None,
) -> VerifyResult:
    """Check a chain of rows (in ``seq`` order) as docs/control-plane.md says. ``head``: the
    record at its seq must exist and have its hash. ``heads`` checks the signed-head records.
    ``decode`` turns stored data back into canonical JSON (a record that does not decode is a
    bad record; RecorderKeyError, for a missing or wrong key, propagates)."""
    start = (0, GENESIS) if anchor is None else anchor
    expect_seq, expect_prev = start[0] + 1, start[1]
    if head is not None and head[0] <= start[0]:
        if head[0] < start[0]:
            return VerifyResult(
                False,
                0,
                head[0],
                None,
                f"the head's record {head[0]} was pruned (the chain starts after seq {start[0]}): "
                "it cannot be checked; keep a newer head",
            )
        if head[1] != start[1]:
            return VerifyResult(False, 0, head[0], None, f"record {head[0]} differs from the known head")
    checked = 0
    last: tuple[int, str] | None = None
    rh = record_hash
    for row in rows:
        seq, rid, ts, et, agent, exe, sev, data, prev, h = row
        if seq != expect_seq:
            what = "missing" if seq > expect_seq else "duplicate or out of order"
            return VerifyResult(
                False,
                checked,
                expect_seq if seq > expect_seq else seq,
                rid,
                f"record seq {expect_seq} {what} (found seq {seq})",
            )
        if prev != expect_prev:
            return VerifyResult(False, checked, seq, rid, "prev_hash does not match the previous record")
        if decode is not None and type(data) is not str:
            try:
                data = decode(seq, data)
            except TamperDetected as exc:
                return VerifyResult(False, checked, seq, rid, str(exc))
        if rh(seq, rid, ts, et, agent, exe, sev, data, prev) != h:
            return VerifyResult(False, checked, seq, rid, "content does not match its hash (edited)")
        if head is not None and seq == head[0] and h != head[1]:
            return VerifyResult(
                False, checked, seq, rid, f"record {seq} differs from the known head (rewritten)"
            )
        if heads is not None:
            bad = heads.see(seq, et, data, prev)
            if bad is not None:
                return VerifyResult(False, checked, seq, rid, bad, heads.signed_heads)
        checked += 1
        expect_seq, expect_prev = seq + 1, h
        last = (seq, h)
    signed = heads.signed_heads if heads is not None else 0
    if head is not None and (last is None or last[0] < head[0]):
        return VerifyResult(
            False,
            checked,
            (last[0] + 1) if last else head[0],
            None,
            f"records after seq {last[0] if last else start[0]} are missing (head is {head[0]})",
            signed,
        )
    if heads is not None:
        bad = heads.finish(last[0] if last else start[0])
        if bad is not None:
            return VerifyResult(False, checked, None, None, bad, signed)
    return VerifyResult(True, checked, signed_heads=signed)
