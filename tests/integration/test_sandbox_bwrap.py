"""Real bubblewrap sandboxes (agent_os.control_plane.sandbox.bwrap): what was not granted fails
at the OS level, limits hold, signals reach every process, and nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent_os.control_plane.errors import SandboxError
from agent_os.control_plane.sandbox import Sandbox, SandboxLimits, SandboxSpec, start
from agent_os.control_plane.sandbox.bwrap import SandboxConfigError, _pids_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root (docs/sandbox.md)")

Start = Callable[..., Awaitable[Sandbox]]
SOURCE_TREE = str(Path(__file__).resolve().parents[2])


@pytest.fixture
async def sandboxed() -> AsyncIterator[Start]:
    """``await sandboxed(code, spec)`` runs Python ``code`` in a sandbox, closed after the test."""
    opened: list[Sandbox] = []

    async def run(code: str, spec: SandboxSpec | None = None) -> Sandbox:
        sandbox = await start(
            [sys.executable, "-c", code], spec, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        opened.append(sandbox)
        return sandbox

    try:
        yield run
    finally:
        for sandbox in opened:
            await sandbox.close()


async def output(sandbox: Sandbox, timeout: float = 30) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(sandbox.process.communicate(), timeout)
    return sandbox.process.returncode or 0, out.decode(), err.decode()


PROBES = r"""
import errno, os, socket
def attempt(name, fn):
    try:
        fn()
        print(name, "ALLOWED")
    except OSError as exc:
        print(name, errno.errorcode.get(exc.errno, exc.errno))
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("write-outside", lambda: open("/usr/lib/agent-os-probe", "w"))
attempt("write-source", lambda: open(os.path.join(SOURCE, "probe"), "w"))
attempt("internet", lambda: socket.create_connection(("1.1.1.1", 80), timeout=2))
attempt("host-nats", lambda: socket.create_connection(("127.0.0.1", 4222), timeout=2))
attempt("host-proc", lambda: os.kill(1, 0) if os.getpid() != 1 and len(os.listdir("/proc")) > 50 else None)
with open("/workspace/result.txt", "w") as f:
    f.write("written")
import agent_os.amb
print("uid", os.getuid(), "cwd", os.getcwd(), "pids", sum(p.isdigit() for p in os.listdir("/proc")))
"""


async def test_what_was_not_granted_fails_at_the_os_level(sandboxed: Start, tmp_path: Path) -> None:
    source = SOURCE_TREE
    sandbox = await sandboxed(f"SOURCE = {source!r}\n{PROBES}", SandboxSpec(workspace=tmp_path / "ws"))
    status, out, err = await output(sandbox)
    assert status == 0, err
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["shadow"] == "EACCES"
    assert lines["write-outside"] in ("EROFS", "EACCES")
    assert lines["write-source"] in ("EROFS", "EACCES")
    assert lines["internet"] == "ENETUNREACH"
    assert lines["host-nats"] == "ECONNREFUSED"  # the sandbox's own loopback, nobody listening
    assert lines["host-proc"] != "ALLOWED" or int(lines["uid"].split()[-1]) < 50
    uid = int(lines["uid"].split()[0])
    assert uid == sandbox.uid, "the sandbox runs as a uid of its own"
    assert uid >= 1_000_000
    assert "cwd /workspace" in lines["uid"]
    assert int(lines["uid"].split()[-1]) < 10, "its own pid namespace: only its processes"
    written = tmp_path / "ws" / "result.txt"
    assert written.read_text() == "written"
    assert written.stat().st_uid == uid


async def test_memory_limit(sandboxed: Start) -> None:
    limits = SandboxLimits(memory=256 << 20)
    code = "try:\n    b = bytearray(400 << 20)\n    print('ALLOCATED')\n"
    code += "except MemoryError:\n    print('MemoryError')"
    status, out, _ = await output(await sandboxed(code, SandboxSpec(limits=limits)))
    assert (status, out.strip()) == (0, "MemoryError")


async def test_fork_bomb_stops_at_the_process_limit(sandboxed: Start) -> None:
    code = """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as exc:
    print(children, exc.errno, flush=True)
