"""The AMB client's own logic: middleware order, rejection, lifecycle, options."""

from __future__ import annotations

import asyncio
import time
import uuid
from importlib import metadata
from typing import Any

import msgpack
import pytest

from agent_os import amb
from agent_os.amb import (
    AMB,
    BrokerUnavailable,
    CapabilityNotSupported,
    ConfigError,
    Envelope,
    LifecycleState,
    MessageRejected,
    Metadata,
    Middleware,
    MsgpackSerializer,
    Signature,
    StateError,
    Subscription,
    available_brokers,
    load_broker,
    new_id,
)
from agent_os.amb.deadletter import DLQ_ERROR, DLQ_REASON
from agent_os.amb.middleware import ConsumeNext, PublishNext
from agent_os.amb.replies import EARLY_MAX
from agent_os.amb.serializers.decoder import Decoder
from agent_os.amb.serializers.schema import wire_of
from agent_os.bus_adapters.memory import MemoryBroker, MemoryServer, memory_server
from tests.support import Collector, wait_until
from tests.support.closing import Closing


def memory_url() -> str:
    return f"memory://unit-{uuid.uuid4().hex}"


class Recorder(Middleware):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        self.log.append(f"{self.name}.out")
        envelope.headers[f"seen-by-{self.name}"] = "1"
        await call_next(envelope)

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        self.log.append(f"{self.name}.in")
        await call_next(envelope, metadata)


async def test_middleware_order_is_wire_side_first(closing: Closing) -> None:
    log: list[str] = []
    url = memory_url()
    client = closing(AMB(connection_string=url, middleware=[Recorder("wire", log), Recorder("app", log)]))
    got = Collector()
    await client.subscribe("m.x", got)
    await client.publish("m.x", 1)
    await got.wait_for(1)
    # Outbound: the innermost (app) runs first, the wire side last; inbound the reverse.
    assert log == ["app.out", "wire.out", "wire.in", "app.in"]
    assert got.metadata[0].headers == {"seen-by-app": "1", "seen-by-wire": "1"}
    await client.close()


class RejectOdd(Middleware):
    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        if isinstance(envelope.payload, int) and envelope.payload % 2:
            raise MessageRejected("odd numbers are not allowed", reason="odd")
        metadata.context["checked"] = True
        await call_next(envelope, metadata)


async def test_inbound_rejection_is_dead_lettered_with_its_reason(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url(), middleware=[RejectOdd()]))
    got, dead = Collector(), Collector()
    await client.subscribe("n.x", got)
    await client.subscribe("_DLQ.n.x", dead)
    for i in range(4):
        await client.publish("n.x", i)
    await got.wait_for(2)
    await dead.wait_for(2)
    assert got.messages == [0, 2]
    assert all(m.context["checked"] for m in got.metadata)
    assert {m.headers["dlq-reason"] for m in dead.metadata} == {"odd"}
    assert client.stats.rejected == 2
    await client.close()


class RefuseOutbound(Middleware):
    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        raise MessageRejected("no", reason="denied")


async def test_outbound_rejection_reaches_the_publisher(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url(), middleware=[RefuseOutbound()]))
    with pytest.raises(MessageRejected):
        await client.publish("o.x", 1)
    assert client.stats.published == 0
    await client.close()


async def test_middleware_chain_is_frozen_after_connect(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))
    client.add_middleware(Middleware())
    await client.connect()
    with pytest.raises(StateError, match="frozen"):
        client.add_middleware(Middleware())
    await client.close()


async def test_lifecycle_errors(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))
    await client.publish("l.x", 1)  # connects on first use
    await client.close()
    await client.close()  # idempotent
    with pytest.raises(StateError, match="closed"):
        await client.publish("l.x", 1)
    with pytest.raises(StateError):
        await client.connect()


async def test_decorator_after_connect_is_active_before_the_next_publish() -> None:
    async with AMB(connection_string=memory_url()) as client:
        got = Collector()

        @client.subscribe("d.x")
        async def handler(message: Any, metadata: Metadata) -> None:
            await got(message, metadata)

        await client.publish("d.x", "first")
        await got.wait_for(1)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"retry_delay": -1}, "retry_delay"),
        ({"queue": ""}, "queue"),
        ({"filter": {}}, "filter"),
    ],
)
async def test_invalid_subscribe_options(options: dict[str, Any], words: str, closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))
    with pytest.raises(ConfigError, match=words):
        await client.subscribe("x.y", Collector(), **options)
    await client.close()


async def test_sync_handler_is_refused(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))

    def sync_handler(message: Any, metadata: Metadata) -> None:
        return None

    with pytest.raises(ConfigError, match="async"):
        await client.subscribe("x.y", sync_handler)  # type: ignore[arg-type]
    await client.close()


async def test_publish_validation(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))
    with pytest.raises(ConfigError):
        await client.publish("bad..subject", 1)
    with pytest.raises(ConfigError):
        await client.publish("wild.*", 1)
    with pytest.raises(ConfigError):
        await client.publish("x", 1, ttl=0)
    with pytest.raises(ConfigError):
        await client.reply("", 1)
    await client.close()


def test_unknown_backend_lists_installed_ones() -> None:
    with pytest.raises(ConfigError, match="memory"):
        load_broker("sqs")
    assert "memory" in available_brokers()


