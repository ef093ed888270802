"""An action judged as an operation other than its permission, a permission that depends on
the request, and context fields a provider adds; the SQL guard's reading of statements that
only read."""

from __future__ import annotations

from typing import Any

import pytest

from agent_os import ActionRequest, ActionResult
from agent_os.control_plane import VIOLATION_EVENTS, KernelSpace, Pattern, Policy
from agent_os.control_plane.actions import ActionRefused, ActionRegistry, Http, Process, Sql
from agent_os.control_plane.errors import KernelError
from agent_os.control_plane.policy.sql_guard import statements_reading


class Query:
    """A provider whose permission is ``read`` for targets starting with 'get', else ``write``."""

    def resource(self, request: ActionRequest) -> str:
        return request.target

    def permission(self, request: ActionRequest) -> str:
        if request.target == "refuse":
            raise ActionRefused("cannot tell")
        if request.target == "bad":
            return ""
        return "read" if request.target.startswith("get") else "write"

    def context(self, request: ActionRequest) -> dict[str, Any]:
        return {"table": request.target.split()[-1], "agent_name": "spoofed"}

    async def run(self, request: ActionRequest) -> Any:
        return request.target


def test_operation_defaults_to_the_permission_and_is_checked() -> None:
    registry = ActionRegistry()
    assert registry.register("crm.lookup", Query(), "read").operation == "read"
    spec = registry.register("crm.query", Query(), "write", operation="crm")
    assert (spec.permission, spec.operation) == ("write", "crm")
    with pytest.raises(KernelError, match="operation"):
        registry.register("crm.bad", Query(), "write", operation="Not One")


async def _run(kernel: KernelSpace, permissions: list[str], *targets: str) -> list[ActionResult]:
    @kernel.register(name="clerk", permissions=permissions)
    async def agent() -> list[ActionResult]:
        return [await kernel.submit(ActionRequest("crm.query", t)) for t in targets]

    results: list[ActionResult] = await kernel.execute(agent)
    return results


async def test_the_permission_comes_from_the_request_and_the_policy_sees_the_operation() -> None:
    policy = Policy("crm", default_action="allow")
    policy.add_rule("deny", Pattern("crm", "*", conditions={"table": "secrets"}), "no secrets")
    policy.add_rule("deny", Pattern("read", "*"), "never judged as read")
    async with KernelSpace(policy) as kernel:
        kernel.actions.register("crm.query", Query(), "write", operation="crm")
        got, put, secret, refused, bad = await _run(
            kernel, ["read"], "get users", "put users", "get secrets", "refuse", "bad"
        )
        assert got.ok, got.error
        assert put.error == "agent clerk lacks permission for write"
        assert secret.error == "no secrets"
        assert refused.error == "cannot tell"
        assert not bad.allowed
        decision = (await kernel.recorder.query(event_type="policy_decision"))[0]
        assert decision.data["operation"] == "crm"
        assert decision.data["permission"] == "read"
        assert decision.data["agent_name"] == "clerk"  # the kernel's fields win over the provider's
        assert len(await kernel.recorder.query(event_type=VIOLATION_EVENTS)) == 4


async def test_registering_the_providers_names_their_permission_and_operation(tmp_path: Any) -> None:
    db = tmp_path / "a.db"
    db.write_bytes(b"")
    registry = ActionRegistry()
    Http(["example.com"]).register(registry)
    Sql({"main": db}).register(registry)
    Process(["echo"]).register(registry)
    assert {(s.name, s.permission, s.operation) for s in registry} == {
        ("net.http", "network", "network"),
        ("sql.query", "write", "sql"),
        ("proc.exec", "execute", "execute"),
    }
    with pytest.raises(KernelError, match="at least one"):
        Sql({})
    with pytest.raises(KernelError, match="DSN or an existing SQLite file"):
        Sql({"x": tmp_path / "missing.db"})
    assert "secret" not in repr(Sql({"pg": "postgresql://u:secret@h/db"}).databases["pg"])


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
@pytest.mark.parametrize(
    ("sql", "reading"),
    [
        ("SELECT 1", [True]),
        ("SELECT a FROM t WHERE b IN (SELECT c FROM u)", [True]),
        ("SELECT 1; DROP TABLE t", [True, False]),
        ("INSERT INTO t VALUES (1)", [False]),
        ("WITH d AS (DELETE FROM t WHERE a = 1 RETURNING *) SELECT * FROM d", [False]),
        ("SELECT * FROM t FOR UPDATE", [False]),
        ("SELECT * INTO u FROM t", [False]),
        ("SELECT nextval('s')", [False]),
        ("SELECT pg_read_file('/etc/passwd')", [False]),
        ("SELECT 1 /* ; DELETE FROM t */", [True]),
        ("SELECT ')(", None),
        ("SELECT 1\0", None),
    ],
)
def test_statements_reading(dialect: str, sql: str, reading: list[bool] | None) -> None:
    assert statements_reading(sql, dialect) == reading


def test_statements_reading_fails_closed_on_unknown_dialects() -> None:
    assert statements_reading("SELECT 1", "no-such-dialect") is None
    assert statements_reading("SELECT 1", "postgres") == [True]
