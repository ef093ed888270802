"""The Redis broker: pub/sub for ephemeral delivery, Streams for queue groups and durables.

``RedisBroker("redis://HOST:PORT/DB", **options)`` (default ``redis://127.0.0.1:6379/0``).
Needs Redis 6.2 or later (``XAUTOCLAIM``) and the ``redis`` extra
(``pip install 'agent-os[redis]'``). Standalone Redis (or Sentinel) only: publishing runs a
Lua script that touches stream keys it does not declare, which Redis Cluster refuses.

How messages travel:

- **Plain subscriptions** use Redis pub/sub: one pub/sub connection per client. A pattern
  without wildcards is a ``SUBSCRIBE``; a wildcard pattern becomes a ``PSUBSCRIBE`` glob
  (``*`` and ``>`` become ``*``, glob metacharacters in literal tokens are escaped). Redis
  globs are looser than our subjects (``*`` crosses dots), so each message is filtered with
  :func:`agent_os.amb.subjects.matches` before it reaches a subscription.
- **Queue groups and durable subscriptions** use one Redis stream and one consumer group per
  group (key ``<prefix>queue:<queue>:<pattern>`` or ``<prefix>durable:<name>:<pattern>``);
  every member is a consumer of that group (``XREADGROUP ... BLOCK``, no polling), so each
  message goes to exactly one member across all clients. Members of one durable name share
  its messages the same way; a ``queue`` given with ``durable`` is ignored.
- **Routing** happens inside Redis. Groups are registered in sorted sets indexed by the first
  token of their pattern (``<prefix>groups:<token>``, and ``<prefix>groups:*`` for patterns
  that start with a wildcard; member ``"<pattern> <stream key>"``, score = lease expiry in
  server milliseconds). ``publish`` runs one Lua script that ``XADD``s the message to the
  stream of every live group whose pattern matches the subject, then ``PUBLISH``es it. We chose
  this over a publisher-side cache of the registry: the script always sees the current
  registry, so a message published after ``subscribe()`` returned reaches the new group even
  when it was created by another client, at the cost of scanning, on each publish, the groups
  registered under the subject's first token and the wildcard-first ones (not all groups).
  Reply subjects (``_INBOX.<client>.…``) skip the script: a plain ``PUBLISH``, so replies
  reach pub/sub subscriptions (the requester's inbox) only, never a queue group or durable.

Guarantees:

- **Pub/sub is at most once.** A message reaches the subscriptions connected when Redis
  handles the ``PUBLISH``; messages published while a client is disconnected are lost to it,
  and Redis drops a client whose output buffer overflows (``client-output-buffer-limit``).
- **Streams are at least once.** A message is acked (``XACK`` then ``XDEL``) only after the
  handler acks it; entries pending for longer than ``claim_min_idle`` seconds on a consumer
  that died are claimed by a live member (``XAUTOCLAIM``), ``attempt`` being Redis's delivery
  count. An entry delivered more than ``max_deliveries`` times is moved to the dead-letter
  stream ``<prefix>dead:<stream key>`` with ``reason`` ``max_deliveries`` (and counted in
  ``dead_lettered``); an entry this adapter cannot read (no ``s``/``d`` field, a subject that is
  not UTF-8, not valid or not matched by the group's pattern) goes there at once with reason
  ``malformed: ...`` (counted in ``malformed`` too), so one bad entry never stops a group. The
  dead entry keeps the original fields and adds ``id``, ``deliveries``, ``group`` and
  ``reason``. A pub/sub message on a channel that is no valid subject is dropped and counted
  in ``malformed``; a reader logs and counts (``reader_errors``) anything unexpected and goes
  on. A durable group lives ``durable_ttl`` seconds after its last member left (None:
  forever); a queue group lives ``queue_lease`` seconds after its last member left.
- **Bounded streams**: every group stream and dead-letter stream is trimmed on each add with
  ``MAXLEN ~ stream_maxlen`` (default 100 000): a backlog beyond that loses its oldest
  messages. Redis trims whole stream nodes only, so trimming never leaves fewer than
  ``stream_maxlen`` entries, and a stream holds fewer than ``stream_maxlen`` plus the
  server's ``stream-node-max-entries`` (100 by default).
- **Ordering**: each subscription hands messages to its handler one at a time, in the order it
  received them; pub/sub delivers in publish order per publisher. Reclaimed and nacked stream
  messages come back out of order. No per-key ordering.
- **Redelivery**: ``nack(delay)`` on a pub/sub delivery re-invokes the same subscription after
  ``delay`` with ``attempt + 1`` (locally; the message is lost if the client closes first). On
  a stream delivery the entry stays pending and is claimed again (``XCLAIM``) after ``delay``.
- **Backpressure**: each subscription has a bounded queue (``max_pending``, an
  :class:`agent_os.amb.dispatch.Dispatcher`); a full queue pauses reading from Redis (the pub/sub reader
  for the whole client, or the stream reader). A client opens at most ``max_connections``
  connections (default 100); commands beyond that (many concurrent publishes or requests) wait
  for a free connection instead of failing.
- **Reconnection**: commands retry with exponential backoff (redis-py ``Retry``) while the
  server is away; the pub/sub connection re-subscribes once it is back, and the stream readers
  resume. A publish that cannot reach Redis raises :class:`~agent_os.amb.errors.BrokerUnavailable`.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401  (fail at import, with the hint, not at connect)
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the redis broker needs redis-py: pip install 'agent-os[redis]'") from exc

from agent_os.bus_adapters.redis._broker import DEFAULT_URL, RedisBroker, glob_for
from agent_os.bus_adapters.redis._subscriptions import StreamDelivery

__all__ = ["DEFAULT_URL", "RedisBroker", "StreamDelivery", "glob_for"]
