"""Hostile subjects: too long for a broker's protocol line, or holding whitespace, control
characters or NUL. Each is refused where a subject is built or accepted (publish, reply_to,
subscribe, queue and durable names, the inbox and dead-letter prefixes, the envelope's topic
and reply_to on receive), or the message carrying it is dead-lettered under a bounded subject;
never does one reach the broker and cost the connection (issue 14, class 1)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import nats
import pytest

from agent_os.amb import AMB, MAX_SUBJECT_BYTES, ConfigError, Metadata, get_serializer
from agent_os.amb.deadletter import (
    DLQ_REASON,
    DLQ_SUBJECT,
    DLQ_SUBJECT_SHA256,
    dead_letter_subject,
    subject_digest,
)
from agent_os.amb.envelope import Envelope, new_id
from agent_os.amb.subjects import subject_ok, validate_pattern, validate_subject
from agent_os.emk import EMK, HashingEmbedder
from agent_os.services.memory_service import MemoryService
from tests.support import Collector, memory_url
from tests.support.closing import Closing
from tests.support.servers import NATS_URL

# Every member of the class: over the bound (in characters, or in UTF-8 bytes only), at the
# NATS protocol line's size, and each kind of character a subject may not hold.
HOSTILE_TOKENS = {
    "over the bound": "a" * (MAX_SUBJECT_BYTES + 1),
    "the NATS line": "a" * 4086,
    "over the bound in UTF-8 only": "\u00e9" * (MAX_SUBJECT_BYTES // 2 + 1),
    "four-byte characters": "\U0001f600" * (MAX_SUBJECT_BYTES // 4 + 1),
    "NUL": "a\x00b",
    "CR LF": "a\r\nPUB x 1",
    "tab": "a\tb",
    "space": "a b",
    "DEL": "a\x7fb",
    "C1 control (NEL)": "a\x85b",
    "line separator": "a\u2028b",
    "no-break space": "a\u00a0b",
    "zero-width space": "a\u200bb",
    "bidi override": "a\u202eb",
    "lone surrogate": "a\ud800b",
    "escape": "a\x1b[31mb",
}
IDS = list(HOSTILE_TOKENS)


def tag() -> str:
    return f"h{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("token", HOSTILE_TOKENS.values(), ids=IDS)
def test_a_hostile_subject_is_refused_everywhere_a_subject_is_checked(token: str) -> None:
    subject = f"tasks.{token}"
    assert not subject_ok(subject)
    with pytest.raises(ConfigError) as caught:
        validate_subject(subject)
    assert len(str(caught.value)) < 400  # the error names the subject without carrying it all
    with pytest.raises(ConfigError):
        validate_pattern(f"{subject}.>")
    with pytest.raises(ConfigError):
        AMB("memory", memory_url(), inbox_prefix=subject)
    with pytest.raises(ConfigError):
        AMB("memory", memory_url(), dead_letter_prefix=subject)


@pytest.mark.parametrize("token", [*HOSTILE_TOKENS.values(), "", ">", "*", "a.", "1 2"], ids=repr)
def test_a_known_inbox_does_not_let_a_hostile_last_token_through(token: str) -> None:
    # subject_ok remembers the heads of valid subjects (a reply subject's inbox) and takes
    # "<head>.<letters and digits>" without the full check: anything else is checked in full.
    head = f"_INBOX.{tag()}"
    assert subject_ok(f"{head}.1")
    assert subject_ok(f"{head}.2f")  # by the known head
    assert subject_ok(f"{head}.{'9' * (MAX_SUBJECT_BYTES - len(head) - 1)}")  # just fits
    assert not subject_ok(f"{head}.{'9' * (MAX_SUBJECT_BYTES - len(head))}")  # one byte over
    assert not subject_ok(f"{head}.{token}")
    with pytest.raises(ConfigError):
        validate_subject(f"{head}.{token}")


def test_the_bound_is_in_utf8_bytes_and_leaves_room_for_prefixes() -> None:
    assert validate_subject("a" * MAX_SUBJECT_BYTES)
    assert validate_subject("\u00e9" * (MAX_SUBJECT_BYTES // 2))
    assert subject_ok("tasks.\u00e9t\u00e9")  # non-ASCII letters are fine
    with pytest.raises(ConfigError):  # its reply subjects would be too long
        AMB("memory", memory_url(), inbox_prefix="i" * (MAX_SUBJECT_BYTES - 10))
    with pytest.raises(ConfigError):  # its dead letters would have no room
        AMB("memory", memory_url(), dead_letter_prefix="d" * (MAX_SUBJECT_BYTES - 10))


@pytest.mark.parametrize("token", HOSTILE_TOKENS.values(), ids=IDS)
def test_a_dead_letter_subject_is_always_a_bounded_valid_subject(token: str) -> None:
    dead = dead_letter_subject("_DLQ", f"ingress.{token}")
    assert subject_ok(dead)
    assert len(dead.encode()) <= MAX_SUBJECT_BYTES
    assert dead.startswith("_DLQ.ingress.")
    assert dead.endswith(subject_digest(f"ingress.{token}")[:32])
    assert dead_letter_subject("_DLQ", "ingress.ok") == "_DLQ.ingress.ok"


@pytest.fixture
async def nats_client() -> AsyncIterator[AMB]:
    client = AMB("nats", NATS_URL, agent_id=f"hostile-{tag()}", dead_letter_prefix=f"dlq{tag()}")
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


@pytest.mark.nats
@pytest.mark.parametrize(
    "token",
    [HOSTILE_TOKENS[k] for k in ("the NATS line", "NUL", "CR LF", "lone surrogate")],
    ids=["the NATS line", "NUL", "CR LF", "lone surrogate"],
)
async def test_on_nats_a_hostile_topic_or_reply_to_raises_and_the_connection_lives(
    nats_client: AMB, token: str
) -> None:
    prefix = tag()
    got = Collector()
    await nats_client.subscribe(f"{prefix}.>", got)
    with pytest.raises(ConfigError):
        await nats_client.publish(f"{prefix}.{token}", "lost?")
    with pytest.raises(ConfigError):
        await nats_client.publish(f"{prefix}.ok", "lost?", reply_to=f"{prefix}.{token}")
    with pytest.raises(ConfigError):
        await nats_client.subscribe(f"{prefix}.{token}", got)
    with pytest.raises(ConfigError):
        await nats_client.subscribe(f"{prefix}.q", got, queue=f"q {token}")
    await nats_client.publish(f"{prefix}.ok", "after")
    await got.wait_for(1)
    assert got.messages == ["after"]
    assert nats_client.healthy


def raw_envelope(topic: str, reply_to: str | None, payload: object = "x") -> bytes:
    """An envelope encoded by hand, as a hostile client would send it (no checks)."""
    env = Envelope(new_id(), topic, "mallory", payload, reply_to=reply_to, timestamp=1)
    return get_serializer("msgpack").encode(env)


@pytest.mark.nats
async def test_on_nats_garbage_on_a_subject_at_the_protocol_limit_is_dead_lettered_bounded(
    nats_client: AMB, closing: Closing
) -> None:
    """The defect: the dead letter of garbage on a 4,000-character subject went to
    ``_DLQ.<subject>``, over NATS's protocol line; the server refused it and nats-py closed the
    connection for good. Now it goes to the bounded form, and the client goes on."""
    prefix = tag()
    long_subject = f"{prefix}.{'a' * 4000}"
    got, dead = Collector(), Collector()
    await nats_client.subscribe(f"{prefix}.>", got)
    watcher = closing(AMB("nats", NATS_URL))
    raw = await nats.connect(NATS_URL)
    try:
        await watcher.subscribe(f"{nats_client.dead_letter_prefix}.>", dead)
        await raw.publish(long_subject, b"\xc1 garbage")
        await raw.publish(
            f"{prefix}.{'b' * 3000}", raw_envelope(f"{prefix}.b", None)
        )  # topic != subject: fine
        await raw.flush()
        await dead.wait_for(1)
        meta = dead.metadata[0]
        assert meta.headers[DLQ_REASON] == "malformed"
        assert meta.headers[DLQ_SUBJECT] == long_subject[:MAX_SUBJECT_BYTES]
        assert meta.headers[DLQ_SUBJECT_SHA256] == subject_digest(long_subject)
        assert len(meta.subject.encode()) <= MAX_SUBJECT_BYTES
        assert nats_client.stats.malformed == 1
        await nats_client.publish(f"{prefix}.ok", "after")
        await got.wait_for(2)
        assert got.messages[-1] == "after"
        assert nats_client.healthy
    finally:
        await raw.close()
        await watcher.close()


@pytest.mark.nats
@pytest.mark.parametrize("field", ["reply_to", "topic"])
async def test_on_nats_an_envelope_with_an_unusable_reply_to_or_topic_is_dead_lettered(
    nats_client: AMB, field: str
) -> None:
    prefix = tag()
    handled, dead = Collector(), Collector()
    await nats_client.subscribe(f"{prefix}.>", handled)
    await nats_client.subscribe(f"{nats_client.dead_letter_prefix}.>", dead)
    raw = await nats.connect(NATS_URL)
    hostile = f"{prefix}.{'r' * 5000}"
    try:
        data = raw_envelope(f"{prefix}.req", hostile) if field == "reply_to" else raw_envelope(hostile, None)
        await raw.publish(f"{prefix}.req", data)
        await raw.flush()
        await dead.wait_for(1)
        assert dead.metadata[0].headers[DLQ_REASON] == "malformed"
        assert field in dead.metadata[0].headers["dlq-error"]
        assert handled.messages == []
        assert nats_client.stats.malformed == 1
        await nats_client.publish(f"{prefix}.ok", "after")
        await handled.wait_for(1)
        assert nats_client.healthy
    finally:
        await raw.close()


@pytest.mark.nats
async def test_the_memory_service_on_nats_survives_a_request_with_a_5000_character_reply_to(
    closing: Closing,
) -> None:
    """The defect: the service answered on the request's reply_to; a 5,000-character one made
    the server close its connection, and it answered nobody after that."""
    prefix = tag()
    emk = closing(EMK("memory", embedding_model=HashingEmbedder(64)))
    client = closing(AMB("nats", NATS_URL, agent_id=f"memory-{prefix}", dead_letter_prefix=f"dlq{prefix}"))
    service = closing(MemoryService(client, emk, prefix=prefix, trust_bus=True))
    agent = closing(AMB("nats", NATS_URL, agent_id=f"alice-{prefix}"))
    raw = await nats.connect(NATS_URL)
    try:
        await service.start()
        await agent.connect()
        hostile = raw_envelope(f"{prefix}.store", f"_INBOX.{'x' * 5000}", {"content": "hostile"})
        await raw.publish(f"{prefix}.store", hostile)
        await raw.flush()
        stored = await agent.request(f"{prefix}.store", {"content": "after the hostile request"}, timeout=5)
        assert stored["ok"] is True
        assert client.stats.malformed == 1
        assert client.healthy
    finally:
        await raw.close()
        await agent.close()
        await service.stop()
        await client.close()
        await emk.close()


@pytest.mark.nats
async def test_a_handler_whose_forward_subject_is_unusable_dead_letters_with_the_reason(
    nats_client: AMB,
) -> None:
    """A subject built from a valid one (a prefix swapped for a longer one) can pass the bound:
    the publish refuses it, and the message is dead-lettered at once as ``invalid_subject``."""
    prefix = tag()
    dead = Collector()

    async def forward(message: object, metadata: Metadata) -> None:
        await nats_client.publish(f"{'long' * 10}.{metadata.subject}", message)

    await nats_client.subscribe(f"{prefix}.>", forward, max_attempts=3)
    await nats_client.subscribe(f"{nats_client.dead_letter_prefix}.>", dead)
    await nats_client.publish(f"{prefix}.{'f' * (MAX_SUBJECT_BYTES - len(prefix) - 1)}", "x")
    await dead.wait_for(1)
    assert dead.metadata[0].headers[DLQ_REASON] == "invalid_subject"
    assert len(dead.metadata[0].subject.encode()) <= MAX_SUBJECT_BYTES  # shortened, hashed
    assert nats_client.stats.retried == 0
    assert nats_client.stats.invalid_subjects == 1
