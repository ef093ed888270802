"""Trust: signed edges, the three models, permissions, and trust levels in verification results."""

from __future__ import annotations

import dataclasses
import time

import pytest

from agent_os.iatp import IATP, TrustError, UnknownAgent

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now


async def agents(iatp: IATP, *names: str) -> None:
    for name in names:
        await iatp.register_agent(name)


async def test_web_direct_edge_path_decay_and_depth() -> None:
    iatp = IATP(trust_model="web")
    await agents(iatp, "a", "b", "c", "d", "e")
    await iatp.establish_trust("a", "b", 0.9, ["send_data"])
    await iatp.establish_trust("b", "c", 0.5)
    await iatp.establish_trust("c", "d", 1.0)
    await iatp.establish_trust("d", "e", 1.0)
    assert iatp.trust_level("b", viewer="a") == pytest.approx(0.9)
    assert iatp.trust_level("c", viewer="a") == pytest.approx(0.9 * 0.5 * 0.8)
    assert iatp.trust_level("d", viewer="a") == pytest.approx(0.9 * 0.5 * 1.0 * 0.8**2)
    assert iatp.trust_level("e", viewer="a") == 0.0  # beyond max_depth = 3
    assert iatp.trust_level("a", viewer="b") == 0.0  # edges are directed
    assert iatp.trust_level("a", viewer="a") == 1.0
    assert iatp.trust_level("b") == 0.0  # no viewer, no web trust


async def test_web_best_path_wins_and_changes_apply_at_once() -> None:
    iatp = IATP(trust_model="web")
    await agents(iatp, "a", "b", "c")
    await iatp.establish_trust("a", "b", 0.5)
    await iatp.establish_trust("b", "c", 0.5)
    assert iatp.trust_level("c", viewer="a") == pytest.approx(0.2)
    await iatp.establish_trust("a", "c", 0.6)
    assert iatp.trust_level("c", viewer="a") == pytest.approx(0.6)
    assert await iatp.revoke_trust("a", "c")
    assert iatp.trust_level("c", viewer="a") == pytest.approx(0.2)


async def test_verification_trust_comes_from_the_receivers_view() -> None:
    iatp = IATP(trust_model="web")
    await agents(iatp, "sender", "receiver", "other")
    await iatp.establish_trust("receiver", "sender", 0.75)
    to_receiver = await iatp.sign("sender", "x", recipient_id="receiver")
    assert (await iatp.verify(to_receiver)).trust_level == pytest.approx(0.75)
    to_other = await iatp.sign("sender", "x", recipient_id="other")
    assert (await iatp.verify(to_other)).trust_level == 0.0
    # a remote recipient is not a viewer a sender can choose
    remote = IATP()
    await remote.register_agent("sender")
    env = await iatp.sign("sender", "x", recipient_id="receiver")
    assert (await iatp.verify(env, viewer="other")).trust_level == 0.0


async def test_permissions_are_on_the_explicit_edge_only() -> None:
    iatp = IATP()
    await agents(iatp, "a", "b", "c")
    await iatp.establish_trust("a", "b", 0.9, ["send_data", "request_action"])
    await iatp.establish_trust("b", "c", 0.9, ["send_data"])
    assert iatp.permissions("a", "b") == {"send_data", "request_action"}
    assert iatp.permits("a", "b", "request_action")
    assert not iatp.permits("b", "a", "send_data")
    assert iatp.permissions("a", "c") == frozenset()  # not along paths


async def test_edges_are_signed_and_checked() -> None:
    iatp = IATP()
    await agents(iatp, "a", "b")
    edge = await iatp.establish_trust("a", "b", 0.4, ["send_data"])
    other = IATP()
    await other.add_identity(iatp.identity("a"))
    await other.add_identity(iatp.identity("b"))
    await other.add_trust_edge(edge.to_dict())
    assert other.trust_level("b", viewer="a") == pytest.approx(0.4)
    forged = dataclasses.replace(edge, trust_level=1.0)
    with pytest.raises(TrustError):
        await other.add_trust_edge(forged)
    widened = dataclasses.replace(edge, permissions=frozenset({"send_data", "admin"}))
    with pytest.raises(TrustError):
        await other.add_trust_edge(widened)


