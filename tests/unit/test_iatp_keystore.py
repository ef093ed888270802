"""File key store: encrypted at rest, 0600, atomic writes, wrong passphrase, tampering."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent_os.iatp import (
    IATP,
    FileKeyStore,
    IATPConfigError,
    InsecureKeyStore,
    KeyStoreCorrupt,
    Reason,
    WrongPassphrase,
)
from agent_os.iatp import filestore as filestore_module

PASS = "correct horse battery staple"


def make(path: Path, passphrase: str = PASS) -> IATP:
    return IATP(key_storage="file", key_path=str(path), passphrase=passphrase, kdf_level="interactive")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_keys_persist_encrypted_with_private_permissions(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    iatp = make(root)
    ident = await iatp.register_agent("alice", {"team": "a"})
    await iatp.register_agent("bob")
    await iatp.establish_trust("bob", "alice", 0.7, ["send_data"])
    env = await iatp.sign("alice", {"x": 1}, recipient_id="bob")

    assert mode(root) == 0o700
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    assert all(mode(p) == 0o600 for p in files), {str(p): oct(mode(p)) for p in files}
    key_file = root / "keys" / f"{ident.key_id}.key"
    raw = key_file.read_bytes()
    # the private seed is nowhere in clear: not in any file, not as base64 either
    seed = iatp.registry.signing_key("alice")
    assert seed is not None
    secret = seed[1][:32]
    import base64

    for p in files:
        content = p.read_bytes()
        assert secret not in content
        assert base64.b64encode(secret) not in content
    assert json.loads(raw)["format"] == "iatp-key-v1"

    again = make(root)
    assert (await again.verify(env)).valid
    assert again.identity("alice").metadata == {"team": "a"}
    assert again.permissions("bob", "alice") == {"send_data"}
    assert (await again.verify(await again.sign("alice", "still me"))).valid


async def test_wrong_passphrase_is_a_specific_error(tmp_path: Path) -> None:
    await make(tmp_path / "ks").register_agent("alice")
    with pytest.raises(WrongPassphrase):
        await make(tmp_path / "ks", "not the passphrase").open()


async def test_verify_with_a_locked_store_fails_closed(tmp_path: Path) -> None:
    good = make(tmp_path / "ks")
    await good.register_agent("alice")
    env = await good.sign("alice", "x")
    locked = make(tmp_path / "ks", "wrong")
    result = await locked.verify(env)
    assert not result.valid
    assert result.reason == Reason.KEY_STORE_UNAVAILABLE  # not the sender's fault: its own reason
    assert result.sender == "alice"
    assert "WrongPassphrase" in (result.detail or "")
    # the bus middleware rejects (dead-letters) with the same reason, and counts it
    from agent_os.amb import Metadata
    from agent_os.iatp import SignatureRejected

    middleware = locked.middleware()
    handled: list[object] = []

    async def handler(envelope: object, metadata: object) -> None:
        handled.append(envelope)

    with pytest.raises(SignatureRejected) as caught:
        await middleware.on_consume(env, Metadata(env, env.topic, 1, {}), handler)
    assert caught.value.reason == "key_store_unavailable"
    assert middleware.rejected == {"key_store_unavailable": 1}
    assert handled == []


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IATPConfigError):
        FileKeyStore(tmp_path, "")


async def test_a_store_readable_by_others_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ks"
    iatp = make(root)
    ident = await iatp.register_agent("alice")
    os.chmod(root / "keys" / f"{ident.key_id}.key", 0o644)
    with pytest.raises(InsecureKeyStore):
        await make(root).open()


async def test_a_swapped_or_damaged_key_file_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "ks"
    iatp = make(root)
    a = await iatp.register_agent("alice")
    b = await iatp.register_agent("bob")
    key_a = root / "keys" / f"{a.key_id}.key"
    key_b = root / "keys" / f"{b.key_id}.key"
    content_a, content_b = key_a.read_bytes(), key_b.read_bytes()
    key_a.write_bytes(content_b)
    with pytest.raises(KeyStoreCorrupt):
        await make(root).open()
    doc = json.loads(content_a)
    doc["ciphertext"] = doc["ciphertext"][:-4] + "AAAA"
    key_a.write_text(json.dumps(doc))
    key_b.write_bytes(content_b)
    with pytest.raises(KeyStoreCorrupt):
        await make(root).open()


async def test_a_tampered_trust_file_is_refused(tmp_path: Path) -> None:
    from agent_os.iatp import TrustError

    root = tmp_path / "ks"
    iatp = make(root)
    await iatp.register_agent("alice")
    await iatp.register_agent("bob")
    await iatp.establish_trust("bob", "alice", 0.2)
    trust = root / "trust.json"
    docs = json.loads(trust.read_text())
    docs[0]["trust_level"] = 1.0
    trust.write_text(json.dumps(docs))
    with pytest.raises(TrustError):
        await make(root).open()


def test_atomic_write_leaves_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.json"
    filestore_module.atomic_write(target, b"old")
    assert mode(target) == 0o600

    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr("agent_os.iatp.filestore.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        filestore_module.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary file left


async def test_rotation_and_revocation_persist(tmp_path: Path) -> None:
    root = tmp_path / "ks"
    iatp = make(root)
    await iatp.register_agent("alice")
    old = await iatp.sign("alice", "before")
    await iatp.rotate_key("alice", grace=0)
    assert old.sig is not None
    assert not (root / "keys" / f"{old.sig.key_id}.key").exists()  # old private key deleted
    new = await iatp.sign("alice", "after")
    assert new.sig is not None
    await iatp.revoke_key(new.sig.key_id, reason="lost laptop")
    again = make(root)
    assert (await again.verify(old)).reason == Reason.RETIRED_KEY
    result = await again.verify(new)
    assert result.reason == Reason.REVOKED_KEY
    assert result.detail == "lost laptop"
