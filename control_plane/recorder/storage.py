"""Where the flight recorder keeps its records: the storage protocol and the memory backend.

A backend stores rows of :data:`~agent_os.control_plane.recorder.records.COLUMNS` and answers simple
column filters; the recorder does the hashing, batching and field filters above it. Backends:
``memory`` (this module), ``sqlite`` (:mod:`.sqlite`), ``postgresql`` (:mod:`.postgres`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent_os.control_plane.errors import RecorderInUse

Row = tuple[Any, ...]


def check_continues(tail: tuple[int, str] | None, first: Row, where: str) -> None:
    """Refuse a batch that does not continue the stored chain: another writer appended to it
    (or it was cut) since this recorder read its tail. Raises RecorderInUse."""
    seq, prev = int(first[0]), first[8]
    if (tail is None and seq == 1) or (tail is not None and (tail[0], tail[1]) == (seq - 1, prev)):
        return
    now = "empty" if tail is None else f"at seq {tail[0]}"
    raise RecorderInUse(
        f"{where}: the stored chain is {now}, but this recorder continues seq {seq - 1}: another "
        "writer appended to it (or it was cut) since this recorder opened it; nothing was written"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Where:
    """Column filters of a query; None means "any"."""

    agent_id: str | None = None
    execution_id: str | None = None
    event_types: Sequence[str] | None = None
    severities: Sequence[str] | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    descending: bool = False
    limit: int | None = None

    def accepts(self, row: Row) -> bool:
        _seq, _id, ts, et, agent, exe, sev, *_ = row
        return (
            (self.agent_id is None or agent == self.agent_id)
            and (self.execution_id is None or exe == self.execution_id)
            and (self.event_types is None or et in self.event_types)
            and (self.severities is None or sev in self.severities)
            and (self.start_ns is None or ts >= self.start_ns)
            and (self.end_ns is None or ts <= self.end_ns)
        )


class Storage(Protocol):
    """An append-only table of records, ordered by ``seq``.

    A storage may also have an int attribute ``write_unit``: a flush started by a full batch
    then hands it a multiple of that many rows when there are more (``FlightRecorder._flush``)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def tail(self) -> tuple[int, str] | None:
        """The last record's (seq, hash), or None when empty."""
        ...

    async def append(self, rows: Sequence[Row]) -> None:
        """Store rows atomically and durably: when this returns, they survive a crash. Rows
        carry plaintext data; a SQL storage encodes it with its codec on the way in. Raises
        RecorderInUse (storing nothing) when the rows do not continue the stored chain."""
        ...

    async def select(self, where: Where) -> list[Row]: ...

    def scan(self, chunk: int = 10_000) -> AsyncIterator[list[Row]]:
        """Every row in ``seq`` order, in chunks (for verify and export)."""
        ...

    async def newest_anchor(self) -> tuple[int, Any] | None:
        """The (seq, stored data) of the newest retention anchor, if any."""
        ...

    async def first_seq_after(self, ts_ns: int) -> int | None:
        """The seq of the first record at or after ``ts_ns`` (None when none is)."""
        ...

    async def hash_at(self, seq: int) -> str | None:
        """The hash of record ``seq`` (None when absent)."""
        ...

    async def delete_through(self, seq: int) -> int:
        """Delete records with seq <= ``seq``; return how many."""
        ...


class MemoryStorage:
    """Records in a list; gone with the process. For tests and short-lived tools."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def tail(self) -> tuple[int, str] | None:
        return (self.rows[-1][0], self.rows[-1][9]) if self.rows else None

    async def append(self, rows: Sequence[Row]) -> None:
        if rows:
            check_continues(await self.tail(), rows[0], "memory storage")
        self.rows.extend(rows)

    async def select(self, where: Where) -> list[Row]:
        found = [r for r in self.rows if where.accepts(r)]
        if where.descending:
            found.reverse()
        return found if where.limit is None else found[: where.limit]

    async def scan(self, chunk: int = 10_000) -> AsyncIterator[list[Row]]:
        for i in range(0, len(self.rows), chunk):
            yield self.rows[i : i + chunk]

    async def newest_anchor(self) -> tuple[int, Any] | None:
        from agent_os.control_plane.recorder.records import ANCHOR_EVENT

        for row in reversed(self.rows):
            if row[3] == ANCHOR_EVENT:
                return row[0], row[7]
        return None

    async def first_seq_after(self, ts_ns: int) -> int | None:
        for row in self.rows:
            if row[2] >= ts_ns:
                seq: int = row[0]
                return seq
        return None

    async def hash_at(self, seq: int) -> str | None:
        for row in self.rows:
            if row[0] == seq:
                found: str = row[9]
                return found
        return None

    async def delete_through(self, seq: int) -> int:
        before = len(self.rows)
        self.rows = [r for r in self.rows if r[0] > seq]
        return before - len(self.rows)
