"""Signed messages on the bus: a verified request and reply, and a forgery that never arrives.

python examples/iatp_signed_bus.py
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent_os.amb import Metadata, MsgpackSerializer
from agent_os.modules import AMB, IATP


async def main() -> None:
    iatp = IATP(trust_model="web")
    await iatp.register_agent("coordinator")
    await iatp.register_agent("worker")
    await iatp.establish_trust("worker", "coordinator", 0.9, ["request_action"])

    worker = AMB("memory", "memory://iatp-example", agent_id="worker", middleware=[iatp.middleware()])
    coordinator = AMB(
        "memory", "memory://iatp-example", agent_id="coordinator", middleware=[iatp.middleware()]
    )
    dead: list[str] = []
    dead_arrived = asyncio.Event()

    @worker.subscribe("tasks.process")
    async def handle(message: Any, metadata: Metadata) -> None:
        check = metadata.context["iatp"]
        allowed = iatp.permits("worker", check.sender, "request_action")
        print(
            f"worker got {message} from {check.sender}: valid={check.valid} "
            f"trust={check.trust_level} allowed={allowed}"
        )
        await worker.reply(metadata, {"task_id": message["task_id"], "status": "completed"})

    @coordinator.subscribe("_DLQ.>", context={"iatp.accept_unsigned": True})
    async def dead_letters(message: Any, metadata: Metadata) -> None:
        dead.append(metadata.headers["dlq-reason"])
        dead_arrived.set()

    async with worker, coordinator:
        reply = await coordinator.request("tasks.process", {"task_id": "t1"}, timeout=5)
        print("coordinator got", reply)

        # Mallory holds a key of her own and claims to be the coordinator.
        mallory = IATP()
        await mallory.register_agent("coordinator")
        forged = await mallory.sign("coordinator", {"task_id": "rm -rf"}, topic="tasks.process")
        await coordinator.broker.publish("tasks.process", MsgpackSerializer().encode(forged))
        await asyncio.wait_for(dead_arrived.wait(), 5)
        print("forged message dead-lettered:", dead[0])


if __name__ == "__main__":
    asyncio.run(main())
