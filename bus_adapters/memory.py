"""The in-memory broker: a real broker inside the process, the embedded default.

Clients with the same ``memory://NAME`` URL share one in-process server; its semantics are in
``docs/bus.md`` ("memory").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlparse

from agent_os.amb.broker import (
    BrokerSubscription,
    Capabilities,
    DeliveryHandler,
    Lifecycle,
    LifecycleState,
)
from agent_os.amb.dispatch import (
    Dispatcher,
    LocalDelivery,
    check_group_names,
    drain_all,
    room_in_any,
)
from agent_os.amb.errors import CapabilityNotSupported, ConfigError
from agent_os.amb.numbers import whole
from agent_os.amb.subjects import (
    INBOX_ROOT,
    MAX_SUBJECT_BYTES,
    SubjectIndex,
    plain_text,
    validate_pattern,
    validate_subject,
)

DEFAULT_MAX_PENDING: Final = 4096
_ROUTE_CACHE_MAX: Final = 8192
_OPEN: Final = LifecycleState.OPEN  # an enum member read from the class costs ~70 ns per access


class _MemorySubscription:
    """One subscription: its pattern and queue group, and the dispatcher that feeds its handler."""

    __slots__ = (
        "alone",
        "client",
        "dispatcher",
        "handle",
        "inbox",
        "offer",
        "pattern",
        "put",
        "queue",
        "shadow",
    )

    def __init__(
        self,
        client: MemoryBroker,
        pattern: str,
        handler: DeliveryHandler,
        queue: str | None,
        max_pending: int,
    ) -> None:
        self.client = client
        self.pattern = pattern
        self.queue = queue
        self.dispatcher: Dispatcher[LocalDelivery] = Dispatcher(
            handler, max_pending=max_pending, name=f"memory broker {pattern!r}"
        )
        self.offer = self.dispatcher.offer
        self.put = self.dispatcher.put
        self.handle = self.dispatcher.handle  # what its deliveries refer to
        self.alone = (self,)  # its route, where it is the only target
        self.inbox: str | None = None  # the reply inbox it stands for on the server (see attach)
        self.shadow = False  # it could match reply subjects, not being their inbox (see attach)

    @property
    def handler_errors(self) -> int:
        return self.dispatcher.handler_errors

    def has_room(self) -> bool:
        return self.dispatcher.has_room()

    def pick(self) -> _MemorySubscription:
        """The subscription a message routed here goes to: itself (see ``_QueueGroup.pick``)."""
        return self

    async def unsubscribe(self) -> None:
        self.client._detach(self)
        await self.dispatcher.stop(None, drop=True)

    async def drain(self, timeout: float | None = None) -> None:
        self.client._detach(self)
        await self.dispatcher.stop(timeout)


class _QueueGroup:
    """Members sharing a (pattern, queue) pair: each message goes to one of them."""

    __slots__ = ("_next", "members")

    def __init__(self) -> None:
        self.members: list[_MemorySubscription] = []
        self._next = 0

    def pick(self) -> _MemorySubscription | None:
        """Round-robin, preferring a member with room so one slow member does not stall the rest;
        None once the group has no members (its last left while a publish waited)."""
        members = self.members
        n = len(members)
        if not n:
            return None
        start = self._next % n
        self._next = start + 1
        for i in range(n):
            member = members[(start + i) % n]
            if member.has_room():
                self._next = (start + i + 1) % n
                return member
        return members[start]


_Target = _MemorySubscription | _QueueGroup


@dataclass(slots=True)
class MemoryStats:
    """Counters of one in-process server."""

    published: int = 0
    routed: int = 0
    no_subscribers: int = 0


class MemoryServer:
    """The in-process broker that ``memory://NAME`` clients share."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        self.stats = MemoryStats()
        self.clients = 0
        # Plain subscriptions and queue groups, by pattern: a subject not routed before is
        # looked up in the index (not matched against every pattern), then cached.
        self._index: SubjectIndex[_Target] = SubjectIndex()
        self._groups: dict[tuple[str, str], _QueueGroup] = {}
        self._routes: dict[str, tuple[_Target, ...]] = {}
        # Reply subjects are new for each request, so they are not cached. A client's reply
        # inbox ("<inbox>.>") is found by the subject's head instead, while no other pattern
        # could match a subject under INBOX_ROOT (``_shadows`` counts those).
        self._inboxes: dict[str, _MemorySubscription] = {}
        self._shadows = 0

    def attach(self, sub: _MemorySubscription) -> None:
        inbox = sub.client._inbox
        if sub.queue is None and sub.pattern == inbox + ".>" and inbox not in self._inboxes:
            sub.inbox = inbox
            self._inboxes[inbox] = sub
        elif _may_match_replies(sub.pattern):
            sub.shadow = True
            self._shadows += 1
        if sub.queue is None:
            self._index.add(sub.pattern, sub)
        else:
            group = self._groups.get((sub.pattern, sub.queue))
            if group is None:
                group = self._groups[(sub.pattern, sub.queue)] = _QueueGroup()
                self._index.add(sub.pattern, group)
            group.members.append(sub)
            for member in group.members:  # publishes waiting for room in the others: room here
                member.dispatcher.wake_putters()
        self._routes.clear()

    def detach(self, sub: _MemorySubscription) -> None:
        if sub.inbox is not None:
            del self._inboxes[sub.inbox]
            sub.inbox = None
        elif sub.shadow:
            sub.shadow = False
            self._shadows -= 1
        if sub.queue is None:
            self._index.remove(sub.pattern, sub)
        else:
            group = self._groups.get((sub.pattern, sub.queue))
            if group is not None:
                with contextlib.suppress(ValueError):
                    group.members.remove(sub)
                if not group.members:
                    del self._groups[(sub.pattern, sub.queue)]
                    self._index.remove(sub.pattern, group)
        self._routes.clear()

    def route(self, subject: str) -> tuple[_Target, ...]:
        """The subscriptions and queue groups ``subject`` goes to. Raises InvalidSubject."""
        if type(subject) is not str:  # keyed by plain text: a str subclass's text, else InvalidSubject
            subject = plain_text(subject, "subject")
        targets = self._routes.get(subject)
        return self.route_miss(subject) if targets is None else targets

    def route_miss(self, subject: str) -> tuple[_Target, ...]:
        """:meth:`route` of a plain ``str`` not in the route cache (a publish's miss). A subject
        under INBOX_ROOT (a reply subject, new for each request) is not cached: its inbox alone
        when ``<inbox>.<token>`` names one and nothing else could match, else the index's
        answer. Any other subject is validated, looked up in the index and cached. Raises
        InvalidSubject."""
        reply = subject.startswith(INBOX_ROOT)
        if reply and not self._shadows:
            inbox, _, token = subject.rpartition(".")
            sub = self._inboxes.get(inbox)
            # A registered inbox and one ASCII letter-or-digit token: valid if short enough.
            if sub is not None and token.isalnum() and token.isascii() and len(subject) <= MAX_SUBJECT_BYTES:
                return sub.alone
        validate_subject(subject)  # only on a miss: cached subjects were validated
        targets = tuple(self._index.match(subject))
        if not reply:  # a reply subject is new for each request: not cached
            if len(self._routes) >= _ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[subject] = targets
        return targets


