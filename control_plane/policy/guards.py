"""The check behind :meth:`Policy.file_access`: :func:`path_refusal` says why a path is outside
a root. (The SQL guard behind :meth:`Policy.no_destructive_sql` is
:mod:`agent_os.control_plane.policy.sql_guard`.) What each denies, and what it does not judge:
``docs/control-plane.md`` (Policies and patterns, Guards).
"""

from __future__ import annotations

import posixpath


def path_refusal(root: str, path: str) -> str | None:
    """Why ``path`` is not inside ``root`` (an absolute, normalized path), or None."""
    if "\\" in path or "\0" in path:
        return "path traversal (a backslash or NUL in the path)"
    if ".." in path.split("/"):
        return "path traversal (a '..' segment)"
    if not path.startswith("/"):
        return f"not an absolute path under {root}"
    normal = posixpath.normpath(path)
    if root == "/" or normal == root or normal.startswith(root + "/"):
        return None
    return f"outside {root}"