def test_entry_points_are_scanned_once_per_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # A scan reads every installed package's metadata (milliseconds): a fleet's clients share one.
    scans: list[str] = []

    def counting(**kw: Any) -> Any:
        scans.append(kw["group"])
        return metadata.entry_points(**kw)

    monkeypatch.setattr("agent_os.amb.broker.entry_points", counting)
    monkeypatch.setattr("agent_os.amb.broker._factories", {})
    first, second = load_broker("memory", memory_url()), load_broker("memory", memory_url())
    assert type(first) is type(second)
    assert first is not second
    assert len(scans) == 1
    for _ in range(2):  # an unknown name is looked up every time (it may be installed later)
        with pytest.raises(ConfigError):
            load_broker("sqs")
    assert len(scans) == 1 + 2 * 2  # each miss: the lookup, and the list of installed ones


def test_public_names_are_complete_and_sorted() -> None:
    public = {n for n in dir(amb) if not n.startswith("_") and n[0].isupper()}
    modules = {
        "broker",
        "client",
        "envelope",
        "errors",
        "filters",
        "metadata",
        "middleware",
        "serializers",
        "subjects",
    }
    assert public - set(amb.__all__) == set()
    assert amb.__all__ == sorted(amb.__all__, key=lambda n: (not n.isupper(), n))
    assert not set(amb.__all__) & modules


async def test_handler_exception_never_stops_the_subscription(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))
    seen: list[int] = []

    async def sometimes(message: int, metadata: Metadata) -> None:
        if message % 3 == 0:
            raise ValueError(message)
        seen.append(message)

    await client.subscribe("h.x", sometimes)
    for i in range(30):
        await client.publish("h.x", i)
    await wait_until(lambda: len(seen) == 20)
    assert client.stats.handler_errors == 10
    assert client.stats.dead_lettered == 10
    await client.close()


async def test_the_receive_path_decodes_within_the_size_limit_and_in_either_format(closing: Closing) -> None:
    url = memory_url()
    small = closing(AMB(connection_string=url, max_message_bytes=300))
    big = closing(AMB(connection_string=url))
    json_client = closing(AMB(connection_string=url, serializer="json"))
    got, dead = Collector(), Collector()
    await small.subscribe("size.x", got)
    await big.subscribe("_DLQ.size.x", dead)
    await big.publish("size.x", "y" * 400)  # over the receiver's limit
    await json_client.publish("size.x", {"from": "json"})  # msgspec refuses JSON: the slow path
    await big.publish("size.x", "fits")
    await got.wait_for(2)
    await dead.wait_for(1)
    assert got.messages == [{"from": "json"}, "fits"]
    assert dead.metadata[0].headers[DLQ_REASON] == "malformed"
    assert dead.metadata[0].headers[DLQ_ERROR].startswith("OversizedEnvelope")
    assert amb.decode(dead.messages[0]).payload == "y" * 400  # dead-lettered whole
    assert small.stats.malformed == 1
    for client in (small, big, json_client):
        await client.close()


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
async def test_publishes_without_headers_share_an_empty_dict_that_stays_empty(
    serializer: str, closing: Closing
) -> None:
    url = memory_url()
    plain = closing(AMB(connection_string=url, serializer=serializer))
    log: list[str] = []
    chained = closing(AMB(connection_string=url, serializer=serializer, middleware=[Recorder("mw", log)]))
    got = Collector()
    await plain.subscribe("hdr.x", got)
    await plain.publish("hdr.x", 1)
    await plain.publish("hdr.x", 2, key="k")
    await plain.publish("hdr.x", 3, headers={"a": "b"})
    await chained.publish("hdr.x", 4)  # the middleware writes into the headers it is given
    await plain.publish("hdr.x", 5)
    await got.wait_for(5)
    assert [dict(m.headers) for m in got.metadata] == [
        {},
        {amb.client.PARTITION_KEY_HEADER: "k"},
        {"a": "b"},
        {"seen-by-mw": "1"},
        {},
    ]
    assert amb.client._NO_HEADERS == {}
    await plain.close()
    await chained.close()


async def test_dead_letter_of_a_dead_letter_does_not_loop(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))

    async def fails(message: Any, metadata: Metadata) -> None:
        raise RuntimeError("always")

    seen: list[str] = []

    async def dead_letters_fail(message: Any, metadata: Metadata) -> None:
        seen.append(metadata.subject)
        raise RuntimeError("always")

    await client.subscribe("_DLQ.>", dead_letters_fail)
    await client.subscribe("loop.x", fails)
    await client.publish("loop.x", 1)
    await wait_until(lambda: client.stats.dead_letter_failures == 1)
    # A nested dead letter would have been published while the first one was handled, so it
    # would come before this one on the _DLQ.> subscription.
    await client.publish("_DLQ.sentinel", 2)
    await wait_until(lambda: "_DLQ.sentinel" in seen)
    assert seen == ["_DLQ.loop.x", "_DLQ.sentinel"]
    assert client.stats.dead_lettered == 1
    await client.close()


async def test_metadata_reads_the_wire_fields_until_the_envelope_is_asked_for(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url(), agent_id="me"))
    got = Collector()
    await client.subscribe("w.x", got, context={"policy": "p"})
    await client.publish(
        "w.x",
        {"n": 1},
        recipient="you",
        reply_to="w.reply",
        correlation_id="c-1",
        headers={"h": "v"},
        priority=3,
        ttl=30,
    )
    await got.wait_for(1)
    meta = got.metadata[0]
    seen = (
        meta.id,
        meta.topic,
        meta.sender,
        meta.recipient,
        meta.reply_to,
        meta.correlation_id,
        meta.timestamp,
        meta.expires_at,
        meta.priority,
        dict(meta.headers),
    )
    assert meta._envelope is None  # nothing so far needed the Envelope object
    env = meta.envelope
    assert meta.envelope is env  # built once
    assert seen == (
        env.id,
        "w.x",
        "me",
        "you",
        "w.reply",
        "c-1",
        env.timestamp,
        env.expires_at,
        3,
        {"h": "v"},
    )
    assert env.payload == {"n": 1}
    assert meta.signature is None
    assert meta.subject == "w.x"
    assert meta.attempt == 1
    assert not meta.redelivered
    # The context is a per-delivery copy of the subscription's seed.
    assert meta.context["policy"] == "p"
    assert meta.context["subscription"].pattern == "w.x"
    meta.context["mine"] = 1
    await client.publish("w.x", 2)
    await got.wait_for(2)
    assert "mine" not in got.metadata[1].context
    await client.close()