async def test_edge_checks_bad_levels_and_unknown_agents() -> None:
    iatp = IATP()
    await agents(iatp, "a", "b")
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(TrustError):
            await iatp.establish_trust("a", "b", bad)
    with pytest.raises(TrustError):
        await iatp.establish_trust("a", "b", 0.5, "send_data")
    with pytest.raises(UnknownAgent):
        await iatp.establish_trust("a", "nobody", 0.5)


async def test_expired_edges_and_edges_of_revoked_keys_stop_counting() -> None:
    clock = Clock()
    iatp = IATP(clock=clock)
    await agents(iatp, "a", "b", "c")
    await iatp.establish_trust("a", "b", 0.9, ["send_data"], expires_in=10)
    await iatp.establish_trust("a", "c", 0.9, ["send_data"])
    clock.now += 11 * S
    assert iatp.trust_level("b", viewer="a") == 0.0
    assert iatp.permissions("a", "b") == frozenset()
    await iatp.rotate_key("a")  # rotation keeps the edges signed by the old key
    assert iatp.trust_level("c", viewer="a") == pytest.approx(0.9)
    old_key = next(k for k in iatp.identity("a").keys if k.version == 1)
    await iatp.revoke_key(old_key.key_id)
    assert iatp.trust_level("c", viewer="a") == 0.0


async def test_hierarchical_endorsement_and_delegation() -> None:
    iatp = IATP(trust_model="hierarchical")
    await agents(iatp, "root", "org", "worker", "stranger", "deep")
    await iatp.add_root("root")
    await iatp.establish_trust("root", "org", 0.9, ["endorse"])
    await iatp.establish_trust("org", "worker", 0.8, ["send_data"])
    await iatp.establish_trust("stranger", "deep", 1.0, ["send_data"])
    assert iatp.trust_level("root") == 1.0
    assert iatp.trust_level("org") == pytest.approx(0.9)
    assert iatp.trust_level("worker") == pytest.approx(0.72)
    assert iatp.trust_level("stranger") == 0.0
    assert iatp.trust_level("deep") == 0.0  # endorsed only by an unendorsed agent
    assert iatp.permissions("org", "worker") == {"send_data"}
    assert iatp.permissions("stranger", "deep") == frozenset()  # grantee not trusted
    # without the endorse permission, an authority cannot pass trust on
    await iatp.establish_trust("root", "org", 0.9)
    assert iatp.trust_level("worker") == 0.0


async def test_pki_certificates_bind_the_key() -> None:
    iatp = IATP(trust_model="pki")
    await agents(iatp, "ca", "svc", "uncertified")
    await iatp.add_root("ca")
    cert = await iatp.issue_certificate("ca", "svc", 0.8, ["request_action"], valid_for=60)
    env = await iatp.sign("svc", "x")
    assert (await iatp.verify(env)).trust_level == pytest.approx(0.8)
    assert (await iatp.verify(await iatp.sign("uncertified", "x"))).trust_level == 0.0
    await iatp.rotate_key("svc")  # the new key has no certificate
    assert (await iatp.verify(await iatp.sign("svc", "y"))).trust_level == 0.0
    with pytest.raises(TrustError):
        await iatp.issue_certificate("svc", "uncertified", 0.5)  # not a root
    with pytest.raises(TrustError):
        await iatp.add_certificate(dataclasses.replace(cert, trust_level=1.0))


async def test_pki_certificate_validity_period_and_issuer_revocation() -> None:
    clock = Clock()
    iatp = IATP(trust_model="pki", clock=clock)
    await agents(iatp, "ca", "svc")
    await iatp.add_root("ca")
    await iatp.issue_certificate("ca", "svc", 0.8, valid_for=10)
    key = iatp.identity("svc").key_id
    assert iatp.trust_level("svc", key_id=key) == pytest.approx(0.8)
    clock.now += 10 * S
    assert iatp.trust_level("svc", key_id=key) == 0.0
    clock.now -= 10 * S
    await iatp.revoke_key(iatp.identity("ca").key_id)
    assert iatp.trust_level("svc", key_id=key) == 0.0
