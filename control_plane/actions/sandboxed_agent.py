"""The agent's side of a sandboxed agent: the runtime the kernel's supervisor starts inside the
sandbox (it lives with the actions because its ``submit`` is theirs), as
``python -m agent_os.control_plane.actions.sandboxed_agent FD SCRIPT ENTRY``.

It opens the channel on file descriptor ``FD``, asks the supervisor for its identity and
arguments (the ``start`` call), loads ``SCRIPT`` and awaits ``ENTRY(agent, *args, **kwargs)``
with an :class:`Agent`: the agent's only way out, every call of which crosses the channel to the
supervisor. Its result goes back with ``done``; an exception that ends it goes back with
``failed`` (what the kernel records, labelled as reported by the sandbox) and exit status 1.
``docs/sandbox.md`` (Sandboxed agents) describes the API and what the supervisor does.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import importlib.util
import inspect
import os
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from agent_os.control_plane.actions.request import ActionRequest, ActionResult
from agent_os.control_plane.sandbox.channel import Channel, Peer

FAILED: Final = 1
"""The runtime's exit status when the agent's entry raised (or could not be loaded)."""

_MAX_TEXT: Final = 2000


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a subscription handler gets beside the message: the message's ``id``, ``topic``,
    ``sender`` (as the kernel established it: verified by IATP, or None), ``verified``,
    ``trust_level``, and whether it is a request (``expects_reply``: answer it with
    :meth:`Agent.reply`)."""

    id: str
    topic: str
    sender: str | None
    verified: bool
    trust_level: float
    expects_reply: bool
    token: int


Handler = Callable[[Any, Delivery], Awaitable[Any]]


class Agent:
    """The agent's side of the channel: what a sandboxed agent's ``main(agent)`` gets.

    Every method is a call to the kernel's supervisor, which applies identity, policy, signals
    and the recorder as for an agent in the kernel's own process. A refusal raises
    :class:`~agent_os.control_plane.errors.RemoteError` whose ``kind`` names the kernel's
    exception (``PolicyViolationError``, ``ActionRefused`` ...); :meth:`submit` returns denials
    as results instead, like ``kernel.submit``."""

    def __init__(self, peer: Peer, agent_id: str) -> None:
        self.agent_id = agent_id
        self._peer = peer
        self._handlers: dict[int, Handler] = {}
        self._pending: list[asyncio.Task[int]] = []

    async def publish(self, topic: str, message: Any = None, *, recipient: str | None = None) -> str:
        """Publish ``message`` on ``topic`` as this agent (signed by the kernel with the
        agent's key when it uses IATP); returns the message id."""
        return str(
            await self._peer.call("publish", {"topic": topic, "message": message, "recipient": recipient})
        )

    async def request(
        self, topic: str, message: Any = None, *, timeout: float = 5.0, recipient: str | None = None
    ) -> Any:
        """Ask on ``topic`` and return the first reply's payload (the bus's RequestTimeout
        comes back as RemoteError ``RequestTimeout``)."""
        args = {"topic": topic, "message": message, "timeout": timeout, "recipient": recipient}
        return await self._peer.call("request", args)

    def subscribe(self, pattern: str, handler: Handler | None = None) -> Any:
        """Have ``handler(message, delivery)`` called for each message on ``pattern`` the kernel
        lets through: ``await agent.subscribe(pattern, handler)`` or, as a decorator,
        ``@agent.subscribe(pattern)`` (then await :meth:`subscribed` before relying on it)."""
        if handler is not None:
            return self._subscribe(pattern, handler)

        def decorator(fn: Handler) -> Handler:
            task = asyncio.get_running_loop().create_task(self._subscribe(pattern, fn))
            self._pending.append(task)
            return fn

        return decorator

    async def subscribed(self) -> None:
        """Wait until the subscriptions made with the decorator are active."""
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)

    async def _subscribe(self, pattern: str, handler: Handler) -> int:
        if not inspect.iscoroutinefunction(handler):
            raise TypeError("a handler must be an async function: async def handler(message, delivery)")
        sub = int(await self._peer.call("subscribe", {"pattern": pattern}))
        self._handlers[sub] = handler
        return sub

    async def reply(self, delivery: Delivery, message: Any = None) -> None:
        """Answer the request ``delivery`` came with (while its handler runs)."""
        await self._peer.call("reply", {"token": delivery.token, "message": message})

    async def submit(self, request: ActionRequest) -> ActionResult:
        """Do an action through the kernel (``kernel.submit``): the result, a denial with its
        reason in ``error``. An ``agent_id`` naming another agent is denied and recorded."""
        args = {
            "action": request.action,
            "target": request.target,
            "params": dict(request.params),
            "agent_id": request.agent_id,
        }
        value = await self._peer.call("submit", args)
        return ActionResult(value["allowed"], value["output"], value["error"], value["record_id"])

    async def _deliver(self, sub: int, message: Any, delivery: dict[str, Any]) -> Any:
        handler = self._handlers.get(sub)
        if handler is None:
            raise LookupError(f"no subscription {sub}")
        await handler(message, Delivery(**delivery))
        return None


