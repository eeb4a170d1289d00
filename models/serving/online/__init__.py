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
    OnlineLimits,
    OnlineState,
    RecentItem,
    WriteResult,
)
from models.serving.online.writer import BufferedWriter, GroupCommitWriter
from models.serving.settings import RecsysSettings


def make_state(settings: RecsysSettings) -> OnlineState | None:
    """The backend the settings name, opened (None when `online_backend` is off). SQLite
    raises BackendUnavailable when its file cannot be opened; Redis connects when first used
    (its `health()` says whether it can be reached)."""
    if settings.online_backend == "off":
        return None
    limits = OnlineLimits(settings.online_max_items, settings.online_retention_s, settings.online_journal_s,
                          settings.online_timeout_s)  # fmt: skip
    if settings.online_backend == "sqlite":
        from models.serving.online.sqlite import SqliteState

        return SqliteState(settings.online_path, limits, settings.online_sqlite_synchronous)
    if settings.online_backend == "redis":
        # Imported here: the redis client is needed only by deployments that use it.
        from models.serving.online.redis import RedisState

        return RedisState(settings.redis_url, limits)
    raise ValueError(f"online_backend {settings.online_backend!r}: valid values are sqlite, redis, off")


__all__ = [
    "START", "BackendUnavailable", "BufferedWriter", "Cursor", "ExpireResult", "GroupCommitWriter", "JournalKind",
    "OnlineLimits", "OnlineState", "RecentItem", "WriteResult", "make_state",
]  # fmt: skip
