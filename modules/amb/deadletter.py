"""Dead letters: the record the AMB client publishes of a message it could not hand to a
handler, the bounded subject it goes to, and the headers that say why (see ``docs/bus.md``,
"Dead letters")."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Final

from agent_os.amb.broker import Delivery
from agent_os.amb.envelope import Envelope, new_id
from agent_os.amb.errors import describe
from agent_os.amb.subjects import MAX_SUBJECT_BYTES, subject_ok

DLQ_REASON: Final = "dlq-reason"
DLQ_ERROR: Final = "dlq-error"
DLQ_SUBJECT: Final = "dlq-subject"
DLQ_SUBJECT_SHA256: Final = "dlq-subject-sha256"
DLQ_ATTEMPTS: Final = "dlq-attempts"
DLQ_ORIGINAL_ID: Final = "dlq-original-id"

DLQ_ROOM: Final = 64
"""Bytes a dead-letter prefix leaves free in a subject, for the hashed form's readable part
and digest: a prefix is at most ``MAX_SUBJECT_BYTES - DLQ_ROOM`` bytes."""
_DIGEST_CHARS: Final = 32
_NOT_SUBJECT_CHAR: Final = re.compile(r"[^!-)+-\-./-=?-~]")  # printable ASCII but "*", ">"


def subject_digest(subject: str) -> str:
    """The SHA-256 (hex) of ``subject`` as UTF-8 (lone surrogates kept as they are)."""
    return hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()


def dead_letter_subject(prefix: str, subject: str) -> str:
    """Where a dead letter of a message delivered on ``subject`` goes: ``<prefix>.<subject>``
    when that is a valid subject, else the bounded form ``<prefix>.<readable>.<digest>``:
    ``subject`` with every character a subject may not hold replaced by ``_``, cut so that the
    whole is at most :data:`MAX_SUBJECT_BYTES`, then 32 hex characters of its SHA-256 (so two
    subjects cut alike still go to different subjects). ``prefix`` must be a valid subject of at
    most ``MAX_SUBJECT_BYTES - DLQ_ROOM`` bytes (the AMB client checks it)."""
    whole = f"{prefix}.{subject}"
    if subject_ok(whole):
        return whole
    digest = subject_digest(subject)[:_DIGEST_CHARS]
    tokens = _NOT_SUBJECT_CHAR.sub("_", subject).split(".")
    readable = ".".join(tok or "_" for tok in tokens)
    room = MAX_SUBJECT_BYTES - len(prefix.encode()) - _DIGEST_CHARS - 2
    readable = readable[: max(0, room)].strip(".")
    return f"{prefix}.{readable}.{digest}" if readable else f"{prefix}.{digest}"


def _text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, lone surrogates replaced (a header must encode)."""
    return text[:limit].encode("utf-8", "replace").decode("utf-8")


def dead_letter_headers(subject: str, reason: str, error: BaseException, attempt: int) -> dict[str, str]:
    """The headers of a dead letter: ``dlq-reason``, ``dlq-error`` (at most 1,024 characters),
    ``dlq-subject`` (the original subject, cut to :data:`MAX_SUBJECT_BYTES` characters),
    ``dlq-subject-sha256`` (the whole subject's digest, as in a shortened dead-letter subject)
    and ``dlq-attempts``."""
    headers = {
        DLQ_REASON: _text(reason, 256),
        DLQ_ERROR: _text(describe(error), 1024),
        DLQ_SUBJECT: _text(subject, MAX_SUBJECT_BYTES),
        DLQ_SUBJECT_SHA256: subject_digest(subject),
        DLQ_ATTEMPTS: str(attempt),
    }
    return headers


def dead_letter_envelope(
    prefix: str,
    sender: str,
    delivery: Delivery,
    original: Envelope | None,
    reason: str,
    error: BaseException,
) -> Envelope:
    """The dead letter of ``delivery``: its raw bytes as the payload, on
    :func:`dead_letter_subject`, with the reason, the error, the subject, the attempt and
    (when it could be decoded) the original envelope's id in its headers."""
    headers = dead_letter_headers(delivery.subject, reason, error, delivery.attempt)
    if original is not None:
        headers[DLQ_ORIGINAL_ID] = _text(original.id, 256)
    return Envelope(
        new_id(),
        dead_letter_subject(prefix, delivery.subject),
        sender,
        bytes(delivery.data),
        timestamp=time.time_ns(),
        headers=headers,
    )
