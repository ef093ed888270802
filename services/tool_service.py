"""The tool service: runs the providers of the actions the control-plane service allowed, in
mediated mode, and :class:`ToolClient`, an agent's ``submit`` over the bus.

An agent's action is a request on ``ingress.action.<name>``; the control-plane service decides
it (the decision part of ``kernel.submit``, one record), forwards an allowed one to
``deliver.<tool service>.action.<name>``, where the instances of this service take turns (a
queue group), and records the outcome when the reply passes it. Under the generated NATS
permissions only the control-plane service can publish there, so an agent cannot reach a
provider around the policy. How it works, options and limits: ``docs/services.md``, "Actions
across processes". Run it with ``agent-os serve tools`` or ``python -m
agent_os.services.tool_service``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Final

import click

from agent_os.amb import AMB, Metadata, RemoteError, RequestTimeout, Subscription, tracing
from agent_os.amb.numbers import seconds, whole
from agent_os.control_plane import ActionRequest, ActionResult, ControlPlaneError
from agent_os.control_plane.actions import ActionRegistry, BusActions, FileSystem
from agent_os.control_plane.actions.bus import BusKind
from agent_os.control_plane.actions.fs import MAX_READ, MAX_WRITE
from agent_os.control_plane.actions.provider import ActionRefused
from agent_os.control_plane.kernel.submit import action_attributes
from agent_os.iatp import ACCEPT_UNSIGNED, IATP, REPLAY_SCOPE
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
    broker_backend,
    log_level_option,
    run,
    serving,
    stop_signals,
    verification_from_options,
    verification_options,
)
from agent_os.services.control_plane_service._actions import (
    ACTION_PREFIX,
    TOOL_SERVICE,
    action_topic,
    parse_action,
    request_payload,
    result_from_payload,
    result_payload,
)
from agent_os.services.control_plane_service._reply_via_service import ReplyViaService
from agent_os.services.control_plane_service._subjects import (
    DELIVERY,
    INGRESS,
    REPLIES,
    check_agent_id,
    delivery_subject,
    ingress_subject,
)

log = logging.getLogger("agent_os.services.tools")

QUEUE_GROUP: Final = "tools"
TIMEOUT: Final = 30.0
"""Seconds :class:`ToolClient` waits for an action's answer by default."""


