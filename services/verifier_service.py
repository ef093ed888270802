"""The verifier service: answers ``cmvk.verify`` requests over the bus with a CMVK panel.

Request payload (a map)::

    {"prompt": <any>, "response": <any>, "context": {...} | null}

Reply: the :meth:`cmvk.VerificationResult.to_dict` of the verification (``verified``,
``confidence``, ``model_votes``, ``consensus``, ``reason``, ``details``, ...) with ``"ok": True``;
for a request that is not such a map, ``{"ok": False, "error": "invalid_request", "reason": ...}``.
A bad request is counted (``stats.invalid``) and answered; it never stops the service. Several
instances share the load as the queue group ``cmvk-verifiers``.

Example::

    service = VerifierService(AMB("nats", "nats://127.0.0.1:4222"), CMVK(models=[...]))
    await service.start()
    reply = await request_verification(client, "What is 6 x 7?", "42")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from amb import AMB, Metadata, Subscription
from cmvk import CMVK, CMVKError

log = logging.getLogger("services.verifier")

VERIFY_SUBJECT: Final = "cmvk.verify"
QUEUE_GROUP: Final = "cmvk-verifiers"


class InvalidVerifyRequest(CMVKError, ValueError):
    """A ``cmvk.verify`` request that is not ``{"prompt", "response", "context"?}``, or the
    error reply a client received for one."""


@dataclass(slots=True)
class VerifierStats:
    """Counters of one service instance."""

    requests: int = 0
    verified: int = 0
    rejected: int = 0
    invalid: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_request(message: Any) -> tuple[Any, Any, dict[str, Any] | None]:
    """Check a request payload; return ``(prompt, response, context)``.

    Raises InvalidVerifyRequest naming what is wrong."""
    if not isinstance(message, Mapping):
        raise InvalidVerifyRequest(f"request must be a map, got {type(message).__name__}")
    missing = [k for k in ("prompt", "response") if k not in message]
    if missing:
        raise InvalidVerifyRequest(f"request lacks {', '.join(missing)}")
    unknown = sorted(set(message) - {"prompt", "response", "context"})
    if unknown:
        raise InvalidVerifyRequest(f"unknown request fields: {', '.join(map(str, unknown))}")
    context = message.get("context")
    if context is not None and not isinstance(context, dict):
        raise InvalidVerifyRequest(f"context must be a map or null, got {type(context).__name__}")
    return message["prompt"], message["response"], context


class VerifierService:
    """Serves ``subject`` (default ``cmvk.verify``) on ``bus`` with ``cmvk``.

    ``concurrency`` requests are verified at once per instance. ``start`` subscribes (in the
    queue group, so instances share requests); ``stop`` drains in-flight verifications.
    """

    def __init__(
        self,
        bus: AMB,
        cmvk: CMVK,
        *,
        subject: str = VERIFY_SUBJECT,
        queue: str | None = QUEUE_GROUP,
        concurrency: int = 8,
    ) -> None:
        self.bus = bus
        self.cmvk = cmvk
        self.subject = subject
        self.queue = queue
        self.concurrency = concurrency
        self.stats = VerifierStats()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to the request subject. Idempotent."""
        if self._sub is None:
            self._sub = await self.bus.subscribe(
                self.subject, self._on_request, queue=self.queue, concurrency=self.concurrency
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; let in-flight ones finish (up to ``timeout``)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.drain(timeout)

    async def _on_request(self, message: Any, metadata: Metadata) -> None:
        self.stats.requests += 1
        try:
            prompt, response, context = parse_request(message)
        except InvalidVerifyRequest as exc:
            self.stats.invalid += 1
            log.warning("invalid cmvk.verify request %s from %s: %s", metadata.id, metadata.sender, exc)
            if metadata.reply_to:
                await self.bus.reply(metadata, {"ok": False, "error": "invalid_request", "reason": str(exc)})
            return
        try:
            result = await self.cmvk.verify(prompt, response, context)
        except Exception as exc:  # a bug must not take the service down; the caller learns it failed
            self.stats.failed += 1
            log.exception("verification of request %s failed", metadata.id)
            if metadata.reply_to:
                reason = f"{type(exc).__name__}: {exc}"
                await self.bus.reply(
                    metadata, {"ok": False, "error": "verification_failed", "reason": reason}
                )
            return
        if result.verified:
            self.stats.verified += 1
        else:
            self.stats.rejected += 1
        if metadata.reply_to:
            await self.bus.reply(metadata, {"ok": True, **result.to_dict()})


async def request_verification(
    bus: AMB,
    prompt: Any,
    response: Any,
    context: dict[str, Any] | None = None,
    *,
    subject: str = VERIFY_SUBJECT,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Ask a verifier service over ``bus``; return the result dict (see the module docstring).

    Raises InvalidVerifyRequest when the service refused the request, CMVKError when its
    verification failed, and the bus's RequestTimeout when no service answered in ``timeout``.
    """
    reply = await bus.request(
        subject, {"prompt": prompt, "response": response, "context": context}, timeout=timeout
    )
    if not isinstance(reply, dict) or not reply.get("ok"):
        reason = reply.get("reason") if isinstance(reply, dict) else repr(reply)
        if isinstance(reply, dict) and reply.get("error") == "invalid_request":
            raise InvalidVerifyRequest(str(reason))
        raise CMVKError(f"verifier service failed: {reason}")
    return reply
