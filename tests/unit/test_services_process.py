"""services._process: what the three service processes share (verification options, the
identities, error mapping, stop signals, the ready line)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import click
import pytest

from iatp import IATP, IATPConfigError, WrongPassphrase
from services._identity import PASSPHRASE_ENV
from services._process import (
    Verification,
    broker_backend,
    run,
    serving,
    stop_signals,
    verification_from_options,
)

PASSPHRASE = "correct horse battery staple"


async def make_store(path: Path, *agents: str) -> None:
    """A file key store holding keys for ``agents`` (the cheapest KDF level: tests only)."""
    iatp = IATP("file", key_path=str(path), passphrase=PASSPHRASE, kdf_level="interactive")
    for agent in agents:
        await iatp.register_agent(agent)


def test_verification_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    with pytest.raises(click.UsageError, match="refusing to start without sender verification"):
        verification_from_options(None, False)
    with pytest.raises(click.UsageError, match="exclude each other"):
        verification_from_options(str(tmp_path), True)
    with pytest.raises(click.UsageError, match=PASSPHRASE_ENV):
        verification_from_options(str(tmp_path), False)
    assert verification_from_options(None, True) == Verification(None, None, True)
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    chosen = verification_from_options(str(tmp_path), False)
    assert chosen == Verification(str(tmp_path), PASSPHRASE, False)
    assert PASSPHRASE not in repr(chosen)


async def test_opening_the_identities(tmp_path: Path) -> None:
    store = tmp_path / "keys"
    await make_store(store, "memory-service")
    iatp = await Verification(str(store), PASSPHRASE).open("memory-service")
    assert iatp is not None
    assert iatp.registry.is_local("memory-service")
    with pytest.raises(IATPConfigError, match="no signing key for 'verifier-service'"):
        await Verification(str(store), PASSPHRASE).open("verifier-service")
    with pytest.raises(WrongPassphrase):
        await Verification(str(store), "wrong passphrase").open("memory-service")
    assert await Verification(None, None, True).open("memory-service") is None


def test_broker_backend() -> None:
    assert [
        broker_backend(u) for u in ("memory://x", "nats://h:1", "tls://h", "rediss://h", "kafka://h")
    ] == [
        "memory",
        "nats",
        "nats",
        "redis",
        "kafka",
    ]
    with pytest.raises(ValueError, match="unsupported broker URL 'amqp://h'"):
        broker_backend("amqp://h")


def test_run_maps_known_errors_to_one_line_and_lets_bugs_through() -> None:
    async def bad_option() -> None:
        raise ValueError("no such thing")

    async def bug() -> None:
        raise KeyError("bug")

    class Custom(Exception):
        pass

    async def custom() -> None:
        raise Custom("named by the service")

    with pytest.raises(click.ClickException) as err:
        run(bad_option, log_level="warning")
    assert err.value.message == "ValueError: no such thing"
    with pytest.raises(click.ClickException, match="Custom: named by the service"):
        run(custom, log_level="warning", errors=(Custom,))
    with pytest.raises(KeyError):
        run(bug, log_level="warning")


async def test_stop_signals_and_the_ready_line(capsys: pytest.CaptureFixture[str]) -> None:
    loop = asyncio.get_running_loop()
    async with stop_signals() as stop:
        task = asyncio.create_task(serving(stop, "ready test", logging.getLogger("t"), "done"))
        await asyncio.sleep(0.01)
        assert capsys.readouterr().out == "ready test\n"
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the event
        await asyncio.wait_for(task, 5)
    assert stop.is_set()
    assert not loop.remove_signal_handler(signal.SIGTERM)  # removed on the way out