time.sleep(60)
"""
    sandbox = await sandboxed(code, SandboxSpec(limits=SandboxLimits(processes=16)))
    assert sandbox.process.stdout is not None
    line = await asyncio.wait_for(sandbox.process.stdout.readline(), 30)
    children, errno_ = map(int, line.split())
    assert errno_ == 11  # EAGAIN past the limit
    assert 0 < children < 16
    assert len(sandbox.pids()) == children + 1, "the bomb and its sleeping children"
    await sandbox.close()
    assert _pids_of(sandbox.uid) == [], "closing killed every process of the sandbox"


async def test_the_sandbox_ends_with_its_main_process(sandboxed: Start) -> None:
    code = "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(60)\n"
    sandbox = await sandboxed(code)
    await asyncio.wait_for(sandbox.wait(), 30)
    await wait_for(lambda: not sandbox.pids())


async def test_open_files_and_file_size_limits(sandboxed: Start) -> None:
    code = """
import errno, os
files = []
try:
    while True:
        files.append(open("/dev/null"))
except OSError as exc:
    print("files", errno.errorcode[exc.errno])
for f in files:
    f.close()
try:
    with open("/workspace/big", "wb") as f:
        f.write(b"x" * (2 << 20))
except OSError as exc:
    print("size", errno.errorcode[exc.errno], os.path.getsize("/workspace/big"))
"""
    spec = SandboxSpec(limits=SandboxLimits(open_files=32, file_size=1 << 20))
    status, out, err = await output(await sandboxed(code, spec))
    assert status == 0, err
    assert out.split() == ["files", "EMFILE", "size", "EFBIG", str(1 << 20)]


async def test_cpu_time_limit_ends_a_busy_loop(sandboxed: Start) -> None:
    spec = SandboxSpec(limits=SandboxLimits(cpu_seconds=1))
    started = time.monotonic()
    status, _, _ = await output(await sandboxed("while True: pass", spec), timeout=30)
    assert status != 0
    assert time.monotonic() - started < 20


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_sigstop_freezes_a_busy_loop_that_never_looks_at_signals(sandboxed: Start) -> None:
    sandbox = await sandboxed("import os\nif os.fork() == 0:\n    pass\nwhile True: pass")
    await wait_for(lambda: len(sandbox.pids()) == 2)
    pids = sandbox.pids()
    await wait_for(lambda: all(cpu_ticks(p) > 0 for p in pids))
    assert sandbox.signal(signal.SIGSTOP) == 2
    await wait_for(lambda: all(state(p) == "T" for p in pids))
    frozen = [cpu_ticks(p) for p in pids]
    await asyncio.sleep(0.3)  # a measured interval: a running loop gains ~30 ticks in it
    assert [cpu_ticks(p) for p in pids] == frozen
    assert sandbox.signal(signal.SIGCONT) == 2
    await wait_for(lambda: all(cpu_ticks(p) > t for p, t in zip(pids, frozen, strict=True)))
    sandbox.signal(signal.SIGKILL)
    assert await asyncio.wait_for(sandbox.wait(), 10) != 0
    await wait_for(lambda: not sandbox.pids())


async def test_each_sandbox_has_its_own_uid_and_frees_it(sandboxed: Start) -> None:
    first = await sandboxed("import time; time.sleep(60)")
    second = await sandboxed("import time; time.sleep(60)")
    assert first.uid != second.uid
    await wait_for(lambda: len(first.pids()) == 1 and len(second.pids()) == 1)
    workspace = first.workspace
    await first.close()
    assert first.pids() == []
    assert len(second.pids()) == 1
    assert not workspace.exists(), "a private workspace is removed"


@pytest.mark.parametrize(
    "spec",
    [
        SandboxSpec(workspace="/"),
        SandboxSpec(workspace="/usr"),
        SandboxSpec(workspace=str(Path(sys.prefix).parent)),
        SandboxSpec(env={"A=B": "c"}),
        SandboxSpec(env={"A": "b\0c"}),
    ],
)
async def test_a_spec_that_cannot_be_honoured_is_refused(spec: SandboxSpec) -> None:
    starting = start([sys.executable, "-c", "pass"], spec)
    with pytest.raises(SandboxConfigError):
        await starting


async def test_limits_and_commands_are_checked() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SandboxConfigError, match="memory"):
            SandboxLimits(memory=bad)  # type: ignore[arg-type]
    with pytest.raises(SandboxError, match="absolute path"):
        await start(["python3", "-c", "pass"])


# Run by a host Python: starts a sandbox running CODE with ROOT = argv[1], passes on its output
# and exit status.
CLOSED_HOST = r"""
import asyncio, sys
from agent_os.control_plane.sandbox import start

