"""ActionRequest/ActionResult, the action registry and the fs providers' limits."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent_os.control_plane.actions import (
    ActionRefused,
    ActionRegistry,
    ActionRequest,
    ActionResult,
    FileSystem,
)
from agent_os.control_plane.errors import KernelError


class Echo:
    def resource(self, request: ActionRequest) -> str:
        return request.target

    async def run(self, request: ActionRequest) -> Any:
        return request.target


def test_requests_are_frozen_and_copy_their_params() -> None:
    params = {"content": "x"}
    request = ActionRequest("fs.write", "a.txt", params)
    params["content"] = "changed"
    assert request.params["content"] == "x"
    assert request.agent_id is None
    with pytest.raises(TypeError):
        request.params["content"] = "y"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.target = "b"  # type: ignore[misc]
    assert ActionResult(True, 1, None, "r").ok
    assert not ActionResult(True, None, "boom", "r").ok


def test_the_registry_checks_names_permissions_and_providers() -> None:
    registry = ActionRegistry()
    spec = registry.register("crm.lookup", Echo(), "read")
    assert registry.get("crm.lookup") is spec
    assert "crm.lookup" in registry
    assert len(registry) == 1
    assert registry.get("crm.other") is None
    with pytest.raises(KernelError, match="already registered"):
        registry.register("crm.lookup", Echo(), "read")
    assert registry.register("crm.lookup", Echo(), "network", replace=True).permission == "network"
    for bad in ("lookup", "CRM.lookup", "crm..x", "crm.*"):
        with pytest.raises(KernelError, match="action name"):
            registry.register(bad, Echo(), "read")
    for perm in ("", "Read", "re*", "a b"):
        with pytest.raises(KernelError, match="permission"):
            registry.register("crm.x", Echo(), perm)
    with pytest.raises(KernelError, match="not a provider"):
        registry.register("crm.x", object(), "read")  # type: ignore[arg-type]


def test_filesystem_registers_the_four_actions_with_their_permissions(tmp_path: Path) -> None:
    registry = ActionRegistry()
    FileSystem(tmp_path).register(registry)
    assert {s.name: s.permission for s in registry} == {
        "fs.read": "read",
        "fs.list": "read",
        "fs.write": "write",
        "fs.delete": "write",
    }
    with pytest.raises(KernelError, match="existing directory"):
        FileSystem(tmp_path / "missing")
    with pytest.raises(KernelError, match="cannot be /"):
        FileSystem("/")


async def test_size_limits_on_read_and_write(tmp_path: Path) -> None:
    fs = FileSystem(tmp_path, max_read=4, max_write=3, max_entries=2)
    (tmp_path / "big.txt").write_text("12345")
    (tmp_path / "ok.txt").write_text("1234")
    with pytest.raises(Exception, match="max_read"):
        await fs.provider("read").run(ActionRequest("fs.read", "big.txt"))
    assert await fs.provider("read").run(ActionRequest("fs.read", "ok.txt")) == "1234"
    with pytest.raises(ActionRefused, match="max_write"):
        fs.provider("write").resource(ActionRequest("fs.write", "w.txt", {"content": "1234"}))
    with pytest.raises(ActionRefused, match="content"):
        fs.provider("write").resource(ActionRequest("fs.write", "w.txt", {"content": 5}))
    (tmp_path / "third").write_text("")
    with pytest.raises(Exception, match="max_entries"):
        await fs.provider("list").run(ActionRequest("fs.list", "."))


async def test_write_replaces_atomically_keeping_the_mode(tmp_path: Path) -> None:
    fs = FileSystem(tmp_path)
    target = tmp_path / "a.sh"
    target.write_text("old")
    target.chmod(0o750)
    out = await fs.provider("write").run(ActionRequest("fs.write", "a.sh", {"content": b"new"}))
    assert out == {"path": str(target), "bytes": 3}
    assert target.read_bytes() == b"new"
    assert (target.stat().st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sh"]  # noqa: ASYNC240 (no temporary file left)
    (tmp_path / "d").mkdir()
    with pytest.raises(Exception, match="is a directory"):
        await fs.provider("write").run(ActionRequest("fs.write", "d", {"content": "x"}))
    with pytest.raises(Exception, match="is a directory"):
        await fs.provider("delete").run(ActionRequest("fs.delete", "d"))
    with pytest.raises(Exception, match="no such file"):
        await fs.provider("read").run(ActionRequest("fs.read", "nope.txt"))
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(Exception, match="binary=True"):
        await fs.provider("read").run(ActionRequest("fs.read", "bin"))
    assert await fs.provider("read").run(ActionRequest("fs.read", "bin", {"binary": True})) == b"\xff\xfe"
