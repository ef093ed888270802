"""The control-plane service: mediated mode, where no message reaches an agent unchecked.

Agents publish to ingress subjects; the service verifies each message, applies policy and
signals, records the decision and forwards what is allowed to delivery subjects; broker
permissions (:func:`nats_authorization`) make it the only way through. How it works, its
options, metrics and NATS permissions: ``docs/services.md``. Run it with ``agent-os serve
control-plane`` or ``python -m agent_os.services.control_plane_service``.
"""

from agent_os.services.control_plane_service._cli import main
from agent_os.services.control_plane_service._nats_permissions import NatsUser, nats_authorization, nats_users
from agent_os.services.control_plane_service._options import load_policy, read_key_file, recorder_from_spec
from agent_os.services.control_plane_service._rate_limits import RedisRateLimits, share_rate_limits
from agent_os.services.control_plane_service._reply_via_service import ReplyViaService
from agent_os.services.control_plane_service._serve import serve
from agent_os.services.control_plane_service._service import (
    ControlPlaneService,
    ServiceStats,
    require_verified_sender,
)
from agent_os.services.control_plane_service._subjects import (
    AGENT_DEAD_LETTERS,
    DELIVERY,
    INBOX,
    INGRESS,
    QUEUE_GROUP,
    REPLIES,
    agent_inbox,
    check_agent_id,
    dead_letter_subject,
    delivery_subject,
    ingress_subject,
    reply_subject,
)

__all__ = [
    "AGENT_DEAD_LETTERS",
    "DELIVERY",
    "INBOX",
    "INGRESS",
    "QUEUE_GROUP",
    "REPLIES",
    "ControlPlaneService",
    "NatsUser",
    "RedisRateLimits",
    "ReplyViaService",
    "ServiceStats",
    "agent_inbox",
    "check_agent_id",
    "dead_letter_subject",
    "delivery_subject",
    "ingress_subject",
    "load_policy",
    "main",
    "nats_authorization",
    "nats_users",
    "read_key_file",
    "recorder_from_spec",
    "reply_subject",
    "require_verified_sender",
    "serve",
    "share_rate_limits",
]
