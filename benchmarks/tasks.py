"""Background tasks on NATS: dispatch -> completion throughput of TaskManager and TaskWorker
against a same-run baseline, AMB request/reply to a queue-group responder doing the same work.

    .venv/bin/python -m benchmarks.tasks [--quick]

Each round runs N tasks (dispatch all, wait for all) through one manager and one worker
(concurrency 8), and N requests (all in flight, the responder at concurrency 8) through plain
AMB clients, all on the local NATS server in this process. A task costs, besides the work, a
durable JetStream publish and ack, the worker's claim (a request to the manager), a spawned
kernel agent with its control subscription, two status messages, the mediator's decisions on
the workers' and manager's messages and the records of both kernels. The figure is the median
over rounds of each round's ratio (tasks/s over requests/s), with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from agent_os.amb import AMB, Metadata
from agent_os.control_plane import KernelSpace, Policy, TaskManager, TaskWorker
from benchmarks._report import write_section

URL = "nats://127.0.0.1:4222"


async def square(task_input: dict[str, int]) -> int:
    return task_input["n"] ** 2


async def tasks_round(manager: TaskManager, n: int) -> float:
    started = time.perf_counter()
    ids = [await manager.dispatch("square", {"n": i}) for i in range(n)]
    done = await asyncio.gather(*(manager.wait(task_id, timeout=120) for task_id in ids))
    elapsed = time.perf_counter() - started
    assert all(s.result == i * i for i, s in enumerate(done)), "a task did not complete"
    return n / elapsed


async def requests_round(caller: AMB, subject: str, n: int) -> float:
    started = time.perf_counter()
    answers = await asyncio.gather(*(caller.request(subject, {"n": i}, timeout=120) for i in range(n)))
    elapsed = time.perf_counter() - started
    assert answers == [i * i for i in range(n)]
    return n / elapsed


async def main(quick: bool) -> None:
    from tests.support.cleanup import delete_nats_streams

    rounds, n = (3, 200) if quick else (7, 1000)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    worker_kernel = KernelSpace(policy=Policy.builtin("permissive"), keep_finished=100)
    manager_kernel = KernelSpace(policy=Policy.builtin("permissive"), keep_finished=100)
    clients = [AMB("nats", URL, agent_id=name) for name in ("worker", "manager", "responder", "caller")]
    worker_client, manager_client, responder, caller = clients
    try:
        worker = TaskWorker(worker_kernel, worker_client, {"square": square}, subject_prefix=prefix)
        manager = TaskManager(manager_kernel, manager_client, subject_prefix=prefix, keep_finished=n)

        async def respond(message: Any, metadata: Metadata) -> None:
            await responder.reply(metadata, await square(message))

        subject = f"{prefix}.rpc"
        await responder.subscribe(subject, respond, queue="rpc", concurrency=8)
        async with manager, worker:
            await tasks_round(manager, 50)  # warm up both paths
            await requests_round(caller, subject, 50)
            tasks_rates, rpc_rates, ratios = [], [], []
            for _ in range(rounds):  # interleaved, so both see the same machine
                rpc = await requests_round(caller, subject, n)
                done = await tasks_round(manager, n)
                tasks_rates.append(done)
                rpc_rates.append(rpc)
                ratios.append(done / rpc)
                print(f"tasks {done:,.0f}/s  request/reply {rpc:,.0f}/s  ratio {done / rpc:.3f}")
    finally:
        for client in clients:
            await client.close()
        await worker_kernel.close()
        await manager_kernel.close()
        await delete_nats_streams(prefix)
    body = f"""
| measure | median | range over {rounds} rounds |
|---|---|---|
| task dispatch -> completion (one manager, one worker at concurrency 8, {n} tasks a round) | {statistics.median(tasks_rates):,.0f} tasks/s | {min(tasks_rates):,.0f}–{max(tasks_rates):,.0f} |
| baseline: AMB request/reply to a queue-group responder (concurrency 8, {n} in flight) | {statistics.median(rpc_rates):,.0f} requests/s | {min(rpc_rates):,.0f}–{max(rpc_rates):,.0f} |
| ratio (per round) | {statistics.median(ratios):.3f} | {min(ratios):.3f}–{max(ratios):.3f} |

Manager, worker, responder and caller share this process and the local NATS server. What a
task costs beyond a request: the durable publish and its ack, the claim (a request), a kernel
agent spawned with its control subscription, two status messages, the mediator's decisions on
both sides' messages and their records (memory recorders).
"""
    write_section("tasks", "python -m benchmarks.tasks" + (" --quick" if quick else ""), body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tasks")
    asyncio.run(main(parser.parse_args().quick))
