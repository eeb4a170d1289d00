"""The online state: users' recent events, shared by every worker and replica, and the
journal the event log is exported from. One interface (base.py), one module per backend
(sqlite.py, redis.py), picked by `RECSYS_ONLINE_BACKEND`; writes go through the group-commit
writer (writer.py). Synchronous by design: see base.py for how async code calls it.
"""

from __future__ import annotations

from models.serving.online.base import (
    START,
    BackendUnavailable,
    Cursor,
    ExpireResult,
    JournalKind,
    OnlineState,
    RecentItem,
    WriteResult,
)
from models.serving.online.writer import GroupCommitWriter
from models.serving.settings import RecsysSettings


def make_state(settings: RecsysSettings) -> OnlineState | None:
    """The backend the settings name, opened (None when `online_backend` is off). Raises
    BackendUnavailable when it cannot be reached now."""
    if settings.online_backend == "off":
        return None
    if settings.online_backend == "sqlite":
        from models.serving.online.sqlite import SqliteState

        return SqliteState(settings.online_path, settings.online_max_items, settings.online_retention_s,
                           settings.online_timeout_s, settings.online_sqlite_synchronous)  # fmt: skip
    if settings.online_backend == "redis":
        # Imported here: the redis client is needed only by deployments that use it.
        from models.serving.online.redis import RedisState

        return RedisState(settings.redis_url, settings.online_max_items, settings.online_retention_s,
                          settings.online_timeout_s)  # fmt: skip
    raise ValueError(f"online_backend {settings.online_backend!r}: valid values are sqlite, redis, off")


__all__ = [
    "START", "BackendUnavailable", "Cursor", "ExpireResult", "GroupCommitWriter", "JournalKind",
    "OnlineState", "RecentItem", "WriteResult", "make_state",
]  # fmt: skip
