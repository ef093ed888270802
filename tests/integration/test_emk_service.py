"""The memory service on the in-memory broker: requests, identity-based isolation, bad input."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from agent_os.amb import AMB, Envelope, Metadata, Middleware, RemoteError, get_serializer
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.amb.middleware import ConsumeNext
from agent_os.emk import EMK, HashingEmbedder
from agent_os.iatp import SigningRejected
from agent_os.services.memory_service import MemoryService
from tests.support import Collector, memory_url
from tests.support.closing import Closing
from tests.support.identities import identities


class FakeVerification(Middleware):
    """Stands in for IATP on the service side: puts a verification result in the context."""

    def __init__(self, result: Any) -> None:
        self.result = result

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        metadata.context["iatp"] = self.result
        await call_next(envelope, metadata)


@pytest.fixture
def url() -> str:
    return memory_url("emk-service")


@pytest.fixture
async def service(url: str) -> AsyncIterator[MemoryService]:
    emk = EMK("memory", embedding_model=HashingEmbedder(64))
    amb = AMB("memory", url, agent_id="memory-service")
    svc = MemoryService(amb, emk, trust_bus=True)
    try:
        await svc.start()
        yield svc
        await svc.stop()
    finally:
        await amb.close()
        await emk.close()


@pytest.fixture
async def alice(url: str, service: MemoryService) -> AsyncIterator[AMB]:
    async with AMB("memory", url, agent_id="alice") as amb:
        yield amb


@pytest.fixture
async def bob(url: str, service: MemoryService) -> AsyncIterator[AMB]:
    async with AMB("memory", url, agent_id="bob") as amb:
        yield amb


async def test_store_search_query_get_history_over_the_bus(alice: AMB, service: MemoryService) -> None:
    stored = await alice.request(
        "emk.store",
        {"content": "User prefers dark mode and metric units.", "tags": ["ui"], "metadata": {"type": "pref"}},
    )
    record = stored["record"]
    assert stored["ok"] is True
    assert record["agent_id"] == "alice"
    assert len(record["content_hash"]) == 64
    newer = (
        await alice.request(
            "emk.store", {"content": "User now prefers light mode.", "supersedes": record["id"]}
        )
    )["record"]
    found = await alice.request("emk.search", {"query": "which mode does the user prefer", "limit": 5})
    assert [r["id"] for r in found["records"]] == [newer["id"]]
    assert 0.0 <= found["records"][0]["relevance"] <= 1.0
    queried = await alice.request("emk.query", {"tags": ["ui"], "include_superseded": True})
    assert [r["id"] for r in queried["records"]] == [record["id"]]
    since = await alice.request("emk.query", {"since": record["created_at"], "newest_first": False})
    assert [r["id"] for r in since["records"]] == [newer["id"]]
    got = await alice.request("emk.get", {"id": record["id"]})
    assert got["record"]["superseded_by"] == newer["id"]
    history = await alice.request("emk.history", {"id": newer["id"]})
    assert [r["id"] for r in history["records"]] == [newer["id"], record["id"]]
    assert service.stats["ok"] == 7


async def test_the_callers_identity_decides_what_it_sees(alice: AMB, bob: AMB) -> None:
    secret = (await alice.request("emk.store", {"content": "Alice's locker code is 4711."}))["record"]
    assert (await bob.request("emk.search", {"query": "Alice's locker code is 4711."}))["records"] == []
    assert (await bob.request("emk.query", {}))["records"] == []
    with pytest.raises(RemoteError) as err:
        await bob.request("emk.get", {"id": secret["id"]})
    assert err.value.reason.startswith("RecordNotFound")
    with pytest.raises(RemoteError) as err:
        await bob.request("emk.store", {"content": "Locker code changed.", "supersedes": secret["id"]})
    assert err.value.reason.startswith("ForeignSupersedes")
    # Naming another agent in the payload does not change who is asking.
    with pytest.raises(RemoteError) as err:
        await bob.request("emk.search", {"query": "locker", "agent_id": "alice"})
    assert err.value.reason.startswith("Forbidden")
    assert len((await alice.request("emk.query", {}))["records"]) == 1


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("emk.store", {"content": ""}, "EmptyContent"),
        ("emk.store", {"content": "x" * 70_000}, "ContentTooLarge"),
        ("emk.store", {"content": "ok", "tags": ["x'; DROP TABLE memories; --", 3]}, "InvalidTag"),
        ("emk.store", {"content": "ok", "tags": [""]}, "InvalidTag"),
        ("emk.store", {"content": "ok", "supersedes": str(uuid.uuid4())}, "UnknownSupersedes"),
        ("emk.store", {"content": "ok", "metadata": "not a dict"}, "BadRequest"),
        ("emk.store", "not a dict", "BadRequest"),
        ("emk.store", {}, "BadRequest"),
        ("emk.search", {"query": "q", "limit": 0}, "InvalidInput"),
        ("emk.search", {"query": "q", "limit": True}, "BadRequest"),
        ("emk.query", {"since": "yesterday"}, "BadRequest"),
        ("emk.get", {"id": "memory_456"}, "InvalidInput"),
    ],
)
async def test_bad_requests_get_specific_errors_and_the_service_keeps_serving(
    alice: AMB, service: MemoryService, topic: str, payload: Any, reason: str
) -> None:
    with pytest.raises(RemoteError) as err:
        await alice.request(topic, payload)
    assert err.value.reason.split(":", 1)[0] == reason
    assert service.stats[f"errors.{reason}"] == 1
    assert (await alice.request("emk.store", {"content": "still serving"}))["ok"] is True


async def test_a_valid_iatp_verification_is_the_identity(url: str, closing: Closing) -> None:
    verified = SimpleNamespace(valid=True, sender="carol")
    emk = closing(EMK("memory", embedding_model=HashingEmbedder(64)))
    async with AMB("memory", url, agent_id="svc", middleware=[FakeVerification(verified)]) as amb:
        svc = closing(MemoryService(amb, emk))  # verification required (the default)
        await svc.start()
        async with AMB("memory", url, agent_id="someone-else") as client:
            stored = await client.request("emk.store", {"content": "Written as carol."})
            assert stored["record"]["agent_id"] == "carol"
        await svc.stop()
    assert [r.content for r in await emk.query("carol")] == ["Written as carol."]


@pytest.mark.parametrize("trust_bus", [False, True])
@pytest.mark.parametrize(
    "result",
    [
        SimpleNamespace(valid=False, sender="carol", reason="unsigned"),
        {"valid": False, "sender": "carol"},
        {"valid": True, "sender": ""},
        SimpleNamespace(sender="carol"),
    ],
)
async def test_an_invalid_iatp_verification_fails_closed(
    url: str, result: Any, trust_bus: bool, closing: Closing
) -> None:
    emk = closing(EMK("memory", embedding_model=HashingEmbedder(64)))
    async with AMB("memory", url, agent_id="svc", middleware=[FakeVerification(result)]) as amb:
        svc = closing(MemoryService(amb, emk, trust_bus=trust_bus))
        await svc.start()
        async with AMB("memory", url, agent_id="carol") as client:
            with pytest.raises(RemoteError) as err:
                await client.request("emk.store", {"content": "should not be stored"})
        await svc.stop()
    assert err.value.reason.startswith("Unauthenticated")
    assert await emk.query("carol") == []


async def test_without_verification_a_claimed_sender_is_refused(url: str, closing: Closing) -> None:
    """The service requires a verified sender unless told to trust the bus: no IATP result
    means no answer, whatever the envelope claims."""
    emk = closing(EMK("memory", embedding_model=HashingEmbedder(64)))
    await emk.store("alice", "Alice's locker code is 4711.")
    async with AMB("memory", url, agent_id="memory-service") as amb:
        svc = closing(MemoryService(amb, emk))
        await svc.start()
        async with AMB("memory", url, agent_id="mallory") as mallory:
            with pytest.raises(RemoteError) as err:
                await mallory.request("emk.query", {}, sender_id="alice")
        await svc.stop()
    assert err.value.reason.startswith("Unauthenticated")
    assert svc.stats["errors.Unauthenticated"] == 1
    await emk.close()


async def test_a_forged_sender_cannot_read_another_agents_memories(url: str) -> None:
    keys = await identities("memory-service", "alice", "mallory")
    emk = EMK("memory", embedding_model=HashingEmbedder(64))
    svc_client = AMB(
        "memory", url, agent_id="memory-service", middleware=[keys["memory-service"].middleware()]
    )
    svc = MemoryService(svc_client, emk)
    alice = AMB("memory", url, agent_id="alice", middleware=[keys["alice"].middleware()])
    mallory = AMB("memory", url, agent_id="mallory", middleware=[keys["mallory"].middleware()])
    raw = AMB("memory", url, agent_id="mallory")
    try:
        await svc.start()
        stored = await alice.request("emk.store", {"content": "Alice's locker code is 4711."}, timeout=5)
        assert stored["record"]["agent_id"] == "alice"

        # mallory's signed client cannot sign as alice: the request fails before it leaves.
        with pytest.raises(SigningRejected):
            await mallory.request("emk.query", {}, sender_id="alice", timeout=1)
        # mallory's own signed request gets mallory's memories: none.
        assert (await mallory.request("emk.query", {}, timeout=5))["records"] == []

        # Around the middleware: an unsigned request claiming alice is answered Unauthenticated;
        # one signed by mallory with the sender rewritten to alice is dead-lettered by IATP.
        dead = Collector()
        await raw.subscribe("_DLQ.emk.>", dead)
        with pytest.raises(RemoteError, match="Unauthenticated"):
            await raw.request("emk.query", {}, sender_id="alice", timeout=5)
        forged = await keys["mallory"].sign("mallory", {}, topic="emk.query")
        forged = dataclasses.replace(forged, sender="alice", reply_to="_INBOX.mallory.1")
        await raw.broker.publish("emk.query", get_serializer("msgpack").encode(forged))
        await dead.wait_for(1)
        assert [m.headers[DLQ_REASON] for m in dead.metadata] == ["unknown_key"]  # not alice's key
        assert svc_client.stats.rejected == 1
        assert svc.stats["requests.query"] == 2  # mallory's own request and the unsigned one
        assert svc.stats["errors.Unauthenticated"] == 1
        assert svc.stats["ok"] == 2
    finally:
        for client in (alice, mallory, raw):
            await client.close()
        await svc.stop()
        await svc_client.close()
        await emk.close()


async def test_with_trust_bus_the_claimed_sender_is_believed(url: str, closing: Closing) -> None:
    """The documented trade of ``trust_bus``: the broker's ACLs must authenticate senders,
    because the service believes the envelope."""
    emk = closing(EMK("memory", embedding_model=HashingEmbedder(64)))
    await emk.store("alice", "Alice's locker code is 4711.")
    async with AMB("memory", url, agent_id="memory-service") as amb:
        svc = closing(MemoryService(amb, emk, trust_bus=True))
        await svc.start()
        async with AMB("memory", url, agent_id="someone") as client:
            answer = await client.request("emk.query", {}, sender_id="alice")
        await svc.stop()
    assert [r["content"] for r in answer["records"]] == ["Alice's locker code is 4711."]
    await emk.close()
