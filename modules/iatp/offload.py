"""ed25519 checks in worker processes, off the core that runs the event loop.

:class:`VerifyWorkers` starts child processes (this module's :func:`main`, see ``_BOOTSTRAP``)
and sends them signature checks in batches over socket pairs; each check's answer comes back as
a future.
``IATPMiddleware(verify_workers=n)`` uses it for the messages it prepares ahead. A worker's
answer is used only for the exact key, bytes and signature it checked, and a worker lost fails
its checks with :class:`WorkerLost`, whose messages are then verified inline: nothing is ever
accepted unchecked. The design is in ``docs/trust.md``, "Verification in worker processes".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections import deque
from typing import Final

from agent_os.amb.numbers import seconds, whole
from agent_os.iatp import _crypto
from agent_os.iatp.errors import IATPConfigError

log = logging.getLogger("agent_os.iatp.offload")

_FRAME: Final = struct.Struct("<III")
"""A batch's head: its sequence number, the size of the checks after it, their number."""
_CHECK: Final = struct.Struct("<I32s64s")
"""One check's head, followed by the message: its length, the public key, the signature."""
_ANSWERS: Final = struct.Struct("<II")
"""An answer's head, the batch's sequence number and its number of checks, followed by one byte
a check, 1 if valid: an answer names the batch it answers, so none is taken for another's."""
_SEQUENCE: Final = 1 << 32
_READ_SIZE: Final = 1 << 16
_BOOTSTRAP: Final = """\
import json, sys
sys.path[:] = json.loads(sys.argv[1])
import agent_os.iatp.offload as offload
if offload.__file__ != sys.argv[2]:
    raise SystemExit(f"not the parent's agent_os: {offload.__file__} is not {sys.argv[2]}")
raise SystemExit(offload.main(sys.argv[3:]))
"""
"""A worker's start, run with ``python -I -c``: the environment (``PYTHONPATH`` and the like) and
the working directory are ignored, the path is the parent's, and a worker whose module is not
the parent's very file exits before answering anything (it is then lost: checked inline)."""


class WorkerLost(Exception):
    """A worker process ended, could not start or broke the protocol before answering."""


class _Worker:
    """One child process: its socket, the batches it has not answered and the checks not sent."""

    __slots__ = (
        "answers",
        "flushing",
        "frames",
        "load",
        "outbox",
        "process",
        "queued",
        "sent",
        "sock",
        "unsent",
    )

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self.sock = sock
        self.frames: deque[_Frame] = deque()  # sent, in order
        self.sent = 0  # batches sent (the next one's sequence number)
        self.outbox: list[bytes] = []
        self.queued: list[asyncio.Future[bool]] = []  # the futures of ``outbox``
        self.unsent = bytearray()  # what the socket did not take yet
        self.answers = bytearray()  # what was read and not parsed yet
        self.load = 0  # checks queued or sent, not answered
        self.flushing = False  # a send of what is queued is scheduled


class _Frame:
    """A batch sent and not answered: its sequence number, its checks and when it was sent."""

    __slots__ = ("at", "futures", "sequence")

    def __init__(self, sequence: int, futures: list[asyncio.Future[bool]], at: float) -> None:
        self.sequence = sequence
        self.futures = futures
        self.at = at


