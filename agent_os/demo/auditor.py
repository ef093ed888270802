"""The auditor demo (``deploy/demos/auditor``): claims cross-checked by a panel of models (the
verifier service, CMVK) and remembered in memory (the memory service, EMK on PostgreSQL with
pgvector), with no API key.

``python -m agent_os.demo.auditor models`` serves three deterministic models (an
OpenAI-compatible server: ``agent_os.cmvk.testing.ScriptedLLMServer`` with the fact checks of
:data:`CLAIMS`); ``keys DIR`` makes the key stores; ``run ...`` sends every claim to the verifier
service, stores each verdict in memory, then recalls them by meaning and by tag, prints what
happened and exits 0 (``--keep-running``: it goes on auditing until SIGINT/SIGTERM). Traced
(``OTEL_*``), each claim is one trace through the verifier and memory services. Any litellm
provider can replace the models (``docs/deployment.md``, The demos).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

from agent_os.amb import AMB, tracing
from agent_os.demo._programs import (
    bus_options,
    keep_running_option,
    keys_step,
    passphrase_from_env,
    run_program,
)
from agent_os.iatp import IATP
from agent_os.services._process import FiniteRange, stop_signals
from agent_os.services.verifier_service import request_verification

AUDITOR: Final = "auditor"
MEMORY: Final = "memory-service"
VERIFIER: Final = "verifier-service"
MODELS: Final = ("checker", "skeptic", "contrarian")
"""The deterministic panel: ``checker`` knows every fact; ``skeptic`` is unsure of rounded
figures; ``contrarian`` disputes what is marked disputed."""

Printer = Callable[[str], None]


@dataclass(frozen=True)
class Claim:
    """A claim to audit: an answer given to a question, whether it is right (None: nobody can
    know), and how the deterministic models treat it."""

    question: str
    answer: str
    true: bool | None
    rounded: bool = False
    disputed: bool = False


CLAIMS: Final = (
    Claim("At what temperature does water boil at sea level?", "100 degrees Celsius", True),
    Claim("Which planet is the largest in the solar system?", "Jupiter", True),
    Claim("What is the capital of Australia?", "Sydney", False),
    Claim("Who wrote On the Origin of Species?", "Charles Darwin", True),
    Claim("How fast does light travel in a vacuum?", "About 300,000 km per second", True, rounded=True),
    Claim("How many moons does Mars have?", "Two: Phobos and Deimos", True, disputed=True),
    Claim("How many continents are there?", "Five", False),
    Claim("Will it rain in Lisbon next Tuesday?", "Yes, all day", None),
)

RECALL: Final = ("the capital of Australia", "speed of light in a vacuum", "moons of Mars")
"""What the auditor asks its memory for at the end, by meaning (``emk.search``)."""

_BLOCK = re.compile(r"(PROMPT|RESPONSE):\n<<<\n(.*?)\n>>>", re.S)


def judge(model: str, question: str, answer: str) -> tuple[str, float, str]:
    """The verdict, confidence and reason of deterministic ``model`` on ``answer`` to
    ``question``: what the models of :func:`serve_models` answer."""
    claim = next((c for c in CLAIMS if c.question == question and c.answer == answer), None)
    if claim is None or claim.true is None:
        return "unsure", 0.5, "not something that can be checked"
    verdict = "supported" if claim.true else "contradicted"
    if model == "skeptic" and claim.rounded:
        return "unsure", 0.6, "a rounded figure: close, but not exact"
    if model == "contrarian" and claim.disputed:
        return ("contradicted" if claim.true else "supported"), 0.7, "I read it differently"
    return verdict, 0.95, "matches the reference" if claim.true else "the reference says otherwise"


def _reply_for(model: str) -> Callable[[dict[str, Any]], Any]:
    from agent_os.cmvk.testing import Reply, verdict

    def reply(body: dict[str, Any]) -> Reply:
        text = "\n".join(
            str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user"
        )
        blocks = dict(_BLOCK.findall(text))
        said, confidence, reason = judge(model, blocks.get("PROMPT", ""), blocks.get("RESPONSE", ""))
        return Reply(verdict(said, confidence, reason))

    return reply


@dataclass
class Audited:
    """One claim's outcome: the panel's result (the verifier's reply) and the memory's id."""

    claim: Claim
    verified: bool
    confidence: float
    consensus: str
    votes: dict[str, str]
    memory_id: str
    reason: str = ""


@dataclass
class AuditResult:
    """What the run observed: each claim's outcome, and what memory gave back."""

    audited: list[Audited] = field(default_factory=list)
    recalled: dict[str, str] = field(default_factory=dict)
    by_tag: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditOptions:
    """How to run the audit (the ``run`` command's options)."""

    broker: str
    identities: Path
    passphrase: str = field(repr=False)
    timeout: float = 60.0
    keep_running: bool = False
    interval: float = 5.0


def _outcome(audited: Audited) -> str:
    return "verified" if audited.verified else "not-verified"


async def audit(bus: AMB, claim: Claim, run: str, timeout: float) -> Audited:
    """Have the verifier service check ``claim`` and the memory service remember the outcome
    (its metadata names the ``run``). Traced, the claim is one trace: the verification and
    the store."""
    with tracing.span("audit claim", {"agent_os.agent.id": bus.agent_id}):
        return await _audit(bus, claim, run, timeout)


async def _audit(bus: AMB, claim: Claim, run: str, timeout: float) -> Audited:
    result = await request_verification(bus, claim.question, claim.answer, timeout=timeout)
    details = result.get("details") or {}
    votes = {name: d.get("verdict") or f"abstained ({d.get('abstention')})" for name, d in details.items()}
    audited = Audited(
        claim, bool(result["verified"]), float(result["confidence"]), str(result["consensus"]), votes, ""
    )
    panel = "verified" if audited.verified else "not verified"
    content = (
        f"Claim: {claim.question} {claim.answer}. Panel: {panel}, {audited.consensus}, "
        f"confidence {audited.confidence:.2f}."
    )
    stored = await bus.request(
        "emk.store",
        {
            "content": content,
            "metadata": {
                "run": run,
                "question": claim.question,
                "answer": claim.answer,
                "votes": json.dumps(votes),
            },
            "tags": ["claim", _outcome(audited), audited.consensus],
        },
        timeout=timeout,
    )
    audited.memory_id = str(stored["record"]["id"])
    audited.reason = str(result.get("reason", ""))
    return audited


async def recall(bus: AMB, query: str, run: str, timeout: float) -> str:
    """The content of the memory of ``run`` closest in meaning to ``query`` ("" when none)."""
    found = await bus.request(
        "emk.search", {"query": query, "limit": 1, "metadata": {"run": run}}, timeout=timeout
    )
    records = found.get("records") or []
    return str(records[0]["content"]) if records else ""


async def run_audit(
    options: AuditOptions, echo: Printer = print, stop: asyncio.Event | None = None
) -> AuditResult:
    """Audit every claim of :data:`CLAIMS`, then recall them; return what was observed. With
    ``keep_running`` it audits the claims again every ``interval`` seconds until ``stop`` is
    set. Raises the verifier's errors (CMVKError, RequestTimeout, ...), the bus's RemoteError
    when memory refuses, and the key store's errors."""
    iatp = IATP("file", key_path=str(options.identities), passphrase=options.passphrase)
    await iatp.open()
    bus = AMB("nats", options.broker, agent_id=AUDITOR, middleware=[iatp.middleware()])
    result = AuditResult()
    run = f"audit-{uuid.uuid4().hex[:12]}"
    try:
        await bus.connect()
        echo(f"auditor: {len(CLAIMS)} claims to the verifier service (cmvk.verify) on {options.broker}")
        for claim in CLAIMS:
            audited = await audit(bus, claim, run, options.timeout)
            result.audited.append(audited)
            votes = ", ".join(f"{m}: {v}" for m, v in audited.votes.items())
            panel = "VERIFIED" if audited.verified else "NOT VERIFIED"
            echo(
                f"  {panel:<12} {claim.question} {claim.answer!r} [{audited.consensus}, "
                f"{audited.confidence:.2f}; {votes}] -> memory {audited.memory_id[:8]}"
            )
            if not audited.verified:
                echo(f"               why: {audited.reason}")
        echo("recall by meaning (emk.search):")
        for query in RECALL:
            result.recalled[query] = await recall(bus, query, run, options.timeout)
            echo(f"  {query!r}: {result.recalled[query]}")
        for tag in ("verified", "not-verified"):
            found = await bus.request(
                "emk.query", {"tags": [tag], "metadata": {"run": run}, "limit": 100}, timeout=options.timeout
            )
            result.by_tag[tag] = len(found.get("records") or [])
        echo(
            f"done: {len(result.audited)} claims audited by {len(MODELS)} models, "
            f"{result.by_tag['verified']} verified and {result.by_tag['not-verified']} not, all remembered"
        )
        if options.keep_running:
            echo(f"--keep-running: auditing again every {options.interval:g} s until SIGINT/SIGTERM")
            stopping = stop or asyncio.Event()
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), options.interval)
                for claim in CLAIMS if not stopping.is_set() else ():
                    await audit(bus, claim, run, options.timeout)
    finally:
        await bus.close(timeout=1.0)
    return result


