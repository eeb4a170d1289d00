"""The recommender as two BentoML services: `RankerService` (the runner: scores feature
matrices with adaptive batching, its own workers and resources) behind `ApiService` (the
public API: candidates, features, ranking, fallbacks). `bentoml serve service:ApiService`.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from pydantic import Field, StrictBool, StrictInt

from models.api_schema import (
    ExternalId,
    FeatureRow,
    ModelResponse,
    RankResponse,
    RecommendResponse,
    ScoreResponse,
    input_error,
)
from models.bentoml_patches import cache_media_types, cap_batch_wait, delay_sigterm, patch_openapi
from models.guard import RequestGuard
from models.monitoring import DriftMonitor
from models.recommender import Recommender, UnknownItemsError
from models.schema import FEATURE_DTYPE, FEATURE_NAMES, N_FEATURES
from models.settings import RecsysSettings
from models.store import open_version, predict_scores, serving_tag

settings = RecsysSettings()  # configuration only: decorators below need it at import
cache_media_types()
cap_batch_wait(settings.max_batch_wait_ms / 1000)
MODEL_TAG = serving_tag(settings, Path(__file__))
NO_ROWS = np.zeros((0, N_FEATURES), dtype=FEATURE_DTYPE)
NO_SCORES = np.zeros(0, dtype=FEATURE_DTYPE)


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (frameworks, model, tables) out of the garbage
    collector's sight: otherwise each full collection walks it all, a 100-150 ms pause every
    few seconds under load that showed as the p99 of /recommend."""
    gc.collect()
    gc.freeze()


def documented_limits(func: Any) -> Any:
    """Add the request-guard limits (see models/guard.py) to an API's OpenAPI description."""
    auth = " Needs 'Authorization: Bearer <key>' (401 without)." if settings.api_key_list() else ""
    func.__doc__ = (
        f"{func.__doc__ or ''}\n\nLimits: request body at most {settings.max_body_bytes} bytes "
        f"(413 above); at most {settings.max_in_flight} requests in flight per worker (503 above).{auth}"
    )
    return func


