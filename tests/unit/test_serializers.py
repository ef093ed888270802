from __future__ import annotations

import base64
import contextlib
import json
import time

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_os.amb import (
    Envelope,
    EnvelopeError,
    JsonSerializer,
    MalformedEnvelope,
    MsgpackSerializer,
    OversizedEnvelope,
    Serializer,
    Signature,
    TruncatedEnvelope,
    UnserializablePayload,
    UnsupportedVersion,
    decode,
    get_serializer,
    new_id,
)
from agent_os.amb.errors import ConfigError

SERIALIZERS: list[Serializer] = [MsgpackSerializer(), JsonSerializer()]


def full_envelope() -> Envelope:
    return Envelope(
        id=new_id(),
        topic="tasks.process",
        sender="coordinator",
        payload={"task_id": "task_123", "blob": b"\x00\x01", "n": [1, 2.5, None]},
        recipient="worker-1",
        reply_to="_INBOX.abc.1",
        correlation_id="corr-1",
        timestamp=time.time_ns(),
        expires_at=time.time_ns() + 10**9,
        priority=7,
        headers={"traceparent": "00-abc-def-01", "content-type": "application/json"},
        sig=Signature("ed25519", "key-1", b"n" * 16, b"s" * 64),
    )


@pytest.mark.parametrize("ser", SERIALIZERS, ids=lambda s: s.name)
def test_roundtrip_keeps_every_field(ser: MsgpackSerializer | JsonSerializer) -> None:
    env = full_envelope()
    assert ser.decode(ser.encode(env)) == env
    assert decode(ser.encode(env)) == env


@pytest.mark.parametrize("ser", SERIALIZERS, ids=lambda s: s.name)
def test_minimal_envelope_roundtrip(ser: MsgpackSerializer | JsonSerializer) -> None:
    env = Envelope(id="1", topic="a", sender="")
    assert ser.decode(ser.encode(env)) == env


def test_ids_are_unique_and_sortable() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 32 for i in ids)


@pytest.mark.parametrize("ser", SERIALIZERS, ids=lambda s: s.name)
def test_truncated_bytes_raise_truncated(ser: MsgpackSerializer | JsonSerializer) -> None:
    data = ser.encode(full_envelope())
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(TruncatedEnvelope):
            ser.decode(data[:cut])


def test_empty_bytes_are_truncated() -> None:
    with pytest.raises(TruncatedEnvelope):
        decode(b"")


@pytest.mark.parametrize("ser", SERIALIZERS, ids=lambda s: s.name)
def test_oversized_rejected_both_ways(ser: MsgpackSerializer | JsonSerializer) -> None:
    small = type(ser)(max_bytes=200)
    env = full_envelope()
    env.payload = b"x" * 500
    with pytest.raises(OversizedEnvelope) as info:
        small.encode(env)
    assert info.value.limit == 200
    with pytest.raises(OversizedEnvelope):
        small.decode(ser.encode(env))


