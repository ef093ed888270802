"""What the three service processes share: the verification options (identities, trust in the
bus, the shared nonce store), the bus client, logging, stop signals, the ready line, and errors
mapped to one line. The rules they implement are in ``docs/services.md``.

A service's ``main`` command collects its options and hands a coroutine to :func:`run`; its
``serve`` coroutine builds the bus client with :func:`service_client` and waits in
:func:`serving` inside :func:`stop_signals`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import click

from agent_os.amb import AMB, BrokerUnavailable, BusError, tracing
from agent_os.iatp import IATP, IATPConfigError, IATPError, RedisNonceStore
from agent_os.services._identity import PASSPHRASE_ENV

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
NONCE_STORE_ENV: Final = "AGENTOS_NONCE_STORE"
"""The environment variable that may hold ``--nonce-store`` (a Redis URL may carry a password)."""
NONCE_STORE_SCHEMES: Final = ("redis", "rediss")
NONCE_PREFIX: Final = "iatp:nonce:"
KEY_REFRESH: Final = 1.0
"""Seconds between two reads of a service's key store for revocations (``--key-refresh``)."""
BROKER_DOWN_EXIT_ENV: Final = "AGENTOS_BROKER_DOWN_EXIT"
"""The environment variable that may set :func:`broker_down_exit` (seconds; 0: never exit)."""
BROKER_DOWN_EXIT: Final = 120.0
PROCESS_ERRORS: Final[tuple[type[Exception], ...]] = (BusError, IATPError, ValueError, OSError, ImportError)
"""Errors a service reports as ``Error: <Type>: <message>`` (exit 1) instead of a traceback."""

_BACKENDS: Final = {
    "memory": "memory",
    "nats": "nats",
    "tls": "nats",
    "redis": "redis",
    "rediss": "redis",
    "kafka": "kafka",
}

F = TypeVar("F", bound=Callable[..., Any])


def broker_backend(url: str) -> str:
    """The bus backend for a broker URL (``memory://``, ``nats://``, ``tls://``, ``redis://``,
    ``rediss://``, ``kafka://``). Raises ValueError for another scheme."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    backend = _BACKENDS.get(scheme)
    if backend is None:
        raise ValueError(f"unsupported broker URL {url!r}: use memory://, nats://, redis:// or kafka://")
    return backend


# -- sender verification -----------------------------------------------------------------------


def nonce_store_url(url: str) -> str:
    """``url`` if it names a Redis server for the shared nonce store (``redis://`` or
    ``rediss://`` with a host: ``redis://host:6379/0``); raises ValueError otherwise."""
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0].rpartition("@")[2]
    if not sep or scheme not in NONCE_STORE_SCHEMES or not host:
        raise ValueError(
            f"the nonce store must be a Redis URL such as redis://127.0.0.1:6379/0 (or rediss:// "
            f"for TLS), not {url!r}"
        )
    return url


@dataclass(frozen=True, slots=True)
class Verification:
    """How a service process establishes senders: IATP identities (a file key store and its
    passphrase) or, explicitly, the bus's word (``trust_bus``). ``nonce_store``: a Redis URL
    (it may hold a password: kept out of the repr) whose :class:`~agent_os.iatp.RedisNonceStore`, keys
    under ``nonce_prefix``, the instances of a queue group share, so a replayed message is
    refused by whichever instance it reaches (``docs/services.md``, "Queue groups share replay
    protection")."""

    identities: str | None
    passphrase: str | None = field(default=None, repr=False)
    trust_bus: bool = False
    nonce_store: str | None = field(default=None, repr=False)
    nonce_prefix: str = NONCE_PREFIX
    key_refresh: float = KEY_REFRESH
    verify_workers: int = 0

    async def open(self, agent_id: str) -> IATP | None:
        """The service's IATP (None with ``trust_bus``), its key store open and, with
        ``nonce_store``, its shared nonce store checked to answer (close it with
        :meth:`close`, or use :meth:`opened`). Raises WrongPassphrase, KeyStoreError
        subclasses, IATPConfigError when the store holds no signing key for ``agent_id`` (the
        service signs its replies and signals with it), ValueError for a nonce store that is not
        a Redis URL, NonceStoreUnavailable when it does not answer."""
        if self.identities is None:
            return None
        store = None
        if self.nonce_store is not None:
            store = RedisNonceStore(nonce_store_url(self.nonce_store), prefix=self.nonce_prefix)
        try:
            iatp = IATP(
                "file",
                key_path=self.identities,
                passphrase=self.passphrase,
                nonce_store=store,
                verify_workers=self.verify_workers,
            )
            await iatp.open()
            if not iatp.registry.is_local(agent_id):
                raise IATPConfigError(
                    f"the key store {self.identities} holds no signing key for {agent_id!r}: register "
                    "the service's identity in it (see docs/services.md, 'Senders are verified')"
                )
            if store is not None:
                # Fail at the start, not on every message: an unreachable store rejects them all.
                await store.claim(f"{agent_id}.startup", secrets.token_bytes(16), 1)
        except BaseException:
            if store is not None:
                await store.close()
            raise
        return iatp

    @staticmethod
    async def close(iatp: IATP | None) -> None:
        """Release what :meth:`open` opened beyond the key store: the shared nonce store."""
        if iatp is not None and iatp.nonce_store is not None:
            await iatp.nonce_store.close()

    @asynccontextmanager
    async def opened(self, agent_id: str) -> AsyncIterator[IATP | None]:
        """:meth:`open` for the block, then :meth:`close`. Inside it the key store is read
        every ``key_refresh`` seconds (:meth:`agent_os.iatp.IATP.watch_keys`), so a key revoked
        there by another process is refused within that time (``docs/services.md``,
        "Revoking a key")."""
        iatp = await self.open(agent_id)
        watch: asyncio.Task[None] | None = None
        try:
            if iatp is not None:
                watch = asyncio.get_running_loop().create_task(iatp.watch_keys(self.key_refresh))
            yield iatp
        finally:
            try:
                if watch is not None:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
            finally:
                await self.close(iatp)


class FiniteRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities, which its bound checks let
    through (every comparison with NaN is false): a usage error, not a service that starts
    with ``--key-refresh nan``."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def verification_options(command: F) -> F:
    """Add ``--identities PATH``, ``--trust-bus``, ``--nonce-store URL``, ``--nonce-prefix``,
    ``--key-refresh`` and ``--verify-workers`` to a service command (its callback gets
    ``identities``, ``trust_bus``, ``nonce_store``, ``nonce_prefix``, ``key_refresh`` and
    ``verify_workers``; turn them into a :class:`Verification` with
    :func:`verification_from_options`, which checks them)."""
    command = click.option(
        "--verify-workers",
        type=click.IntRange(0, 64),
        default=0,
        show_default=True,
        metavar="N",
        help="Check the ed25519 signatures of incoming messages in N worker processes, off the "
        "event loop's core (docs/trust.md, 'Verification in worker processes'). Needs --identities.",
    )(command)
    command = click.option(
        "--key-refresh",
        type=FiniteRange(0.05, 60),
        default=KEY_REFRESH,
        show_default=True,
        metavar="SECONDS",
        help="Read the --identities key store this often for keys revoked there by another process: "
        "they are refused within this time. Unreadable for 3 periods: every message is refused.",
    )(command)
    command = click.option(
        "--nonce-prefix",
        default=NONCE_PREFIX,
        show_default=True,
        help="Key prefix in the nonce store; the instances of one queue group use the same one, "
        "other deployments sharing the Redis their own.",
    )(command)
    command = click.option(
        "--nonce-store",
        envvar=NONCE_STORE_ENV,
        metavar="redis://HOST:PORT/DB",
        help="A Redis that the instances of this service's queue group share to refuse replayed "
        "messages: without it each instance remembers only the nonces it saw itself, so a "
        "replay handed to another instance (or to a restarted one) would pass. Needs "
        f"--identities; checked at start; an unreachable store rejects messages. Or {NONCE_STORE_ENV}.",
    )(command)
    command = click.option(
        "--trust-bus",
        is_flag=True,
        help="Take the envelope's claimed sender without verifying it. Only for a broker whose "
        "ACLs already authenticate senders (no agent can publish under another's name).",
    )(command)
    return click.option(
        "--identities",
        type=click.Path(exists=True, file_okay=False),
        help="An IATP file key store (directory) with the service's own key and the agents' public "
        f"identities; every message is verified. Passphrase in {PASSPHRASE_ENV}.",
    )(command)


def verification_from_options(
    identities: str | None,
    trust_bus: bool,
    nonce_store: str | None = None,
    nonce_prefix: str = NONCE_PREFIX,
    key_refresh: float = KEY_REFRESH,
    verify_workers: int = 0,
) -> Verification:
    """Check the verification options. Raises click.UsageError for neither or both of
    ``--identities`` and ``--trust-bus``, for ``--identities`` without the passphrase variable,
    for a ``nonce_store`` without ``--identities`` (it holds the nonces of verified signatures)
    or one that is not a Redis URL."""
    if identities is not None and trust_bus:
        raise click.UsageError("--identities and --trust-bus exclude each other")
    if verify_workers and identities is None:
        raise click.UsageError("--verify-workers needs --identities: the workers check signatures")
    if nonce_store is not None:
        if identities is None:
            raise click.UsageError(
                "--nonce-store needs --identities: it remembers the nonces of verified signatures"
            )
        try:
            nonce_store_url(nonce_store)
        except ValueError as exc:
            raise click.UsageError(f"--nonce-store: {exc}") from None
    if identities is None:
        if not trust_bus:
            raise click.UsageError(
                "refusing to start without sender verification: give --identities PATH (an IATP "
                f"key store; passphrase in {PASSPHRASE_ENV}), or --trust-bus when the broker's "
                "ACLs already authenticate senders"
            )
        return Verification(None, None, True)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if not passphrase:
        raise click.UsageError(f"--identities needs the key store's passphrase in {PASSPHRASE_ENV}")
    return Verification(
        identities,
        passphrase,
        nonce_store=nonce_store,
        nonce_prefix=nonce_prefix,
        key_refresh=key_refresh,
        verify_workers=verify_workers,
    )


