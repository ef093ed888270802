"""What the three service processes share: options for sender verification, opening the
identities, logging, stop signals, the ready line, and errors mapped to a one-line message.

A service's ``main`` command collects its options and hands a coroutine to :func:`run`; its
``serve`` coroutine builds the bus client with :func:`service_client` and waits in
:func:`serving`::

    async def serve(..., stop=None):
        client = service_client(broker, agent_id, iatp)
        async with stop_signals(stop) as stop:
            try:
                await start_things()
                await serving(stop, "ready memory ...", log, "answering the requests in flight")
            finally:
                await close_things()

SIGINT and SIGTERM set ``stop`` while the service runs (and while it closes, so a second
signal does not interrupt the drain); the handlers are removed when it is done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import click

from amb import AMB, BusError
from iatp import IATP, IATPConfigError, IATPError
from services._identity import PASSPHRASE_ENV

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
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


@dataclass(frozen=True, slots=True)
class Verification:
    """How a service process establishes senders: IATP identities (a file key store and its
    passphrase) or, explicitly, the bus's word (``trust_bus``)."""

    identities: str | None
    passphrase: str | None = field(default=None, repr=False)
    trust_bus: bool = False

    async def open(self, agent_id: str) -> IATP | None:
        """The service's IATP (None with ``trust_bus``), its key store open. Raises
        WrongPassphrase, KeyStoreError subclasses, or IATPConfigError when the store holds no
        signing key for ``agent_id`` (the service signs its replies and signals with it)."""
        if self.identities is None:
            return None
        iatp = IATP("file", key_path=self.identities, passphrase=self.passphrase)
        await iatp.open()
        if not iatp.registry.is_local(agent_id):
            raise IATPConfigError(
                f"the key store {self.identities} holds no signing key for {agent_id!r}: register "
                "the service's identity in it (see the README, 'CLI and services')"
            )
        return iatp


def verification_options(command: F) -> F:
    """Add ``--identities PATH`` and ``--trust-bus`` to a service command (its callback gets
    ``identities`` and ``trust_bus``; turn them into a :class:`Verification` with
    :func:`verification_from_options`)."""
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


def verification_from_options(identities: str | None, trust_bus: bool) -> Verification:
    """Check the verification options. Raises click.UsageError for neither or both of them, or
    for ``--identities`` without the passphrase variable."""
    if identities is not None and trust_bus:
        raise click.UsageError("--identities and --trust-bus exclude each other")
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
    return Verification(identities, passphrase)


def service_client(broker: str, agent_id: str, iatp: IATP | None) -> AMB:
    """The service's bus client; with ``iatp``, its middleware verifies every delivery before
    the service sees it (viewer: the service) and signs what the service sends. Raises
    ValueError for an unsupported broker URL."""
    middleware = [iatp.middleware(agent_id=agent_id)] if iatp is not None else []
    return AMB(broker_backend(broker), broker, agent_id=agent_id, middleware=middleware)


# -- the process -------------------------------------------------------------------------------


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (a name such as INFO)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(
    main: Callable[[], Coroutine[Any, Any, Any]],
    *,
    log_level: str,
    errors: tuple[type[Exception], ...] = (),
) -> None:
    """Configure logging and run ``main()`` to its end. :data:`PROCESS_ERRORS` and ``errors``
    become a click error (``Error: <Type>: <message>``, exit 1); anything else propagates."""
    configure_logging(log_level)
    try:
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


async def serving(stop: asyncio.Event, ready: str, log: logging.Logger, stopping: str) -> None:
    """Print the ``ready`` line on stdout, wait for ``stop``, and log ``stopping: <stopping>``."""
    print(ready, flush=True)
    await stop.wait()
    log.info("stopping: %s", stopping)