def test_wrong_version_is_unsupported() -> None:
    fields = msgpack.unpackb(MsgpackSerializer().encode(full_envelope()), raw=False)
    fields[0] = 2
    with pytest.raises(UnsupportedVersion) as info:
        decode(msgpack.packb(fields, use_bin_type=True))
    assert info.value.version == 2
    obj = json.loads(JsonSerializer().encode(full_envelope()))
    obj["v"] = 3
    with pytest.raises(UnsupportedVersion):
        decode(json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("index", "value", "words"),
    [
        (1, 5, "id"),
        (1, "", "id"),
        (2, None, "topic"),
        (3, 1, "sender"),
        (4, 1, "recipient"),
        (7, "now", "timestamp"),
        (8, 1.5, "expires_at"),
        (9, "high", "priority"),
        (10, {"a": 1}, "headers"),
        (10, [], "headers"),
        (12, ["ed25519", "k", "nonce-not-bytes", b"s"], "sig"),
        (12, ["ed25519", "k"], "sig"),
    ],
)
def test_wrong_field_types_name_the_field(index: int, value: object, words: str) -> None:
    fields = msgpack.unpackb(MsgpackSerializer().encode(full_envelope()), raw=False)
    fields[index] = value
    with pytest.raises(MalformedEnvelope, match=words):
        decode(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        msgpack.packb({"v": 1}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb("text"),
        msgpack.packb({1: 2}),
        b'{"v":1,"id":"x","topic":"t","sender":"s","timestamp":1,"extra":1}',
        b'{"v":1,"id":"x","topic":"t"}',
        b"[1,2,3]",
        b'{"v":1,"id":"x","topic":"t","sender":"s","timestamp":1,"payload":{"$b64":"***"}}',
        b'{"v":1, "id":"x",}',
        b"\xff\xfe{}",
        '{"v":1,"id":"\u00e9"'.encode("latin-1"),
    ],
)
def test_malformed_bytes_raise_envelope_errors(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(data)


def test_trailing_bytes_are_malformed() -> None:
    with pytest.raises(MalformedEnvelope):
        decode(MsgpackSerializer().encode(full_envelope()) + b"\x00")


def test_unserializable_payload() -> None:
    env = full_envelope()
    env.payload = {"when": object()}
    for ser in SERIALIZERS:
        with pytest.raises(UnserializablePayload):
            ser.encode(env)


def test_json_bytes_anywhere_in_payload() -> None:
    env = Envelope(id="1", topic="t", sender="s", payload={"a": [b"\x00", {"b": b"\xff"}]})
    assert JsonSerializer().decode(JsonSerializer().encode(env)).payload == env.payload


@pytest.mark.parametrize(
    "payload",
    [float("nan"), float("inf"), 2**64, -(2**63) - 1, {1: "x"}, {"s": {1, 2}}, "\ud800", None],
    ids=["nan", "inf", "2**64", "below -2**63", "an int key", "a set", "a lone surrogate", "none"],
)
def test_json_refuses_what_it_cannot_carry_exactly(payload: object) -> None:
    env = Envelope(id="i", topic="t", sender="s", payload=payload, timestamp=1)
    if payload is None:
        assert JsonSerializer().decode(JsonSerializer().encode(env)) == env
        return
    with pytest.raises(UnserializablePayload):
        JsonSerializer().encode(env)


def test_json_refuses_payloads_nested_deeper_than_msgpack_goes() -> None:
    deep: object = 1
    for _ in range(600):
        deep = [deep]
    with pytest.raises(UnserializablePayload, match="nested too deeply"):
        JsonSerializer().encode(Envelope(id="i", topic="t", sender="s", payload=deep, timestamp=1))


json_texts = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["$b64", "$$x", "\\u00e9"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(payload=json_texts, spacing=st.sampled_from([(",", ":"), (", ", ": ")]), ascii_only=st.booleans())
def test_the_fast_json_decode_agrees_with_the_checked_one(
    payload: object, spacing: tuple[str, str], ascii_only: bool
) -> None:
    # JsonSerializer.decode takes msgspec's reading only when it is exactly what the checked
    # path (the standard library with every check) would give; otherwise it defers to it.
    head = '{"v":1,"id":"a1","topic":"tasks.t","sender":"s","timestamp":1700000000000000000,"payload":'
    try:
        text = json.dumps(payload, separators=spacing, ensure_ascii=ascii_only)
    except ValueError:
        return
    data = (head + text + "}").encode("utf-8", "surrogatepass")
    ser = JsonSerializer()
    try:
        expected: object = ser.decode_checked(data)
    except EnvelopeError as exc:
        expected = type(exc)
    try:
        got: object = ser.decode(data)
    except EnvelopeError as exc:
        got = type(exc)
    assert got == expected


def test_json_envelopes_this_encoder_writes_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    ser = JsonSerializer()
    data = ser.encode(
        Envelope(id="i", topic="t", sender="s", payload={"a": [1, 2.5, "é"]}, timestamp=time.time_ns())
    )

    def refuse(_: bytes) -> Envelope:
        raise AssertionError("deferred to the checked path")

    monkeypatch.setattr(ser, "decode_checked", refuse)
    assert ser.decode(data).payload == {"a": [1, 2.5, "é"]}
    full = full_envelope()  # every field written
    full.payload = {"task_id": "task_123", "n": [1, 2.5, None]}  # bytes would go the checked way
    assert ser.decode(ser.encode(full)) == full


_WIRE_ORDER = ["v", "id", "topic", "sender", "recipient", "reply_to", "correlation_id", "timestamp"]
_WIRE_ORDER += ["expires_at", "priority", "headers", "payload", "sig"]


def test_json_envelopes_leave_out_the_fields_at_their_defaults() -> None:
    # Absent optional fields, priority 0 and empty headers are not written (a third less to
    # send for a short message); what is written keeps the wire order.
    ser = JsonSerializer()
    bare = Envelope(id="i", topic="t", sender="s", payload=None, timestamp=5)
    assert list(json.loads(ser.encode(bare))) == ["v", "id", "topic", "sender", "timestamp", "payload"]
    assert list(json.loads(ser.encode(full_envelope()))) == _WIRE_ORDER


def test_json_envelopes_with_every_field_written_decode_alike() -> None:
    # Another producer (or an earlier version of this one) may write every field, null and
    # defaults included: the same envelope.
    ser = JsonSerializer()
    env = Envelope(id="i", topic="t", sender="s", payload={"k": [1]}, timestamp=5)
    values = [1, "i", "t", "s", None, None, None, 5, None, 0, {}, {"k": [1]}, None]
    spelled = dict(zip(_WIRE_ORDER, values, strict=True))
    assert ser.decode(json.dumps(spelled, separators=(",", ":")).encode()) == env
    assert ser.decode(ser.encode(env)) == env


def test_json_envelopes_with_every_field_written_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The spelling of producers that write every field (this encoder before 2026-12) is read as
    # fast as the compact one: msgspec's reading is compared with both.
    ser = JsonSerializer()

    def refuse(_: bytes) -> Envelope:
        raise AssertionError("deferred to the checked path")

    monkeypatch.setattr(ser, "decode_checked", refuse)
    values = [1, "i", "t", "s", None, "_INBOX.a.1", None, 5, None, 0, {}, "text", None]
    spelled = dict(zip(_WIRE_ORDER, values, strict=True))
    env = Envelope(id="i", topic="t", sender="s", payload="text", reply_to="_INBOX.a.1", timestamp=5)
    assert ser.decode(json.dumps(spelled, separators=(",", ":")).encode()) == env


def test_unknown_serializer() -> None:
    with pytest.raises(ConfigError, match="protobuf"):
        get_serializer("protobuf")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_envelope_errors(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_envelopes_decode_or_raise_envelope_errors(data: st.DataObject) -> None:
    encoded = bytearray(MsgpackSerializer().encode(full_envelope()))
    for _ in range(data.draw(st.integers(1, 5))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] = data.draw(st.integers(0, 255))
    try:
        env = decode(bytes(encoded))
    except EnvelopeError:
        return
    assert isinstance(env.id, str)
    assert isinstance(env.headers, dict)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(payload=json_values, headers=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4))
def test_any_payload_roundtrips_in_both_formats(payload: object, headers: dict[str, str]) -> None:
    if isinstance(payload, dict) and list(payload) == ["$b64"]:
        return  # the one shape JSON reserves
    env = Envelope(id="i", topic="t", sender="s", payload=payload, headers=headers, timestamp=1)
    for ser in SERIALIZERS:
        assert ser.decode(ser.encode(env)) == env


# -- the fast paths: the same results as the plain ones -------------------------------------


def test_ids_keep_their_format_across_the_cached_prefix() -> None:
    from agent_os.amb.envelope import new_id_at

    now = time.time_ns()
    ids = [new_id_at(now) for _ in range(1_000)]  # crosses several 256-id prefix boundaries
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert len(i) == 32
        int(i, 16)  # hex only
        assert i[:12] == f"{now // 1_000_000:012x}"
    assert len({i[12:20] for i in ids}) == 1  # one node per process
    counters = [int(i[20:], 16) for i in ids]
    assert counters == list(range(counters[0], counters[0] + len(ids)))
    later = new_id_at(now + 5_000_000)
    assert later[:12] == f"{now // 1_000_000 + 5:012x}"
    assert later > ids[-1]


def test_an_id_spells_its_millisecond_node_and_counter_at_fixed_widths() -> None:
    import itertools
    import random

    from agent_os.amb.envelope import _IdSource

    rng = random.Random(18)
    source = _IdSource()
    # Edges (zero, all ones, past each field's width: masked, as documented) and random values.
    cases = [(0, 0, 0), (2**48 - 1, 2**32 - 1, 2**48 - 1), (2**48 + 5, 7, 2**48 + 3), (-1, 1, 1)]
    cases += [(rng.getrandbits(50), rng.getrandbits(32), rng.getrandbits(50)) for _ in range(2_000)]
    for ms, node, counter in cases:
        source._node, source._counter = node, itertools.count(counter)
        got = source.at(ms * 1_000_000 + 999_999)
        assert got == f"{ms & (2**48 - 1):012x}{node:08x}{counter & (2**48 - 1):012x}", (ms, node, counter)


def test_new_envelope_sets_every_field_like_the_constructor() -> None:
    import dataclasses

    from agent_os.amb.envelope import new_envelope

    assert [f.name for f in dataclasses.fields(Envelope)] == [
        "id",
        "topic",
        "sender",
        "payload",
        "recipient",
        "reply_to",
        "correlation_id",
        "timestamp",
        "expires_at",
        "priority",
        "headers",
        "sig",
        "v",
    ], "new_envelope and envelope_from_wire set these fields: update them with the dataclass"
    env = full_envelope()
    values = [getattr(env, f.name) for f in dataclasses.fields(Envelope)][:-1]
    assert new_envelope(*values) == env


def test_wire_fields_and_envelopes_convert_both_ways() -> None:
    from agent_os.amb.serializers.decoder import Decoder
    from agent_os.amb.serializers.schema import envelope_from_wire, wire_of

    env = full_envelope()
    fields = Decoder().decode_fields(MsgpackSerializer().encode(env))
    assert envelope_from_wire(fields) == env
    assert wire_of(env) == fields
    assert Decoder().decode_fields(JsonSerializer().encode(env)) == fields


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary()


@settings(max_examples=300, deadline=None)
@given(payload=scalars, priority=st.integers(-(2**63), 2**63 - 1), ts=st.integers(0, 2**64 - 1))
def test_the_scalar_payload_encoder_writes_msgpacks_bytes(payload: object, priority: int, ts: int) -> None:
    env = Envelope(id="i", topic="t", sender="s", payload=payload, timestamp=ts, priority=priority)
    fields = [1, "i", "t", "s", None, None, None, ts, None, priority, {}, payload, None]
    data = MsgpackSerializer().encode(env)
    assert data == msgpack.packb(fields, use_bin_type=True)
    assert data == MsgpackSerializer().encode_new(
        "i", "t", "s", payload, None, None, None, ts, None, priority, {}
    )


def test_values_msgpack_refuses_are_refused_whatever_the_payload_type() -> None:
    ser = MsgpackSerializer()
    refused: list[object] = [{1, 2}, {"when": object()}, [frozenset()], 2**64]
    for payload in refused:
        with pytest.raises(UnserializablePayload):
            ser.encode(Envelope(id="i", topic="t", sender="s", payload=payload))
        with pytest.raises(UnserializablePayload):
            ser.encode_new("i", "t", "s", payload, None, None, None, 1, None, 0, {})


field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.text(max_size=2) | st.binary(max_size=2), max_size=4),
    st.dictionaries(st.text(max_size=2), st.text(max_size=2) | st.integers(-5, 5), max_size=2),
)


