"""What the EMK storage tests share."""

from __future__ import annotations

# Raw SQL the append-only triggers refuse (``{s}``: the namespace), on every table EMK writes;
# tests/integration/test_emk_postgres.py runs them on the PostgreSQL server and
# tests/integration/test_emk_storage.py on the embedded one.
APPEND_ONLY_VIOLATIONS = [
    "UPDATE {s}.memories SET content = 'rewritten'",
    "UPDATE {s}.memories SET supersedes = NULL",
    "DELETE FROM {s}.memories",
    "TRUNCATE {s}.memories",
    "UPDATE {s}.meta SET value = '8' WHERE key = 'dimension'",
    "DELETE FROM {s}.meta",
    "TRUNCATE {s}.meta",
    "DELETE FROM {s}.retention_log",
    "TRUNCATE {s}.retention_log",
]
