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
    }
)
OPENING_METHODS = frozenset({"connect", "start", "open"})

# Tests that deliberately leave something open, "path::test": why.
EXEMPT: dict[str, str] = {}


def _is_constructor(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Name) and func.id in OPENERS) or (
        isinstance(func, ast.Attribute) and func.attr in OPENERS
    )


def _opens(node: ast.AST, built: frozenset[str] = frozenset()) -> Iterator[ast.Call]:
    """The opening calls in ``node``: a constructor of one of OPENERS, or ``connect``, ``start``
    or ``open`` on a name in ``built`` (the test's own instances; those a fixture gives are the
    fixture's to close). What is handed to the ``closing`` fixture is closed by it, with what it
    owns (a service's client). Nested functions and classes are left out: they are checked where
    they are called."""
    stack = [node]
    while stack:
        current = stack.pop()
        if (
            isinstance(current, ast.Call)
            and isinstance(current.func, ast.Name)
            and current.func.id == "closing"
        ):
            continue  # the fixture closes it, and what it owns (a service's client)
        for child in ast.iter_child_nodes(current):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            stack.append(child)
        if isinstance(current, ast.Call):
            func = current.func
            if _is_constructor(current) or (
                isinstance(func, ast.Attribute)
                and func.attr in OPENING_METHODS
                and isinstance(func.value, ast.Name)
                and func.value.id in built
            ):
                yield current


def _built(func: ast.AsyncFunctionDef) -> frozenset[str]:
    """The names the test binds to an instance of one of OPENERS."""
    names = set()
    for node in ast.walk(func):
        if (
            isinstance(node, (ast.Assign, ast.AnnAssign))
            and isinstance(node.value, ast.Call)
            and _is_constructor(node.value)
        ):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return frozenset(names)


def _guarded_try(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Try) and bool(stmt.finalbody)


def _unguarded(body: list[ast.stmt], built: frozenset[str]) -> Iterator[ast.Call]:
    """The opening calls in the statement list ``body`` that nothing is sure to close."""
    for i, stmt in enumerate(body):
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            # The items are guarded by the with itself; the body is checked like any other,
            # unless it is a constructor that pytest.raises expects to fail (nothing opened).
            if not _refused_constructor(stmt):
                yield from _unguarded(stmt.body, built)
        elif isinstance(stmt, ast.Try) and stmt.finalbody:
            # What the try's body opens, the finally closes; the other blocks are not guarded.
            for handler in stmt.handlers:
                yield from _unguarded(handler.body, built)
            yield from _unguarded(stmt.orelse, built)
            yield from _unguarded(stmt.finalbody, built)
        elif isinstance(stmt, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.Match)):
            # The header (a condition, an iterable, a subject), then each block.
            for value in vars(stmt).values():
                if isinstance(value, ast.expr):
                    yield from _opens(value, built)
                elif value and isinstance(value, list) and isinstance(value[0], ast.stmt):
                    yield from _unguarded(value, built)
                elif isinstance(value, list):
                    for item in value:
                        if isinstance(item, (ast.ExceptHandler, ast.match_case)):
                            yield from _unguarded(item.body, built)
        elif (calls := list(_opens(stmt, built))) and not _followed_by_try(body[i + 1 :], built):
            yield from calls


def _refused_constructor(stmt: ast.With | ast.AsyncWith) -> bool:
    """``with pytest.raises(...): Open(...)``: the constructor raises, so nothing is open."""
    raises = any(
        isinstance(item.context_expr, ast.Call)
        and isinstance(item.context_expr.func, ast.Attribute)
        and item.context_expr.func.attr == "raises"
        for item in stmt.items
    )
    only = stmt.body[0] if len(stmt.body) == 1 else None
    return (
        raises
        and isinstance(only, ast.Expr)
        and isinstance(only.value, ast.Call)
        and _is_constructor(only.value)
    )


def _followed_by_try(rest: list[ast.stmt], built: frozenset[str]) -> bool:
    """Whether ``rest`` is more opening statements and then ``try: ... finally:`` (the
    ``x = Open(...)``, ``await x.connect()``, ``try:`` idiom)."""
    for stmt in rest:
        if isinstance(stmt, ast.Try) and stmt.finalbody:
            return True
        if isinstance(stmt, (ast.With, ast.AsyncWith, ast.Try)) or not list(_opens(stmt, built)):
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


def unclosed(root: Path = TESTS) -> list[str]:
    """``path::test:line: call`` for every opening call an async test leaves unguarded."""
    found = []
    for path in sorted(root.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, func in _async_tests(tree):
            where = f"{path.relative_to(root.parent)}::{name}"
            if where in EXEMPT:
                continue
            found += [
                f"{where}:{c.lineno}: {ast.unparse(c.func)}" for c in _unguarded(func.body, _built(func))
            ]
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
