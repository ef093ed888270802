"""The verifier service: a :class:`~agent_os.cmvk.CMVK` panel answering ``cmvk.verify`` requests
over the bus, and :func:`request_verification` to ask it. Requests, replies, errors and options:
``docs/services.md``, "The verifier service". Run it with ``agent-os serve verifier`` or
``python -m agent_os.services.verifier_service``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, get_args

import click

from agent_os.amb import AMB, Metadata, Subscription
from agent_os.amb.durations import Durations
from agent_os.amb.numbers import whole
from agent_os.cmvk import CMVK, CMVKConfigError, CMVKError, ModelSpec, Strategy, VerificationResult
from agent_os.iatp import ACCEPT_UNSIGNED, BIND_TOPIC, IATP, REPLAY_SCOPE
from agent_os.services._identity import Unauthenticated, require_verification, sender_identity
from agent_os.services._metrics import (
    METRICS_PORTS,
    MetricsOptions,
    metrics_endpoint,
    metrics_from_options,
    metrics_options,
    ready_line,
    require_metrics,
    service_registry,
)
from agent_os.services._process import (
    FiniteRange,
    log_level_option,
    run,
    service_client,
    serving,
    stop_signals,
    verification_from_options,
    verification_options,
)

log = logging.getLogger("agent_os.services.verifier")

VERIFY_SUBJECT: Final = "cmvk.verify"
QUEUE_GROUP: Final = "cmvk-verifiers"
MAX_TEXT_BYTES: Final = 65_536
"""Default bound on each of a request's prompt, response and context, in bytes as sent to the
models (UTF-8 of a string; JSON of any other value)."""


class InvalidVerifyRequest(CMVKError, ValueError):
    """A ``cmvk.verify`` request that is not ``{"prompt", "response", "context"?}``, or the
    error reply a client received for one."""


class RequestTooLarge(InvalidVerifyRequest):
    """A ``cmvk.verify`` request whose prompt, response or context exceeds the service's
    ``max_text_bytes`` (nothing of it was sent to any model), or the error reply for one."""


class VerifierRefused(CMVKError, PermissionError):
    """The verifier service refused a request whose sender it could not establish."""


@dataclass(slots=True)
class VerifierStats:
    """Counters of one service instance."""

    requests: int = 0
    verified: int = 0
    rejected: int = 0
    invalid: int = 0
    failed: int = 0
    unauthenticated: int = 0
    too_large: int = 0
    wrong_subject: int = 0

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


def check_sizes(prompt: Any, response: Any, context: dict[str, Any] | None, limit: int) -> None:
    """Raise RequestTooLarge when the prompt, the response or the context is longer than
    ``limit`` bytes as the models would get it (UTF-8 of a string, JSON of anything else, as
    CMVK serializes it)."""
    for name, value in (("prompt", prompt), ("response", response), ("context", context)):
        size = _text_bytes(value, limit)
        if size > limit:
            raise RequestTooLarge(f"the {name} is larger than the limit of {limit} bytes")


def _text_bytes(value: Any, limit: int) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        # A character is at most 4 UTF-8 bytes: long strings are refused without encoding.
        return len(value) if len(value) > limit else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return len(value)
    try:
        return len(json.dumps(value, default=str, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError, RecursionError):
        return limit + 1  # what cannot be measured is not sent


class VerifierService:
    """Serves ``subject`` (default ``cmvk.verify``) on ``bus`` with ``cmvk``.

    ``concurrency`` requests are verified at once per instance. ``start`` subscribes (in the
    queue group, so instances share requests); ``stop`` drains in-flight verifications.
    ``bus`` should carry the IATP middleware; ``trust_bus=True`` takes the envelope's claimed
    sender when there is no IATP result (``docs/services.md``, "The verifier service"). A
    request must be signed for ``subject`` (else ``wrong_subject``), its nonces are remembered
    under ``replay_scope`` (the queue group), and its prompt, response and context may have
    ``max_text_bytes`` each (else ``too_large``, and no model is asked).

    Counters: ``stats``, ``verdicts`` (by model and verdict: ``supported``, ``contradicted``,
    ``unsure`` or ``abstained``), ``abstentions`` (by model and kind), ``cost_usd`` (by model)
    ``durations`` (seconds per verification, by outcome) and ``model_durations`` (seconds per
    model's answer, retries included, by model); :class:`VerifierMetrics` exposes
    them to Prometheus.
    """

    def __init__(
        self,
        bus: AMB,
        cmvk: CMVK,
        *,
        subject: str = VERIFY_SUBJECT,
        queue: str | None = QUEUE_GROUP,
        concurrency: int = 8,
        trust_bus: bool = False,
        max_text_bytes: int = MAX_TEXT_BYTES,
    ) -> None:
        whole(max_text_bytes, "max_text_bytes", error=CMVKConfigError)
        self.bus = bus
        self.trust_bus = trust_bus
        self.max_text_bytes = max_text_bytes
        self.replay_scope = queue or subject
        self.cmvk = cmvk
        self.subject = subject
        self.queue = queue
        self.concurrency = concurrency
        self.stats = VerifierStats()
        self.verdicts: Counter[tuple[str, str]] = Counter()
        self.abstentions: Counter[tuple[str, str]] = Counter()
        self.cost_usd: dict[str, float] = {}
        self.durations = Durations()
        self.model_durations = Durations()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Load the LLM client (:meth:`agent_os.cmvk.CMVK.warm`, so that the first request is
        answered like the others), then subscribe to the request subject. Idempotent. Raises
        ImportError naming the extra to install when litellm is missing."""
        if self._sub is None:
            await self.cmvk.warm()
            self._sub = await self.bus.subscribe(
                self.subject,
                self._on_request,
                queue=self.queue,
                concurrency=self.concurrency,
                # Bound to the signed topic, one replay scope, and unsigned requests let through
                # to be answered "unauthenticated" rather than left to time out.
                context={BIND_TOPIC: True, REPLAY_SCOPE: self.replay_scope, ACCEPT_UNSIGNED: True},
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; let in-flight ones finish (up to ``timeout``)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.drain(timeout)

    async def __aenter__(self) -> VerifierService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _refuse(self, metadata: Metadata, error: str, reason: str) -> None:
        if metadata.reply_to:
            await self.bus.reply(metadata, {"ok": False, "error": error, "reason": reason})

    async def _on_request(self, message: Any, metadata: Metadata) -> None:
        self.stats.requests += 1
        if metadata.topic != metadata.subject:  # without IATP (trust_bus), the claimed topic
            self.stats.wrong_subject += 1
            log.warning("refused cmvk.verify request %s: signed for another topic", metadata.id)
            await self._refuse(metadata, "wrong_subject", f"the request's topic is not {self.subject}")
            return
        try:
            caller = sender_identity(metadata, trust_bus=self.trust_bus)
        except Unauthenticated as exc:
            self.stats.unauthenticated += 1
            log.warning(
                "refused cmvk.verify request %s (claimed sender %r): %s", metadata.id, metadata.sender, exc
            )
            await self._refuse(metadata, "unauthenticated", str(exc))
            return
        try:
            prompt, response, context = parse_request(message)
            check_sizes(prompt, response, context, self.max_text_bytes)
        except RequestTooLarge as exc:
            self.stats.too_large += 1
            log.warning("too large cmvk.verify request %s from %s: %s", metadata.id, caller, exc)
            await self._refuse(metadata, "too_large", str(exc))
            return
        except InvalidVerifyRequest as exc:
            self.stats.invalid += 1
            log.warning("invalid cmvk.verify request %s from %s: %s", metadata.id, caller, exc)
            await self._refuse(metadata, "invalid_request", str(exc))
            return
        started = time.perf_counter()
        try:
            result = await self.cmvk.verify(prompt, response, context)
        except Exception as exc:  # a bug must not take the service down; the caller learns it failed
            self.durations.observe(("failed",), time.perf_counter() - started)
            self.stats.failed += 1
            log.exception("verification of request %s from %s failed", metadata.id, caller)
            if metadata.reply_to:
                reason = f"{type(exc).__name__}: {exc}"
                await self.bus.reply(
                    metadata, {"ok": False, "error": "verification_failed", "reason": reason}
                )
            return
        outcome = "verified" if result.verified else "rejected"
        self.durations.observe((outcome,), time.perf_counter() - started)
        self._count(result)
        log.debug("request %s from %s: verified=%s", metadata.id, caller, result.verified)
        if metadata.reply_to:
            await self.bus.reply(metadata, {"ok": True, **result.to_dict()})

    def _count(self, result: VerificationResult) -> None:
        if result.verified:
            self.stats.verified += 1
        else:
            self.stats.rejected += 1
        for name, vote in result.model_votes.items():
            self.verdicts[name, vote.verdict or "abstained"] += 1
            if vote.abstention is not None:
                self.abstentions[name, vote.abstention] += 1
            self.cost_usd[name] = self.cost_usd.get(name, 0.0) + (vote.stats.cost_usd or 0.0)
            self.model_durations.observe((name,), vote.stats.latency_s)


class VerifierMetrics:
    """A prometheus_client collector over a :class:`VerifierService`'s counters
    (``docs/observability.md``): requests by outcome, verification latency, model verdicts,
    abstentions and cost."""

    def __init__(self, service: VerifierService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        service = self.service
        requests = CounterMetricFamily(
            "agentos_cmvk_requests",
            "Verification requests, by outcome (verified, rejected or why it was refused or failed)",
            labels=["outcome"],
        )
        for outcome, count in service.stats.as_dict().items():
            if outcome != "requests":
                requests.add_metric([outcome], count)
        verdicts = CounterMetricFamily(
            "agentos_cmvk_model_verdicts",
            "Each panel model's verdicts (supported, contradicted, unsure, abstained)",
            labels=["model", "verdict"],
        )
        for (model, verdict), count in list(service.verdicts.items()):
            verdicts.add_metric([model, verdict], count)
        abstentions = CounterMetricFamily(
            "agentos_cmvk_abstentions",
            "Model abstentions, by model and kind (timeout, deadline, provider_error, parse_error)",
            labels=["model", "kind"],
        )
        for (model, kind), count in list(service.abstentions.items()):
            abstentions.add_metric([model, kind], count)
        cost = CounterMetricFamily(
            "agentos_cmvk_cost_usd", "Cost of the model calls as litellm reports it (USD)", labels=["model"]
        )
        for model, usd in list(service.cost_usd.items()):
            cost.add_metric([model], usd)
        yield from (requests, verdicts, abstentions, cost)
        yield service.durations.family(
            "agentos_cmvk_verification_duration_seconds",
            "Time of one verification by the panel, by outcome (verified, rejected, failed)",
            ["outcome"],
        )
        yield service.model_durations.family(
            "agentos_cmvk_model_call_duration_seconds",
            "Time of one panel model's answer (retries included), by model",
            ["model"],
        )


async def request_verification(
    bus: AMB,
    prompt: Any,
    response: Any,
    context: dict[str, Any] | None = None,
    *,
    subject: str = VERIFY_SUBJECT,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Ask a verifier service over ``bus``; return the result dict (``docs/services.md``).

    Raises RequestTooLarge (an InvalidVerifyRequest) when the service refused the request as
    beyond its size limit, InvalidVerifyRequest when it refused it as malformed,
    VerifierRefused when it could not establish the sender, CMVKError when its verification
    failed, and the bus's RequestTimeout when no service answered in ``timeout``.
    """
    reply = await bus.request(
        subject, {"prompt": prompt, "response": response, "context": context}, timeout=timeout
    )
    if not isinstance(reply, dict) or not reply.get("ok"):
        reason = reply.get("reason") if isinstance(reply, dict) else repr(reply)
        if isinstance(reply, dict) and reply.get("error") == "too_large":
            raise RequestTooLarge(str(reason))
        if isinstance(reply, dict) and reply.get("error") == "invalid_request":
            raise InvalidVerifyRequest(str(reason))
        if isinstance(reply, dict) and reply.get("error") == "unauthenticated":
            raise VerifierRefused(str(reason))
        raise CMVKError(f"verifier service failed: {reason}")
    return reply


# -- the process -------------------------------------------------------------------------------


def model_spec(text: str) -> ModelSpec:
    """A panel member from ``MODEL`` (``openai/gpt-4o``, named after the model) or
    ``NAME=MODEL``. Raises CMVKConfigError for an empty name or model."""
    name, sep, model = text.partition("=")
    if not sep:
        name, model = text, text
    if not model.strip():
        raise CMVKConfigError(f"--model {text!r}: the model is empty")
    return ModelSpec(name.strip(), model=model.strip())


async def serve(
    *,
    broker: str,
    cmvk: CMVK,
    iatp: IATP | None = None,
    trust_bus: bool = False,
    subject: str = VERIFY_SUBJECT,
    queue: str | None = QUEUE_GROUP,
    agent_id: str = "verifier-service",
    concurrency: int = 8,
    stop: asyncio.Event | None = None,
    max_text_bytes: int = MAX_TEXT_BYTES,
    metrics: MetricsOptions | None = None,
) -> VerifierService:
    """Serve ``cmvk`` on the broker at ``broker`` until ``stop`` is set (or SIGINT/SIGTERM), then
    finish the verifications in flight and close the bus client. With ``iatp`` (holding the
    service's signing key ``agent_id`` and the agents' public identities) every request is verified;
    without it ``trust_bus`` must be true. Loads litellm, then prints ``ready verifier
    subject=<subject> broker=<url>`` once it takes requests; returns the service (its ``stats``);
    with ``metrics``, serves ``/metrics`` and ``/healthz`` there and adds ``metrics=<url>`` to the
    ready line (``docs/observability.md``). Raises VerificationRequired (neither or both of ``iatp``
    and ``trust_bus``), ValueError for an unsupported broker URL, ImportError naming the extra to
    install, a bus error when it cannot connect."""
    require_verification(iatp is not None, trust_bus, "verifier service")
    if metrics is not None:
        require_metrics()
    client = service_client(broker, agent_id, iatp)
    service = VerifierService(
        client,
        cmvk,
        subject=subject,
        queue=queue,
        concurrency=concurrency,
        trust_bus=trust_bus,
        max_text_bytes=max_text_bytes,
    )
    async with stop_signals(stop) as stopping:
        try:
            await client.connect()
            await service.start()
            log.info(
                "verifier service %s on %s with %r; senders %s",
                agent_id,
                broker,
                cmvk,
                "taken from the trusted bus" if trust_bus else "verified by IATP",
            )
            registry = service_registry([client], VerifierMetrics(service)) if metrics is not None else None
            async with metrics_endpoint(metrics, registry, lambda: client.healthy) as url:
                await serving(
                    stopping,
                    ready_line(f"ready verifier subject={subject} broker={broker}", url),
                    log,
                    "finishing the verifications in flight",
                    client=client,
                )
        finally:
            try:
                await service.stop(timeout=cmvk.timeout)
            finally:
                await client.close()
    return service


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker", required=True, help="Broker URL: nats://host:4222, redis://, kafka://, memory://name."
)
@verification_options
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    envvar="AGENTOS_VERIFIER_MODELS",
    help="A panel member, MODEL or NAME=MODEL (a litellm id such as openai/gpt-4o); repeat for more. "
    "Or AGENTOS_VERIFIER_MODELS, the members separated by spaces.",
)
@click.option(
    "--api-base",
    envvar="AGENTOS_LLM_API_BASE",
    help="Base URL for every model (an OpenAI-compatible server, say). Or AGENTOS_LLM_API_BASE.",
)
@click.option(
    "--api-key",
    envvar="AGENTOS_LLM_API_KEY",
    help="Or AGENTOS_LLM_API_KEY; else the provider's own variable.",
)
@click.option("--threshold", type=FiniteRange(0, 1, min_open=True), default=0.8, show_default=True)
@click.option("--strategy", type=click.Choice(get_args(Strategy)), default="majority", show_default=True)
@click.option(
    "--timeout",
    type=FiniteRange(0, 1e9, min_open=True),
    default=30.0,
    show_default=True,
    help="Deadline of one verification, seconds.",
)
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--quorum", type=click.IntRange(min=1), help="Answering models required (default: a majority).")
@click.option("--subject", default=VERIFY_SUBJECT, show_default=True)
@click.option("--queue", default=QUEUE_GROUP, show_default=True, help="Queue group shared by instances.")
@click.option("--agent-id", default="verifier-service", show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--max-text-bytes",
    type=click.IntRange(min=1),
    default=MAX_TEXT_BYTES,
    show_default=True,
    help="Largest prompt, response and context of a request (bytes each, as sent to the models).",
)
@metrics_options(METRICS_PORTS["verifier"])
@log_level_option
def main(
    broker: str,
    identities: str | None,
    trust_bus: bool,
    nonce_store: str | None,
    nonce_prefix: str,
    models: Sequence[str],
    api_base: str | None,
    api_key: str | None,
    threshold: float,
    strategy: Strategy,
    timeout: float,
    retries: int,
    quorum: int | None,
    subject: str,
    queue: str,
    agent_id: str,
    concurrency: int,
    max_text_bytes: int,
    log_level: str,
    key_refresh: float,
    verify_workers: int,
    metrics_host: str,
    metrics_port: int,
    metrics_token: str | None,
    no_metrics: bool,
) -> None:
    """Run the verifier service (a CMVK panel answering cmvk.verify) until SIGINT/SIGTERM."""
    verification = verification_from_options(
        identities, trust_bus, nonce_store, nonce_prefix, key_refresh, verify_workers
    )
    metrics = metrics_from_options(no_metrics, metrics_host, metrics_port, metrics_token)

    async def serve_process() -> None:
        cmvk = CMVK(
            [model_spec(m) for m in models],
            consensus_threshold=threshold,
            voting_strategy=strategy,
            timeout=timeout,
            retries=retries,
            quorum=quorum,
            api_base=api_base,
            api_key=api_key,
        )
        async with verification.opened(agent_id) as iatp:
            await serve(
                broker=broker,
                cmvk=cmvk,
                iatp=iatp,
                trust_bus=verification.trust_bus,
                subject=subject,
                queue=queue,
                agent_id=agent_id,
                concurrency=concurrency,
                max_text_bytes=max_text_bytes,
                metrics=metrics,
            )

    run(serve_process, log_level=log_level, errors=(CMVKError,), name="verifier")


if __name__ == "__main__":
    main()
