"""fs.* actions against every way out of the workspace: '..', encoded dots, absolute paths,
NUL and backslashes, over-long paths, symlinks (in the path, as the last component, and swapped
in after the check). Nothing outside is read, written or deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_os import ActionRequest
from agent_os.control_plane import KernelSpace
from agent_os.control_plane.actions import ActionRefused, FileSystem


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """(workspace, outside): the outside directory holds secret.txt."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (ws / "sub").mkdir()
    return ws, outside


def _escapes(ws: Path, outside: Path) -> list[str]:
    return [
        "../outside/secret.txt",
        "sub/../../outside/secret.txt",
        "sub/..",
        "%2e%2e/outside/secret.txt",
        "%2E%2E%2Foutside%2Fsecret.txt",
        "..%2foutside/secret.txt",
        "sub/%2e%2e/%2e%2e/outside/secret.txt",
        str(outside / "secret.txt"),
        "/etc/passwd",
        f"{ws}evil/secret.txt",
        f"{ws}/../outside/secret.txt",
        "sub/a\0.txt",
        "..\\outside\\secret.txt",
        "sub/" + "a/" * 2100,
        "sub/" + "n" * 300,
    ]


@pytest.mark.parametrize("action", ["fs.read", "fs.write", "fs.delete", "fs.list"])
async def test_every_escape_is_denied_before_the_provider(places: tuple[Path, Path], action: str) -> None:
    ws, outside = places
    async with KernelSpace("permissive", workspace=ws) as kernel:
        kernel.external("agent")
        targets = _escapes(ws, outside)
        for target in targets:
            result = await kernel.submit(
                ActionRequest(action, target, {"content": "pwned"}, agent_id="agent")
            )
            assert not result.allowed, target
            assert result.output is None, target
            assert result.error, target
        denied = await kernel.recorder.query(event_type="action_blocked")  # the provider refused
        assert len(denied) == len(targets)
        assert await kernel.recorder.query(event_type="action_outcome") == []
    assert (outside / "secret.txt").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


async def test_a_symlink_to_outside_is_never_followed(places: tuple[Path, Path]) -> None:
    ws, outside = places
    (ws / "out").symlink_to(outside, target_is_directory=True)
    (ws / "leak.txt").symlink_to(outside / "secret.txt")
    async with KernelSpace("permissive", workspace=ws) as kernel:
        kernel.external("agent")

        async def submit(action: str, target: str, **params: object) -> tuple[bool, object, str | None]:
            r = await kernel.submit(ActionRequest(action, target, params, agent_id="agent"))
            return r.allowed, r.output, r.error

        for action, target in [
            ("fs.read", "out/secret.txt"),
            ("fs.read", "leak.txt"),
            ("fs.write", "out/new.txt"),
            ("fs.write", "out/secret.txt"),
            ("fs.delete", "out/secret.txt"),
            ("fs.list", "out"),
        ]:
            allowed, output, error = await submit(action, target, content="pwned")
            assert allowed, (action, target)
            assert output is None, (action, target)
            assert "symlink" in (error or ""), (action, target, error)
        # Writing or deleting the link itself acts on the link, inside the workspace.
        assert (await submit("fs.write", "leak.txt", content="mine"))[1] == {
            "path": str(ws / "leak.txt"),
            "bytes": 4,
        }
        assert not (ws / "leak.txt").is_symlink()
        assert (ws / "leak.txt").read_text() == "mine"
        (ws / "leak2.txt").symlink_to(outside / "secret.txt")
        assert (await submit("fs.delete", "leak2.txt"))[2] is None
        assert "leak2.txt" not in {p.name for p in ws.iterdir()}
        listed = (await submit("fs.list", "."))[1]
        assert {"name": "out", "type": "symlink", "size": len(str(outside))} in listed  # type: ignore[operator]
    assert (outside / "secret.txt").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


@pytest.mark.parametrize("kind", ["read", "write", "delete", "list"])
async def test_a_symlink_swapped_in_after_the_check_is_not_followed(
    places: tuple[Path, Path], kind: str
) -> None:
    ws, outside = places
    (ws / "sub/secret.txt").write_text("mine")
    fs = FileSystem(ws)
    provider = fs.provider(kind)  # type: ignore[arg-type]
    target = "sub" if kind == "list" else "sub/secret.txt"
    request = ActionRequest(f"fs.{kind}", target, {"content": "pwned"})
    assert provider.resource(request) == str(ws / target)  # the check passes ...
    (ws / "sub").rename(ws / "moved")  # ... then the directory becomes a symlink out
    (ws / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(Exception, match="symlink"):
        await provider.run(request)
    assert (outside / "secret.txt").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_the_workspace_resolves_what_stays_inside(places: tuple[Path, Path]) -> None:
    ws, outside = places
    workspace = FileSystem(ws).workspace
    assert workspace.resolve("sub/./a.txt") == (str(ws / "sub/a.txt"), ("sub", "a.txt"))
    assert workspace.resolve(str(ws / "sub")) == (str(ws / "sub"), ("sub",))
    assert workspace.resolve("") == (str(ws), ())
    assert workspace.resolve(".") == (str(ws), ())
    for target in _escapes(ws, outside):
        with pytest.raises(ActionRefused):
            workspace.resolve(target)