def service_client(broker: str, agent_id: str, iatp: IATP | None) -> AMB:
    """The service's bus client; with ``iatp``, its middleware verifies every delivery before
    the service sees it (viewer: the service) and signs what the service sends. Raises
    ValueError for an unsupported broker URL."""
    middleware = [iatp.middleware(agent_id=agent_id)] if iatp is not None else []
    return AMB(broker_backend(broker), broker, agent_id=agent_id, middleware=middleware)


# -- the process -------------------------------------------------------------------------------

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

log_level_option: Final = click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Log to stderr from this level on.",
)
"""Every service's ``--log-level``: a level name, any case; anything else is a usage error."""


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (a name such as INFO)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(
    main: Callable[[], Coroutine[Any, Any, Any]],
    *,
    log_level: str,
    errors: tuple[type[Exception], ...] = (),
    name: str = "service",
) -> None:
    """Configure logging and tracing, and run ``main()`` to its end. Tracing is set up from the
    ``OTEL_*`` environment variables (service name ``agent-os-<name>`` unless they name one;
    nothing when they configure no tracing, ``docs/observability.md``, "Tracing"), and its last
    spans are exported when ``main()`` ends. :data:`PROCESS_ERRORS` and ``errors`` become a
    click error (``Error: <Type>: <message>``, exit 1); anything else propagates."""
    configure_logging(log_level)
    try:
        with tracing.configured(f"agent-os-{name}"):
            asyncio.run(main())
    except (*PROCESS_ERRORS, *errors) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@asynccontextmanager
async def stop_signals(stop: asyncio.Event | None = None) -> AsyncIterator[asyncio.Event]:
    """SIGINT and SIGTERM set the yielded event (``stop``, or a new one) inside the block."""
    event = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, event.set)
    try:
        yield event
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


def broker_down_exit() -> float:
    """Seconds a service goes on with its broker connection down before it exits: from
    :data:`BROKER_DOWN_EXIT_ENV` (0: never), default :data:`BROKER_DOWN_EXIT`. Raises
    ValueError for a value that is not a non-negative number."""
    text = os.environ.get(BROKER_DOWN_EXIT_ENV)
    if text is None:
        return BROKER_DOWN_EXIT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value == 0 or 0.1 <= value <= 1e9):  # NaN and infinities fail too
        raise ValueError(
            f"{BROKER_DOWN_EXIT_ENV} must be 0 (never) or a number of seconds from 0.1 to 1e9, "
            f"got {text[:40]!r}"
        )
    return value


async def serving(
    stop: asyncio.Event, ready: str, log: logging.Logger, stopping: str, *, client: AMB | None = None
) -> None:
    """Print the ``ready`` line on stdout, wait for ``stop``, and log ``stopping: <stopping>``.

    With ``client``, its broker connection is watched: once it has been down (``client.healthy``
    false) for :func:`broker_down_exit` seconds the service stops with BrokerUnavailable (exit
    1) so that its supervisor starts it again, rather than live on deaf."""
    limit = broker_down_exit() if client is not None else 0.0
    print(ready, flush=True)
    if client is None or limit == 0:
        await stop.wait()
    else:
        await _watch_broker(stop, client, limit, log)
    log.info("stopping: %s", stopping)


async def _watch_broker(stop: asyncio.Event, client: AMB, limit: float, log: logging.Logger) -> None:
    """Wait for ``stop``; raise BrokerUnavailable once ``client`` has been unhealthy ``limit``
    seconds in a row."""
    loop = asyncio.get_running_loop()
    down_since: float | None = None
    every = min(1.0, limit / 4)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()
        if client.healthy:
            if down_since is not None:
                log.warning("the broker connection is back")
            down_since = None
            continue
        now = loop.time()
        if down_since is None:
            down_since = now
            log.error("the broker connection is down; exiting if it stays down %gs", limit)
        elif now - down_since >= limit:
            raise BrokerUnavailable(f"the broker connection has been down for {limit:g}s; exiting")
