"""Importing identities: a known agent gains keys only with a rotation statement by one of its
valid keys; a local agent never gains foreign keys; first imports are trust on first use."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent_os.iatp import IATP, IdentityConflict, MemoryKeyStore, Reason, TrustError


async def pair(name: str = "carol") -> tuple[IATP, IATP]:
    """(remote: holds ``name``'s private key, local: imported ``name``'s public identity)."""
    remote, local = IATP(), IATP()
    await remote.register_agent(name)
    await local.add_identity(remote.identity(name))
    return remote, local


async def test_an_attackers_identity_under_a_local_agents_name_is_refused() -> None:
    """The reported attack: an attacker's own "bank" imported where the real "bank" lives."""
    process = IATP()
    await process.register_agent("bank")
    attacker = IATP()
    await attacker.register_agent("bank")
    with pytest.raises(IdentityConflict, match="local"):
        await process.add_identity(attacker.identity("bank"))
    forged = await attacker.sign("bank", {"transfer": 1_000_000})
    result = await process.verify(forged)
    assert not result.valid
    assert result.reason == Reason.UNKNOWN_KEY
    assert len(process.identity("bank").keys) == 1


async def test_even_a_proven_new_key_is_refused_for_a_local_agent() -> None:
    """A local agent's keys are made here; nothing imported adds to them, proof or not."""
    store = MemoryKeyStore()
    here = IATP(key_storage=store)
    await here.register_agent("bank")
    twin = IATP(key_storage=store)  # a second copy of the same private key (a misconfiguration)
    await twin.open()
    await twin.rotate_key("bank")  # a valid rotation statement by the key both hold
    with pytest.raises(IdentityConflict, match="local"):
        await here.add_identity(twin.identity("bank"))
    assert len(here.identity("bank").keys) == 1


async def test_an_unproven_new_key_for_a_known_remote_agent_is_refused() -> None:
    remote, local = await pair()
    attacker = IATP()
    await attacker.register_agent("carol")
    before = local.identity("carol")
    with pytest.raises(IdentityConflict, match="rotation statement"):
        await local.add_identity(attacker.identity("carol"))
    assert local.identity("carol") == before  # nothing merged
    assert (await local.verify(await attacker.sign("carol", "pay me"))).reason == Reason.UNKNOWN_KEY
    assert (await local.verify(await remote.sign("carol", "still me"))).valid


async def test_the_refusal_is_a_trust_error_and_leaves_the_record_untouched() -> None:
    remote, local = await pair()
    attacker = IATP()
    await attacker.register_agent("carol")
    # the attacker also appends the real key with a revocation to its copy: nothing is merged
    mixed = attacker.identity("carol").to_dict()
    real = remote.identity("carol").to_dict()["keys"][0]
    mixed["keys"].append({**real, "revoked_at": 1, "revocation_reason": "forged"})
    with pytest.raises(TrustError):
        await local.add_identity(mixed)
    assert local.registry.keys[real["key_id"]].revoked_at is None


async def test_a_rotation_statement_by_the_current_key_carries_the_new_key(tmp_path: Path) -> None:
    remote, local = await pair()
    old = remote.identity("carol").key_id
    before = await remote.sign("carol", "before")
    rotated = await remote.rotate_key("carol", grace=60)
    new_key = next(k for k in rotated.keys if k.key_id == rotated.key_id)
    assert new_key.endorsed_by == old
    assert new_key.endorsement is not None
    await local.add_identity(rotated.to_dict())
    assert local.identity("carol").key_id == rotated.key_id
    assert (await local.verify(await remote.sign("carol", "after"))).valid
    assert (await local.verify(before)).valid  # the old key verifies through the grace period
    assert local.registry.keys[old].retire_at == remote.registry.keys[old].retire_at


async def test_a_chain_of_missed_rotations_is_followed_from_a_known_key() -> None:
    remote, local = await pair()
    for _ in range(3):
        await remote.rotate_key("carol")
    await local.add_identity(remote.identity("carol").to_dict())
    assert [k.version for k in local.identity("carol").keys] == [1, 2, 3, 4]
    assert (await local.verify(await remote.sign("carol", "v4"))).valid


