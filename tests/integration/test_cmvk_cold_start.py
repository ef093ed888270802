"""CMVK's first call in a fresh process answers like the second: loading litellm (seconds)
happens before any deadline starts, the verifier service loads it before it says ready, and
litellm never goes to the network for its cost map.

Each test runs a fresh interpreter, since this one has imported litellm long ago. A slow import
is simulated by a meta-path finder that sleeps when ``litellm`` is looked up, longer than the
call's timeout: an import inside the deadline would make every model abstain.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from agent_os.amb import AMB
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict
from agent_os.services.verifier_service import request_verification

NATS = "nats://127.0.0.1:4222"

SLOW_IMPORT = """
import sys, time

class SlowLitellm:
    '''Stands for a cold disk: finding litellm takes {delay} s; then the normal finders load it.'''

    def find_spec(self, name, path=None, target=None):
        if name == "litellm":
            print("importing litellm", flush=True)
            time.sleep({delay})
        return None

sys.meta_path.insert(0, SlowLitellm())
"""

FIRST_VERIFY = """
import asyncio, json
from agent_os.cmvk import CMVK, ModelSpec
from agent_os.cmvk.testing import Reply, ScriptedLLMServer, verdict

async def main():
    async with ScriptedLLMServer({{n: Reply(verdict("supported")) for n in ("a", "b", "c")}}) as llm:
        cmvk = CMVK([ModelSpec(n, model=f"openai/{{n}}") for n in ("a", "b", "c")],
                    api_base=llm.url, api_key="k", timeout={timeout})
        result = await cmvk.verify("What is 6 x 7?", "42")
        print(json.dumps({{"verified": result.verified, "latency_s": result.latency_s,
                          "reason": result.reason}}), flush=True)

asyncio.run(main())
"""


def run_fresh(code: str, env: dict[str, str] | None = None, timeout: float = 90) -> list[str]:
    """Run ``code`` in a fresh interpreter; return its stdout lines (fails on a non-zero exit)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_first_verify_of_a_process_succeeds_within_its_timeout() -> None:
    """Loading litellm takes 3 s here, the deadline is 1.5 s: the first verify of the process
    passes only when the load happens before its deadline starts."""
    code = textwrap.dedent(SLOW_IMPORT.format(delay=3.0)) + textwrap.dedent(FIRST_VERIFY.format(timeout=1.5))
    lines = run_fresh(code)
    assert lines[0] == "importing litellm"  # the slow finder was used
    result = json.loads(lines[-1])
    assert result["verified"] is True, result["reason"]
    assert result["latency_s"] < 1.5


def test_litellm_never_fetches_its_cost_map_over_the_network() -> None:
    code = textwrap.dedent(
        """
        import json, os, socket
        attempts = []
        def refuse(self, address, *args):
            attempts.append(repr(address))
            raise OSError("no network in this test")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        from agent_os.cmvk._client import load_client
        load_client()
        print(json.dumps({"attempts": attempts, "env": os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP")}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"attempts": [], "env": "True"}


def test_a_cost_map_setting_of_the_user_is_kept() -> None:
    code = textwrap.dedent(
        """
        import os, sys
        sys.modules["litellm"] = None  # not installed: the import fails after the setting
        from agent_os.cmvk._client import litellm_module
        try:
            litellm_module()
        except ImportError as exc:
            print(exc)
        print(os.environ["LITELLM_LOCAL_MODEL_COST_MAP"])
        """
    )
    lines = run_fresh(code, env={"LITELLM_LOCAL_MODEL_COST_MAP": "False"})
    assert lines == ["CMVK calls models through litellm: pip install 'agent-os[cmvk]'", "False"]


@pytest.mark.nats
async def test_the_verifier_service_loads_litellm_before_it_says_ready() -> None:
    """The service process loads litellm (3 s here) before ``ready``; its first request is then
    answered within the 1.5 s deadline like any other."""
    tag = uuid.uuid4().hex[:10]
    subject = f"cmvk_cold_{tag}.verify"
    code = textwrap.dedent(SLOW_IMPORT.format(delay=3.0)) + textwrap.dedent(
        """
        from agent_os.services.verifier_service import main
        main()
        """
    )
    scripts = {"a": Reply(verdict("supported")), "b": Reply(verdict("supported"))}
    async with ScriptedLLMServer(scripts) as llm:
        args = ["--broker", NATS, "--trust-bus", "--model", "a=openai/a", "--model", "b=openai/b"]
        args += ["--api-base", llm.url, "--api-key", "k", "--timeout", "1.5", "--subject", subject]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            *args,
            "--queue",
            subject,
            "--no-metrics",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        caller = AMB("nats", NATS, agent_id=f"caller-{tag}")
        try:
            first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
            ready = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
            assert (first, ready) == ("importing litellm", f"ready verifier subject={subject} broker={NATS}")
            reply = await request_verification(caller, "What is 6 x 7?", "42", subject=subject, timeout=20)
        finally:
            if proc.returncode is None:
                proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
            await caller.close()
    assert reply["verified"] is True, reply["reason"]
    assert reply["latency_s"] < 1.5