CODE = '''
import os, sys, agent_os.amb
print("prefix", sys.prefix)
print("loaded", agent_os.amb.__file__)
print("shown", " ".join(sorted(os.listdir(ROOT))))
for name in ("notes.txt", "agent_os/outside/notes.txt"):
    try:
        open(os.path.join(ROOT, name)).read()
        print(name, "ALLOWED")
    except OSError as exc:
        print(name, type(exc).__name__)
'''

async def main():
    sandbox = await start(
        [sys.executable, "-c", f"ROOT = {sys.argv[1]!r}\n" + CODE],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(sandbox.process.communicate(), 60)
    finally:
        await sandbox.close()
    sys.stdout.write(out.decode())
    sys.stderr.write(err.decode())
    sys.exit(sandbox.process.returncode)

asyncio.run(main())
"""


async def run_closed_host(python: str, root: Path, pythonpath: str) -> dict[str, str]:
    """Run CLOSED_HOST with ``python`` for ``root``; its sandbox's report, line by line."""
    host = await asyncio.create_subprocess_exec(
        python,
        "-c",
        CLOSED_HOST,
        str(root),
        cwd=root,
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(host.communicate(), 90)
    finally:
        if host.returncode is None:
            host.kill()
            await host.wait()
    assert host.returncode == 0, err.decode()
    return dict(line.split(" ", 1) for line in out.decode().splitlines())


def closed_dir(path: Path) -> Path:
    """``path`` made as ``mktemp -d`` makes a directory (0700), with a file anyone could read
    if they could enter."""
    path.mkdir(mode=0o700)
    (path / "notes.txt").write_text("the owner's, not the sandbox's")
    (path / "notes.txt").chmod(0o644)
    return path


async def test_a_source_tree_in_a_closed_directory_loads_and_shows_nothing_else(tmp_path: Path) -> None:
    """A checkout in a directory only its owner may open: the sandbox loads agent_os from it
    and sees nothing else the directory holds. Links in the package that lead out of the tree,
    or nowhere, show nothing and stop nothing."""
    root = closed_dir(tmp_path / "checkout")
    package = Path(SOURCE_TREE) / "agent_os"
    folders = {"agent_os"} | {
        link.resolve().relative_to(SOURCE_TREE).parts[0] for link in package.iterdir() if link.is_symlink()
    }
    for name in folders:
        shutil.copytree(
            Path(SOURCE_TREE) / name, root / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    outside = closed_dir(tmp_path / "outside")
    outside.chmod(0o755)  # readable by all: only what the sandbox is shown may be reached
    (root / "agent_os" / "outside").symlink_to(outside)
    (root / "agent_os" / "gone").symlink_to("../gone")
    lines = await run_closed_host(sys.executable, root, str(root))
    assert lines["loaded"].startswith(str(root / "agent_os") + "/")
    assert lines["shown"].split() == sorted(folders)
    assert lines["notes.txt"] == "FileNotFoundError"
    assert lines["agent_os/outside/notes.txt"] == "FileNotFoundError"


async def test_a_virtual_environment_in_a_closed_directory_runs(tmp_path: Path) -> None:
    """``python -m venv "$(mktemp -d)"``: the sandbox runs that environment's interpreter, as
    that environment, and sees nothing else in its directory."""
    venv = tmp_path / "venv"
    venv.mkdir(mode=0o700)
    made = await asyncio.create_subprocess_exec(sys.executable, "-m", "venv", "--without-pip", str(venv))
    assert await asyncio.wait_for(made.wait(), 60) == 0
    assert stat.S_IMODE(venv.stat().st_mode) == 0o700
    (venv / "notes.txt").write_text("the owner's, not the sandbox's")
    (venv / "notes.txt").chmod(0o644)
    site = sysconfig.get_paths()["purelib"]  # where agent_os's dependencies are
    lines = await run_closed_host(str(venv / "bin" / "python"), venv, f"{SOURCE_TREE}:{site}")
    assert lines["prefix"] == str(venv)
    assert lines["notes.txt"] == "FileNotFoundError"
    assert "notes.txt" not in lines["shown"].split()
