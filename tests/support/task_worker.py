"""A task worker process for the tests: ``python -m tests.support.task_worker URL QUEUE PREFIX
RECORDER`` runs a TaskWorker on NATS with the handlers below, its kernel's flight recorder in
the SQLite file RECORDER, prints ``ready <worker id>`` once it takes tasks, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from agent_os.amb import AMB
from agent_os.control_plane import FlightRecorder, KernelSpace, Policy, TaskWorker

ACK_WAIT = 3.0  # short, so that a killed worker's tasks come back within the test
HEARTBEAT = 1.0  # well below ACK_WAIT: a long task is never delivered again while it runs


async def square(task_input: dict[str, Any]) -> dict[str, Any]:
    """The result the tests check: the input's number and its square."""
    n = int(task_input["n"])
    return {"n": n, "square": n * n, "pid": os.getpid()}


async def sleep(task_input: dict[str, Any]) -> str:
    """Runs for ``seconds`` (a task to cancel)."""
    await asyncio.sleep(float(task_input["seconds"]))
    return "slept"


async def fail(task_input: Any) -> None:
    raise ValueError(f"failing on purpose: {task_input!r}")


async def main(url: str, queue: str, prefix: str, recorder_path: str) -> None:
    kernel = KernelSpace(
        policy=Policy.builtin("permissive"), flight_recorder=FlightRecorder("sqlite", recorder_path)
    )
    worker_id = f"worker-{os.getpid()}"
    client = AMB("nats", url, agent_id=worker_id, broker_options={"ack_wait": ACK_WAIT, "pull_batch": 16})
    handlers = {"square": square, "sleep": sleep, "fail": fail}
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    worker = TaskWorker(
        kernel, client, handlers, queue=queue, subject_prefix=prefix, concurrency=8, heartbeat=HEARTBEAT
    )
    try:
        await worker.start()
        print(f"ready {worker_id}", flush=True)
        await stop.wait()
    finally:
        await worker.close()
        await client.close()
        await kernel.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