@settings(max_examples=600, deadline=None)
@given(index=st.integers(0, 12).filter(lambda i: i != 11), value=field_values)
def test_the_typed_decoder_and_the_checked_one_accept_the_same_fields(index: int, value: object) -> None:
    from agent_os.amb.serializers.msgpack_format import decode_msgpack_checked
    from agent_os.amb.serializers.schema import check_subjects, typed_unpack

    fields = msgpack.unpackb(MsgpackSerializer().encode(full_envelope()), raw=False)
    fields[index] = value
    data = msgpack.packb(fields, use_bin_type=True)
    try:
        typed = typed_unpack(data)
        check_subjects(typed[2], typed[5])  # what the typed path checks after msgspec
        typed_ok = True
    except Exception:
        typed_ok = False
    try:
        decode_msgpack_checked(data)
        checked_ok = True
    except EnvelopeError:
        checked_ok = False
    assert typed_ok == checked_ok
    try:  # either way the decoder's answer is an envelope or an EnvelopeError
        env = decode(data)
    except EnvelopeError:
        assert not checked_ok
    else:
        assert checked_ok
        assert isinstance(env.id, str)


def test_payload_maps_with_non_string_keys_decode() -> None:
    env = Envelope(id="i", topic="t", sender="s", payload={1: "a", "b": [2]}, timestamp=1)
    assert decode(MsgpackSerializer().encode(env)) == env


