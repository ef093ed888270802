"""Agent Message Bus: envelopes, serializers, the Broker protocol and the client agents use."""

from agent_os.amb.broker import (
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
    LifecycleState,
    available_brokers,
    load_broker,
)
from agent_os.amb.client import AMB
from agent_os.amb.envelope import WIRE_VERSION, Envelope, Signature, new_id
from agent_os.amb.errors import (
    BrokerUnavailable,
    BusError,
    CapabilityNotSupported,
    ConfigError,
    EnvelopeError,
    InvalidSubject,
    MalformedEnvelope,
    MessageRejected,
    OversizedEnvelope,
    RemoteError,
    RequestTimeout,
    StateError,
    TransportError,
    TruncatedEnvelope,
    UnserializablePayload,
    UnsupportedVersion,
)
from agent_os.amb.metadata import Metadata
from agent_os.amb.middleware import ConsumeNext, Middleware, PublishNext
from agent_os.amb.serializers import Serializer, get_serializer
from agent_os.amb.serializers.decoder import decode
from agent_os.amb.serializers.json_format import JsonSerializer
from agent_os.amb.serializers.msgpack_format import MsgpackSerializer
from agent_os.amb.stats import BusStats
from agent_os.amb.subjects import MAX_SUBJECT_BYTES
from agent_os.amb.subscription import Handler, MessageStream, Subscription, SubscriptionOptions

__all__ = [
    "AMB",
    "MAX_SUBJECT_BYTES",
    "WIRE_VERSION",
    "Broker",
    "BrokerSubscription",
    "BrokerUnavailable",
    "BusError",
    "BusStats",
    "Capabilities",
    "CapabilityNotSupported",
    "ConfigError",
    "ConsumeNext",
    "Delivery",
    "DeliveryHandler",
    "Envelope",
    "EnvelopeError",
    "Handler",
    "InvalidSubject",
    "JsonSerializer",
    "LifecycleState",
    "MalformedEnvelope",
    "MessageRejected",
    "MessageStream",
    "Metadata",
    "Middleware",
    "MsgpackSerializer",
    "OversizedEnvelope",
    "PublishNext",
    "RemoteError",
    "RequestTimeout",
    "Serializer",
    "Signature",
    "StateError",
    "Subscription",
    "SubscriptionOptions",
    "TransportError",
    "TruncatedEnvelope",
    "UnserializablePayload",
    "UnsupportedVersion",
    "available_brokers",
    "decode",
    "get_serializer",
    "load_broker",
    "new_id",
]
