"""The README's quick example: a filtered subscriber answering a request on the in-memory broker."""

import asyncio

from agent_os.modules import AMB


async def main() -> None:
    async with AMB(backend="memory", agent_id="coordinator") as amb:

        @amb.subscribe("tasks.*", filter={"priority": "high"})
        async def handle_task(message, metadata):  # type: ignore[no-untyped-def]
            await amb.reply(metadata, {"task_id": message["task_id"], "status": "completed"})

        answer = await amb.request("tasks.process", {"task_id": "t1", "priority": "high"}, timeout=5)
        print(answer)  # {'task_id': 't1', 'status': 'completed'}


if __name__ == "__main__":
    asyncio.run(main())
