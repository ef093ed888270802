"""The suite closes what a test opens even when the test fails (STYLE.md, "Tests").

An async test that builds a client, kernel, recorder, broker or service (or calls ``connect``,
``start`` or ``open``) must do it where the close is certain: in an ``async with`` (or ``with``)
item, inside a ``try`` that has a ``finally``, in the statements just before such a ``try``, or
through a fixture (whose teardown runs whatever the test did). A close at the end of the test
body is skipped by the first failing assertion; the leaked tasks and connections then fail
other tests.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# The classes whose instances hold tasks, connections or files until closed or stopped.
OPENERS = frozenset(
    {
        "AMB",
        "KernelSpace",
        "FlightRecorder",
        "ControlPlaneService",
        "MemoryService",
        "VerifierService",
        "MemoryBroker",
        "NatsBroker",
        "RedisBroker",
        "KafkaBroker",
        "EMK",
        "AdminAPI",
        "McpTools",
        "VerifyWorkers",
    }
)
OPENING_METHODS = frozenset({"connect", "start", "open"})

# Tests that deliberately leave something open, "path::test": why.
EXEMPT: dict[str, str] = {}


class _Module:
    """The check of one test module: ``openers`` are the OPENERS and the module's own helpers
    that return one (``agent_client(...)``), ``built`` the names a test binds to one."""

    def __init__(self, tree: ast.Module) -> None:
        self.openers = OPENERS  # what _is_factory looks for
        helpers = [f for f in tree.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        self.openers = OPENERS | {f.name for f in helpers if self._is_factory(f)}
        self.built: frozenset[str] = frozenset()

    def _is_factory(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        """A module-level helper (not a test, not a fixture) returning an instance of OPENERS, or
        a tuple holding one."""
        if node.name.startswith("test"):
            return False
        if any("fixture" in ast.unparse(d) for d in node.decorator_list):
            return False
        built = self._bound(node)
        for ret in ast.walk(node):
            if isinstance(ret, ast.Return) and ret.value is not None:
                values = ret.value.elts if isinstance(ret.value, ast.Tuple) else [ret.value]
                if any(self._constructs(v) or (isinstance(v, ast.Name) and v.id in built) for v in values):
                    return True
        return False

    def _constructs(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Await):
            node = node.value
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        return (isinstance(func, ast.Name) and func.id in self.openers) or (
            isinstance(func, ast.Attribute) and func.attr in self.openers
        )

    def _bound(self, func: ast.FunctionDef | ast.AsyncFunctionDef) -> frozenset[str]:
        """The names ``func`` binds to an instance of one of the openers."""
        names = set()
        for node in ast.walk(func):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value and self._constructs(node.value):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
        return frozenset(names)

    def unguarded_in(self, test: ast.AsyncFunctionDef) -> list[ast.Call]:
        self.built = self._bound(test)
        return list(self._unguarded(test.body))

    def _opens(self, node: ast.AST) -> Iterator[ast.Call]:
        """The opening calls in ``node``: a constructor of one of the openers, or ``connect``,
        ``start`` or ``open`` on a name in ``built`` (the test's own instances; those a fixture
        gives are the fixture's to close). What is handed to the ``closing`` fixture is closed
        by it, with what it owns (a service's client). Nested functions and classes are left
        out: they are checked where they are called."""
        stack = [node]
        while stack:
            current = stack.pop()
            if (
                isinstance(current, ast.Call)
                and isinstance(current.func, ast.Name)
                and current.func.id == "closing"
            ):
                continue
            nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
            stack += [child for child in ast.iter_child_nodes(current) if not isinstance(child, nested)]
            if isinstance(current, ast.Call):
                func = current.func
                if self._constructs(current) or (
                    isinstance(func, ast.Attribute)
                    and func.attr in OPENING_METHODS
                    and isinstance(func.value, ast.Name)
                    and func.value.id in self.built
                ):
                    yield current

    def _unguarded(self, body: list[ast.stmt]) -> Iterator[ast.Call]:
        """The opening calls in the statement list ``body`` that nothing is sure to close."""
        for i, stmt in enumerate(body):
            if isinstance(stmt, (ast.With, ast.AsyncWith)):
                # The items are guarded by the with itself; the body is checked like any other,
                # unless it is a constructor that pytest.raises expects to fail (nothing opened).
                if not self._refused_constructor(stmt):
                    yield from self._unguarded(stmt.body)
            elif isinstance(stmt, ast.Try) and stmt.finalbody:
                # What the try's body opens, the finally closes; the other blocks are not guarded.
                for handler in stmt.handlers:
                    yield from self._unguarded(handler.body)
                yield from self._unguarded(stmt.orelse)
                yield from self._unguarded(stmt.finalbody)
            elif isinstance(stmt, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.Match)):
                # The header (a condition, an iterable, a subject), then each block.
                for value in vars(stmt).values():
                    if isinstance(value, ast.expr):
                        yield from self._opens(value)
                    elif value and isinstance(value, list) and isinstance(value[0], ast.stmt):
                        yield from self._unguarded(value)
                    elif isinstance(value, list):
                        for item in value:
                            if isinstance(item, (ast.ExceptHandler, ast.match_case)):
                                yield from self._unguarded(item.body)
            elif (calls := list(self._opens(stmt))) and not self._followed_by_try(body[i + 1 :]):
                yield from calls

    def _refused_constructor(self, stmt: ast.With | ast.AsyncWith) -> bool:
        """``with pytest.raises(...): Open(...)``: the constructor raises, so nothing is open."""
        raises = any(
            isinstance(item.context_expr, ast.Call)
            and isinstance(item.context_expr.func, ast.Attribute)
            and item.context_expr.func.attr == "raises"
            for item in stmt.items
        )
        only = stmt.body[0] if len(stmt.body) == 1 else None
        return raises and isinstance(only, ast.Expr) and self._constructs(only.value)

    def _followed_by_try(self, rest: list[ast.stmt]) -> bool:
        """Whether ``rest`` is more opening statements and then ``try: ... finally:`` (the
        ``x = Open(...)``, ``await x.connect()``, ``try:`` idiom)."""
        for stmt in rest:
            if isinstance(stmt, ast.Try) and stmt.finalbody:
                return True
            if isinstance(stmt, (ast.With, ast.AsyncWith, ast.Try)) or not list(self._opens(stmt)):
                return False
        return False


def _async_tests(tree: ast.Module) -> Iterator[tuple[str, ast.AsyncFunctionDef]]:
    for node in tree.body:
        if isinstance(node, ast.AsyncFunctionDef) and node.name.startswith("test"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, ast.AsyncFunctionDef) and item.name.startswith("test"):
                    yield f"{node.name}::{item.name}", item


def unclosed_in(source: str, where: str = "<source>") -> list[str]:
    """``where::test:line: call`` for every opening call an async test in ``source`` leaves
    unguarded, except the tests in EXEMPT."""
    tree = ast.parse(source)
    module = _Module(tree)
    found = []
    for name, test in _async_tests(tree):
        if f"{where}::{name}" not in EXEMPT:
            found += [f"{where}::{name}:{c.lineno}: {ast.unparse(c.func)}" for c in module.unguarded_in(test)]
    return found


def unclosed(root: Path = TESTS) -> list[str]:
    """What :func:`unclosed_in` finds in every test module under ``root``."""
    found = []
    for path in sorted(root.rglob("test_*.py")):
        found += unclosed_in(path.read_text(), str(path.relative_to(root.parent)))
    return found


def test_async_tests_close_what_they_open() -> None:
    found = unclosed()
    assert not found, "opened without async with, try/finally or a fixture:\n" + "\n".join(found)


def test_exemptions_name_existing_tests() -> None:
    names = set()
    for path in TESTS.rglob("test_*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names |= {f"{path.relative_to(TESTS.parent)}::{name}" for name, _ in _async_tests(tree)}
    assert set(EXEMPT) <= names


LEAKY = """
def agent(url):
    return AMB("memory", url)

async def test_inline_close():
    client = AMB("memory", "memory://x")
    await client.publish("a", 1)
    await client.close()

async def test_a_helper_opens():
    client = agent("memory://x")
    await client.close()

async def test_connect_after_the_try():
    client = AMB("memory", "memory://x")
    try:
        pass
    finally:
        await client.close()
    await client.connect()
"""

CLOSED = """
async def test_async_with(closing):
    async with AMB("memory", "memory://x") as client:
        await client.publish("a", 1)

async def test_try_finally():
    client = AMB("memory", "memory://x")
    await client.connect()
    try:
        await client.publish("a", 1)
    finally:
        await client.close()

async def test_fixture(closing):
    service = closing(ControlPlaneService(AMB("memory", "memory://x"), KernelSpace()))
    await service.start()

async def test_refused():
    with pytest.raises(KernelError):
        KernelSpace(keep_finished=-1)
"""


def test_the_check_finds_inline_closes_and_accepts_the_guarded_forms() -> None:
    assert unclosed_in(LEAKY) == [
        "<source>::test_inline_close:6: AMB",
        "<source>::test_a_helper_opens:11: agent",
        "<source>::test_connect_after_the_try:20: client.connect",
    ]
    assert unclosed_in(CLOSED) == []
