"""The memory service on the in-memory broker: requests, identity-based isolation, bad input."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from amb import AMB, Envelope, Metadata, Middleware, RemoteError
from amb.middleware import ConsumeNext
from emk import EMK, HashingEmbedder
from services.memory_service import MemoryService, caller_identity


class FakeVerification(Middleware):
    """Stands in for IATP on the service side: puts a verification result in the context."""

    def __init__(self, result: Any) -> None:
        self.result = result

    async def on_consume(self, envelope: Envelope, metadata: Metadata, call_next: ConsumeNext) -> None:
        metadata.context["iatp"] = self.result
        await call_next(envelope, metadata)


@pytest.fixture
def url() -> str:
    return f"memory://emk-service-{uuid.uuid4().hex}"


@pytest.fixture
async def service(url: str) -> AsyncIterator[MemoryService]:
    emk = EMK("memory", embedding_model=HashingEmbedder(64))
    amb = AMB("memory", url, agent_id="memory-service")
    svc = MemoryService(amb, emk)
    await svc.start()
    yield svc
    await svc.stop()
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


async def test_a_valid_iatp_verification_is_the_identity(url: str) -> None:
    verified = SimpleNamespace(valid=True, sender="carol")
    emk = EMK("memory", embedding_model=HashingEmbedder(64))
    async with AMB("memory", url, agent_id="svc", middleware=[FakeVerification(verified)]) as amb:
        svc = MemoryService(amb, emk)
        await svc.start()
        async with AMB("memory", url, agent_id="someone-else") as client:
            stored = await client.request("emk.store", {"content": "Written as carol."})
            assert stored["record"]["agent_id"] == "carol"
        await svc.stop()
    assert [r.content for r in await emk.query("carol")] == ["Written as carol."]


@pytest.mark.parametrize(
    "result",
    [
        SimpleNamespace(valid=False, sender="carol", reason="unsigned"),
        {"valid": False, "sender": "carol"},
        {"valid": True, "sender": ""},
        SimpleNamespace(sender="carol"),
    ],
)
async def test_an_invalid_iatp_verification_fails_closed(url: str, result: Any) -> None:
    emk = EMK("memory", embedding_model=HashingEmbedder(64))
    async with AMB("memory", url, agent_id="svc", middleware=[FakeVerification(result)]) as amb:
        svc = MemoryService(amb, emk)
        await svc.start()
        async with AMB("memory", url, agent_id="carol") as client:
            with pytest.raises(RemoteError) as err:
                await client.request("emk.store", {"content": "should not be stored"})
        await svc.stop()
    assert err.value.reason.startswith("Unauthenticated")
    assert await emk.query("carol") == []


def test_caller_identity_prefers_the_iatp_result_over_the_envelope() -> None:
    env = Envelope("id1", "emk.store", "envelope-sender", None, timestamp=1)
    meta = Metadata(env, "emk.store", 1, {})
    assert caller_identity(meta) == "envelope-sender"
    meta.context["iatp"] = {"valid": True, "sender": "verified-sender"}
    assert caller_identity(meta) == "verified-sender"