@dataclass(slots=True)
class ToolStats:
    """Counters of one tool-service instance: ``requests`` taken, ``done`` (the provider
    returned), ``failed`` (it raised), ``refused`` (unusable requests: malformed, unknown
    action, unauthenticated, a target the provider refuses, signed for another subject) and
    ``unsent`` (outputs that could not be sent, answered with an error instead)."""

    requests: int = 0
    done: int = 0
    failed: int = 0
    refused: int = 0
    unsent: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ToolMetrics:
    """A prometheus_client collector over a :class:`ToolService`'s counters
    (``docs/observability.md``): ``agentos_tool_<counter>_total`` for each of its ``stats``."""

    def __init__(self, service: ToolService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        for name, value in self.service.stats.as_dict().items():
            yield CounterMetricFamily(f"agentos_tool_{name}", _TOOL_COUNTERS[name], value=value)


_TOOL_COUNTERS: Final = {
    "requests": "Action requests taken from the control-plane service",
    "done": "Actions whose provider returned",
    "failed": "Actions whose provider raised",
    "refused": "Unusable action requests (malformed, unknown action, unauthenticated, refused target)",
    "unsent": "Outputs that could not be sent, answered with an error instead",
}


class ToolService:
    """Runs ``actions``' providers for the action requests the control-plane service forwards
    to ``client``'s agent (``agent_id``, default the client's) on ``<delivery_prefix>.<agent
    id>.<action_prefix>.>``, ``concurrency`` at once, sharing them with the other instances of
    ``queue``; answers each with an action result (``output`` or ``error``).

    ``client`` must carry :class:`ReplyViaService` (after IATP's middleware, when verifying), so
    that answers pass the control-plane service, which records the outcome; :func:`serve` builds
    such a client. ``trust_bus``: take the envelope's claimed sender (no IATP). A request acts
    for its verified sender and only for the action of the subject it was signed for.
    Raises VerificationRequired (neither or both of ``iatp``-verification and ``trust_bus``:
    ``verifies`` says whether ``client`` carries IATP's middleware), ValueError for an agent id
    or prefix unusable in a subject.

    Example::

        registry = ActionRegistry()
        FileSystem("/srv/work").register(registry)
        bus = AMB("nats", url, agent_id="tools", middleware=[iatp.middleware(), ReplyViaService()])
        async with ToolService(bus, registry, verifies=True):
            ...
    """

    def __init__(
        self,
        client: AMB,
        actions: ActionRegistry,
        *,
        agent_id: str | None = None,
        verifies: bool = False,
        trust_bus: bool = False,
        queue: str = QUEUE_GROUP,
        concurrency: int = 8,
        ingress_prefix: str = INGRESS,
        delivery_prefix: str = DELIVERY,
        action_prefix: str = ACTION_PREFIX,
    ) -> None:
        require_verification(verifies, trust_bus, "tool service")
        whole(concurrency, "concurrency", error=ValueError)
        self.client = client
        self.actions = actions
        self.agent_id = check_agent_id(agent_id or client.agent_id)
        self.trust_bus = trust_bus
        self.queue = queue
        self.concurrency = concurrency
        self.ingress_prefix = ingress_prefix
        self.action_prefix = action_prefix
        self.subject_prefix = delivery_subject(action_prefix, delivery_prefix, agent=self.agent_id) + "."
        self.stats = ToolStats()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Connect and take action requests. Idempotent."""
        if self._sub is None:
            self._sub = await self.client.subscribe(
                self.subject_prefix + ">",
                self._on_request,
                queue=self.queue,
                concurrency=self.concurrency,
                # One replay scope for the group; unsigned requests are let through to be
                # answered "unauthenticated" rather than left to time out.
                context={REPLAY_SCOPE: self.queue, ACCEPT_UNSIGNED: True},
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; let the actions in flight finish (up to ``timeout``)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.drain(timeout)

    async def __aenter__(self) -> ToolService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_request(self, message: Any, metadata: Metadata) -> None:
        self.stats.requests += 1
        action = metadata.subject[len(self.subject_prefix) :]
        topic = action_topic(action, self.action_prefix)
        try:
            if metadata.topic != ingress_subject(topic, self.ingress_prefix):
                raise ActionRefused(f"the request was signed for {metadata.topic!r}, not for {action!r}")
            sender = sender_identity(metadata, trust_bus=self.trust_bus)
            request, why = parse_action(action, message)
            if why is not None:
                raise ActionRefused(why)
            if request.agent_id not in (None, sender):
                raise ActionRefused(f"{sender} cannot act as {request.agent_id!r}")
            request = ActionRequest(action, request.target, request.params, sender)
            spec = self.actions.get(action)
            if spec is None:
                raise ActionRefused(f"unknown action {action!r}")
            try:
                spec.provider.resource(request)  # checked again where it runs
            except ActionRefused:
                raise
            except Exception as exc:  # a provider's bug refuses, never allows
                raise ActionRefused(f"provider error: {type(exc).__name__}: {exc}") from exc
        except (ActionRefused, Unauthenticated) as exc:
            self.stats.refused += 1
            log.warning("refused action request %s (%s): %s", metadata.id, action, exc)
            await self._answer(metadata, ActionResult(True, None, str(exc), None))
            return
        try:
            with tracing.span(f"action {action}", action_attributes(request)):  # (tracing on)
                output = await spec.provider.run(request)
        except Exception as exc:
            self.stats.failed += 1
            error = str(exc) or type(exc).__name__
            log.info("action %s of %s on %r failed: %s", action, sender, request.target, error)
            await self._answer(metadata, ActionResult(True, None, error, None))
            return
        self.stats.done += 1
        log.debug("action %s of %s on %r done", action, sender, request.target)
        await self._answer(metadata, ActionResult(True, output, None, None))

    async def _answer(self, metadata: Metadata, result: ActionResult) -> None:
        if not metadata.reply_to:
            return
        try:
            await self.client.reply(metadata, result_payload(result))
        except Exception as exc:  # too large, not serializable, ...: the requester learns why
            if result.output is None:
                raise
            self.stats.unsent += 1
            error = f"the output could not be sent: {type(exc).__name__}: {exc}"
            log.warning("action request %s: %s", metadata.id, error)
            await self.client.reply(metadata, result_payload(ActionResult(True, None, error, None)))


class ToolClient:
    """``submit(ActionRequest) -> ActionResult`` over an agent's bus client in mediated mode,
    so that code written against ``kernel.submit`` runs unchanged across processes.

    ``bus``: the agent's client (its inbox under :func:`agent_inbox`; IATP's middleware when
    the services verify). Each action is a request on ``<ingress_prefix>.<action_prefix>.
    <action>``, answered by the control-plane service (a denial, with its record id) or by the
    tool service (the outcome: ``allowed=True``, ``output`` or ``error``; ``record_id`` None,
    the records are in the service's recorder). No answer within ``timeout`` seconds, or a
    failed responder, gives ``allowed=False`` and the reason in ``error``: whether the action
    ran is then unknown.

    ``bus.publish`` and ``bus.request`` (agents talking) are messages, not tool-service work:
    they go out through ``bus`` itself on ``<ingress_prefix>.<target>`` (params as
    :class:`~agent_os.control_plane.actions.BusActions` takes them), and the control-plane
    service decides and records them as it does every message (``publish``/``request``,
    ``deliver``, ``reply``). A request it denies is dead-lettered, not answered: the result is
    then ``allowed=False`` with "no answer", as for a request nobody answers."""

    def __init__(
        self,
        bus: AMB,
        *,
        timeout: float = TIMEOUT,
        ingress_prefix: str = INGRESS,
        action_prefix: str = ACTION_PREFIX,
    ) -> None:
        seconds(timeout, "timeout", error=ValueError)
        self.bus = bus
        self.timeout = timeout
        self.ingress_prefix = ingress_prefix
        self.action_prefix = action_prefix
        self._messages = BusActions(_Ingress(bus, ingress_prefix), max_timeout=max(timeout, 60.0))

    async def submit(self, request: ActionRequest) -> ActionResult:
        """Ask for ``request`` and return what came of it (see the class). Raises TypeError for
        something that is not an ActionRequest, the bus's ConfigError for an action name that
        is no subject token, StateError when the client is closed."""
        if not isinstance(request, ActionRequest):
            raise TypeError(f"submit takes an ActionRequest, got {type(request).__name__}")
        if request.action in BusActions.ACTIONS:
            return await self._message(request)
        subject = ingress_subject(action_topic(request.action, self.action_prefix), self.ingress_prefix)
        try:
            answer = await self.bus.request(subject, request_payload(request), timeout=self.timeout)
        except RequestTimeout:
            why = f"no answer within {self.timeout:g}s: whether {request.action} ran is unknown"
            return ActionResult(False, None, why, None)
        except RemoteError as exc:
            return ActionResult(False, None, f"the action failed on the way: {exc.reason}", None)
        result = result_from_payload(answer)
        if result is None:
            return ActionResult(False, None, "the answer is not an action result", None)
        return result

    async def _message(self, request: ActionRequest) -> ActionResult:
        """A ``bus.*`` action: the message itself, through the control-plane service."""
        kind: BusKind = "publish" if request.action == "bus.publish" else "request"
        provider = self._messages.provider(kind)
        try:
            provider.resource(request)
        except ActionRefused as exc:
            return ActionResult(False, None, str(exc), None)
        try:
            output = await provider.run(request)
        except RequestTimeout:
            why = f"no answer to {request.target}: denied by the control plane, or nobody answered in time"
            return ActionResult(False, None, why, None)
        except Exception as exc:  # the responder's error, a closed client ...
            return ActionResult(True, None, str(exc) or type(exc).__name__, None)
        return ActionResult(True, output, None, None)


class _Ingress:
    """An agent's client seen by :class:`BusActions` in mediated mode: every subject goes out
    under the ingress prefix, so the control-plane service decides on it."""

    def __init__(self, bus: AMB, prefix: str) -> None:
        self.bus = bus
        self.prefix = prefix

    async def publish(self, topic: str, message: Any = None, *, recipient: str | None = None) -> str:
        return await self.bus.publish(ingress_subject(topic, self.prefix), message, recipient=recipient)

    async def request(
        self, topic: str, message: Any = None, *, timeout: float = 5.0, recipient: str | None = None
    ) -> Any:
        subject = ingress_subject(topic, self.prefix)
        return await self.bus.request(subject, message, timeout=timeout, recipient=recipient)


# -- the process -------------------------------------------------------------------------------


async def serve(
    *,
    broker: str,
    actions: ActionRegistry,
    iatp: IATP | None = None,
    trust_bus: bool = False,
    agent_id: str = TOOL_SERVICE,
    queue: str = QUEUE_GROUP,
    concurrency: int = 8,
    ingress_prefix: str = INGRESS,
    delivery_prefix: str = DELIVERY,
    reply_prefix: str = REPLIES,
    stop: asyncio.Event | None = None,
    metrics: MetricsOptions | None = None,
) -> ToolService:
    """Run a tool service with ``actions`` on the broker at ``broker`` until ``stop`` is set
    (or SIGINT/SIGTERM), then finish the actions in flight and close the bus client. With
    ``iatp`` (holding the service's signing key ``agent_id`` and the agents' public
    identities) every request is verified and every answer signed; without it ``trust_bus``
    must be true. With ``metrics``, serves ``/metrics`` and ``/healthz`` there
    (``docs/observability.md``). Prints ``ready tools subjects=<subjects> broker=<url>`` (then
    `` metrics=<url>``) once it takes requests; returns the service (its ``stats``). Raises
    VerificationRequired, ValueError for an unsupported broker URL or an unusable agent id or
    prefix, ImportError naming the extra to install, a bus error when it cannot connect."""
    require_verification(iatp is not None, trust_bus, "tool service")
    if metrics is not None:
        require_metrics()
    middleware = [iatp.middleware(agent_id=agent_id)] if iatp is not None else []
    client = AMB(
        broker_backend(broker),
        broker,
        agent_id=agent_id,
        middleware=[*middleware, ReplyViaService(reply_prefix)],
    )
    service = ToolService(
        client,
        actions,
        agent_id=agent_id,
        verifies=iatp is not None,
        trust_bus=trust_bus,
        queue=queue,
        concurrency=concurrency,
        ingress_prefix=ingress_prefix,
        delivery_prefix=delivery_prefix,
    )
    async with stop_signals(stop) as stopping:
        try:
            await client.connect()
            await service.start()
            names = ", ".join(sorted(spec.name for spec in actions)) or "none"
            log.info(
                "tool service %s on %s (queue %s) with actions %s; senders %s",
                agent_id,
                broker,
                queue,
                names,
                "taken from the trusted bus" if trust_bus else "verified by IATP",
            )
            registry = service_registry([client], ToolMetrics(service)) if metrics is not None else None
            async with metrics_endpoint(metrics, registry, lambda: client.healthy) as url:
                await serving(
                    stopping,
                    ready_line(f"ready tools subjects={service.subject_prefix}> broker={broker}", url),
                    log,
                    "finishing the actions in flight",
                    client=client,
                )
        finally:
            try:
                await service.stop()
            finally:
                await client.close()
    return service


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker", required=True, help="Broker URL: nats://host:4222, redis://, kafka://, memory://name."
)
@verification_options
@click.option(
    "--workspace",
    type=click.Path(exists=True, file_okay=False),
    required=True,
    help="The directory of the fs.* actions (the control-plane service's --workspace).",
)
@click.option(
    "--max-read",
    type=click.IntRange(min=1),
    default=MAX_READ,
    show_default=True,
    help="Largest file fs.read returns, bytes.",
)
@click.option(
    "--max-write",
    type=click.IntRange(min=1),
    default=MAX_WRITE,
    show_default=True,
    help="Largest content fs.write takes, bytes (give the control plane's the same).",
)
@click.option(
    "--agent-id",
    default=TOOL_SERVICE,
    show_default=True,
    help="The service's agent id (the control plane's --tool-service).",
)
@click.option("--queue", default=QUEUE_GROUP, show_default=True, help="Queue group shared by instances.")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--ingress-prefix", default=INGRESS, show_default=True)
@click.option("--delivery-prefix", default=DELIVERY, show_default=True)
@click.option("--reply-prefix", default=REPLIES, show_default=True)
@metrics_options(METRICS_PORTS["tool"])
@log_level_option
def main(
    broker: str,
    identities: str | None,
    trust_bus: bool,
    nonce_store: str | None,
    nonce_prefix: str,
    workspace: str,
    max_read: int,
    max_write: int,
    agent_id: str,
    queue: str,
    concurrency: int,
    ingress_prefix: str,
    delivery_prefix: str,
    reply_prefix: str,
    log_level: str,
    key_refresh: float,
    verify_workers: int,
    metrics_host: str,
    metrics_port: int,
    metrics_token: str | None,
    no_metrics: bool,
) -> None:
    """Run the tool service (the providers of allowed actions, mediated mode) until SIGINT/SIGTERM."""
    verification = verification_from_options(
        identities, trust_bus, nonce_store, nonce_prefix, key_refresh, verify_workers
    )
    metrics = metrics_from_options(no_metrics, metrics_host, metrics_port, metrics_token)
    try:
        check_agent_id(agent_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--agent-id") from None
    actions = ActionRegistry()
    FileSystem(os.fspath(workspace), max_read=max_read, max_write=max_write).register(actions)

    async def serve_process() -> None:
        async with verification.opened(agent_id) as iatp:
            await serve(
                broker=broker,
                actions=actions,
                iatp=iatp,
                trust_bus=verification.trust_bus,
                agent_id=agent_id,
                queue=queue,
                concurrency=concurrency,
                ingress_prefix=ingress_prefix,
                delivery_prefix=delivery_prefix,
                reply_prefix=reply_prefix,
                metrics=metrics,
            )

    run(serve_process, log_level=log_level, errors=(ControlPlaneError,), name="tools")


if __name__ == "__main__":
    main()
