"""Background tasks on NATS: a manager dispatches tasks to two workers, waits for their results,
and cancels a long one (its agent is killed by SIGKILL through the kernel).

Needs NATS with JetStream (``AGENT_OS_NATS_URL``, default nats://127.0.0.1:4222). The workers
run in this process to keep the example short; each would normally be its own process.
"""

from __future__ import annotations

import asyncio
import os

from agent_os.amb import AMB
from agent_os.control_plane import KernelSpace, Policy, TaskManager, TaskState, TaskWorker

URL = os.environ.get("AGENT_OS_NATS_URL", "nats://127.0.0.1:4222")
PREFIX = os.environ.get("AGENT_OS_TASKS_PREFIX", "example-tasks")


async def square(task_input: dict[str, int]) -> int:
    return task_input["n"] ** 2


async def long_report(task_input: dict[str, float]) -> str:
    await asyncio.sleep(task_input["seconds"])
    return "report"


async def main() -> None:
    handlers = {"square": square, "long_report": long_report}
    worker_kernel = KernelSpace(policy=Policy.builtin("permissive"))
    manager_kernel = KernelSpace(policy=Policy.builtin("permissive"))
    clients = [AMB("nats", URL, agent_id=name) for name in ("worker-1", "worker-2", "caller")]
    try:
        workers = [TaskWorker(worker_kernel, c, handlers, subject_prefix=PREFIX) for c in clients[:2]]
        tasks = TaskManager(manager_kernel, clients[2], subject_prefix=PREFIX, handlers=handlers)
        async with tasks, workers[0], workers[1]:
            ids = [await tasks.dispatch("square", {"n": n}) for n in range(5)]
            done = [await tasks.wait(task_id, timeout=30) for task_id in ids]
            print("squares:", [status.result for status in done])

            slow = await tasks.dispatch("long_report", {"seconds": 60})
            while tasks.status(slow).state is TaskState.PENDING:  # noqa: ASYNC110 - a caller polling
                await asyncio.sleep(0.01)
            print("long_report:", tasks.status(slow).state.value)
            print("cancelled:", await tasks.cancel(slow))
            print("long_report:", (await tasks.wait(slow, timeout=10)).state.value)

            records = await manager_kernel.recorder.query(event_type="task_cancelled")
            print("recorded:", [(r.event_type, r.data["killed"]) for r in records])
    finally:
        for client in clients:
            await client.close()
        await worker_kernel.close()
        await manager_kernel.close()


if __name__ == "__main__":
    asyncio.run(main())