# -- the JSON decode's fast path against its checked reference, whole envelopes --------------

_key = st.text(max_size=3)
_B64_TEXTS = st.sampled_from(["bm9uY2U=", "", "QR==", "QQ", "QQ==", "a-_b", "!!!!", "AAAA\n", "AA=A"])
_scalar_json = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.sampled_from(["", "tasks.t", "a b", "$x", "\ud800", "_INBOX.x.1", "é"]),
)
_any_json = st.recursive(
    _scalar_json,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(_key | _key | _key | st.sampled_from(["$b64", "$$b64", "$x"]), children, max_size=3)
    ),
    max_leaves=8,
)
_sig_json = st.one_of(
    st.none(),
    _any_json,
    st.fixed_dictionaries(
        {
            "scheme": st.text(max_size=3),
            "key_id": st.text(max_size=3),
            "nonce": _B64_TEXTS,
            "value": _B64_TEXTS,
        }
    ),
)
_b64_of = st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode())
# Per field: what a valid envelope may hold, and what it may not (or not always: a mix).
_ENVELOPE_FIELDS: dict[str, tuple[st.SearchStrategy[object], st.SearchStrategy[object]]] = {
    "v": (st.just(1), st.sampled_from([2, 1.0, "1", None, 2**64, True])),
    "id": (st.text(min_size=1, max_size=4), _scalar_json),
    "topic": (
        st.sampled_from(["tasks.t", "a.b.c", "x"]),
        st.sampled_from(["", "a..b", "a b", "t.>"]) | _scalar_json,
    ),
    "sender": (st.text(max_size=4), _scalar_json),
    "recipient": (st.none() | st.text(max_size=4), _scalar_json),
    "reply_to": (
        st.sampled_from([None, "", "_INBOX.x.1"]),
        st.sampled_from(["bad subject", "a."]) | _scalar_json,
    ),
    "correlation_id": (st.none() | st.text(max_size=4), _scalar_json),
    "timestamp": (st.integers(-(2**63), 2**64 - 1), st.sampled_from([2**64, -(2**63) - 1]) | _scalar_json),
    "expires_at": (st.none() | st.integers(-(2**63), 2**64 - 1), st.integers(-(2**65), 2**65) | _scalar_json),
    "priority": (st.integers(-(2**63), 2**64 - 1), st.integers(-(2**65), 2**65) | _scalar_json),
    "headers": (
        st.dictionaries(_key | _key | _key | st.sampled_from(["$h", "$$h"]), st.text(max_size=3), max_size=3),
        st.dictionaries(st.text(max_size=3), _scalar_json, min_size=1, max_size=2) | _any_json,
    ),
    "payload": (_any_json, _any_json),
    "sig": (
        st.none()
        | st.tuples(st.text(max_size=3), st.text(max_size=3), _b64_of, _b64_of).map(
            lambda sig: dict(zip(("scheme", "key_id", "nonce", "value"), sig, strict=True))
        ),
        _sig_json,
    ),
}


