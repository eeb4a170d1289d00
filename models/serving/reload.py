"""Live reload: every worker of both services follows the registry's stages. A poll reads
the stages (in a thread: the registry's reads are blocking); when the champion or the
challenger changed, the new versions are checked and loaded in a thread (integrity and
schema checks, tables or booster) and switched in on the event loop, between requests.
A version that fails its checks is never switched in: the old one keeps serving, and the
failure shows in the status (/model's `reload`), in `recsys_model_reload_total` and in one
log line. service.py gives each service its own `prepare` and `commit`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import bentoml

from models.lifecycle.registry import RegistryError
from models.lifecycle.store import ModelCheckError
from models.serving.plan import Stages

log = logging.getLogger("recsys.reload")
Service = Literal["api", "ranker"]
P = TypeVar("P")
# What reading the stages or opening a version can raise that is not a bug: no champion or
# a failed check (ModelCheckError), an unreadable registry (RegistryError), the disk or the
# network (OSError).
RELOAD_FAILURES: tuple[type[BaseException], ...] = (ModelCheckError, RegistryError, OSError)


@functools.cache
def _metrics() -> dict[str, Any]:
    return {
        "reloads": bentoml.metrics.Counter(
            name="recsys_model_reload_total",
            documentation="Attempts to switch to the registry's new stages, by service and result "
            "(switched, failed: the version failed its checks and the old one keeps serving)",
            labelnames=["service", "result"],
        ),
        # One series per worker process (liveall): a worker that did not switch shows.
        "served": bentoml.metrics.Gauge(
            name="recsys_model_served",
            documentation="1 for each version a worker serves now, by service and role (0 once replaced)",
            labelnames=["service", "role", "model_version"],
            multiprocess_mode="liveall",
        ),
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class ReloadStatus:
    """What /model shows under `reload`: whether this worker follows the registry, when it
    last looked, and how its last attempt to switch went."""

    follows: bool
    interval_s: float
    checked_at: str | None = None
    switched_at: str | None = None
    last_attempt: dict[str, Any] | None = None
    failures: int = 0
    problem: str | None = None  # the stages could not be read at the last look (kept serving)
    refused: dict[str, str] = field(default_factory=dict)  # tag -> why it is not switched in

    def as_dict(self) -> dict[str, Any]:
        return {"follows": self.follows, "interval_s": self.interval_s, "checked_at": self.checked_at,
                "switched_at": self.switched_at, "last_attempt": self.last_attempt,
                "failures": self.failures, "problem": self.problem, "refused": dict(self.refused)}  # fmt: skip


class StageFollower(Generic[P]):
    """One per worker. `current()` names the stages served now; `wanted()` reads the
    registry's (blocking); `prepare(stages)` loads and checks what is new (blocking, raises
    ModelCheckError); `commit(prepared)` switches (on the loop, fast, between requests)."""

    def __init__(self, service: Service, interval_s: float, follows: bool,
                 current: Callable[[], Stages], wanted: Callable[[], Stages],
                 prepare: Callable[[Stages], P], commit: Callable[[P, Stages], None]) -> None:  # fmt: skip
        self.service = service
        self.status = ReloadStatus(follows=follows, interval_s=interval_s)
        self._current = current
        self._wanted = wanted
        self._prepare = prepare
        self._commit = commit
        self._lock = asyncio.Lock()
        self._refused_stages: Stages | None = None
        self._task: asyncio.Task[None] | None = None
        self.mark_served(None, current())

    def mark_served(self, before: Stages | None, after: Stages) -> None:
        served = _metrics()["served"]
        for role, tag in zip(("champion", "challenger"), before or (None, None)):
            if tag is not None:
                served.labels(service=self.service, role=role, model_version=tag).set(0)
        for role, tag in zip(("champion", "challenger"), after):
            if tag is not None:
                served.labels(service=self.service, role=role, model_version=tag).set(1)

    def start(self) -> asyncio.Task[None] | None:
        """The polling task (none when this worker does not follow the registry)."""
        if not self.status.follows:
            return None
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())
        self._task.add_done_callback(self._ended)
        return self._task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (err := task.exception()) is not None:
            log.error("%s: following the registry stopped: %r", self.service, err, exc_info=err)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.status.interval_s)
            await self.poll()

    async def poll(self, force: bool = False) -> dict[str, Any]:
        """Look at the registry now; switch if its stages changed and the new versions pass
        their checks. `force`: try again a version refused before. Returns the status."""
        async with self._lock:
            try:
                wanted = await asyncio.to_thread(self._wanted)
            except RELOAD_FAILURES as err:
                problem = f"{type(err).__name__}: {err}"
                if problem != self.status.problem:
                    log.warning("%s: cannot read the registry's stages (%s); still serving %s",
                                self.service, problem, _named(self._current()))  # fmt: skip
                self.status.problem = problem
                return self.status.as_dict()
            self.status.problem = None
            self.status.checked_at = _now()
            current = self._current()
            if wanted == current or (wanted == self._refused_stages and not force):
                return self.status.as_dict()
            attempt: dict[str, Any] = {"at": _now(), "from": _named(current), "to": _named(wanted)}
            try:
                prepared = await asyncio.to_thread(self._prepare, wanted)
            except RELOAD_FAILURES as err:
                self._refused(wanted, current, attempt, err)
                return self.status.as_dict()
            self._commit(prepared, wanted)
            self._refused_stages = None
            self.status.refused.clear()
            self.status.switched_at = attempt["done_at"] = _now()
            self.status.last_attempt = {**attempt, "result": "switched", "error": None}
            self.mark_served(current, wanted)
            _metrics()["reloads"].labels(service=self.service, result="switched").inc()
            log.info("%s: switched from %s to %s", self.service, attempt["from"], attempt["to"])
            return self.status.as_dict()

    def _refused(self, wanted: Stages, current: Stages, attempt: dict[str, Any], err: BaseException) -> None:
        self._refused_stages = wanted
        self.status.failures += 1
        error = f"{type(err).__name__}: {err}"
        self.status.last_attempt = {**attempt, "done_at": _now(), "result": "failed", "error": error}
        for tag in wanted:
            if tag is not None and tag not in current and tag in str(err):
                self.status.refused[tag] = error
        _metrics()["reloads"].labels(service=self.service, result="failed").inc()
        # One line, no traceback: the error names the version and the check that failed.
        log.error("%s: not switching to %s: %s; still serving %s",
                  self.service, attempt["to"], error, attempt["from"])  # fmt: skip


def _named(stages: Stages) -> str:
    champion, challenger = stages
    return f"champion {champion}" + (f", challenger {challenger}" if challenger else "")
