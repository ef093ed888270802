"""Dead letters: the record the AMB client publishes of a message it could not hand to a
handler, and the headers that say why (see ``docs/bus.md``, "Dead letters")."""

from __future__ import annotations

import time
from typing import Final

from agent_os.amb.broker import Delivery
from agent_os.amb.envelope import Envelope, new_id

DLQ_REASON: Final = "dlq-reason"
DLQ_ERROR: Final = "dlq-error"
DLQ_SUBJECT: Final = "dlq-subject"
DLQ_ATTEMPTS: Final = "dlq-attempts"
DLQ_ORIGINAL_ID: Final = "dlq-original-id"


def dead_letter_envelope(
    prefix: str,
    sender: str,
    delivery: Delivery,
    original: Envelope | None,
    reason: str,
    error: BaseException,
) -> Envelope:
    """The dead letter of ``delivery``: its raw bytes as the payload, on
    ``<prefix>.<delivery subject>``, with the reason, the error, the subject, the attempt and
    (when it could be decoded) the original envelope's id in its headers."""
    headers = {
        DLQ_REASON: reason,
        DLQ_ERROR: f"{type(error).__name__}: {error}"[:1024],
        DLQ_SUBJECT: delivery.subject,
        DLQ_ATTEMPTS: str(delivery.attempt),
    }
    if original is not None:
        headers[DLQ_ORIGINAL_ID] = original.id
    return Envelope(
        new_id(),
        f"{prefix}.{delivery.subject}",
        sender,
        bytes(delivery.data),
        timestamp=time.time_ns(),
        headers=headers,
    )
