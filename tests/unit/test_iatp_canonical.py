"""The signed bytes: canonical, domain-separated, and any change to a covered field breaks them."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import gc
import pickle
import weakref
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_os.amb import Envelope, JsonSerializer, MsgpackSerializer, Signature, new_id
from agent_os.iatp import IATP, UNSIGNED_HEADERS, envelope_bytes, key_id_for
from agent_os.iatp.canonical import ENVELOPE_DOMAIN, SESSION_DOMAIN, payload_digest
from tests.support.envelopes import MUTATIONS, make_env, payloads, texts

SIGNED_STR_FIELDS = ("id", "topic", "sender", "recipient", "reply_to", "correlation_id")


def canon(env: Envelope) -> bytes:
    return envelope_bytes(env, "ed25519", "k" * 32, b"n" * 16)


def test_bytes_start_with_the_domain_and_differ_between_domains() -> None:
    env = make_env()
    assert ENVELOPE_DOMAIN.encode() in canon(env)[:32]
    assert envelope_bytes(env, "x", "k", b"n") != envelope_bytes(env, "x", "k", b"n", SESSION_DOMAIN)


def test_encoding_is_deterministic_and_ignores_header_order() -> None:
    a = make_env(headers={"a": "1", "b": "2"})
    b = dataclasses.replace(a, headers={"b": "2", "a": "1"})
    assert canon(a) == canon(b)


def test_trace_headers_are_not_signed_but_every_other_header_is() -> None:
    env = make_env()
    before = canon(env)
    for name in UNSIGNED_HEADERS:
        env.headers[name] = "00-abc"
    assert canon(env) == before
    env.headers["x-tenant"] = "t1"
    assert canon(env) != before


def test_signature_block_is_not_part_of_the_signed_bytes() -> None:
    env = make_env()
    before = canon(env)
    env.sig = Signature("ed25519", "k", b"n", b"v")
    assert canon(env) == before


@given(st.sampled_from(range(len(SIGNED_STR_FIELDS) - 1)), st.text(min_size=2, max_size=20), st.data())
def test_shifting_characters_between_adjacent_fields_changes_the_bytes(
    index: int, text: str, data: st.DataObject
) -> None:
    left, right = SIGNED_STR_FIELDS[index], SIGNED_STR_FIELDS[index + 1]
    cut_a = data.draw(st.integers(0, len(text)))
    cut_b = data.draw(st.integers(0, len(text)).filter(lambda c: c != cut_a))
    env_a = make_env(**{left: text[:cut_a], right: text[cut_a:]})
    shift: dict[str, Any] = {left: text[:cut_b], right: text[cut_b:]}  # fields named at run time
    env_b = dataclasses.replace(env_a, **shift)
    assert canon(env_a) != canon(env_b)


@given(st.text(min_size=1, max_size=10), st.text(max_size=10), st.text(max_size=10))
def test_shifting_between_header_name_and_value_changes_the_bytes(name: str, value: str, extra: str) -> None:
    a = make_env(headers={name + extra: value})
    b = make_env(headers={name: extra + value}, id=a.id, timestamp=a.timestamp)
    if extra:
        assert canon(a) != canon(b)
    else:
        assert canon(a) == canon(b)


@given(payloads, payloads)
def test_payload_digest_tells_different_payloads_apart(a: Any, b: Any) -> None:
    if payload_digest(a) == payload_digest(b):
        # equal digests only for values msgpack encodes identically (e.g. a tuple and a list)
        import msgpack

        assert msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True)


def test_payload_types_are_not_confused() -> None:
    assert payload_digest(b"1") != payload_digest("1")
    assert payload_digest(1) != payload_digest(1.0)
    assert payload_digest(True) != payload_digest(1)
    assert payload_digest({"a": 1, "b": 2}) != payload_digest({"b": 2, "a": 1})  # map order is signed


def _reference_bytes(
    env: Envelope, domain: str, scheme: str, key_id: str, nonce: bytes, digest: bool
) -> bytes:
    """The documented format, built the plain way: one ``packb`` of the whole 16-element list."""
    import hashlib

    import msgpack

    headers = sorted((k, v) for k, v in env.headers.items() if k not in UNSIGNED_HEADERS)
    payload: Any = env.payload
    if digest:
        packed = msgpack.packb(payload, use_bin_type=True)
        payload = hashlib.blake2b(packed, digest_size=32, person=b"iatp-payload-v1").digest()
    fields = [
        domain, scheme, key_id, nonce, env.v, env.id, env.topic, env.sender, env.recipient,
        env.reply_to, env.correlation_id, env.timestamp, env.expires_at, env.priority, headers, payload,
    ]  # fmt: skip
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


@settings(max_examples=200, deadline=None)
@given(
    payloads,
    st.dictionaries(st.sampled_from(["a", "b", "traceparent", "x-tenant", "ü"]), texts, max_size=4),
    st.none() | texts,
    st.none() | st.integers(0, 2**63 - 1),
    st.integers(-(2**31), 2**31),
    st.binary(max_size=40),
    texts,
)
def test_the_fast_encoding_is_the_documented_list(
    payload: Any,
    headers: dict[str, str],
    reply_to: str | None,
    expires_at: int | None,
    priority: int,
    nonce: bytes,
    key_id: str,
) -> None:
    """The hot path packs a constant head once and one 13-tuple per message; the result must be
    byte for byte one ``packb`` of the documented 16-element list (envelope and session forms)."""
    from agent_os.iatp.canonical import session_bytes

    env = make_env(
        payload=payload, headers=headers, reply_to=reply_to, expires_at=expires_at, priority=priority
    )
    for domain in (ENVELOPE_DOMAIN, SESSION_DOMAIN):
        assert envelope_bytes(env, "ed25519", key_id, nonce, domain) == _reference_bytes(
            env, domain, "ed25519", key_id, nonce, True
        )
    assert session_bytes(env, "iatp-session-v1", key_id, nonce) == _reference_bytes(
        env, SESSION_DOMAIN, "iatp-session-v1", key_id, nonce, False
    )


def test_key_id_is_a_fingerprint_of_the_public_key() -> None:
    assert key_id_for(b"\x01" * 32) != key_id_for(b"\x02" * 32)
    assert len(key_id_for(b"\x01" * 32)) == 32


# -- tampering with a really signed envelope ----------------------------------------------------

_iatp = IATP(max_nonces=100_000)
asyncio.run(_iatp.register_agent("alice"))
asyncio.run(_iatp.register_agent("bob"))


def _signed(**fields: Any) -> Envelope:
    env = make_env(**fields)
    _iatp.sign_envelope(env)
    return env


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(sorted(MUTATIONS)), st.data())
def test_any_change_to_a_signed_field_fails_verification(field: str, data: st.DataObject) -> None:
    env = _signed()
    original = getattr(env, field)
    new = data.draw(MUTATIONS[field].filter(lambda v: v != original or type(v) is not type(original)))
    tampered = dataclasses.replace(env, **{field: new})
    result = _iatp.verify_envelope(tampered)
    assert not result.valid
    assert result.reason is not None


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["key_id", "nonce", "value", "scheme"]), st.binary(min_size=1, max_size=4), st.data())
def test_any_change_to_the_signature_block_fails(part: str, flip: bytes, data: st.DataObject) -> None:
    env = _signed()
    assert env.sig is not None
    sig = env.sig
    if part in ("nonce", "value"):
        raw = bytearray(getattr(sig, part))
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= flip[0] or 1
        change: dict[str, Any] = {part: bytes(raw)}  # the field is named at run time
    else:
        change = {part: getattr(sig, part) + "x"}
    new_sig = msgspec.structs.replace(sig, **change)
    assert not _iatp.verify_envelope(dataclasses.replace(env, sig=new_sig)).valid


@pytest.mark.parametrize("serializer", [MsgpackSerializer(), JsonSerializer()])
def test_signature_survives_both_wire_formats(serializer: Any) -> None:
    env = _signed(payload={"a": [1, 2.5, b"\x00bytes", None, True], "z": "text"})
    decoded = serializer.decode(serializer.encode(env))
    assert _iatp.verify_envelope(decoded).valid


@pytest.mark.parametrize(
    ("left", "right"), [("topic", "reply_to"), ("id", "topic"), ("recipient", "reply_to")]
)
def test_field_shift_attack_on_a_signed_envelope_fails(left: str, right: str) -> None:
    env = _signed(**{left: "abcd", right: "efgh"})
    shift: dict[str, Any] = {left: "abcde", right: "fgh"}  # fields named by the parameters
    shifted = dataclasses.replace(env, **shift)
    result = _iatp.verify_envelope(shifted)
    assert not result.valid
    assert result.reason == "bad_signature"


def test_a_signature_is_frozen_and_compared_by_its_fields() -> None:
    sig = Signature("ed25519", "k" * 32, b"n" * 16, b"v" * 64)
    assert sig == Signature("ed25519", "k" * 32, b"n" * 16, b"v" * 64)
    assert sig != Signature("ed25519", "k" * 32, b"n" * 16, b"w" * 64)
    assert hash(sig) == hash(Signature("ed25519", "k" * 32, b"n" * 16, b"v" * 64))
    assert (sig.scheme, sig.key_id, sig.nonce, sig.value) == ("ed25519", "k" * 32, b"n" * 16, b"v" * 64)
    with pytest.raises(AttributeError):
        sig.value = b"x"  # type: ignore[misc]
    assert copy.deepcopy(sig) == sig
    assert pickle.loads(pickle.dumps(sig)) == sig
    assert msgspec.structs.replace(sig, value=b"w" * 64).value == b"w" * 64
    assert repr(sig).startswith("Signature(scheme='ed25519', key_id=")


def test_a_cycle_through_a_signature_is_collected() -> None:
    """Signature's fields are not checked on construction, so one can hold a container that
    leads back to it: the garbage collector must see it (a Struct with gc=False would leak)."""

    class Payload:
        pass

    payload = Payload()
    alive = weakref.ref(payload)
    env = Envelope(new_id(), "a.b", "s", payload)
    env.sig = Signature("ed25519", "k", [env], b"")  # type: ignore[arg-type]
    del env, payload
    gc.collect()
    assert alive() is None


def test_ext_values_as_the_bus_decodes_them_are_signed_as_msgpack_ext() -> None:
    import msgpack

    from agent_os.iatp.canonical import pack

    decoded = msgspec.msgpack.decode(msgpack.packb({"x": msgpack.ExtType(5, b"abc")}))
    assert pack([decoded]) == msgpack.packb([{"x": msgpack.ExtType(5, b"abc")}], use_bin_type=True)
    with pytest.raises(TypeError):
        payload_digest(object())


# -- the helpers the tests exercise are the ones signing uses ----------------------------------


def test_the_signed_bytes_end_with_signed_headers_and_payload_digest() -> None:
    import msgpack

    from agent_os.iatp.canonical import session_bytes, signed_headers

    env = make_env(headers={"b": "2", "traceparent": "00-x", "a": "1"}, payload={"k": [1, b"2"]})
    fields = msgpack.unpackb(canon(env), raw=False)
    assert fields[-1] == payload_digest(env.payload)
    assert [tuple(pair) for pair in fields[-2]] == signed_headers(env.headers) == [("a", "1"), ("b", "2")]
    # the session form is the same list with the payload itself last: one definition for both
    session = msgpack.unpackb(session_bytes(env, "ed25519", "k" * 32, b"n" * 16), raw=False)
    assert session[0] == SESSION_DOMAIN
    assert session[1:-1] == fields[1:-1]
    assert session[-1] == env.payload


def test_signing_goes_through_the_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the signer computed the digest or the header list on its own, the helper tests above
    would test something signing does not use: replacing a helper must change what is signed."""
    from agent_os.iatp import canonical
    from agent_os.iatp.canonical import rest_bytes, session_rest_bytes

    env = make_env(headers={"a": "1"})
    before, session_before = rest_bytes(env, b"n" * 16), session_rest_bytes(env, b"n" * 16)
    monkeypatch.setattr(canonical, "payload_digest", lambda payload: b"\x00" * 32)
    assert rest_bytes(env, b"n" * 16) != before
    assert session_rest_bytes(env, b"n" * 16) == session_before  # a MAC covers the payload itself
    monkeypatch.setattr(canonical, "signed_headers", lambda headers: [("a", "2")])
    assert session_rest_bytes(env, b"n" * 16) != session_before
    calls: list[Any] = []
    real = canonical.signed_fields

    def recording(env: Envelope, nonce: bytes, last: Any) -> bytes:
        calls.append(last)
        return real(env, nonce, last)

    monkeypatch.setattr(canonical, "signed_fields", recording)
    rest_bytes(env, b"n" * 16)
    session_rest_bytes(env, b"n" * 16)
    assert calls == [b"\x00" * 32, env.payload]  # both forms are built by the one definition