@bentoml.service(
    workers=settings.ranker_workers,
    resources={"cpu": str(settings.ranker_cpu)},
    traffic={"timeout": settings.traffic_timeout_s},
    logging={"access": {"enabled": settings.access_log}},
    runner_connection={"max_requests": settings.runner_max_requests, "max_age": settings.runner_max_age_s},
)
class RankerService:
    """Scores (n, N_FEATURES) float32 matrices with the XGBoost ranker."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        version = open_version(str(type(self).bento_model.tag))
        self.tag = version.tag
        self.booster = version.load_booster(settings.nthread)

    @bentoml.on_startup
    def drain_on_shutdown(self) -> None:
        delay_sigterm(settings.ranker_shutdown_grace_s)
        freeze_startup_heap()

    # numpy, not DataFrame: BentoML 1.4's batchable DataFrame inputs are broken
    # (get_batch_size returns a shape tuple); see ../shared/NOTES.md.
    @bentoml.api(
        batchable=settings.batching,
        batch_dim=0,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )
    def score(self, features: np.ndarray) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != N_FEATURES:
            raise InvalidArgument(f"features: shape {features.shape}, expected (n, {N_FEATURES})")
        return predict_scores(self.booster, features.astype(FEATURE_DTYPE, copy=False))

    @bentoml.api
    def model_tag(self) -> str:
        return self.tag


@bentoml.service(
    workers=settings.api_workers,
    traffic={"timeout": settings.traffic_timeout_s},
    logging={"access": {"enabled": settings.access_log}},
)
class ApiService:
    """The public recommendation API."""

    ranker = bentoml.depends(RankerService)
    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, before any worker starts: a version that fails its checks stops `serve`."""
        open_version(MODEL_TAG)

    def __init__(self) -> None:
        self.version = open_version(str(type(self).bento_model.tag))
        self.recommender = Recommender(self.version.load_tables(), self.version.params)
        self.drift = DriftMonitor(settings, self.version.tag, self.version.path, role="api")
        self._ranker_checked = False

    @bentoml.on_startup
    async def start_drift_flusher(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self.drift.flush_forever())
        freeze_startup_heap()

    async def _score(self, features: np.ndarray) -> np.ndarray:
        try:
            if not self._ranker_checked:
                await self._check_ranker()
            if len(features) == 0:
                return np.zeros(0, dtype=FEATURE_DTYPE)
            return np.asarray(await self.ranker.to_async.score(features))
        except aiohttp.ClientError as err:
            # The ranking service is gone (shutting down, or a worker died): a retryable 503,
            # not a 500.
            raise ServiceUnavailable(f"ranking service unreachable: {err}") from err

    async def _check_ranker(self) -> None:
        """Both services resolve the model tag on their own; refuse to mix versions."""
        ranker_tag = await self.ranker.to_async.model_tag()
        if ranker_tag != self.version.tag:
            raise ServiceUnavailable(
                f"model mismatch: the ranking service serves {ranker_tag}, the API {self.version.tag}"
            )
        self._ranker_checked = True

    @bentoml.api
    @documented_limits
    async def recommend(
        self,
        user_id: ExternalId,
        k: Annotated[StrictInt, Field(ge=1, le=settings.max_k, description="How many items.")] = 10,
        exclude_seen: StrictBool = True,
    ) -> RecommendResponse:
        """Top-k items for a user; unknown users get the most popular items (a fallback)."""
        user = self.recommender.user_index(user_id)
        if user is None:
            self.drift.observe(NO_ROWS, NO_SCORES, cold=True, endpoint="recommend")
            items = self.recommender.describe(self.recommender.popular(k), None)
            return RecommendResponse(
                user_id=user_id, items=items, model_tag=self.version.tag,
                fallback=True, fallback_reason="unknown user: most popular items",
            )  # fmt: skip
        prepared = self.recommender.prepare_recommend(user, exclude_seen)
        scores = await self._score(prepared.features)
        self.drift.observe(prepared.features, scores, cold=False, endpoint="recommend")
        return RecommendResponse(
            user_id=user_id, items=self.recommender.ranked(prepared, scores, k),
            model_tag=self.version.tag, fallback=False,
        )  # fmt: skip

    @bentoml.api
    @documented_limits
    async def rank(
        self,
        user_id: ExternalId,
        item_ids: Annotated[list[ExternalId], Field(min_length=1, max_length=settings.max_rank_items)],
    ) -> RankResponse:
        """The given items ordered by the ranker's score for this user. Unknown item ids are
        a 400 naming them; an unknown user is ranked without history (cold_start)."""
        try:
            items = self.recommender.item_indices(item_ids)
        except UnknownItemsError as err:
            raise input_error("item_ids", "unknown_item_ids", str(err)) from err
        user = self.recommender.user_index(user_id)
        prepared = self.recommender.prepare_rank(user, items)
        scores = await self._score(prepared.features)
        self.drift.observe(prepared.features, scores, cold=user is None, endpoint="rank")
        return RankResponse(
            user_id=user_id, items=self.recommender.ranked(prepared, scores, len(items)),
            model_tag=self.version.tag, cold_start=user is None,
        )  # fmt: skip

    @bentoml.api
    @documented_limits
    async def score(
        self,
        rows: Annotated[list[FeatureRow], Field(min_length=1, max_length=settings.max_score_rows)],  # type: ignore[valid-type]
    ) -> ScoreResponse:
        """Ranker scores for rows of raw features, one field per schema feature."""
        matrix = np.array([[getattr(r, n) for n in FEATURE_NAMES] for r in rows], dtype=FEATURE_DTYPE)
        scores = await self._score(matrix)
        self.drift.observe(matrix, scores, cold=False, endpoint="score")
        return ScoreResponse(scores=scores.tolist(), model_tag=self.version.tag)

    @bentoml.api(route="/drift")
    @documented_limits
    def drift_status(self) -> dict[str, Any]:
        """Drift of the served traffic against the model's reference profile, merged over
        every worker: PSI and status (ok, warn, alert) per feature and for the score, KS for
        the score, the cold-start share, the window and the model version."""
        return self.drift.report()

    @bentoml.api(route="/model")
    @documented_limits
    def model_info(self) -> ModelResponse:
        """The served model version: tag, creation time, metrics, dataset and schema."""
        meta: dict[str, Any] = self.version.metadata
        return ModelResponse(
            tag=self.version.tag,
            creation_time=self.version.creation_time,
            metrics=meta["metrics"],
            dataset=meta["dataset"],
            feature_schema=meta["feature_schema"],
            schema_hash=meta["schema_hash"],
            params=meta["params"],
            code_version=meta["code_version"],
            versions=meta["versions"],
        )


patch_openapi("ApiService", {api.route for api in ApiService.apis.values()})
ApiService.add_asgi_middleware(
    RequestGuard,
    api_keys=settings.api_key_list(),
    max_body_bytes=settings.max_body_bytes,
    max_in_flight=settings.max_in_flight,
)