async def serve_models(host: str, port: int, stop: asyncio.Event, echo: Printer = print) -> None:
    """Serve the deterministic models (:data:`MODELS`) as an OpenAI-compatible API on
    ``host:port`` until ``stop`` is set. Raises OSError when the port is taken."""
    from agent_os.cmvk.testing import ScriptedLLMServer

    server = ScriptedLLMServer({m: _reply_for(m) for m in MODELS})
    try:
        url = await server.start(host, port)
        echo(f"ready models={','.join(MODELS)} url={url}")
        await stop.wait()
    finally:
        await server.close()


# -- the commands ----------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The auditor demo: claims checked by several models and remembered."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 in a container.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
def models(host: str, port: int) -> None:
    """Serve the demo's deterministic models (OpenAI-compatible, /v1/chat/completions) until
    SIGINT/SIGTERM: no API key, no model weights."""

    async def serve() -> None:
        async with stop_signals() as stop:
            await serve_models(host, port, stop, click.echo)

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def keys(directory: Path) -> None:
    """Make the key stores in DIRECTORY (passphrase in AGENTOS_KEY_PASSPHRASE): `memory`,
    `verifier` and `auditor`. Does nothing when they exist."""
    keys_step(directory, {"memory": [MEMORY], "verifier": [VERIFIER], "auditor": [AUDITOR]})


@main.command()
@bus_options("The auditor's")
@click.option("--timeout", type=FiniteRange(0, 1e9, min_open=True), default=60.0, show_default=True)
@keep_running_option("the claims audited again every --interval s")
@click.option("--interval", type=FiniteRange(0, 1e9, min_open=True), default=5.0, show_default=True)
def run(broker: str, identities: Path, timeout: float, keep_running: bool, interval: float) -> None:
    """Audit the claims; print what happened; exit 0 at the end (1 when it went otherwise)."""
    from agent_os.amb import BusError
    from agent_os.cmvk import CMVKError

    options = AuditOptions(broker, identities, passphrase_from_env(), timeout, keep_running, interval)

    run_program(
        lambda stop: run_audit(options, click.echo, stop),
        keep_running=keep_running,
        name="auditor",
        errors=(BusError, CMVKError, OSError, KeyError),
    )


if __name__ == "__main__":
    main()