async def test_a_statement_signed_by_another_key_or_for_other_bytes_is_refused() -> None:
    remote, local = await pair()
    old = remote.identity("carol").key_id
    await remote.rotate_key("carol")
    data = remote.identity("carol").to_dict()
    newest = data["keys"][-1]
    attacker = IATP()
    await attacker.register_agent("carol")
    fake = attacker.identity("carol").to_dict()["keys"][0]
    # the attacker's key, presented with the real statement (made for another key)
    forged = {**data, "current_key_id": fake["key_id"], "keys": [data["keys"][0], {
        **fake, "version": 2, "endorsed_by": old, "endorsement": newest["endorsement"],
    }]}  # fmt: skip
    with pytest.raises(IdentityConflict):
        await local.add_identity(forged)
    # the real statement with its version changed no longer verifies
    bumped = {**data, "keys": [data["keys"][0], {**newest, "version": 9}]}
    with pytest.raises(IdentityConflict):
        await local.add_identity(bumped)
    # a statement naming a key the importer does not hold as valid
    await local.revoke_key(old, reason="compromised")
    with pytest.raises(IdentityConflict):
        await local.add_identity(data)


async def test_a_statement_by_a_key_the_copy_itself_revokes_is_refused() -> None:
    remote, local = await pair()
    old = remote.identity("carol").key_id
    await remote.rotate_key("carol")
    await remote.revoke_key(old, reason="compromised")  # revoked before the import
    with pytest.raises(IdentityConflict):
        await local.add_identity(remote.identity("carol").to_dict())


async def test_a_key_id_already_bound_to_another_agent_is_refused() -> None:
    remote, local = await pair()
    carol = remote.identity("carol").to_dict()
    theft: dict[str, Any] = {
        "agent_id": "mallory",
        "metadata": {},
        "current_key_id": carol["current_key_id"],
        "keys": [{**carol["keys"][0], "agent_id": "mallory"}],
    }
    with pytest.raises(IdentityConflict, match="carol"):
        await local.add_identity(theft)
    assert "mallory" not in local.registry.agents
    assert local.registry.keys[carol["current_key_id"]].agent_id == "carol"


async def test_reimporting_the_same_identity_and_first_imports_still_work() -> None:
    remote, local = await pair()
    await local.add_identity(remote.identity("carol"))  # nothing new: accepted
    await remote.register_agent("dave")
    await remote.rotate_key("dave")
    await local.add_identity(remote.identity("dave").to_dict())  # unknown agent: taken as given
    assert len(local.identity("dave").keys) == 2


async def test_a_new_key_vouched_for_out_of_band_is_accepted_explicitly() -> None:
    """After a compromise the old key can sign nothing: the operator checks the new key out of
    band and says so."""
    remote, local = await pair()
    old = remote.identity("carol").key_id
    await remote.revoke_key(old, reason="compromised")
    await remote.rotate_key("carol")  # no valid key left to sign a statement
    data = remote.identity("carol").to_dict()
    assert data["keys"][-1]["endorsement"] is None
    with pytest.raises(IdentityConflict):
        await local.add_identity(data)
    await local.add_identity(data, trust_new_keys=True)
    assert (await local.verify(await remote.sign("carol", "new key"))).valid
    # never for a local agent
    attacker = IATP()
    await attacker.register_agent("carol")
    await remote.register_agent("erin")
    await attacker.register_agent("erin")
    with pytest.raises(IdentityConflict):
        await remote.add_identity(attacker.identity("erin"), trust_new_keys=True)


async def test_rotation_statements_survive_the_file_store_and_json(tmp_path: Path) -> None:
    import json

    remote = IATP("file", key_path=str(tmp_path / "ks"), passphrase="pw", kdf_level="interactive")
    await remote.register_agent("carol")
    local = IATP()
    await local.add_identity(remote.identity("carol"))
    await remote.rotate_key("carol")
    reopened = IATP("file", key_path=str(tmp_path / "ks"), passphrase="pw", kdf_level="interactive")
    await reopened.open()
    exported = json.loads(json.dumps(reopened.identity("carol").to_dict()))
    await local.add_identity(exported)
    assert (await local.verify(await reopened.sign("carol", "x"))).valid
    # the key record type keeps the statement through replace() and equality
    key = reopened.registry.agents["carol"].current
    assert dataclasses.replace(key).endorsement == key.endorsement