def describe(exc: BaseException) -> dict[str, Any]:
    """What the runtime reports about the exception that ended the agent: its type, errno (and
    its name), message and the last lines of its traceback."""
    number = getattr(exc, "errno", None)
    lines = traceback.format_exception(exc)
    return {
        "type": type(exc).__name__,
        "errno": number if isinstance(number, int) else None,
        "errno_name": errnos.errorcode.get(number) if isinstance(number, int) else None,
        "message": str(exc)[:_MAX_TEXT],
        "traceback": "".join(lines[-3:])[-_MAX_TEXT:],
    }


def load(script: str, entry: str) -> Callable[..., Awaitable[Any]]:
    """The coroutine function ``entry`` of the file ``script``. Raises ImportError, or
    TypeError when it is missing or not ``async``."""
    spec = importlib.util.spec_from_file_location("__agent__", script)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__agent__"] = module
    spec.loader.exec_module(module)
    fn: Any = module
    for part in entry.split("."):
        fn = getattr(fn, part, None)
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{script} has no async function {entry!r}: define async def {entry}(agent)")
    return fn  # type: ignore[no-any-return]


async def run(fd: int, script: str, entry: str) -> int:
    """Serve the channel on ``fd``, run the agent, report its end; the exit status."""
    channel = await Channel.open(socket.socket(fileno=fd))
    agents: list[Agent] = []

    async def deliver(sub: int, message: Any, delivery: dict[str, Any]) -> Any:
        return await agents[0]._deliver(sub, message, delivery)

    peer = Peer(channel, {"deliver": deliver})
    serving = asyncio.get_running_loop().create_task(peer.run())
    try:
        hello = await peer.call("start", {"pid": os.getpid()})
        agent = Agent(peer, hello["agent_id"])
        agents.append(agent)
        try:
            main = load(script, entry)
            value = await main(agent, *hello["args"], **hello["kwargs"])
        except Exception as exc:
            _leave_if_child()
            await peer.call("failed", {"report": describe(exc)})
            return FAILED
        _leave_if_child()
        await peer.call("done", {"value": value})
        return 0
    finally:
        await peer.close()
        serving.cancel()


_MAIN_PID = os.getpid()


def _leave_if_child() -> None:
    """End a child the agent forked where it would speak for the agent on the channel: the
    channel is the agent process's, not its children's."""
    if os.getpid() != _MAIN_PID:
        os._exit(FAILED)


def main(argv: list[str] | None = None) -> int:
    """``FD SCRIPT ENTRY``: run the agent; the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or not args[0].isdigit():
        print(f"usage: python -m {__name__} FD SCRIPT ENTRY", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(int(args[0]), args[1], args[2]))
    except BaseException:
        _leave_if_child()
        raise


if __name__ == "__main__":
    sys.exit(main())
