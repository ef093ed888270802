"""A private Prometheus server of a test (Debian's ``prometheus``, installed by ``.ci/services``):
its own free port, data directory and generated configuration scraping the test's targets,
queried through its HTTP API. Started and stopped by the test. And :func:`samples`, what a
prometheus_client registry exposes, for tests without a server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.nats_private import free_port


def scrape_config(jobs: Mapping[str, Sequence[str]], interval: str = "1s") -> str:
    """A Prometheus configuration (JSON is YAML) scraping ``jobs`` (job name -> ``host:port``
    targets) every ``interval``."""
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]} for job, targets in jobs.items()
        ],
    }
    return json.dumps(config, indent=2)


def promtool() -> str:
    """The path of ``promtool`` (Debian's ``prometheus`` package has it). Skips the test when it
    is not installed, and fails it in CI (``CI`` set), where ``.ci/services`` installs it."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/services installs Debian's prometheus package")
        pytest.skip("promtool is not installed (.ci/services installs Debian's prometheus package)")
    return found


@contextlib.asynccontextmanager
async def prometheus(
    jobs: Mapping[str, Sequence[str]], directory: Path, *, config: Mapping[str, Any] | None = None
) -> AsyncIterator[str]:
    """Run ``prometheus`` scraping ``jobs`` every second (or with ``config``, a whole
    configuration, instead) with its data in ``directory``; yield its URL once it is ready;
    stop it afterwards, also when the test fails. Skips the test when prometheus is not
    installed; fails it when it does not get ready within 30 seconds."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (.ci/services installs Debian's package)")
    port = free_port()
    conf = directory / "prometheus.yml"
    conf.write_text(scrape_config(jobs) if config is None else json.dumps(config, indent=2))
    log = (directory / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={conf}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                if proc.returncode is not None:
                    pytest.fail(
                        f"prometheus exited ({proc.returncode}): {(directory / 'prometheus.log').read_text()}"
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/-/ready") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    pytest.fail("prometheus did not get ready within 30 seconds")
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
        log.close()


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``registry`` as parsed from its exposition text: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def api(url: str, path: str, **params: str) -> Any:
    """GET Prometheus's HTTP API ``path`` (``/api/v1/...``); return its ``data``. Fails the test
    on an error answer."""
    async with aiohttp.ClientSession() as http, http.get(url + path, params=params) as resp:
        body = await resp.json()
    if body.get("status") != "success":
        pytest.fail(f"prometheus {path} {params}: {body}")
    return body["data"]


async def wait_targets_up(url: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Wait until ``count`` active targets are up (``/api/v1/targets``); return them. Fails the
    test with the targets' last errors when they are not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        targets = (await api(url, "/api/v1/targets", state="active"))["activeTargets"]
        if sum(t["health"] == "up" for t in targets) >= count:
            return list(targets)
        if time.monotonic() > deadline:
            pytest.fail(f"targets not up: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}")
        await asyncio.sleep(0.2)


async def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The series an instant PromQL query returns now."""
    data = await api(url, "/api/v1/query", query=promql)
    return list(data["result"])