_pools: weakref.WeakSet[VerifyWorkers] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: let go of the parent's workers, closing only the child's copies of
    their sockets (the event loop's registrations belong to the parent)."""
    for pool in list(_pools):
        pool._disown()


os.register_at_fork(after_in_child=_after_fork)


class VerifyWorkers:
    """``n`` worker processes checking ed25519 signatures for the running event loop.

    :meth:`check` queues a check on the least loaded worker and returns a future of its answer;
    :meth:`answer` is how a caller waits for it. What is queued is sent in batches of up to
    ``max_batch``: as soon as that many wait, else once the event loop has run what is ready
    (the checks queued meanwhile go together) or an answer comes; at most ``max_frames``
    batches are out per worker, and a worker holding ``max_batch * max_frames`` checks takes no
    more (:meth:`check` returns None: check inline).

    Guarantees: an answer is a worker's ``_crypto.verify`` of exactly the bytes given; a worker
    that ends, fails to start, answers out of protocol or not within ``answer_timeout`` seconds
    is killed and every check it had fails with :class:`WorkerLost` (counted in ``lost``).
    Workers restart after ``restart_after`` seconds, twice as long after each failure in a row
    (at most a minute); meanwhile :meth:`check` returns None. The workers end when
    :meth:`close` is called, the pool is collected or this process ends (they read the end of
    their socket; a forked child closes its copies at once). They serve the event loop that
    started them while it is open; :meth:`check` from another loop returns None. Not
    thread-safe: one event loop uses it.
    """

    def __init__(
        self,
        n: int = 1,
        *,
        max_batch: int = 16,
        max_frames: int = 4,
        answer_timeout: float = 2.0,
        restart_after: float = 1.0,
    ) -> None:
        whole(n, "verify_workers", error=IATPConfigError)
        whole(max_batch, "max_batch", error=IATPConfigError)
        whole(max_frames, "max_frames", error=IATPConfigError)
        seconds(answer_timeout, "answer_timeout", error=IATPConfigError)
        seconds(restart_after, "restart_after", zero=True, error=IATPConfigError)
        self.n = n
        self.max_batch = max_batch
        self.max_frames = max_frames
        self.answer_timeout = answer_timeout
        self.restart_after = restart_after
        self.checks = 0  # checks answered by a worker
        self.batches = 0  # batches sent
        self.lost = 0  # checks failed with WorkerLost
        self.withdrawn = 0  # checks taken back before their answer (checked inline)
        self.started = 0  # worker processes started
        self._workers: list[_Worker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()
        self._failures = 0  # in a row, since the last answer
        self._down_until = 0.0
        self._closed = False
        _pools.add(self)

    @property
    def running(self) -> int:
        """Worker processes running now."""
        return len(self._workers)

    def start(self) -> bool:
        """Start the missing workers on the running event loop; True if all ``n`` run. Does
        nothing (False) after :meth:`close` or while restarts wait after a failure."""
        if self._closed:
            return False
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            self._disown()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                return False  # the workers serve the loop that started them while it is open
            self._forget()  # a closed loop's workers
            self._loop = loop
        while len(self._workers) < self.n:
            if time.monotonic() < self._down_until:
                return False
            try:
                worker = self._spawn()
            except OSError as exc:
                log.warning("cannot start a signature worker (%s); verifying inline", exc)
                self._failed()
                return False
            self._workers.append(worker)
            self.started += 1
            loop.add_reader(worker.sock.fileno(), _readable, weakref.ref(self), worker)
        return True

    def check(self, public_key: bytes, message: bytes, signature: bytes) -> asyncio.Future[bool] | None:
        """Queue a check of ``signature`` over ``message`` by ``public_key``: a future of
        True/False (or WorkerLost), or None when no worker can take it (check inline). Needs
        the running event loop; a key or signature of the wrong length gives None."""
        workers = self._workers
        if len(workers) < self.n or self._loop is not asyncio.get_running_loop() or self._pid != os.getpid():
            self.start()
            workers = self._workers
            if not workers or self._loop is not asyncio.get_running_loop():
                return None
        if len(public_key) != _crypto.PUBLIC_KEY_BYTES or len(signature) != _crypto.SIGNATURE_BYTES:
            return None
        worker = workers[0] if len(workers) == 1 else min(workers, key=lambda w: w.load)
        full = self.max_batch * self.max_frames
        if worker.load >= full:
            self._on_readable(worker)  # answers the loop has not read yet make room
            if worker.load >= full:
                frames = worker.frames
                if frames and time.monotonic() - frames[0].at > self.answer_timeout:
                    # Full and silent (its checks' messages may all have been dropped, so no
                    # one waits for an answer): a worker that stopped answering is found here.
                    self._drop(worker, f"no answer in {self.answer_timeout:g} s")
                return None
        assert self._loop is not None
        future: asyncio.Future[bool] = self._loop.create_future()
        worker.outbox.append(_CHECK.pack(len(message), public_key, signature) + message)
        worker.queued.append(future)
        worker.load += 1
        if len(worker.queued) >= self.max_batch:
            if len(worker.frames) < self.max_frames:
                self._send(worker)
        elif not worker.flushing:
            worker.flushing = True
            self._loop.call_soon(self._flush, worker)
        return future

    async def answer(self, future: asyncio.Future[bool]) -> bool | None:
        """The answer of a check from :meth:`check`: True or False, or None where the caller
        must check inline: its worker was lost or did not answer within ``answer_timeout``, or
        the check is taken back rather than waited for, because it is its worker's only one (a
        lone message would wait a round trip) or waits behind ``max_frames`` batches. A check
        still queued is sent now. Answers that have come are read at once, not when the event
        loop next polls (a busy loop polls seldom)."""
        if self._pid != os.getpid():
            self._disown()
        if not future.done() and self._loop is not asyncio.get_running_loop():
            future.cancel()  # not this loop's check (a fork that kept the loop): inline
            self.withdrawn += 1
            return None
        if not future.done():
            for worker in tuple(self._workers):  # reading may drop one
                if worker.frames:
                    self._on_readable(worker)
            if not future.done():
                owner, sent = self._owner(future)
                if owner is not None and not sent and len(owner.frames) < self.max_frames and owner.load > 1:
                    self._send(owner)  # what is queued up to it goes now
                    sent = future not in owner.queued
                if owner is None or not sent or owner.load == 1:
                    if owner is not None:  # checked inline, now
                        if not sent:
                            i = owner.queued.index(future)
                            del owner.queued[i], owner.outbox[i]
                            owner.load -= 1
                        self.withdrawn += 1
                    future.cancel()
                    return None
                done, _ = await asyncio.wait((future,), timeout=self.answer_timeout)
                if not done:
                    self._drop(owner, f"no answer in {self.answer_timeout:g} s")
                if not future.done():  # its worker was let go of meanwhile (a fork, a new loop)
                    future.cancel()
                    self.withdrawn += 1
                    return None
        if future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    def close(self) -> None:
        """Stop the workers; checks not answered fail with WorkerLost. Idempotent. In a forked
        child, only lets go of the parent's workers."""
        self._closed = True
        self._stop("closed")

    def stop(self) -> None:
        """End the workers for now, not counted as a failure: :meth:`start` (or the next
        :meth:`check`) starts them again at once. Checks not answered fail with WorkerLost. In
        a forked child, only lets go of the parent's workers."""
        self._stop("stopped")

    def _stop(self, why: str) -> None:
        if self._pid != os.getpid():
            self._disown()
        for worker in list(self._workers):
            self._drop(worker, why, failure=False)

    # -- the parent's side -------------------------------------------------------------------

    def _owner(self, future: asyncio.Future[bool]) -> tuple[_Worker | None, bool]:
        """The worker holding a check not answered, and whether it was sent."""
        for worker in self._workers:
            if future in worker.queued:
                return worker, False
            for frame in worker.frames:
                if future in frame.futures:
                    return worker, True
        return None, False

    def _spawn(self) -> _Worker:
        if not sys.executable:
            raise OSError("no Python interpreter to run (sys.executable is empty)")
        parent, child = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(sys.path), __file__, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C goes to the parent, which ends it
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        return _Worker(process, parent)

    def _flush(self, worker: _Worker) -> None:
        """Send what ``worker`` has queued, if it may have another batch out."""
        worker.flushing = False
        if worker.queued and len(worker.frames) < self.max_frames and worker in self._workers:
            self._send(worker)

    def _send(self, worker: _Worker) -> None:
        """Send one batch of what ``worker`` has queued (at most ``max_batch`` checks)."""
        take = self.max_batch
        futures = worker.queued[:take]
        body = b"".join(worker.outbox[:take])
        sequence = worker.sent % _SEQUENCE
        data = _FRAME.pack(sequence, len(body), len(futures)) + body
        del worker.queued[:take], worker.outbox[:take]
        worker.sent += 1
        worker.frames.append(_Frame(sequence, futures, time.monotonic()))
        self.batches += 1
        if worker.unsent:
            worker.unsent += data
            return
        try:
            sent = worker.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._drop(worker, f"{type(exc).__name__}: {exc}")
            return
        if sent < len(data):
            worker.unsent += data[sent:]
            assert self._loop is not None
            self._loop.add_writer(worker.sock.fileno(), _writable, weakref.ref(self), worker)

    def _on_writable(self, worker: _Worker) -> None:
        try:
            sent = worker.sock.send(worker.unsent)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(worker, f"{type(exc).__name__}: {exc}")
            return
        del worker.unsent[:sent]
        if not worker.unsent:
            assert self._loop is not None
            self._loop.remove_writer(worker.sock.fileno())

    def _on_readable(self, worker: _Worker) -> None:
        try:
            data = worker.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(worker, f"{type(exc).__name__}: {exc}")
            return
        if not data:
            self._drop(worker, f"the worker ended (exit code {worker.process.poll()})")
            return
        buffer = worker.answers
        buffer += data
        frames = worker.frames
        while len(buffer) >= _ANSWERS.size:
            sequence, count = _ANSWERS.unpack_from(buffer)
            end = _ANSWERS.size + count
            if len(buffer) < end:
                break
            if not frames or frames[0].sequence != sequence or len(frames[0].futures) != count:
                self._drop(worker, "an answer to no batch sent")
                return
            answers = buffer[_ANSWERS.size : end]
            if answers.strip(b"\x00\x01"):
                self._drop(worker, "an answer other than 0 or 1")
                return
            del buffer[:end]
            futures = frames.popleft().futures
            worker.load -= count
            self.checks += count
            self._failures = 0
            for future, answer in zip(futures, answers, strict=True):
                if not future.done():  # its caller may have been cancelled
                    future.set_result(answer == 1)
        if worker.queued and len(frames) < self.max_frames:
            self._send(worker)

    def _failed(self) -> None:
        """A worker failed: restarts wait, twice as long as last time (at most a minute)."""
        self._failures += 1
        pause = min(self.restart_after * 2 ** min(self._failures - 1, 16), 60.0)
        self._down_until = time.monotonic() + pause

    def _drop(self, worker: _Worker, why: str, *, failure: bool = True) -> None:
        """Kill ``worker`` and fail its checks with WorkerLost; a ``failure`` (not a close or a
        stop) is logged and delays restarts."""
        if self._pid != os.getpid():
            self._disown()
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        if failure and not self._closed:
            log.warning("signature worker %d lost (%s); verifying inline", worker.process.pid, why)
            self._failed()
        self._end(worker)
        error = WorkerLost(why)
        for futures in (*(frame.futures for frame in worker.frames), worker.queued):
            for future in futures:
                if not future.done() and not future.get_loop().is_closed():
                    self.lost += 1
                    future.set_exception(error)
                    future.exception()  # retrieved: a dropped message's check logs nothing
        worker.frames.clear()
        worker.queued.clear()
        worker.outbox.clear()

    def _forget(self) -> None:
        """End the workers started on another event loop, without touching their checks (their
        futures belong to that loop)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            self._end(worker)

    def _end(self, worker: _Worker) -> None:
        """Take ``worker``'s socket off the event loop (while it is open), close it and end
        the process."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(worker.sock.fileno())
            loop.remove_writer(worker.sock.fileno())
        worker.sock.close()
        _reap(worker.process)

    def _disown(self) -> None:
        """In a forked child: close the child's copies of the parent's sockets, touching
        neither the processes nor the event loop (both the parent's); start afresh."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.sock.close()
        self._pid = os.getpid()
        self._loop = None

    def __del__(self) -> None:
        """Collected without :meth:`close` (the event loop holds it only weakly): end the
        workers all the same."""
        if getattr(self, "_pid", None) != os.getpid():
            return  # a forked child's copy: the workers are the parent's
        for worker in self._workers:
            with contextlib.suppress(Exception):  # at interpreter exit some of this is gone
                self._end(worker)


def _readable(pool: weakref.ref[VerifyWorkers], worker: _Worker) -> None:
    """The event loop's reader callback, holding the pool weakly (a pool dropped without
    ``close`` is collected, and its workers end)."""
    found = pool()
    if found is not None:
        found._on_readable(worker)


def _writable(pool: weakref.ref[VerifyWorkers], worker: _Worker) -> None:
    found = pool()
    if found is not None:
        found._on_writable(worker)


def _reap(process: subprocess.Popen[bytes]) -> None:
    """End a worker whose socket is closed (it would end by itself on reading the end)."""
    if process.poll() is None:
        process.kill()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kill not done in 5 s
            log.warning("signature worker %d did not end", process.pid)


# -- the worker's side -------------------------------------------------------------------------


def serve(sock: socket.socket) -> None:
    """Answer batches of checks on ``sock`` until it ends: the worker's whole life."""
    reader = sock.makefile("rb")
    verify = _crypto.verify
    check_head = _CHECK.size
    while True:
        head = reader.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        sequence, size, count = _FRAME.unpack(head)
        body = reader.read(size)
        if len(body) < size:
            return
        answers = bytearray(count)
        at = 0
        for i in range(count):
            length, public_key, signature = _CHECK.unpack_from(body, at)
            at += check_head
            answers[i] = verify(public_key, body[at : at + length], signature)
            at += length
        if at != size:
            raise ValueError(f"a batch of {size} bytes held {at} bytes of checks")
        sock.sendall(_ANSWERS.pack(sequence, count) + answers)


def main(argv: list[str] | None = None) -> int:
    """The worker process: serve the socket whose descriptor is the one argument."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ends with its parent, by its socket
    # A parent gone away (ConnectionError) leaves nothing to answer.
    with socket.socket(fileno=int(args[0])) as sock, contextlib.suppress(ConnectionError):
        serve(sock)
    return 0
