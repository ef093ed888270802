"""The v1 envelope: one record per message, the unit that is serialized, signed and routed.

Broker-specific delivery facts (attempt, redelivered, partition/offset, stream id) never live
here: they travel beside the envelope in :class:`agent_os.amb.Metadata`, outside the signed bytes.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

WIRE_VERSION = 1


class Signature(msgspec.Struct, frozen=True):
    """The signature block written by IATP: what signed the envelope, and how.

    ``scheme`` names the algorithm (``"ed25519"`` or a session MAC), ``key_id`` the key,
    ``nonce`` the random bytes that make the signature unique, ``value`` the signature.

    A frozen msgspec Struct (``docs/bus.md``, "The envelope"): setting a field raises
    AttributeError; copy one with changes with ``msgspec.structs.replace``.
    """

    scheme: str
    key_id: str
    nonce: bytes
    value: bytes


@dataclass(slots=True)
class Envelope:
    """One message on the bus (wire format v1).

    ``timestamp`` and ``expires_at`` are nanoseconds since the Unix epoch. ``payload`` is bytes
    or any value the serializer can carry (msgpack: dicts, lists, str, int, float, bool, None,
    bytes). ``headers`` map str to str (``traceparent``, ``content-type``, ...).
    """

    id: str
    topic: str
    sender: str
    payload: Any = None
    recipient: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    timestamp: int = 0
    expires_at: int | None = None
    priority: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    sig: Signature | None = None
    v: int = WIRE_VERSION

    def expired(self, now_ns: int | None = None) -> bool:
        """True when the envelope has an expiry and it has passed."""
        if self.expires_at is None:
            return False
        return (time.time_ns() if now_ns is None else now_ns) >= self.expires_at


_new: Final = object.__new__


def new_envelope(
    id: str,
    topic: str,
    sender: str,
    payload: Any,
    recipient: str | None,
    reply_to: str | None,
    correlation_id: str | None,
    timestamp: int,
    expires_at: int | None,
    priority: int,
    headers: dict[str, str],
    sig: Signature | None,
) -> Envelope:
    """``Envelope(...)`` with every field given (``v`` is WIRE_VERSION), for the bus's hot paths:
    it sets the slots directly instead of going through the dataclass ``__init__`` (about a
    third cheaper). Keep it in step with the fields of :class:`Envelope`."""
    env: Envelope = _new(Envelope)
    env.id = id
    env.topic = topic
    env.sender = sender
    env.payload = payload
    env.recipient = recipient
    env.reply_to = reply_to
    env.correlation_id = correlation_id
    env.timestamp = timestamp
    env.expires_at = expires_at
    env.priority = priority
    env.headers = headers
    env.sig = sig
    env.v = WIRE_VERSION
    return env


_HEX2: Final = tuple(f"{i:02x}" for i in range(256))
_MS_MASK: Final = (1 << 48) - 1  # the id's millisecond: 12 hex characters
_HIGH_MASK: Final = (1 << 40) - 1  # the counter without its last byte: 10 hex characters


class _IdSource:
    """Sortable unique ids: 48-bit milliseconds, 32-bit per-process node, 48-bit counter, as hex.

    The format is fixed (32 lowercase hex characters, ``<ms:12><node:8><counter:12>``): ids from
    one process sort in creation order; ids from different processes sort by their millisecond.
    The node is drawn again after ``fork`` so children never repeat the parent's ids.

    Hot path: the first 30 characters (millisecond, node, counter without its last byte) are
    kept per millisecond and 256 counter values, so an id is usually one table look-up and one
    concatenation.
    """

    __slots__ = ("_counter", "_node", "_state")

    def __init__(self) -> None:
        self._reseed()

    def _reseed(self) -> None:
        self._node = int.from_bytes(os.urandom(4), "big")
        # The counter starts at a random point so that two processes drawing the same node
        # (one chance in 2**32) still do not collide on the first ids.
        # itertools.count is atomic under the GIL, so threads never draw the same value.
        self._counter = itertools.count(int.from_bytes(os.urandom(5), "big"))
        # (millisecond, counter >> 8, the id's first 30 characters): one attribute, replaced
        # whole, and each id is built from its own counter value, so threads never mix parts.
        self._state = (-1, -1, "")

    def next(self) -> str:
        """A new id stamped with the current time."""
        return self.at(time.time_ns())

    def at(self, now_ns: int) -> str:
        """A new id stamped with ``now_ns`` (nanoseconds since the epoch, e.g. the envelope's
        timestamp, saving a clock read)."""
        count = next(self._counter)
        ms = now_ns // 1_000_000
        high = count >> 8
        state = self._state
        if state[0] != ms or state[1] != high:
            # The 30 characters as one 120-bit number's hex: under half of what three format
            # specs cost, paid for every id at rates under one message a millisecond.
            prefix = (((ms & _MS_MASK) << 72) | (self._node << 40) | (high & _HIGH_MASK)).to_bytes(15).hex()
            state = self._state = (ms, high, prefix)
        return state[2] + _HEX2[count & 0xFF]


_ids = _IdSource()
os.register_at_fork(after_in_child=_ids._reseed)


new_id = _ids.next
"""Return a new sortable unique id (32 hex characters)."""

new_id_at = _ids.at
"""Return a new sortable unique id stamped with ``now_ns`` (the caller's ``time.time_ns()``)."""