def _at_default(name: str, value: object) -> bool:
    """True for a field the JSON encoder leaves out: an optional one that is null, priority 0,
    empty headers."""
    if name in ("recipient", "reply_to", "correlation_id", "expires_at", "sig"):
        return value is None
    return (name == "priority" and type(value) is int and value == 0) or (name == "headers" and value == {})


def _outcome(decode_fields: object, data: bytes) -> object:
    """What a decode gives, comparable across paths: the fields' repr (types matter: 1 is not
    1.0 nor True) or the error's class and text."""
    assert callable(decode_fields)
    try:
        return repr(decode_fields(data))
    except EnvelopeError as exc:
        return (type(exc).__name__, str(exc))


def _reference(data: bytes) -> object:
    from agent_os.amb.serializers.schema import wire_of

    return _outcome(lambda d: wire_of(JsonSerializer().decode_checked(d)), data)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_the_json_fast_path_agrees_with_the_checked_one_on_whole_envelopes(data: st.DataObject) -> None:
    # Every field valid or not (wrong types, empty, invalid subjects, integers past 64 bits,
    # lone surrogates, "$" keys, base64 that is not canonical), fields left out, repeated or
    # unknown, in any order, spelled with any spacing and escaping: JsonSerializer.decode_fields
    # (msgspec, deferring to the checked path when in doubt) and the Decoder (which sends "{"
    # input straight to it) give what decode_checked gives, accepted or refused.
    from agent_os.amb.serializers.decoder import Decoder

    names = list(_ENVELOPE_FIELDS)  # the encoder's order, which the fast path needs
    if data.draw(st.integers(0, 3)) == 0:
        names = data.draw(st.permutations(names))
    dropped = (
        data.draw(st.sets(st.sampled_from(names), max_size=2)) if data.draw(st.integers(0, 5)) == 0 else set()
    )
    pairs = [
        (name, data.draw(_ENVELOPE_FIELDS[name][data.draw(st.integers(0, 29)) == 0], label=name))
        for name in names
        if name not in dropped
    ]
    if data.draw(st.integers(0, 2)) == 0:  # as the encoder writes: the fields at their defaults left out
        pairs = [(name, value) for name, value in pairs if not _at_default(name, value)]
    if data.draw(st.integers(0, 3)) == 0:  # a repeated or an unknown key
        name = data.draw(st.sampled_from([*names, "extra"]))
        pairs.insert(data.draw(st.integers(0, len(pairs))), (name, data.draw(_scalar_json)))
    style = data.draw(st.sampled_from(["msgspec", "msgspec", "json", "json ascii", "json spaced"]))
    sep = (", ", ": ") if style == "json spaced" else (",", ":")
    ascii_only = style == "json ascii"

    def spell(value: object) -> bytes:
        if style == "msgspec":  # the spelling the encoder writes
            with contextlib.suppress(msgspec.EncodeError, UnicodeEncodeError):
                return msgspec.json.encode(value)
        return json.dumps(value, separators=sep, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    raw = b"{" + sep[0].encode().join(spell(k) + sep[1].encode() + spell(v) for k, v in pairs) + b"}"
    expected = _reference(raw)
    assert _outcome(JsonSerializer().decode_fields, raw) == expected
    assert _outcome(Decoder().decode_fields, raw) == expected


@settings(max_examples=800, deadline=None)
@given(st.data())
def test_the_json_fast_path_agrees_with_the_checked_one_on_mutated_envelopes(data: st.DataObject) -> None:
    # Bytes of envelopes this encoder writes (the fast path's own input), changed at random:
    # both paths accept the same ones with the same fields and refuse the rest alike.
    bare = Envelope(id="i", topic="t.u", sender="s", timestamp=9)  # the fields at defaults left out
    env = full_envelope() if data.draw(st.booleans()) else bare
    env.payload = data.draw(st.sampled_from([env.payload, "x" * 40, 7, None, [1, "a"]]))
    encoded = bytearray(JsonSerializer().encode(env))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] = data.draw(st.sampled_from(b'"{}[],:\\$0129.e-nu x\xc3\xa9\xff') | st.integers(0, 255))
    raw = bytes(encoded)
    assert _outcome(JsonSerializer().decode_fields, raw) == _reference(raw)
