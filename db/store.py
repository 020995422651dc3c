"""Open a task store: `open_store(url)`, and every name a caller of the store needs, from one place.

The interface and its argument checks are in `db/base.py` (`TaskStore`), the errors in `db/errors.py`,
the backends in `db/sqlite.py` (embedded default), `db/postgres.py` and `db/supabase_store.py` (SQL or
HTTP transport); this module only picks one by URL.
"""

from __future__ import annotations

import os

from db.base import DEFAULT_MAX_ATTEMPTS, TaskStore, new_task
from db.errors import (
    InvalidTask,
    StoreUnavailable,
    TaskConflict,
    TaskForbidden,
    TaskNotFound,
    TaskStoreError,
)
from db.postgres import PostgresTaskStore
from db.sqlite import SqliteTaskStore
from db.supabase_store import SupabaseTaskStore

__all__ = [
    "DEFAULT_DB_URL",
    "DEFAULT_MAX_ATTEMPTS",
    "InvalidTask",
    "StoreUnavailable",
    "TaskConflict",
    "TaskForbidden",
    "TaskNotFound",
    "TaskStore",
    "TaskStoreError",
    "new_task",
    "open_store",
]

DEFAULT_DB_URL = "sqlite:///tasks.db"


def open_store(url: str | None = None, *, migrate: bool = True) -> TaskStore:
    """Open the store named by `url`, `$HWGP_DB`, or the default `sqlite:///tasks.db`.

    `sqlite:///relative.db`, `sqlite:////absolute.db`, `postgresql://user@host:port/db`, or Supabase:
    `supabase+postgresql://…` (direct) / `supabase+https://<ref>.supabase.co` (edge functions; see
    `db/supabase_store.py`). Timeouts go in the URL's query: `?busy_timeout_s=` for SQLite,
    `?connect_timeout_s=&statement_timeout_s=&pool_size=` for PostgreSQL (see `db/postgres.py`).
    """
    url = url or os.environ.get("HWGP_DB") or DEFAULT_DB_URL
    if url.startswith("sqlite:"):
        store: TaskStore = SqliteTaskStore(url)
    elif url.startswith(("postgresql:", "postgres:")):
        store = PostgresTaskStore(url)
    elif url.startswith("supabase+"):
        store = SupabaseTaskStore(url)
    else:
        raise InvalidTask(
            "db", f"unsupported database URL {url!r}; use sqlite:///FILE, postgresql://… or supabase+…"
        )
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store
