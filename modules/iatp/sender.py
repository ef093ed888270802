"""Who sent a delivered message: the one fail-closed answer for every consumer.

A handler (a service acting for an agent, the control plane's mediator) must not take the
envelope's ``sender`` at its word: anyone able to publish can write any name there. The IATP
middleware puts its verdict in ``metadata.context["iatp"]`` (:data:`agent_os.iatp.RESULT`);
:func:`sender_identity` turns that into an identity in one way:

- a **valid** result (signature, key, time window, nonce, trust checks all passed) names the
  sender, whatever the envelope claims;
- a result that is present but **not valid** (an unsigned message a subscription let through
  with ``ACCEPT_UNSIGNED``) is refused, whatever the envelope claims;
- with **no result** (no IATP middleware on this client), the claimed sender is used only when
  the caller says it trusts the bus (``trust_bus=True``: a broker whose ACLs already stop
  agents from publishing under another's name); otherwise the message is refused.

Usage::

    from agent_os.iatp import Unauthenticated, sender_identity

    async def handle(message, metadata):
        try:
            agent = sender_identity(metadata)
        except Unauthenticated:
            ...  # refuse the request
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent_os.iatp.errors import Unauthenticated
from agent_os.iatp.middleware import RESULT


def sender_identity(metadata: Any, *, trust_bus: bool = False) -> str:
    """The agent a delivered message acts for (see the module docstring).

    ``metadata`` is the delivery's :class:`agent_os.amb.Metadata` (anything with ``context`` and
    ``sender``). The IATP result may be a :class:`~agent_os.iatp.VerificationResult` or a mapping with
    ``valid`` and ``sender``; it counts only when ``valid is True`` and the sender is a
    non-empty string.

    Raises Unauthenticated when the result is present but not valid (or names no sender), when
    there is no result and ``trust_bus`` is false, or when a trusted envelope names no sender.
    Never raises anything else, and never returns the claimed sender unless ``trust_bus``.
    """
    context = getattr(metadata, "context", None)
    result = context.get(RESULT) if isinstance(context, Mapping) else None
    if result is not None:
        sender = _field(result, "sender")
        if _field(result, "valid") is not True or not isinstance(sender, str) or not sender:
            raise Unauthenticated("the message's IATP verification is not valid")
        return sender
    if not trust_bus:
        raise Unauthenticated("the message was not verified by IATP (and the bus is not trusted)")
    sender = getattr(metadata, "sender", None)
    if not isinstance(sender, str) or not sender:
        raise Unauthenticated("the message has no sender")
    return sender


def _field(result: Any, name: str) -> Any:
    if isinstance(result, Mapping):
        return result.get(name)
    return getattr(result, name, None)
