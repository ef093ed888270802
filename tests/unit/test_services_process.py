"""services._process: what the three service processes share (verification options, the
identities, error mapping, stop signals, the ready line)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from types import ModuleType

import click
import pytest
from click.testing import CliRunner

from agent_os.iatp import IATPConfigError, WrongPassphrase
from agent_os.services import control_plane_service, memory_service, verifier_service
from agent_os.services._identity import PASSPHRASE_ENV
from agent_os.services._process import (
    NONCE_PREFIX,
    NONCE_STORE_ENV,
    Verification,
    broker_backend,
    nonce_store_url,
    run,
    serving,
    stop_signals,
    verification_from_options,
)
from tests.support.identities import PASSPHRASE, make_store


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


async def test_verify_workers_reach_every_middleware_of_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    store = tmp_path / "keys"
    await make_store(store, "memory-service")
    chosen = verification_from_options(str(store), False, verify_workers=2)
    assert chosen.verify_workers == 2
    iatp = await chosen.open("memory-service")
    assert iatp is not None
    middleware = iatp.middleware(agent_id="memory-service")  # as service_client builds it
    try:
        assert middleware.workers is not None
        assert middleware.workers.n == 2
        assert iatp.middleware(verify_workers=0).workers is None  # the caller's word wins
    finally:
        middleware.close()
    assert (await Verification(str(store), PASSPHRASE).open("memory-service")).middleware().workers is None  # type: ignore[union-attr]


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


# -- the shared nonce store (--nonce-store) -------------------------------------------------------


def test_a_nonce_store_must_be_a_redis_url() -> None:
    for good in ("redis://127.0.0.1:6379/0", "rediss://cache.example:6380/2", "redis://:pw@h:1/0"):
        assert nonce_store_url(good) == good
    for bad in ("http://127.0.0.1:6379", "127.0.0.1:6379", "redis://", "redis:///0", "nats://h:4222", ""):
        with pytest.raises(ValueError, match="must be a Redis URL"):
            nonce_store_url(bad)


def test_nonce_store_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    with pytest.raises(click.UsageError, match="--nonce-store needs --identities"):
        verification_from_options(None, True, "redis://127.0.0.1:6379/0")
    with pytest.raises(click.UsageError, match=r"--nonce-store: .*must be a Redis URL"):
        verification_from_options(str(tmp_path), False, "http://127.0.0.1:6379")
    chosen = verification_from_options(str(tmp_path), False, "redis://:s3cret@127.0.0.1:6379/0", "cp:")
    assert chosen == Verification(
        str(tmp_path), PASSPHRASE, nonce_store="redis://:s3cret@127.0.0.1:6379/0", nonce_prefix="cp:"
    )
    assert "s3cret" not in repr(chosen)  # a Redis URL may carry a password
    assert verification_from_options(str(tmp_path), False).nonce_store is None


@pytest.mark.parametrize("service", [memory_service, verifier_service, control_plane_service])
def test_each_service_command_takes_the_nonce_store(
    service: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main: click.Command = service.main
    runner = CliRunner()
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    monkeypatch.setenv("AGENTOS_ADMIN_TOKEN", "t" * 32)
    monkeypatch.delenv(NONCE_STORE_ENV, raising=False)
    helped = runner.invoke(main, ["--help"], terminal_width=200)
    assert helped.exit_code == 0
    assert "--nonce-store redis://HOST:PORT/DB" in helped.output
    assert "--nonce-prefix TEXT" in helped.output
    assert NONCE_PREFIX in helped.output
    base = (
        ["--broker", "memory://nonce-cli", "--model", "m"]
        if service is verifier_service
        else ["--broker", "memory://x"]
    )
    # Refused while the options are read, before anything starts: exit 2 with the reason.
    refused = runner.invoke(main, [*base, "--identities", str(tmp_path), "--nonce-store", "http://h:6379"])
    assert refused.exit_code == 2
    assert "must be a Redis URL such as redis://127.0.0.1:6379/0" in refused.output
    from_env = runner.invoke(main, [*base, "--trust-bus"], env={NONCE_STORE_ENV: "redis://127.0.0.1:6379/0"})
    assert from_env.exit_code == 2
    assert "--nonce-store needs --identities" in from_env.output