async def _wait_for_room(target: _Target, sub: _MemorySubscription, delivery: LocalDelivery) -> bool:
    """Put ``delivery``, which found ``sub``'s queue full, waiting for room. A plain
    subscription that stops meanwhile does not take it (False). A queue group (all its members
    were full) gives it to the first member with room, so that a stuck member does not hold
    the publish while the others drain; False only once no member is left."""
    if isinstance(target, _MemorySubscription):
        return await sub.put(delivery)
    while True:
        live = [member for member in target.members if not member.dispatcher.stopping]
        if not live:
            return False
        for member in live:
            if member.has_room() and member.offer(
                LocalDelivery(delivery.subject, delivery.data, 1, member.handle)
            ):
                # Woken by one member, this publish may have used another's room: what is left
                # goes to the publishes still waiting (each wake-up is one room).
                for other in live:
                    other.dispatcher.pass_on_room()
                return True
        await room_in_any([member.dispatcher for member in live])


def _plain_bytes(data: object) -> bytes:
    """What a publish carries: a copy of bytes-like ``data`` (the caller may change a
    bytearray afterwards), as a broker over a socket would; anything else raises ConfigError."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise ConfigError(f"a message is bytes, got {type(data).__name__}")


def _may_match_replies(pattern: str) -> bool:
    """True when ``pattern`` could match a subject under INBOX_ROOT."""
    return pattern.startswith(INBOX_ROOT) or pattern.partition(".")[0] in ("*", ">")


_servers: dict[str, MemoryServer] = {}


def _server_for(name: str) -> MemoryServer:
    loop = asyncio.get_running_loop()
    server = _servers.get(name)
    if server is None or server.loop.is_closed() or server.clients == 0:
        server = _servers[name] = MemoryServer(name, loop)
    elif server.loop is not loop:
        raise ConfigError(f"memory broker {name!r} is in use by another event loop")
    return server


def memory_server(name: str = "default") -> MemoryServer | None:
    """The in-process server called ``name``, if a client is connected to it."""
    server = _servers.get(name)
    return server if server is not None and server.clients else None


_client_ids = itertools.count(1)


class MemoryBroker(Lifecycle):
    """A client of an in-process memory server. ``MemoryBroker("memory://NAME")``.

    Options: ``max_pending`` (per-subscription queue bound, default 4096).
    """

    name = "memory"
    capabilities = Capabilities(
        durable=False,
        redelivery=True,
        queue_groups=True,
        wildcards=True,
        ordered_per_key=False,
        native_request_reply=False,
        max_payload=None,
    )
    _what = "memory broker"

    def __init__(
        self, connection_string: str | None = None, *, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        url = urlparse(connection_string or "memory://default")
        if url.scheme != "memory":
            raise ConfigError(f"memory broker URL must look like memory://NAME, got {connection_string!r}")
        whole(max_pending, "max_pending")
        self.server_name = url.netloc or url.path.lstrip("/") or "default"
        self.max_pending = max_pending
        self._server: MemoryServer | None = None
        self._subs: set[_MemorySubscription] = set()
        self._inbox = f"_INBOX.{os.getpid():x}{next(_client_ids):x}{os.urandom(4).hex()}"

    @property
    def server(self) -> MemoryServer:
        return self._connected(self._server)

    async def connect(self) -> None:
        if not self._begin_connect():
            return
        self._server = _server_for(self.server_name)
        self._server.clients += 1
        self._state = LifecycleState.OPEN

    async def close(self, timeout: float = 5.0) -> None:
        if not self._begin_close():
            return
        subs = list(self._subs)
        for sub in subs:
            self._detach(sub)
        await drain_all(subs, timeout)
        self.server.clients -= 1
        self._state = LifecycleState.CLOSED

    async def publish(self, subject: str, data: bytes, *, key: str | None = None) -> None:
        if self._state is not _OPEN:
            self._require_open()
        server = self._server
        assert server is not None  # guaranteed by the OPEN state
        stats = server.stats
        if type(subject) is not str:  # the caches are keyed by plain text, never by a caller's object
            subject = plain_text(subject, "subject")
        if type(data) is not bytes:
            data = _plain_bytes(data)
        targets = server._routes.get(subject)
        if targets is None:
            targets = server.route_miss(subject)  # raises for an invalid subject: not published
        stats.published += 1
        if not targets:
            stats.no_subscribers += 1
            return
        for target in targets:
            sub = target if type(target) is _MemorySubscription else target.pick()
            if sub is None:
                continue
            delivery = LocalDelivery(subject, data, 1, sub.handle)
            if sub.offer(delivery) or await _wait_for_room(target, sub, delivery):
                stats.routed += 1

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        queue: str | None = None,
        durable: str | None = None,
        max_pending: int | None = None,
    ) -> BrokerSubscription:
        self._require_open()
        if durable is not None:
            raise CapabilityNotSupported(self.name, "durable subscriptions")
        validate_pattern(pattern)
        check_group_names(queue, None)
        sub = _MemorySubscription(self, pattern, handler, queue, max_pending or self.max_pending)
        self._subs.add(sub)
        self.server.attach(sub)
        return sub

    @property
    def connected(self) -> bool:
        """True while open (the in-process server cannot be lost)."""
        return self._state is LifecycleState.OPEN

    def inbox_prefix(self) -> str:
        return self._inbox

    def _detach(self, sub: _MemorySubscription) -> None:
        if sub in self._subs:
            self._subs.discard(sub)
            if self._server is not None:
                self._server.detach(sub)
