"""Hostile envelopes: numbers no format should carry (thousands of digits, beyond 64 bits,
NaN, infinities), and the rest of the decode-failure class (duplicate keys, lone surrogates,
deep nesting, invalid UTF-8, ext types, truncation). Every one ends in an EnvelopeError
subclass, so the bus dead-letters and counts it; a fuzzer shows nothing else escapes the decoder
(issue 14, class 8)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_os.amb import (
    AMB,
    Envelope,
    EnvelopeError,
    MsgpackSerializer,
    UnserializablePayload,
    decode,
    get_serializer,
)
from agent_os.amb.deadletter import DLQ_REASON
from agent_os.amb.serializers.decoder import Decoder
from agent_os.amb.serializers.json_format import JsonSerializer
from tests.support import Collector
from tests.support.cleanup import delete_nats_streams
from tests.support.closing import Closing
from tests.support.servers import NATS_URL

HEAD = '{"v":1,"id":"a1","topic":"tasks.t","sender":"mallory","timestamp":1'


def json_envelope(**raw_fields: str) -> bytes:
    """A JSON envelope whose fields after the head are given as raw JSON text."""
    tail = "".join(f',"{name}":{text}' for name, text in raw_fields.items())
    return (HEAD + tail + "}").encode()


# Every member of the class: a name and bytes that must be refused as an envelope.
HOSTILE: dict[str, bytes] = {
    "a 5,000-digit integer in the payload": json_envelope(payload="9" * 5000),
    "a 5,000-digit negative integer": json_envelope(payload="-" + "9" * 5000),
    "a 4,301-digit integer, just over Python's limit": json_envelope(payload="1" * 4301),
    "an integer of 2**64": json_envelope(payload=str(2**64)),
    "an integer below -2**63": json_envelope(payload=str(-(2**63) - 1)),
    "a huge timestamp": (HEAD.replace('"timestamp":1', '"timestamp":' + "7" * 5000) + "}").encode(),
    "a huge priority": json_envelope(priority=str(10**30)),
    "a huge integer deep in the payload": json_envelope(payload='{"a":[1,{"b":' + "5" * 4400 + "}]}"),
    "NaN": json_envelope(payload="NaN"),
    "Infinity": json_envelope(payload="Infinity"),
    "-Infinity": json_envelope(payload='{"x":-Infinity}'),
    "a float that overflows to infinity": json_envelope(payload="1e400"),
    "a negative float that overflows": json_envelope(payload="[-1.5e999]"),
    "a duplicate envelope field": json_envelope(topic='"tasks.other"'),
    "a duplicate payload key": json_envelope(payload='{"amount":1,"amount":100000}'),
    "keys that collide once unescaped": json_envelope(payload='{"$a":1,"a":2}'),
    "a lone high surrogate": json_envelope(payload='"\\ud800"'),
    "a lone low surrogate in a key": json_envelope(payload='{"\\udc00":1}'),
    "a lone surrogate in a header": json_envelope(headers='{"h":"x\\udbffy"}'),
    "JSON nested 100,000 deep": json_envelope(payload="[" * 100_000 + "]" * 100_000),
    "JSON objects nested 100,000 deep": json_envelope(payload='{"a":' * 100_000 + "1" + "}" * 100_000),
    "invalid UTF-8 in JSON": HEAD.encode() + b',"payload":"\xff\xfe"}',
    "a JSON envelope cut short": json_envelope(payload="[1,2")[:-1],
    "msgpack nested 100,000 deep": b"\x9d\x01\xa2a1\xa7tasks.t\xa1s\xc0\xc0\xc0\x01\xc0\x00\x80"
    + b"\x91" * 100_000
    + b"\xc0\xc0",
    "invalid UTF-8 in a msgpack string": msgpack.packb(
        [1, "a1", "tasks.t", "s", None, None, None, 1, None, 0, {}, "x", None], use_bin_type=True
    ).replace(b"\xa1x", b"\xa1\xff"),
    "a bad timestamp ext in the payload": msgpack.packb(
        [1, "a1", "tasks.t", "s", None, None, None, 1, None, 0, {}, "@PAYLOAD@", None], use_bin_type=True
    ).replace(b"\xa9@PAYLOAD@", b"\xc7\x05\xff" + b"\x00" * 5),  # ext -1 of 5 bytes: no timestamp
    "a timestamp ext past year 9999": msgpack.packb(
        [1, "a1", "tasks.t", "s", None, None, None, 1, None, 0, {}, "@PAYLOAD@", None], use_bin_type=True
    ).replace(b"\xa9@PAYLOAD@", b"\xc7\x0c\xff" + b"\x00" * 4 + b"\x7f" + b"\xff" * 7),
    "an ext type as a header": msgpack.packb(
        [1, "a1", "tasks.t", "s", None, None, None, 1, None, 0, {"h": msgpack.ExtType(5, b"x")}, 1, None],
        use_bin_type=True,
    ),
    "an ext type as the timestamp": msgpack.packb(
        [1, "a1", "tasks.t", "s", None, None, None, msgpack.ExtType(1, b"x"), None, 0, {}, 1, None],
        use_bin_type=True,
    ),
    "a msgpack array declaring 2**32-1 items": b"\xdd\xff\xff\xff\xff\x01",
    "a msgpack string declaring 2**32-1 bytes": b"\x9d\x01\xdb\xff\xff\xff\xff",
    "a non-string header key": msgpack.packb(
        [1, "a1", "tasks.t", "s", None, None, None, 1, None, 0, {1: "x"}, 1, None], use_bin_type=True
    ),
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=list(HOSTILE))
def test_every_hostile_envelope_is_an_envelope_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(data)
    with pytest.raises(EnvelopeError):
        Decoder().decode_fields(data)  # what the client's receive path does
    if data[:1] == b"{":
        with pytest.raises(EnvelopeError):
            JsonSerializer().decode(data)
    else:
        with pytest.raises(EnvelopeError):
            MsgpackSerializer().decode(data)


def test_numbers_within_64_bits_still_decode_and_forward_in_either_format() -> None:
    data = json_envelope(payload=f'[{2**64 - 1},{-(2**63)},1.5e300,-0.0,{{"$$b64":"x"}}]')
    env = decode(data)
    assert env.payload == [2**64 - 1, -(2**63), 1.5e300, -0.0, {"$b64": "x"}]
    assert decode(MsgpackSerializer().encode(env)).payload == env.payload
    assert decode(JsonSerializer().encode(env)).payload == env.payload


# -- the fuzzer ---------------------------------------------------------------------------------

FIELD_NAMES = ("v", "id", "topic", "sender", "recipient", "reply_to", "correlation_id", "timestamp",
               "expires_at", "priority", "headers", "payload", "sig", "extra")  # fmt: skip
hostile_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(4290, 6000).map(lambda n: "9" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1E309", "0e99999", "-0"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
hostile_strings = st.one_of(
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(['"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"', '"a\\u202eb"', '"\\uZZZZ"']),
)
json_fragments = st.recursive(
    st.one_of(hostile_numbers, hostile_strings, st.sampled_from(["true", "false", "null", "{}", "[]"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(hostile_strings, inner), max_size=4).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
        ),
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    ),
    max_leaves=12,
)


def only_envelope_errors(data: bytes) -> Envelope | None:
    """Decode ``data`` every way the bus does; fail on anything but an envelope or an
    EnvelopeError, and on a decoder that accepts what another refuses."""
    outcomes: list[Envelope | None] = []
    for decoder in (decode, Decoder().decode):
        try:
            outcomes.append(decoder(data))
        except EnvelopeError:
            outcomes.append(None)
    assert (outcomes[0] is None) == (outcomes[1] is None)
    return outcomes[0]


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELD_NAMES), json_fragments), max_size=4))
def test_fuzz_json_envelopes_with_hostile_values(fields: list[tuple[str, str]]) -> None:
    data = (HEAD + "".join(f',"{name}":{text}' for name, text in fields) + "}").encode()
    env = only_envelope_errors(data)
    if env is not None:  # what is accepted is forwarded in either format, or refused by name
        for serializer in (MsgpackSerializer(), JsonSerializer()):
            try:
                again = serializer.encode(env)
            except UnserializablePayload:  # nested deeper than the format's encoder goes
                continue
            assert decode(again).payload == env.payload


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.integers(0, 12), msgpack_values, msgpack_values)
def test_fuzz_msgpack_envelopes_with_hostile_values(index: int, value: Any, payload: Any) -> None:
    fields: list[Any] = [1, "a1", "tasks.t", "s", None, None, None, 1, None, 0, {}, payload, None]
    fields[index] = value
    only_envelope_errors(msgpack.packb(fields, use_bin_type=True))


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(data: bytes) -> None:
    only_envelope_errors(data)


@FUZZ
@given(st.sampled_from(["msgpack", "json"]), st.data())
def test_fuzz_mutated_valid_envelopes(fmt: str, data: st.DataObject) -> None:
    env = Envelope("a1", "tasks.t", "s", {"amount": 10, "items": [1.5, "x", b"\x00"]}, timestamp=1)
    raw = bytearray(get_serializer(fmt).encode(env))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif len(raw) > 1:
            del raw[at]
    only_envelope_errors(bytes(raw))


# -- on the real server -------------------------------------------------------------------------


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"h{uuid.uuid4().hex[:10]}"
    yield name
    await delete_nats_streams(name)


@pytest.mark.nats
@pytest.mark.parametrize("durable", [None, "numbers"], ids=["core", "jetstream-durable"])
async def test_on_nats_a_huge_integer_is_dead_lettered_counted_and_settled(
    prefix: str, durable: str | None, closing: Closing
) -> None:
    """The defect: a plain ValueError escaped the receive path: no dead letter, no count, and a
    durable consumer got it again and again. Now: one dead letter (``malformed``), counted,
    acked, and the subscription goes on."""
    client = closing(AMB("nats", NATS_URL, dead_letter_prefix=f"dlq{prefix}"))
    watcher = closing(AMB("nats", NATS_URL))
    raw = await nats.connect(NATS_URL)
    try:
        got, dead = Collector(), Collector()
        await watcher.subscribe(f"dlq{prefix}.>", dead)
        sub = await client.subscribe(f"{prefix}.>", got, durable=durable and f"{durable}{prefix}")
        for name in ("a 5,000-digit integer in the payload", "NaN", "a duplicate payload key"):
            await raw.publish(f"{prefix}.in", HOSTILE[name])
        await raw.flush()
        await dead.wait_for(3)
        assert {m.headers[DLQ_REASON] for m in dead.metadata} == {"malformed"}
        assert client.stats.malformed == 3
        await client.publish(f"{prefix}.in", "after")
        await got.wait_for(1)
        assert got.messages == ["after"]
        if durable is not None:  # every hostile message was acked: none waits for redelivery
            broker_sub: Any = sub._broker_sub
            info = await raw.jsm().consumer_info(broker_sub.stream, broker_sub.durable)
            assert info.num_ack_pending == 0
            assert info.num_redelivered == 0
    finally:
        await raw.close()
        await client.close()
        await watcher.close()
