"""Hostile numbers in the options of the control plane, IATP and the services: NaN, infinities,
bools, strings and integers of thousands of digits. A check such as ``per <= 0`` lets NaN
through, and a rate limit of 5 per NaN seconds then allowed every action (its bucket refilled
to full on each take). Each is now refused with the error class its part documents, naming
the option; the command-line options refuse them as usage errors."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import click
import numpy as np
import pytest

from agent_os.amb import AMB, ConfigError
from agent_os.cli import main as cli_main
from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk._errors import CMVKConfigError
from agent_os.control_plane import FlightRecorder, KernelSpace, Policy
from agent_os.control_plane.actions.code.job import CodeLimits
from agent_os.control_plane.actions.code.monty import MontyBackend
from agent_os.control_plane.actions.fs import FileSystem
from agent_os.control_plane.actions.http import Http
from agent_os.control_plane.actions.llm import LLM
from agent_os.control_plane.actions.mcp import McpTools
from agent_os.control_plane.actions.proc import Process
from agent_os.control_plane.actions.snapshots import SnapshotStore
from agent_os.control_plane.actions.sql import Sql
from agent_os.control_plane.errors import (
    KernelError,
    PolicyError,
    RecorderConfigError,
    RecorderError,
    SandboxError,
    SignalError,
    TaskError,
)
from agent_os.control_plane.kernel.signals import SignalDispatcher
from agent_os.control_plane.mediation.replies import PendingRequests
from agent_os.control_plane.policy.ratelimit import RateLimit, RateLimiter, parse_window
from agent_os.control_plane.sandbox.bwrap import SandboxConfigError, SandboxLimits
from agent_os.control_plane.tasks.ledger import TaskLedger
from agent_os.iatp import IATP
from agent_os.iatp.errors import IATPConfigError
from agent_os.iatp.noncestore import RedisNonceStore
from agent_os.iatp.replay import NonceCache
from agent_os.services._process import FiniteRange
from agent_os.services.control_plane_service._rate_limits import RedisRateLimits

_ROOT: str = tempfile.mkdtemp(prefix="agentos-numbers-")
_DB: str = os.path.join(_ROOT, "empty.db")
open(_DB, "wb").close()
HUGE = 10**5000
BAD_TIMES: dict[str, object] = {
    "NaN": math.nan,
    "infinity": math.inf,
    "negative": -1.0,
    "bool": True,
    "text": "5",
    "huge int": HUGE,
}
BAD_COUNTS: dict[str, object] = {"NaN": math.nan, "float": 2.5, "bool": True, "text": "2", "negative": -1}

# (what, a call taking the bad value, the error class the part documents, the option's name)
TIMES: list[tuple[str, Callable[[Any], object], type[Exception], str]] = [
    ("rate-limit window", lambda v: RateLimit(5, v), PolicyError, "window"),
    ("rate-limit window text", parse_window, PolicyError, "window"),
    ("Policy.rate_limit", lambda v: Policy.rate_limit(5, v), PolicyError, "window"),
    (
        "recorder flush_interval",
        lambda v: FlightRecorder("memory", flush_interval=v),
        RecorderConfigError,
        "flush",
    ),
    (
        "recorder retention_days",
        lambda v: FlightRecorder("memory", retention_days=v),
        RecorderConfigError,
        "days",
    ),
    (
        "recorder head_interval",
        lambda v: FlightRecorder("memory", head_interval=v),
        RecorderConfigError,
        "head",
    ),
    ("IATP clock_skew", lambda v: IATP(clock_skew=v), IATPConfigError, "clock_skew"),
    ("IATP max_age", lambda v: IATP(max_age=v), IATPConfigError, "max_age"),
    ("IATP session_lifetime", lambda v: IATP(session_lifetime=v), IATPConfigError, "session_lifetime"),
    ("IATP rotation_grace", lambda v: IATP(rotation_grace=v), IATPConfigError, "rotation_grace"),
    (
        "nonce store timeout",
        lambda v: RedisNonceStore("redis://127.0.0.1:6379/0", timeout=v),
        IATPConfigError,
        "timeout",
    ),
    ("mediated replies ttl", lambda v: PendingRequests(default_ttl=v), ValueError, "default_ttl"),
    ("LLM timeout", lambda v: LLM("m", timeout=v), KernelError, "timeout"),
    ("MCP timeout", lambda v: McpTools({}, timeout=v), KernelError, "timeout"),
    ("snapshot ttl", lambda v: SnapshotStore(ttl=v), KernelError, "ttl"),
    (
        "shared rate limits timeout",
        lambda v: RedisRateLimits("redis://127.0.0.1:6379/0", timeout=v),
        ValueError,
        "timeout",
    ),
    ("kernel timeout", lambda v: KernelSpace(timeout=v), KernelError, "timeout"),
    ("kernel signal_timeout", lambda v: KernelSpace(signal_timeout=v), KernelError, "signal_timeout"),
    ("SQL timeout", lambda v: Sql({"db": _DB}, timeout=v), KernelError, "timeout"),
    ("HTTP timeout", lambda v: Http(["example.com"], timeout=v), KernelError, "timeout"),
    ("process timeout", lambda v: Process(["/bin/true"], timeout=v), KernelError, "timeout"),
    ("CMVK timeout", lambda v: CMVK(["a"], timeout=v), CMVKConfigError, "timeout"),
    ("CMVK backoff", lambda v: CMVK(["a"], backoff=v), CMVKConfigError, "backoff"),
    ("model weight", lambda v: ModelSpec("a", weight=v), CMVKConfigError, "weight"),
    ("code timeout", lambda v: CodeLimits(timeout=v), KernelError, "timeout"),
]
COUNTS: list[tuple[str, Callable[[Any], object], type[Exception], str]] = [
    (
        "recorder batch_size",
        lambda v: FlightRecorder("memory", batch_size=v),
        RecorderConfigError,
        "batch_size",
    ),
    ("IATP max_nonces", lambda v: IATP(max_nonces=v), IATPConfigError, "max_entries"),
    ("nonce cache", lambda v: NonceCache(v), ValueError, "max_age_ns"),
    ("task ledger", lambda v: TaskLedger(keep_finished=v), TaskError, "keep_finished"),
    ("signal queue", lambda v: SignalDispatcher(queue_size=v), SignalError, "queue_size"),
    ("kernel keep_finished", lambda v: KernelSpace(keep_finished=v), KernelError, "keep_finished"),
    ("mediated replies max_pending", lambda v: PendingRequests(max_pending=v), ValueError, "max_pending"),
    ("LLM retries", lambda v: LLM("m", retries=v), KernelError, "retries"),
    ("monty pool", lambda v: MontyBackend(pool_size=v), KernelError, "pool_size"),
    (
        "kernel max_concurrent_agents",
        lambda v: KernelSpace(max_concurrent_agents=v),
        KernelError,
        "concurrent",
    ),
    ("file max_write", lambda v: FileSystem(_ROOT, max_write=v), KernelError, "max_write"),
    ("file max_read", lambda v: FileSystem(_ROOT, max_read=v), KernelError, "max_read"),
    (
        "bus max_message_bytes",
        lambda v: AMB("memory", "memory://n", max_message_bytes=v),
        ConfigError,
        "max_message",
    ),
    ("CMVK retries", lambda v: CMVK(["a"], retries=v), CMVKConfigError, "retries"),
    ("CMVK quorum", lambda v: CMVK(["a", "b"], quorum=v), CMVKConfigError, "quorum"),
    ("IATP lookahead", lambda v: IATP().middleware(lookahead=v), IATPConfigError, "lookahead"),
]


async def _agent() -> None:
    return None


# Past what the machinery under them takes (a float's range, prlimit's and Monty's 64 bits).
TOO_LARGE: list[tuple[str, Callable[[], object], type[Exception]]] = [
    ("rate limit", lambda: RateLimit(10**400, 60.0), PolicyError),
    ("rate-limit spec", lambda: RateLimit.parse("9" * 400 + "/1m"), PolicyError),
    ("rate-limit spec, a superscript digit", lambda: RateLimit.parse("\u00b2/1m"), PolicyError),
    ("rate limit of a huge int", lambda: Policy.rate_limit(10**5000), PolicyError),
    ("code memory", lambda: CodeLimits(memory=2**70), KernelError),
    ("code timeout", lambda: CodeLimits(timeout=1e300), KernelError),
    ("sandbox memory", lambda: SandboxLimits(memory=2**64), SandboxConfigError),
    ("sandbox huge", lambda: SandboxLimits(memory=10**5000), SandboxConfigError),
    ("agent priority", lambda: KernelSpace().register(_agent, priority=10**5000), KernelError),
    ("agent priority text", lambda: KernelSpace().register(_agent, priority="high"), KernelError),  # type: ignore[call-overload]
    ("IATP session lifetime", lambda: IATP(session_lifetime=1e300), IATPConfigError),
]


@pytest.mark.parametrize(("what", "call", "error", "name"), TIMES, ids=[t[0] for t in TIMES])
@pytest.mark.parametrize("value", BAD_TIMES.values(), ids=list(BAD_TIMES))
def test_a_bad_time_is_refused_naming_the_option(
    what: str, call: Callable[[Any], object], error: type[Exception], name: str, value: object
) -> None:
    if what == "rate-limit window text" and value == "5":
        pytest.skip("'5' is not a window spelling: refused as one (tested below)")
    with pytest.raises(error, match=name):
        call(value)


@pytest.mark.parametrize(("what", "call", "error", "name"), COUNTS, ids=[t[0] for t in COUNTS])
@pytest.mark.parametrize("value", BAD_COUNTS.values(), ids=list(BAD_COUNTS))
def test_a_bad_count_is_refused_naming_the_option(
    what: str, call: Callable[[Any], object], error: type[Exception], name: str, value: object
) -> None:
    with pytest.raises(error, match=name):
        call(value)


def test_a_rate_limit_holds_with_the_windows_it_accepts() -> None:
    # The window the fail-open case used to slip through; a valid one still limits.
    with pytest.raises(PolicyError):
        parse_window("5")
    limiter = RateLimiter(RateLimit(5, parse_window("1h")))
    assert [limiter.take("agent") for _ in range(7)] == [True] * 5 + [False] * 2


def _commands(group: click.Group, ctx: click.Context) -> Iterator[click.Command]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from _commands(command, click.Context(command, parent=ctx))
        elif command is not None:
            yield command


def test_every_float_option_of_the_command_line_refuses_nan() -> None:
    ctx = click.Context(cli_main)
    floats = [
        (command.name, param.name)
        for command in _commands(cli_main, ctx)
        for param in command.params
        if isinstance(param.type, click.types.FloatParamType)
    ]
    assert floats, "no float option found: the walk over the commands is broken"
    loose = [
        (command.callback.__module__ if command.callback else command.name, param.name)
        for command in _commands(cli_main, ctx)
        for param in command.params
        if isinstance(param.type, click.types.FloatParamType) and not isinstance(param.type, FiniteRange)
    ]
    assert loose == []
    for text in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(click.BadParameter, match="finite"):
            FiniteRange().convert(text, None, None)
    with pytest.raises(click.BadParameter, match="finite"):
        FiniteRange(0.05, 60).convert("nan", None, None)  # the bounds let NaN through
    assert FiniteRange(0.05, 60).convert("1.5", None, None) == 1.5


@pytest.mark.parametrize(("what", "call", "error"), TOO_LARGE, ids=[t[0] for t in TOO_LARGE])
def test_a_value_past_what_the_machinery_takes_is_refused(
    what: str, call: Callable[[], object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("value", [math.nan, math.inf, True, "5", 1e300], ids=repr)
async def test_times_given_per_call_are_checked(value: object) -> None:
    iatp = IATP()
    await iatp.register_agent("a")
    await iatp.register_agent("b")
    with pytest.raises(IATPConfigError, match="ttl"):
        await iatp.sign("a", "m", "b", ttl=value)  # type: ignore[arg-type]
    with pytest.raises(IATPConfigError, match="expires_in"):
        await iatp.establish_trust("a", "b", 0.5, expires_in=value)  # type: ignore[arg-type]
    with pytest.raises(IATPConfigError, match="grace"):
        await iatp.rotate_key("a", grace=value)  # type: ignore[arg-type]
    kernel = KernelSpace()
    try:

        @kernel.register
        async def agent() -> int:
            return 1

        with pytest.raises(KernelError, match="timeout"):
            await kernel.execute(agent, timeout=value)  # type: ignore[arg-type]
        with pytest.raises(RecorderError, match="limit"):
            await kernel.recorder.query(limit=-1 if value is True else value)  # type: ignore[arg-type]
    finally:
        await kernel.close()


def test_environment_numbers_are_checked() -> None:
    from agent_os.control_plane.sandbox.bwrap import _uid_base

    for text in ("0", "1000", "-5", "abc", "\u00b2", "9" * 30):
        with pytest.raises(SandboxError, match="UID_BASE"):
            _uid_base(text)
    assert _uid_base("1500000000") == 1_500_000_000


def test_other_number_types_are_kept_as_their_values(tmp_path: Any) -> None:
    # Taken by value and stored plain, so that what is built from them later (a sandbox's
    # limits, a message) sees an int or a float.
    limits = CodeLimits(memory=np.int64(2**28), processes=np.int64(8), timeout=np.float32(2.5))  # type: ignore[arg-type]
    assert (type(limits.memory), type(limits.processes), type(limits.timeout)) == (int, int, float)
    with pytest.raises(KernelError, match="2\\*\\*61"):
        CodeLimits(memory=2**62)
    kernel = KernelSpace(timeout=None)  # type: ignore[arg-type]  # no time limit, as before
    assert kernel.timeout is None


def test_thresholds_and_limits_of_other_types() -> None:
    for bad in ("0.8", None, math.nan, True, 0, 1.5, -0.1):
        with pytest.raises(CMVKConfigError, match="consensus_threshold"):
            CMVK(["a"], consensus_threshold=bad)  # type: ignore[arg-type]
    assert CMVK(["a"], consensus_threshold=np.float64(0.8)).consensus_threshold == 0.8
    assert CMVK(["a"], consensus_threshold=Decimal("0.8")).consensus_threshold == 0.8  # type: ignore[arg-type]
    assert type(RateLimit(np.int64(5)).limit) is int  # type: ignore[arg-type]
    assert RateLimit.parse(np.int64(100)) == RateLimit(100, 60.0)  # type: ignore[arg-type]
