"""Reversible actions: what ``fs.write`` and ``fs.delete`` changed, kept so it can be undone.

A :class:`Snapshot` is the state of one path before an action (its content and mode, the
target of the symlink it was, or that it did not exist) and a digest of what the action left
there. ``kernel.submit`` takes it before a reversible provider runs (:class:`Reversible`) and
keeps it in the kernel's :class:`SnapshotStore` under the record id of the action's outcome;
``kernel.rollback(record_id)`` (the ``fs.rollback`` action) restores it. Where they live, how
long, and what a failure to take one does: ``docs/control-plane.md`` (Actions, Reversible
actions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol

from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.errors import KernelError

if TYPE_CHECKING:
    from agent_os.control_plane.actions.request import ActionRequest

OnFailure = Literal["block", "proceed"]

SNAPSHOT_TTL: Final = 3600.0
"""How long a snapshot can be rolled back (seconds) by default."""
MAX_SNAPSHOT: Final = 10 * 2**20
"""The largest file (bytes) snapshotted by default; a larger one is a failure to snapshot."""
MAX_TOTAL: Final = 256 * 2**20
"""The most snapshot bytes a store keeps by default; the oldest go first past it."""


class SnapshotError(Exception):
    """The state before an action could not be kept (too large, not a regular file, unreadable)."""


class RollbackRefused(ActionRefused):
    """A rollback that cannot be done: no snapshot for the record id (unknown, already rolled
    back, or dropped to stay under the store's size), an expired one, or another agent's."""


def digest(data: bytes) -> str:
    """The digest a snapshot compares contents by (SHA-256, hex)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One path before an action: ``root`` (the workspace), ``path`` (normalized, absolute),
    ``parts`` (below the root), ``action`` (``fs.write``/``fs.delete``), ``content`` and
    ``mode`` of the file (None: no file), ``left`` (the digest of what the action left there;
    None: it left nothing) and ``link`` (the path was a symlink to this; never followed, put
    back as a link). Neither content nor link: the path did not exist. ``agent`` (the acting
    agent's name) and ``expires`` (store clock) are set when the store keeps it."""

    root: str
    path: str
    parts: tuple[str, ...]
    action: str
    content: bytes | None
    mode: int | None
    left: str | None
    link: str | None = None
    agent: str = ""
    expires: float = 0.0

    @property
    def existed(self) -> bool:
        """Whether the path held a file before the action."""
        return self.content is not None or self.link is not None

    @property
    def size(self) -> int:
        return len(self.content or b"") + len(self.link or "")


class Reversible(Protocol):
    """A provider whose actions can be undone: ``capture(request)`` returns the snapshot to
    keep before ``run`` (None: this request changes nothing worth keeping) or raises
    SnapshotError; ``snapshots`` is the store it is kept in."""

    @property
    def snapshots(self) -> SnapshotStore | None: ...

    async def capture(self, request: ActionRequest) -> Snapshot | None: ...


class SnapshotStore:
    """The snapshots of one kernel, in memory (``kernel.snapshots``), by outcome record id.

    ``ttl``: seconds a snapshot can be rolled back; ``max_snapshot``: the largest file kept
    (bytes; larger is a failure to snapshot); ``max_total``: the most bytes kept, the oldest
    snapshots dropped first past it; ``on_failure``: ``"block"`` (default: an action whose
    snapshot failed does not run) or ``"proceed"`` (it runs unprotected); ``clock``: seconds,
    monotonic (for tests). Raises KernelError for out-of-range options."""

    def __init__(
        self,
        *,
        ttl: float = SNAPSHOT_TTL,
        max_snapshot: int = MAX_SNAPSHOT,
        max_total: int = MAX_TOTAL,
        on_failure: OnFailure = "block",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        seconds(ttl, "ttl", error=KernelError)
        whole(max_snapshot, "max_snapshot", 0, error=KernelError)
        whole(max_total, "max_total", max_snapshot, error=KernelError)
        if on_failure not in ("block", "proceed"):
            raise KernelError(f"on_failure must be 'block' or 'proceed', got {on_failure!r}")
        self.ttl = ttl
        self.max_snapshot = max_snapshot
        self.max_total = max_total
        self.on_failure: OnFailure = on_failure
        self.clock = clock
        self._kept: OrderedDict[str, Snapshot] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, record_id: str, snapshot: Snapshot, agent: str) -> Snapshot:
        """Keep ``snapshot`` for ``ttl`` seconds as the one of ``record_id``, made by ``agent``."""
        kept = dataclasses.replace(snapshot, agent=agent, expires=self.clock() + self.ttl)
        self._purge()
        while self._kept and self._bytes + kept.size > self.max_total:
            self._drop(next(iter(self._kept)))
        self._kept[record_id] = kept
        self._bytes += kept.size
        return kept

    def get(self, record_id: str) -> Snapshot:
        """The snapshot of ``record_id``. Raises RollbackRefused when there is none or it expired."""
        kept = self._kept.get(record_id) if isinstance(record_id, str) else None
        if kept is None:
            raise RollbackRefused(
                f"no snapshot for record {record_id!r}: not a reversible action's outcome, "
                "already rolled back, or dropped (max_total)"
            )
        if kept.expires <= self.clock():
            self._drop(record_id)
            raise RollbackRefused(f"the snapshot of record {record_id!r} expired (ttl {self.ttl:g}s)")
        return kept

    def discard(self, record_id: str) -> None:
        """Forget the snapshot of ``record_id`` (after it was rolled back)."""
        if record_id in self._kept:
            self._drop(record_id)

    def _drop(self, record_id: str) -> None:
        self._bytes -= self._kept.pop(record_id).size

    def _purge(self) -> None:
        now = self.clock()  # kept in order of expiry: the ttl is the same for all
        while self._kept and next(iter(self._kept.values())).expires <= now:
            self._drop(next(iter(self._kept)))
