"""The NATS adapter: core NATS for ephemeral pub/sub, JetStream for durable subscriptions.

``NatsBroker("nats://127.0.0.1:4222", max_deliver=5)``: the URL (several may be given, comma
separated) and the fields of :class:`NatsConfig` as keyword options. Needs nats-py
(``pip install 'agent-os[nats]'``), imported only when the broker connects.

Semantics:

- **Ephemeral subscriptions** (no ``durable``) are core NATS subscriptions: ``*`` / ``>`` and
  queue groups are the server's own. Delivery is **at most once**: a message published while
  the subscriber is disconnected, or dropped by the server or by nats-py as a slow consumer, is
  lost. ``nack(delay)`` redelivers *locally*: the same subscription's handler gets the message
  again with ``attempt + 1`` after ``delay`` (the server keeps no record of core messages, so a
  local redelivery dies with the process).
- **Durable subscriptions** (``durable="name"``) use JetStream. The stream that captures the
  pattern is found (any stream whose subjects cover it) or created (``AMB_<pattern hash>``, file
  storage); the durable pull consumer ``name`` (explicit ack, deliver-new, ``max_deliver``,
  ``ack_wait``) is created once and bound by every later subscriber with that name, which then
  share its messages like a queue group (``queue`` is ignored). Delivery is **at least once**:
  a message is delivered again until acked: after ``nack(delay)``, after ``ack_wait`` without an
  ack (a consumer that crashed), after a reconnect. ``attempt`` is JetStream's delivery count.
  After ``max_deliver`` deliveries the server stops redelivering an unacked message: keep
  ``max_deliver`` >= the subscription's ``max_attempts`` so the AMB client dead-letters first.
  A durable subscriber publishes to the JetStream API (``$JS.API.>``, acks on ``$JS.ACK.>``)
  and reads its pull requests' answers on nats-py's ``new_inbox()`` (``_INBOX.<random>``), so a
  NATS user limited like a mediated-mode agent (the control plane's generated permissions:
  publish only to ingress, replies and dead letters; read only delivery subjects, its own
  control subject and ``_INBOX.<agent>.>``) cannot have one: such agents receive with
  ephemeral subscriptions.
- **Ordering**: each subscription's handler gets one message at a time, in the order the server
  delivered them (publish order per publishing connection); redeliveries break that order. No
  order per key across queue-group members (``ordered_per_key`` is False).
- **Durable publishing**: a publish to a subject covered by a stream this client knows (the
  streams of its durable subscriptions and ``stream_subjects``) is a JetStream publish with
  acks batched for throughput. ``publish()`` returning means the message is in the connection's
  buffer and *this client has taken charge of it*: it is kept until the stream acknowledges it,
  and sent again with the same ``Nats-Msg-Id`` (the stream drops the duplicate) when no ack
  comes within ``min(2, publish_timeout / 2)`` seconds, e.g. across a server restart. At most
  ``publish_window`` publishes are unacknowledged at once; ``publish()`` waits for room beyond
  that. A message not acknowledged within ``publish_timeout`` is counted
  (``publish_acks.failures``) and its error raised by the next durable ``publish()`` or by
  ``flush()``; ``flush()`` returns once every durable publish so far is stored, and ``close()``
  waits for them (within its timeout). With ``confirm_publish=True`` each durable publish
  returns only once stored. Only a process that dies with unacknowledged publishes loses them.
- **Core publishing**: any other publish returns once the message is in the connection's buffer
  (as raw nats-py does; order is kept per connection, not across clients). While the client is
  connected and the payload is within the server's limit, it goes straight to the send that
  nats-py's ``Client.publish`` ends in (its checks are the adapter's: subjects once, the
  connection state, the size), about 0.3 µs less per message; otherwise, or if the installed
  nats-py lacks that internal send, it takes ``Client.publish`` (which buffers while
  reconnecting and raises as usual).
  ``confirm_publish=True`` makes it wait until the server has processed it (one PING/PONG round
  trip), so a publish that returned is delivered before any publish started after it from any
  client, at about 1/40 of the throughput. JetStream stores a core publish when a stream covers
  the subject, but nothing confirms it.
- **Dispatch**: the handler runs inside nats-py's per-subscription task (no extra hop: the
  subscription's dispatcher is nats-py's callback); local redeliveries wait in a bounded queue
  (``max_pending``) and are handed over in between. A message on a durable's private pull
  inbox that is not a JetStream message of its consumer is dropped and counted
  (``malformed``); a handler's exception (a stray CancelledError included) is counted by the
  dispatcher and never ends the subscription.
- **Subjects**: checked by the adapter (ConfigError), once per subject rather than on every
  publish, and more strictly than nats-py (no empty tokens, no wildcards in published subjects,
  no whitespace in queue group names); nats-py's own per-publish check is turned off.
- **Backpressure**: nats-py buffers messages a busy handler has not taken yet up to its own
  limits (``pending_msgs_limit``), then drops them as a slow consumer (core subscriptions);
  a durable consumer asks the server for at most ``pull_batch`` messages at a time.
- **Connection**: reconnects forever with exponential backoff and jitter; subscriptions and
  durable pulls resume; publishes are buffered meanwhile (nats-py's ``pending_size``). nats-py
  errors reach callers as :class:`~agent_os.amb.errors.BrokerUnavailable` or
  :class:`~agent_os.amb.errors.TransportError` (a bad subject as ConfigError), the original chained.
- **Drain**: ``close()`` waits for durable publishes' acks, stops each subscription's interest,
  lets the messages already received reach the handlers (up to ``timeout``; a handler still
  running then is cancelled, and a durable subscription's unhandled messages are nacked), then
  closes the connection.

Not guaranteed: exactly-once delivery; durability of core publishes or of local redeliveries;
order across redeliveries; anything beyond what the server's JetStream storage keeps.
"""

from __future__ import annotations

import importlib.util

from agent_os.bus_adapters.nats._config import DEFAULT_URL, INSTALL_HINT, NatsConfig

if importlib.util.find_spec("nats") is None:  # fail at import, with the hint, not at connect
    raise ImportError(INSTALL_HINT)

from agent_os.bus_adapters.nats._broker import NatsBroker
from agent_os.bus_adapters.nats._publish import AckWindow
from agent_os.bus_adapters.nats._subscriptions import JetStreamDelivery

__all__ = ["DEFAULT_URL", "INSTALL_HINT", "AckWindow", "JetStreamDelivery", "NatsBroker", "NatsConfig"]
