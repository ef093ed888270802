"""Where the tests reach the shared servers (NATS, Redis, PostgreSQL, MariaDB).

One place for the addresses, so a run can point every server-bound test elsewhere through the
environment, and so that ``tests/unit`` is checkable by grep for naming none of them.
"""

from __future__ import annotations

import os

NATS_URL = os.environ.get("AGENT_OS_TEST_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("AGENT_OS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("EMK_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("AGENT_OS_TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")
