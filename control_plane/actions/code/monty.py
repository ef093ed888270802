"""The Monty backend: code runs in pydantic-monty's interpreter, in a pool of ``monty`` worker
processes (:class:`MontyBackend`).

Each run checks out a worker, starts the code and answers each suspension itself: a call of a
tool is awaited through the kernel (:data:`~.job.ToolCall`) and its result or exception
resumes the code; an OS call (files, the clock's sleep, imports of modules Monty lacks) is
left unhandled, so Monty raises its own error. The pool's blocking calls run in threads of our
own: pydantic-monty's asyncio pool can abort the interpreter at exit (its runtime's threads
call into a finalizing interpreter), its blocking pool does not. A run past its time limit, or
cancelled (SIGKILL of the agent), kills its worker: Monty replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, TypeVar

from agent_os.amb.numbers import whole
from agent_os.control_plane.actions.code.job import (
    Job,
    RunOutcome,
    ToolCall,
    ToolDenied,
    ToolFailed,
    error_text,
    plain,
)
from agent_os.control_plane.actions.tools import ToolArgumentError
from agent_os.control_plane.errors import KernelError

if TYPE_CHECKING:
    from pydantic_monty import Monty, MontySession

INSTALL_HINT: Final = "the Monty backend needs pydantic-monty: pip install 'agent-os[sandbox]'"
GRACE: Final = 2.0
"""Seconds past a run's time limit before the host kills its worker (Monty stops the code
itself at the limit; this is the backstop)."""
_T = TypeVar("_T")


class _OutputOver(Exception):
    """Raised by the print callback past ``max_output``; Monty ends the run with it."""


class MontyBackend:
    """Runs code in Monty. ``pool_size``: workers kept warm; ``max_workers``: most runs at once
    (more wait for a worker). The pool starts on the first run; :meth:`close` stops it."""

    name: Final = "monty"

    def __init__(self, *, pool_size: int = 2, max_workers: int = 16) -> None:
        whole(pool_size, "pool_size", error=KernelError)
        whole(max_workers, "max_workers", pool_size, error=KernelError)
        self.pool_size = pool_size
        self.max_workers = max_workers
        self._pool: Monty | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._starting = asyncio.Lock()
        self._closed = False

    async def start(self) -> None:
        """Start the pool's workers now (the first run does it otherwise). Raises ImportError
        (naming the ``sandbox`` extra) without pydantic-monty, KernelError once closed."""
        async with self._starting:
            if self._closed:
                raise KernelError("the Monty backend is closed")
            if self._pool is not None:
                return
            try:
                import pydantic_monty
            except ImportError as exc:
                raise ImportError(INSTALL_HINT) from exc
            threads = ThreadPoolExecutor(self.max_workers + 1, thread_name_prefix="agent-os-monty")
            pool = pydantic_monty.Monty(
                min_processes=self.pool_size, max_processes=self.max_workers, checkout_timeout=60.0
            )
            await asyncio.get_running_loop().run_in_executor(threads, pool.__enter__)
            self._pool, self._threads = pool, threads

    async def close(self) -> None:
        """Stop the workers and the threads; idempotent."""
        async with self._starting:
            self._closed = True
            pool, threads, self._pool, self._threads = self._pool, self._threads, None, None
        if pool is not None and threads is not None:
            await asyncio.get_running_loop().run_in_executor(threads, pool.__exit__, None, None, None)
        if threads is not None:
            threads.shutdown(wait=False)

    async def run(self, job: Job, call: ToolCall) -> RunOutcome:
        """Run ``job``; tool calls go through ``call``. The code's own failures are the
        outcome's ``error``; raises ImportError without pydantic-monty, CancelledError when
        cancelled (its worker is killed first)."""
        await self.start()
        assert self._pool is not None
        printed: list[str] = []
        size = [0]

        def on_print(_stream: str, text: str) -> None:
            size[0] += len(text.encode("utf-8", "surrogatepass"))
            if size[0] > job.limits.max_output:
                raise _OutputOver(f"output over {job.limits.max_output} bytes (max_output)")
            printed.append(text)

        run = _Run(self._pool, self._threads_or_fail(), job, on_print)
        try:
            error = None
            value = await run.drive(call)
        except _Failure as exc:
            value, error = None, exc.text
        finally:
            await run.end()
        if size[0] > job.limits.max_output:
            error = error_text(
                "OutputLimitExceeded", f"output over {job.limits.max_output} bytes (max_output)"
            )
        return RunOutcome(plain(value), "".join(printed), {}, error)

    def _threads_or_fail(self) -> ThreadPoolExecutor:
        if self._threads is None:
            raise KernelError("the Monty backend is closed")
        return self._threads


class _Failure(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Run:
    """One run on one checked-out worker, driven from the event loop; each blocking step of
    pydantic-monty runs in a thread."""

    def __init__(
        self, pool: Monty, threads: ThreadPoolExecutor, job: Job, on_print: Callable[[str, str], None]
    ) -> None:
        self.pool = pool
        self.threads = threads
        self.job = job
        self.on_print = on_print
        self.session: MontySession | None = None
        self.pid: int | None = None
        self.killed = False

    async def _step(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a thread, within the time limit plus :data:`GRACE`: past it, or
        when cancelled, the worker is killed (which ends the step)."""
        future = asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.job.limits.timeout + GRACE)
        except TimeoutError:
            self.kill()
            with contextlib.suppress(Exception):
                await future
            limit = self.job.limits.timeout
            raise _Failure(error_text("TimeoutError", f"ran past its time limit of {limit:g}s")) from None
        except asyncio.CancelledError:
            self.kill()
            with contextlib.suppress(Exception):
                await future
            raise

    def kill(self) -> None:
        if self.pid is not None and not self.killed:
            self.killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)

    def _start(self) -> Any:
        from pydantic_monty import MontyError

        limits = self.job.limits
        session = self.pool.checkout(
            script_name="code.py",
            limits={
                "max_feed_duration_secs": limits.timeout,
                "max_memory": limits.memory,
                "max_suspensions": limits.max_tool_calls + 1,
            },
        )
        session.__enter__()
        self.session, self.pid = session, session.worker_pid
        try:
            return session.feed_start(
                self.job.code, inputs=dict(self.job.inputs), print_callback=self.on_print
            )
        except MontyError as exc:
            return exc

    @staticmethod
    def _resume(snapshot: Any, how: str, value: Any) -> Any:
        from pydantic_monty import MontyError

        try:
            if how == "unhandled":
                return snapshot.resume_not_handled()
            if how == "lookup":
                return snapshot.resume(**value)
            return snapshot.resume(value)
        except MontyError as exc:
            return exc

    async def drive(self, call: ToolCall) -> Any:
        """Run the code to its end; its value, or _Failure with the error."""
        from pydantic_monty import FunctionSnapshot, MontyComplete, MontyError, NameLookupSnapshot

        step = await self._step(self._start)
        calls = 0
        while True:
            if isinstance(step, MontyComplete):
                return step.output
            if isinstance(step, MontyError):
                raise _Failure(_describe(step))
            if isinstance(step, NameLookupSnapshot):
                name = step.variable_name
                found = {"value": _stub(name)} if name in self.job.tools else {}
                step = await self._step(self._resume, step, "lookup", found)
                continue
            if not isinstance(step, FunctionSnapshot) or step.is_os_function:
                step = await self._step(self._resume, step, "unhandled", None)
                continue
            calls += 1
            answer = await self._answer(call, str(step.function_name), step.args, step.kwargs, calls)
            step = await self._step(self._resume, step, "call", answer)

    async def _answer(
        self, call: ToolCall, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], calls: int
    ) -> dict[str, Any]:
        if name not in self.job.tools:
            return {"exception": NameError(f"name {name!r} is not defined")}
        if calls > self.job.limits.max_tool_calls:
            raise _Failure(
                error_text("ToolLimitExceeded", f"more than {self.job.limits.max_tool_calls} tool calls")
            )
        try:
            return {"return_value": plain(await call(name, args, kwargs))}
        except ToolDenied as exc:
            return {"exception": PermissionError(str(exc))}
        except ToolFailed as exc:
            return {"exception": RuntimeError(str(exc))}
        except ToolArgumentError as exc:
            return {"exception": TypeError(str(exc))}

    async def end(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(
                    self.threads, session.__exit__, None, None, None
                )


def _stub(name: str) -> Callable[..., Any]:
    """A host function for a tool read as a value (``f = read_file``): Monty calls it back
    by its name."""

    def tool(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called: Monty suspends
        raise RuntimeError(name)

    tool.__name__ = tool.__qualname__ = name
    return tool


def _describe(exc: Exception) -> str:
    from pydantic_monty import MontyCrashedError, MontyRuntimeError, MontySyntaxError

    if isinstance(exc, MontyRuntimeError | MontySyntaxError):
        inner = exc.exception()
        if (
            isinstance(inner, Exception)
            and type(inner).__name__ == "Exception"
            and "max_output" in str(inner)
        ):
            return error_text("OutputLimitExceeded", str(inner))
        return error_text(type(inner).__name__, str(inner))
    if isinstance(exc, MontyCrashedError):
        return error_text("WorkerCrashed", f"the Monty worker died: {exc}")
    return error_text(type(exc).__name__, str(exc))
