"""What the API service does per request, without BentoML: pick the version (champion or,
by user hash, challenger), rank with its tables and the ranking service, count the drift,
record what was served, and in shadow mode let the challenger rank the same request off
the response path. service.py gives it a `score` function that calls the ranking service.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
from pydantic import ValidationError

from models.core.recommender import UnknownItemsError
from models.core.schema import FEATURE_DTYPE, N_FEATURES
from models.serving.api_schema import HistoryInfo, RankResponse, RecommendResponse, input_error
from models.serving.rankers import RANKER_FAILURES
from models.serving.realtime import RealTime, impression_of
from models.serving.settings import RecsysSettings
from models.serving.variants import TrafficLog, Variant, routes_to_challenger

ScoreFn = Callable[[Variant, np.ndarray], Awaitable[np.ndarray]]
NO_ROWS = np.zeros((0, N_FEATURES), dtype=FEATURE_DTYPE)
NO_SCORES = np.zeros(0, dtype=FEATURE_DTYPE)
Ranked = RecommendResponse | RankResponse
log = logging.getLogger("recsys.shadow")
# How a challenger's ranking can fail: the ranking service (any way), or the request itself
# (a /rank item the challenger's catalog does not know is a validation error).
SHADOW_FAILURES: tuple[type[BaseException], ...] = (*RANKER_FAILURES, ValidationError)


class Ranking:
    """One per API worker."""

    def __init__(self, settings: RecsysSettings, champion: Variant, challenger: Variant | None,
                 score: ScoreFn, realtime: RealTime | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.realtime = realtime  # None: the online state is off (trained histories only)
        self.champion = champion
        self.challenger = challenger
        self.score = score
        self.traffic = TrafficLog(settings)
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    @property
    def variants(self) -> list[Variant]:
        return [self.champion] + ([self.challenger] if self.challenger else [])

    @property
    def mode(self) -> str:
        return self.settings.challenger_mode if self.challenger else "off"

    def variant_for(self, user_id: str) -> Variant:
        """Split mode: a stable share of users goes to the challenger."""
        s = self.settings
        if self.challenger is not None and self.mode == "split" and routes_to_challenger(user_id, s.challenger_share, s.routing_salt):
            return self.challenger
        return self.champion

    async def _online(self, user_id: str) -> list[str]:
        """The user's online items (newest first); none when the state is off or unreadable."""
        if self.realtime is None:
            return []
        return await self.realtime.recent_item_ids(user_id) or []

    def _record(self, response: Ranked) -> None:
        if self.realtime is not None:
            variant = "fallback" if getattr(response, "fallback", False) else response.variant
            self.realtime.record(impression_of(response.recommendation_id, response.user_id,
                                               [i.item_id for i in response.items], response.model_tag, variant))  # fmt: skip

    async def recommend(self, user_id: str, k: int, exclude_seen: bool) -> RecommendResponse:
        online = await self._online(user_id)
        response = await self._recommend(self.variant_for(user_id), user_id, k, exclude_seen, online)
        self._record(response)
        if self.challenger is not None and self.mode == "shadow":
            self._shadow("recommend", user_id, response,
                         self._recommend(self.challenger, user_id, k, exclude_seen, online, shadow=True))  # fmt: skip
        return response

    async def rank(self, user_id: str, item_ids: list[str]) -> RankResponse:
        duplicates = [i for i, n in Counter(item_ids).items() if n > 1]
        if duplicates:
            raise input_error("item_ids", "duplicate_item_ids",
                              f"item_ids: duplicate ids {duplicates[:20]} (rule: each id at most once)")  # fmt: skip
        online = await self._online(user_id)
        response = await self._rank(self.variant_for(user_id), user_id, item_ids, online)
        self._record(response)
        if self.challenger is not None and self.mode == "shadow":
            self._shadow("rank", user_id, response, self._rank(self.challenger, user_id, item_ids, online, shadow=True))
        return response

    async def _recommend(self, variant: Variant, user_id: str, k: int, exclude_seen: bool,
                         online_ids: list[str], shadow: bool = False) -> RecommendResponse:  # fmt: skip
        """`online_ids`: the user's online items, newest first; with any the model knows, a
        user unknown at training time is a known user (no popularity fallback)."""
        start = time.perf_counter()
        rec = variant.recommender
        user = rec.user_index(user_id)
        online = rec.known_items(online_ids)
        cold = user is None and len(online) == 0
        warmed = user is None and not cold  # known only through its events
        if cold:
            variant.drift.observe(NO_ROWS, NO_SCORES, cold=True, endpoint="recommend")
            items = rec.popular_described(k)
            reason: str | None = "unknown user: most popular items"
        else:
            prepared = rec.prepare_recommend(user, exclude_seen, online)
            scores = await self.score(variant, prepared.features)
            variant.drift.observe(prepared.features, scores, cold=False, endpoint="recommend",
                                  online=len(online), warmed=warmed)  # fmt: skip
            items, reason = rec.ranked(prepared, scores, k), None
        if cold and not shadow:
            self.traffic.fallback("recommend", variant.tag)
        self._served("recommend", variant, shadow, start, {"user_id": user_id, "k": k, "exclude_seen": exclude_seen}, items)
        return RecommendResponse(
            user_id=user_id, items=items, model_tag=variant.tag, variant=variant.role,
            recommendation_id=uuid.uuid4().hex, history=HistoryInfo(trained=rec.trained_count(user), online=len(online)),
            fallback=cold, fallback_reason=reason,
        )  # fmt: skip

    async def _rank(self, variant: Variant, user_id: str, item_ids: list[str], online_ids: list[str],
                    shadow: bool = False) -> RankResponse:  # fmt: skip
        start = time.perf_counter()
        rec = variant.recommender
        try:
            items = rec.item_indices(item_ids)
        except UnknownItemsError as err:
            raise input_error("item_ids", "unknown_item_ids", str(err)) from err
        user = rec.user_index(user_id)
        online = rec.known_items(online_ids)
        cold = user is None and len(online) == 0
        prepared = rec.prepare_rank(user, items, online)
        scores = await self.score(variant, prepared.features)
        variant.drift.observe(prepared.features, scores, cold=cold, endpoint="rank", online=len(online),
                              warmed=user is None and not cold)  # fmt: skip
        ranked = rec.ranked(prepared, scores, len(items))
        if cold and not shadow:
            self.traffic.fallback("rank", variant.tag)
        self._served("rank", variant, shadow, start, {"user_id": user_id, "item_ids": item_ids}, ranked)
        return RankResponse(
            user_id=user_id, items=ranked, model_tag=variant.tag, variant=variant.role, cold_start=cold,
            recommendation_id=uuid.uuid4().hex, history=HistoryInfo(trained=rec.trained_count(user), online=len(online)),
        )  # fmt: skip

    def _served(self, endpoint: str, variant: Variant, shadow: bool, start: float,
                request: dict[str, Any], items: list[dict[str, Any]]) -> None:  # fmt: skip
        self.traffic.served(endpoint, "shadow" if shadow else variant.role, variant.tag, time.perf_counter() - start)
        if not shadow:
            self.traffic.log_request(endpoint, variant.role, variant.tag, request, [i["item_id"] for i in items])

    def _shadow(self, endpoint: str, user_id: str, served: Ranked, run: Coroutine[Any, Any, Ranked]) -> None:
        """The challenger ranks the same request after the response is on its way; its
        result is logged, never returned. Bounded: beyond max_in_flight, skipped (counted)."""
        assert self.challenger is not None
        if len(self._shadow_tasks) >= self.settings.max_in_flight:
            run.close()
            self.traffic.shadow_failed(self.challenger.tag, OverflowError("too many shadow requests"))
            return
        items = [i.item_id for i in served.items]
        task = asyncio.get_running_loop().create_task(self._run_shadow(endpoint, user_id, items, run))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_done)

    def _shadow_done(self, task: asyncio.Task[None]) -> None:
        """Anything _run_shadow did not expect is a bug: counted and logged, not lost."""
        self._shadow_tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        assert self.challenger is not None and err is not None
        self.traffic.shadow_failed(self.challenger.tag, err)
        log.error("shadow ranking by %s failed unexpectedly: %r", self.challenger.tag, err, exc_info=err)

    async def _run_shadow(self, endpoint: str, user_id: str, served: list[str],
                          run: Coroutine[Any, Any, Ranked]) -> None:  # fmt: skip
        assert self.challenger is not None
        start = time.perf_counter()
        try:
            result = await run
        except SHADOW_FAILURES as err:
            if self.traffic.shadow_failed(self.challenger.tag, err):
                log.warning("shadow ranking by %s failed: %s: %s (logged once per error type; "
                            "all counted in recsys_shadow_total)", self.challenger.tag, type(err).__name__, err)  # fmt: skip
            return
        self.traffic.log_shadow(endpoint, user_id, (self.champion.tag, served),
                                (self.challenger.tag, [i.item_id for i in result.items]), time.perf_counter() - start)  # fmt: skip