async def test_request_with_metadata_returns_the_replys_delivery_metadata(closing: Closing) -> None:
    url = memory_url()
    requester, responder = (
        closing(AMB(connection_string=url, agent_id="asker")),
        closing(AMB(connection_string=url, agent_id="answerer")),
    )

    async def answer(message: Any, metadata: Metadata) -> None:
        await responder.reply(metadata, message + 1)

    await responder.subscribe("r.x", answer)
    payload, meta = await requester.request("r.x", 41, timeout=5, with_metadata=True)
    assert payload == 42
    assert meta.sender == "answerer"
    assert meta.correlation_id is not None
    assert meta.subject == meta.topic
    assert meta.topic.startswith(requester.broker.inbox_prefix())
    with pytest.raises(amb.RequestTimeout):
        await requester.request("r.nobody", 1, timeout=0.05)
    assert requester.stats.request_timeouts == 1
    assert requester.stats.requests == 2
    await requester.close()
    await responder.close()


async def test_a_reply_on_the_memory_bus_resolves_its_request_in_the_repliers_task(closing: Closing) -> None:
    # The reply inbox is an InstantHandler: reply() returns with the request answered, no hop
    # through the event loop. What it cannot take at once goes the queued way: a malformed or
    # expired reply is still dead-lettered or counted, and the request still gets its reply.
    url = memory_url()
    requester = closing(AMB(connection_string=url, agent_id="asker"))
    responder = closing(AMB(connection_string=url, agent_id="answerer"))
    handled_during_reply: list[int] = []
    dead = Collector()
    await requester.subscribe("_DLQ.>", dead)

    async def answer(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to
        if message == "junk first":
            await responder.broker.publish(metadata.reply_to, b"\x93not an envelope")
        if message == "expired first":
            await responder.publish(metadata.reply_to, "too late", ttl=1e-9, correlation_id=metadata.id)
        before = requester.stats.handled
        await responder.reply(metadata, f"re: {message}")
        handled_during_reply.append(requester.stats.handled - before)

    await responder.subscribe("instant.x", answer)
    assert await requester.request("instant.x", "plain", timeout=5) == "re: plain"
    assert handled_during_reply == [1], "the reply was handled inside reply()"
    assert await requester.request("instant.x", "junk first", timeout=5) == "re: junk first"
    await dead.wait_for(1)
    assert requester.stats.malformed == 1
    assert await requester.request("instant.x", "expired first", timeout=5) == "re: expired first"
    assert requester.stats.expired == 1
    # Behind a queued delivery the reply waits its turn (the order holds): not handled at once.
    assert handled_during_reply[1:] == [0, 0]
    assert requester.stats.late_replies == 0
    assert requester.stats.mismatched_replies == 0


async def test_a_reply_whose_subjects_are_not_the_requests_is_still_checked(closing: Closing) -> None:
    # The reply path takes a topic equal to the request's own reply subject without a second
    # check; any other topic, and any reply_to, is checked: malformed, dead-lettered.
    url = memory_url()
    requester = closing(AMB(connection_string=url, agent_id="asker"))
    responder = closing(AMB(connection_string=url, agent_id="answerer"))
    dead = Collector()
    await requester.subscribe("_DLQ.>", dead)
    codec = MsgpackSerializer()

    async def answer(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to
        for topic, reply_to in ((message, None), (metadata.reply_to, message)):
            forged = codec.encode_new(
                new_id(),
                topic,
                "answerer",
                "forged",
                None,
                reply_to,
                metadata.id,
                time.time_ns(),
                None,
                0,
                {},
            )
            await responder.broker.publish(metadata.reply_to, forged)
        await responder.reply(metadata, "real")

    await responder.subscribe("checked.x", answer)
    for n, bad in enumerate(("a b", "a.*", "_INBOX.x y", "x" * 1025), start=1):
        assert await requester.request("checked.x", bad, timeout=5) == "real"
        await dead.wait_for(2 * n)
    assert requester.stats.malformed == 8
    assert requester.stats.mismatched_replies == 0


async def test_the_middleware_hears_of_a_subscriptions_end_once_even_after_a_failed_stop(
    closing: Closing,
) -> None:
    ended: list[Subscription] = []

    class Listening(Middleware):
        def unsubscribed(self, subscription: Subscription) -> None:
            ended.append(subscription)

    client = closing(AMB(connection_string=memory_url(), middleware=[Listening()]))
    release = asyncio.Event()
    busy = asyncio.Event()

    async def stuck(message: Any, metadata: Metadata) -> None:
        busy.set()
        await release.wait()

    sub = await client.subscribe("ends.x", stuck)
    await client.publish("ends.x", 1)
    await busy.wait()
    draining = asyncio.create_task(sub.drain(30))
    await wait_until(lambda: not sub.active, what="the drain under way")
    draining.cancel()  # cut short: the subscription is over all the same
    with pytest.raises(asyncio.CancelledError):
        await draining
    assert ended == [sub]
    await sub.unsubscribe()  # again: nothing more to tell
    await sub.drain()
    assert ended == [sub]
    with pytest.raises(CapabilityNotSupported):  # never made: over before it began
        await client.subscribe("ends.y", stuck, durable="d")
    assert len(ended) == 2
    release.set()


def server_of(url: str) -> MemoryServer:
    """The in-process server of a memory:// URL that a client is connected to."""
    server = memory_server(url.removeprefix("memory://"))
    assert server is not None
    return server


async def echo_pair(closing: Closing, url: str, topic: str) -> tuple[AMB, AMB]:
    """A requester and a responder on ``url`` whose handler on ``topic`` answers each request
    with its own payload."""
    requester = closing(AMB(connection_string=url))
    responder = closing(AMB(connection_string=url))

    async def answer(message: Any, metadata: Metadata) -> None:
        await responder.reply(metadata, message)

    await responder.subscribe(topic, answer)
    return requester, responder


async def test_subjects_known_valid_are_not_checked_again_and_nothing_else_slips_through(
    closing: Closing,
) -> None:
    # A request's reply subject, and the reply_to of a wire message being answered, are taken
    # without a second check (AMB._checked). Every other topic and reply_to is still checked.
    url = memory_url()
    requester, responder = await echo_pair(closing, url, "known.x")
    assert await requester.request("known.x", 1, timeout=5) == 1
    fresh = closing(AMB(connection_string=url))
    await fresh.connect()
    server = server_of(url)
    published = server.stats.published
    for client in (requester, responder, fresh):
        for bad_topic in (None, "", "a b", "a.*", "_INBOX.x y", "x" * 1025):
            with pytest.raises(ConfigError):
                await client.publish(bad_topic, 1)  # type: ignore[arg-type]
        for bad_reply_to in ("a b", "a.>", "_INBOX..1", 5):
            with pytest.raises(ConfigError):
                await client.publish("known.y", 1, reply_to=bad_reply_to)  # type: ignore[arg-type]
    assert server.stats.published == published, "refused before the broker"

    # A reply_to with nothing to answer on is refused whatever came before.
    async def no_reply_wanted(message: Any, metadata: Metadata) -> None:
        with pytest.raises(ConfigError):
            await responder.reply(metadata, message)
        seen.append(message)

    seen: list[Any] = []
    await responder.subscribe("known.none", no_reply_wanted)
    await requester.publish("known.none", "a")
    await requester.publish("known.none", "b", reply_to="")
    await wait_until(lambda: len(seen) == 2)
    published = server.stats.published
    for bad_topic in (None, ""):  # what those reply_to fields held
        with pytest.raises(ConfigError):
            await responder.publish(bad_topic, 1)  # type: ignore[arg-type]
    assert server.stats.published == published, "refused before the broker"

    # The longest inbox prefixes the constructor takes (their reply subjects just fit): ASCII,
    # and not ASCII (whose reply subjects are always checked, in UTF-8 bytes).
    for prefix in ("_INBOX." + "p" * 983, "_INBOX." + "\u00e9" * 491 + "p"):
        with pytest.raises(ConfigError):
            AMB(connection_string=url, inbox_prefix=prefix + "p")
        longest = closing(AMB(connection_string=url, inbox_prefix=prefix))
        assert await longest.request("known.x", prefix[-3:], timeout=5) == prefix[-3:]
    # A broker whose inbox leaves room for one digit only: the 10th request's reply subject
    # (".10") is one byte too long, and refused before the broker like any other.
    tight = closing(AMB(connection_string=url))
    await tight.connect()
    tight.broker._inbox = "_INBOX." + "t" * 1015  # type: ignore[attr-defined]
    for n in range(1, 10):
        assert await tight.request("known.x", n, timeout=5) == n
    published = server.stats.published
    with pytest.raises(amb.InvalidSubject):
        await tight.request("known.x", 10, timeout=5)
    assert server.stats.published == published


async def test_a_broker_inbox_with_a_wildcard_token_does_not_pass_for_checked(closing: Closing) -> None:
    # A broker's inbox prefix was only checked as part of the pattern "<prefix>.>", and a
    # pattern may hold "*": its reply subjects are checked before anything is sent.
    url = memory_url()

    class WildInbox(MemoryBroker):
        def inbox_prefix(self) -> str:
            return "_INBOX.*.mine"

    requester = closing(AMB(broker=WildInbox(url)))
    await requester.connect()
    server = server_of(url)
    published = server.stats.published
    with pytest.raises(amb.InvalidSubject):
        await requester.request("wild.x", 1, timeout=5)
    assert server.stats.published == published


async def test_a_reply_inbox_behind_middleware_is_not_instant(closing: Closing) -> None:
    url = memory_url()
    seen: list[str] = []

    class Watch(Middleware):
        async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
            seen.append(envelope.topic)
            await call_next(envelope, metadata)

    requester = closing(AMB(connection_string=url, middleware=[Watch()]))
    responder = closing(AMB(connection_string=url))
    handled_during_reply: list[int] = []

    async def answer(message: Any, metadata: Metadata) -> None:
        before = requester.stats.handled
        await responder.reply(metadata, message)
        handled_during_reply.append(requester.stats.handled - before)

    await responder.subscribe("watched.x", answer)
    assert await requester.request("watched.x", 7, timeout=5) == 7
    assert handled_during_reply == [0]
    assert len(seen) == 1
    assert seen[0].startswith(requester.broker.inbox_prefix())


async def test_requests_time_out_each_at_its_own_deadline(closing: Closing) -> None:
    # One timer serves every pending request (PendingRequests.published): a short request made
    # after a long one still times out first, and an answered request never times out.
    url = memory_url()
    requester, _ = await echo_pair(closing, url, "dl.answered")
    loop = asyncio.get_running_loop()
    ended: dict[str, float] = {}

    async def timed_out(name: str, timeout: float) -> None:
        start = loop.time()
        with pytest.raises(amb.RequestTimeout):
            await requester.request("dl.nobody", name, timeout=timeout)
        ended[name] = loop.time() - start

    long = asyncio.create_task(timed_out("long", 0.6))
    short = asyncio.create_task(timed_out("short", 0.1))
    assert [await requester.request("dl.answered", n, timeout=0.2) for n in range(50)] == list(range(50))
    await asyncio.gather(long, short)
    assert 0.1 <= ended["short"] < 0.5
    assert 0.6 <= ended["long"] < 2.0
    assert requester.stats.request_timeouts == 2


async def test_inbox_prefix_puts_each_clients_reply_inbox_under_it(closing: Closing) -> None:
    url = memory_url()
    responder = closing(AMB(connection_string=url, agent_id="answerer"))
    seen: list[str | None] = []

    async def answer(message: Any, metadata: Metadata) -> None:
        seen.append(metadata.reply_to)
        await responder.reply(metadata, f"{message}!")

    await responder.subscribe("r.x", answer)
    # Two clients of one agent: same prefix, yet each has its own inbox under it.
    first, second = (
        closing(AMB(connection_string=url, agent_id="a", inbox_prefix="_INBOX.a")) for _ in range(2)
    )
    answers = await asyncio.gather(
        *(
            client.request("r.x", f"{name}{n}", timeout=5)
            for n in range(3)
            for name, client in (("first", first), ("second", second))
        )
    )
    assert answers == [f"{name}{n}!" for n in range(3) for name in ("first", "second")]
    assert len(seen) == 6
    assert len(set(seen)) == 6
    assert all(r is not None and r.startswith("_INBOX.a.") for r in seen)
    inboxes = {r.rsplit(".", 1)[0] for r in seen if r is not None}  # <prefix>.<token>
    assert len(inboxes) == 2
    assert all(inbox.count(".") == 2 for inbox in inboxes)
    assert not any(r.startswith(first.broker.inbox_prefix()) for r in seen if r is not None)
    assert first.stats.late_replies == second.stats.late_replies == 0
    for client in (first, second, responder):
        await client.close()


@pytest.mark.parametrize(
    "bad", ["", "_INBOX..a", "_INBOX.*", "_INBOX.>", "_INBOX.a>", "_INBOX.a b", "_INBOX."]
)
def test_an_inbox_prefix_that_is_not_a_subject_is_refused_at_construction(bad: str) -> None:
    with pytest.raises(ConfigError, match="inbox_prefix"):
        AMB(connection_string=memory_url(), inbox_prefix=bad)


async def test_each_new_topic_is_validated_once_and_bad_ones_always_fail(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))
    for _ in range(3):
        with pytest.raises(ConfigError):
            await client.publish("bad topic", 1)
        with pytest.raises(ConfigError):
            await client.publish("wild.*", 1)
    await client.publish("fine.topic", 1)
    assert "fine.topic" in client._topics
    assert "bad topic" not in client._topics
    await client.close()


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_a_stray_cancelled_error_from_a_handler_is_a_handler_error(
    concurrency: int, closing: Closing
) -> None:
    """A handler that lets out the CancelledError of something it awaited (its own task not
    being cancelled) fails like any handler: dead-lettered, counted, the subscription goes on."""
    client = closing(AMB(connection_string=memory_url()))
    seen: list[int] = []
    dead = Collector()

    async def handler(message: int, metadata: Metadata) -> None:
        if message == 1:
            other = asyncio.get_running_loop().create_future()
            other.cancel()
            await other  # raises CancelledError into this handler
        seen.append(message)

    await client.subscribe("_DLQ.c.x", dead)
    await client.subscribe("c.x", handler, concurrency=concurrency)
    for i in range(4):
        await client.publish("c.x", i)
    await wait_until(lambda: sorted(seen) == [0, 2, 3], what="the other messages")
    await dead.wait_for(1)
    assert client.stats.handler_errors == 1
    assert client.stats.dead_lettered == 1
    assert dead.metadata[0].headers["dlq-reason"] == "handler_error"
    assert "CancelledError" in dead.metadata[0].headers["dlq-error"]
    await client.close()


async def test_close_still_cancels_a_handler_stuck_past_the_timeout(closing: Closing) -> None:
    client = closing(AMB(connection_string=memory_url()))
    started = asyncio.Event()
    cancelled = False

    async def stuck(message: Any, metadata: Metadata) -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled = True
            raise

    await client.subscribe("stuck.x", stuck)
    await client.publish("stuck.x", 1)
    await started.wait()
    await asyncio.wait_for(client.close(timeout=0.1), 5)
    assert cancelled
    assert client.stats.handler_errors == 0, "a real cancellation is not a handler error"


async def test_a_drain_that_fails_still_leaves_the_client_and_its_broker_closed(closing: Closing) -> None:
    # One subscription's drain raising must not stop close() halfway: the other is drained, a
    # pending request fails, the broker is closed, and then the error is raised.
    client = closing(AMB(connection_string=memory_url(), agent_id="closer"))
    other = Collector()
    failing = await client.subscribe("fail.a", Collector())
    await client.subscribe("fail.b", other)

    async def broken(timeout: float | None = None) -> None:
        raise RuntimeError("drain failed")

    failing.drain = broken  # type: ignore[method-assign]
    await client.publish("fail.b", 1)
    await other.wait_for(1)
    pending = asyncio.create_task(client.request("nobody.home", 1, timeout=30))
    await wait_until(lambda: client.stats.requests >= 1, what="the request on its way")
    with pytest.raises(RuntimeError, match="drain failed"):
        await client.close()
    assert client.state is LifecycleState.CLOSED
    with pytest.raises((StateError, BrokerUnavailable)):  # the broker is closed
        await client.broker.publish("fail.b", b"x")
    with pytest.raises(StateError):
        await asyncio.wait_for(pending, 5)


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_close_from_inside_a_handler_does_not_wait_for_that_handler(
    closing: Closing, concurrency: int
) -> None:
    """A handler closes the client: close() drains the other subscriptions (their handler in
    progress finishes first) and returns without waiting for its caller, not after its timeout."""
    client = closing(AMB(connection_string=memory_url()))
    go, closed = asyncio.Event(), asyncio.Event()
    finished: list[str] = []
    at_close: list[str] = []

    async def other(message: Any, metadata: Metadata) -> None:
        await go.wait()
        finished.append("other")

    async def closer(message: Any, metadata: Metadata) -> None:
        await client.close(timeout=30)
        at_close.extend(finished)
        closed.set()

    await client.subscribe("ci.other", other)
    await client.subscribe("ci.close", closer, concurrency=concurrency)
    await client.publish("ci.other", 1)
    await client.publish("ci.close", 1)
    await wait_until(lambda: client.state is amb.LifecycleState.CLOSING, what="the close to start")
    go.set()
    await asyncio.wait_for(closed.wait(), 5)
    assert at_close == ["other"]
    assert client.state is amb.LifecycleState.CLOSED


@pytest.mark.parametrize("stop", ["unsubscribe", "drain"])
async def test_a_concurrent_handler_may_stop_its_own_subscription(closing: Closing, stop: str) -> None:
    """With ``concurrency=3``, message 0's handler stops its subscription while handlers 1 and
    2 run and message 3 waits for a slot (4 and 5 queued behind it). The stop does not wait for
    its caller: unsubscribe drops 3 to 5 and returns once 1 and 2 have finished; drain returns
    once every other message is handled."""
    client = closing(AMB(connection_string=memory_url()))
    release, stopping = asyncio.Event(), asyncio.Event()
    handled: list[int] = []
    at_return: list[int] = []

    async def handle(message: int, metadata: Metadata) -> None:
        if message == 0:
            stopping.set()
            await getattr(sub, stop)()
            at_return.extend(sorted(handled))
        elif message in (1, 2):
            await release.wait()
        handled.append(message)

    sub = await client.subscribe("cs.x", handle, concurrency=3)
    for n in (1, 2, 0, 3, 4, 5):
        await client.publish("cs.x", n)
    await asyncio.wait_for(stopping.wait(), 5)
    release.set()
    await wait_until(lambda: 0 in handled, what="the stop to return")
    assert not sub.active
    if stop == "unsubscribe":
        assert at_return == [1, 2], "the other handlers finished first"
        assert sorted(handled) == [0, 1, 2], "nothing handed over after the unsubscribe"
    else:
        assert at_return == [1, 2, 3, 4, 5], "the others and the queued ones finished first"
        assert sorted(handled) == [0, 1, 2, 3, 4, 5]
    await client.close()


async def test_a_reply_with_another_correlation_id_does_not_resolve_the_request(closing: Closing) -> None:
    url = memory_url()
    requester = closing(AMB(connection_string=url, agent_id="asker"))
    responder = closing(AMB(connection_string=url, agent_id="answerer"))

    async def answer(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to is not None
        # First a reply claiming to answer another request, on this request's reply subject...
        await responder.publish(metadata.reply_to, "wrong", correlation_id="another-request")
        # ...then the real one.
        await responder.reply(metadata, "right")

    await responder.subscribe("corr.x", answer)
    payload, meta = await requester.request("corr.x", 1, timeout=5, with_metadata=True)
    assert payload == "right"
    assert meta.correlation_id is not None
    assert requester.stats.mismatched_replies == 1

    async def only_wrong(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to is not None
        await responder.publish(metadata.reply_to, "wrong", correlation_id="another-request")

    await responder.subscribe("corr.wrong", only_wrong)
    with pytest.raises(amb.RequestTimeout):
        await requester.request("corr.wrong", 1, timeout=0.3)
    assert requester.stats.mismatched_replies == 2
    await requester.close()
    await responder.close()


async def test_a_request_to_an_agent_is_answered_by_that_agent_only(closing: Closing) -> None:
    url = memory_url()
    requester = closing(AMB(connection_string=url, agent_id="asker"))
    addressed = closing(AMB(connection_string=url, agent_id="addressed"))
    intruder = closing(AMB(connection_string=url, agent_id="intruder"))

    async def answer(message: Any, metadata: Metadata) -> None:
        # Another agent answers first, on the request's own reply subject, with its id...
        await intruder.reply(metadata, "from the intruder")
        # ...then the agent the request was addressed to.
        await addressed.reply(metadata, "from the addressee")

    await addressed.subscribe("to.agent", answer)
    payload, meta = await requester.request(
        "to.agent", 1, recipient="addressed", timeout=5, with_metadata=True
    )
    assert (payload, meta.sender) == ("from the addressee", "addressed")
    assert requester.stats.mismatched_replies == 1

    async def only_intruder(message: Any, metadata: Metadata) -> None:
        await intruder.reply(metadata, "from the intruder")

    await addressed.subscribe("to.intruded", only_intruder)
    with pytest.raises(amb.RequestTimeout):
        await requester.request("to.intruded", 1, recipient="addressed", timeout=0.3)
    assert requester.stats.mismatched_replies == 2
    # Without a recipient, whoever answers on the reply subject answers the request.
    assert await requester.request("to.intruded", 1, timeout=5) == "from the intruder"
    for client in (requester, addressed, intruder):
        await client.close()


async def test_a_reply_without_correlation_id_answers_its_reply_subject(closing: Closing) -> None:
    """``reply(metadata.reply_to, ...)`` (the subject only) sets no correlation id: the reply
    subject, unique to the request, is enough."""
    url = memory_url()
    requester = closing(AMB(connection_string=url))
    responder = closing(AMB(connection_string=url))

    async def answer(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to is not None
        await responder.reply(metadata.reply_to, message * 2)

    await responder.subscribe("nocorr.x", answer)
    assert await requester.request("nocorr.x", 21, timeout=5) == 42
    assert requester.stats.mismatched_replies == 0
    await requester.close()
    await responder.close()


class HoldRequests(Middleware):
    """Holds a request's publish until ``replies`` messages reached this client: the replies
    come in before ``publish()`` has returned the request's id."""

    def __init__(self, replies: int) -> None:
        self.replies = replies
        self.client: AMB | None = None
        self.mismatched_on_release: list[int] = []

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        await call_next(envelope)
        if envelope.reply_to and self.client is not None:
            client = self.client
            await wait_until(lambda: client.stats.delivered >= self.replies, what="the early replies")
            self.mismatched_on_release.append(client.stats.mismatched_replies)

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        await call_next(envelope, metadata)


async def test_replies_that_come_before_publish_returns_are_checked_too(closing: Closing) -> None:
    url = memory_url()
    hold = HoldRequests(replies=2)
    requester = closing(AMB(connection_string=url, middleware=[hold]))
    hold.client = requester
    responder = closing(AMB(connection_string=url))

    async def answer(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to is not None
        await responder.publish(metadata.reply_to, "wrong", correlation_id="another-request")
        await responder.reply(metadata, "right")

    await responder.subscribe("early.x", answer)
    assert await requester.request("early.x", 1, timeout=5) == "right"
    assert requester.stats.mismatched_replies == 1
    await requester.close()
    await responder.close()


async def full_subscriber(closing: Closing, url: str, topic: str) -> asyncio.Event:
    """A subscriber on ``topic`` whose handler waits for the returned event and whose queue
    (one message) is full: the next publish on ``topic`` waits for room until the event is set."""
    stuck = closing(AMB(connection_string=url, broker_options={"max_pending": 1}))
    release = asyncio.Event()
    started = asyncio.Event()

    async def wait(message: Any, metadata: Metadata) -> None:
        started.set()
        await release.wait()

    await stuck.subscribe(topic, wait)
    filler = closing(AMB(connection_string=url))
    await filler.publish(topic, 1)
    await asyncio.wait_for(started.wait(), 5)
    await filler.publish(topic, 2)  # queued: the queue is full now
    return release


async def test_a_request_times_out_while_its_publish_waits_for_room(closing: Closing) -> None:
    url = memory_url()
    release = await full_subscriber(closing, url, "full.x")
    requester = closing(AMB(connection_string=url))
    started = time.monotonic()
    with pytest.raises(amb.RequestTimeout):
        await asyncio.wait_for(requester.request("full.x", 3, timeout=0.2), 5)
    assert 0.15 < time.monotonic() - started < 2
    assert requester.stats.request_timeouts == 1
    assert len(requester._requests) == 0
    # The client goes on: once there is room, a request is answered as ever.
    responder = closing(AMB(connection_string=url))

    async def echo(message: Any, metadata: Metadata) -> None:
        await responder.reply(metadata, message)

    await responder.subscribe("free.x", echo)
    assert await requester.request("free.x", 4, timeout=5) == 4
    release.set()


async def test_closing_the_client_ends_a_request_whose_publish_waits(closing: Closing) -> None:
    url = memory_url()
    release = await full_subscriber(closing, url, "full.y")
    requester = closing(AMB(connection_string=url))
    request = asyncio.ensure_future(requester.request("full.y", 3, timeout=30))
    await wait_until(lambda: len(requester._requests) == 1, what="the request waiting")
    await requester.close()
    with pytest.raises(StateError):
        await asyncio.wait_for(request, 5)
    release.set()


async def test_a_caller_cancelling_a_waiting_request_is_not_taken_for_its_deadline(
    closing: Closing,
) -> None:
    url = memory_url()
    release = await full_subscriber(closing, url, "full.z")
    requester = closing(AMB(connection_string=url))
    request = asyncio.ensure_future(requester.request("full.z", 3, timeout=0.2))
    await wait_until(lambda: len(requester._requests) == 1, what="the request waiting")
    request.cancel()  # before the deadline: the caller's cancellation stands
    with pytest.raises(asyncio.CancelledError):
        await request
    assert requester.stats.request_timeouts == 0
    release.set()


async def test_a_caller_cancelling_as_the_deadline_fires_stays_cancelled(closing: Closing) -> None:
    """The caller's cancellation is on its way when the deadline interrupts the publish (the
    timer's work done here by hand, in the same step): the request ends cancelled."""
    url = memory_url()
    release = await full_subscriber(closing, url, "full.w")
    requester = closing(AMB(connection_string=url))
    request = asyncio.ensure_future(requester.request("full.w", 3, timeout=30))
    await wait_until(lambda: len(requester._requests) == 1, what="the request waiting")
    (pending,) = requester._requests.waiting.values()
    request.cancel()
    pending.future.set_result(None)
    pending.interrupt()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert requester.stats.request_timeouts == 0
    release.set()


async def test_replies_kept_before_the_request_is_sent_are_bounded(closing: Closing) -> None:
    url = memory_url()
    hold = HoldRequests(replies=EARLY_MAX + 10)
    requester = closing(AMB(connection_string=url, middleware=[hold]))
    hold.client = requester
    responder = closing(AMB(connection_string=url))

    async def flood(message: Any, metadata: Metadata) -> None:
        assert metadata.reply_to is not None
        for _ in range(EARLY_MAX + 10):
            await responder.publish(metadata.reply_to, "forged", correlation_id="another-request")

    await responder.subscribe("flood.x", flood)
    with pytest.raises(amb.RequestTimeout):
        await requester.request("flood.x", 1, timeout=1)
    # 10 dropped on arrival, before the publish returned; the 64 kept were found wrong after.
    assert hold.mismatched_on_release == [10]
    assert requester.stats.mismatched_replies == EARLY_MAX + 10


class CaseBlind(str):
    """A str subclass that compares equal to any text of other case."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__


async def test_a_recipient_is_compared_by_its_text_not_by_its_class(closing: Closing) -> None:
    url = memory_url()
    requester = closing(AMB(connection_string=url))
    other = closing(AMB(connection_string=url, agent_id="ALICE"))

    async def answer(message: Any, metadata: Metadata) -> None:
        await other.reply(metadata, "from ALICE")

    await other.subscribe("blind.x", answer)
    with pytest.raises(amb.RequestTimeout):
        await requester.request("blind.x", 1, recipient=CaseBlind("alice"), timeout=0.3)
    assert requester.stats.mismatched_replies == 1


def _receive_corpus() -> list[bytes]:
    """Valid and malformed inputs for the receive path's decode: every branch of
    ``Decoder.decode_fields`` (size limit, msgspec, JSON, the checked msgpack path)."""
    signed = Envelope(
        id="i-1",
        topic="rx.x",
        sender="s",
        payload={"k": [1, b"\x00"], "2": None},
        headers={"a": "b"},
        timestamp=1,
        expires_at=2**62,
        sig=Signature("ed25519", "key-1", b"n" * 16, b"v" * 64),
    )
    plain = Envelope(id="i-2", topic="rx.x", sender="s", payload="p", timestamp=1)
    valid_fields = [1, "i-3", "rx.x", "s", None, None, None, 1, None, 0, {}, "p", None]

    def packed(**changes: object) -> bytes:
        fields = list(valid_fields)
        for index, value in changes.items():
            fields[int(index[1:])] = value
        return msgpack.packb(fields, use_bin_type=True)

    packed_signed = amb.MsgpackSerializer().encode(signed)
    return [
        packed_signed,
        amb.MsgpackSerializer().encode(plain),
        amb.JsonSerializer().encode(signed),
        amb.JsonSerializer().encode(plain),
        packed(),
        packed(f11={1: "non-string key"}),  # msgspec refuses map keys that are not str
        packed(f1=""),
        packed(f1=7),
        packed(f3=None),
        packed(f7="soon"),
        packed(f10={"a": 1}),
        packed(f12=["ed25519", "k", "not bytes", b"v"]),
        packed(f0=2),
        packed(f0="1"),
        msgpack.packb(valid_fields[:12], use_bin_type=True),
        msgpack.packb({"v": 1}, use_bin_type=True),
        b"",
        b"\xc1",
        packed_signed[:-5],
        b"{not json",
        b'{"v": 1, "id": "x"',
        b'{"v": 1, "id": "x", "topic": "rx.x", "sender": "s", "timestamp": 1, "extra": 0}',
        b'{"v": 9}',
        b"\xff" * 10,
        amb.MsgpackSerializer().encode(Envelope(id="big", topic="rx.x", sender="s", payload="y" * 600)),
    ]


async def test_the_inline_receive_decode_agrees_with_the_decoder(closing: Closing) -> None:
    # AMB._on_delivery carries Decoder.decode_fields inline (the receive hot path): fed the same
    # inputs, the client hands a handler exactly the decoder's fields or dead-letters the
    # decoder's error.
    limit = 500
    decoder = Decoder(limit)
    url = memory_url()
    receiver = closing(AMB(connection_string=url, max_message_bytes=limit))
    watcher = closing(AMB(connection_string=url))
    got, dead = Collector(), Collector()
    await receiver.subscribe("rx.x", got)
    await watcher.subscribe("_DLQ.rx.x", dead)
    corpus = _receive_corpus()
    accepted = 0
    for data in corpus:
        try:
            expected: object = decoder.decode_fields(data)
        except amb.EnvelopeError as exc:
            expected = f"{type(exc).__name__}: {exc}"[:1024]
        before = len(got.messages) + len(dead.messages)
        await receiver.broker.publish("rx.x", data)
        await wait_until(lambda: len(got.messages) + len(dead.messages) > before)  # noqa: B023
        if isinstance(expected, str):
            assert dead.messages[-1] == data
            assert dead.metadata[-1].headers[DLQ_REASON] == "malformed"
            assert dead.metadata[-1].headers[DLQ_ERROR] == expected
        else:
            accepted += 1
            assert wire_of(got.metadata[-1].envelope) == expected
    assert 0 < accepted < len(corpus)
    assert receiver.stats.malformed == len(corpus) - accepted
    await receiver.close()
    await watcher.close()
