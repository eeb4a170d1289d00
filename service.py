"""The recommender as two BentoML services: `RankerService` (the runner: scores feature
matrices with adaptive batching, its own workers and resources) behind `ApiService` (the
public API: candidates, features, ranking, fallbacks). `bentoml serve service:ApiService`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable
from pydantic import Field, StrictBool, StrictInt
from starlette.responses import JSONResponse

import models
from models.core.ranking import predict_scores
from models.core.recommender import Recommender
from models.core.schema import FEATURE_DTYPE, N_FEATURES
from models.lifecycle.store import ModelCheckError, open_version
from models.serving.api_schema import (
    EventIn,
    EventsResponse,
    ExternalId,
    FeatureRow,
    ModelResponse,
    RankResponse,
    RecommendResponse,
    Routing,
    ScoreResponse,
    VersionInfo,
    event_error,
    feature_matrix,
)
from models.serving.batching import JoinedCalls
from models.serving.bentoml_patches import (
    authorize_dependency,
    cache_media_types,
    cap_batch_wait,
    client_errors_in_one_line,
    delay_sigterm,
    forbid_unknown_fields,
    json_server_logs,
    metrics_dir_per_serve,
    patch_openapi,
    retire_sessions_when_idle,
    separate_monitor_logs,
    skip_unexported_tracing,
)
from models.serving.events import InvalidEvent
from models.serving.export_loop import ExportLoop
from models.serving.guard import RequestGuard, TokenGuard
from models.serving.monitoring import DriftMonitor
from models.serving.online import BackendUnavailable, make_state
from models.serving.orchestration import Ranking
from models.serving.plan import serving_plan
from models.serving.rankers import RankerPool
from models.serving.realtime import RealTime, retry_after
from models.serving.settings import RecsysSettings
from models.serving.ui import PUBLIC_PATHS as UI_PUBLIC_PATHS
from models.serving.ui import UI_PATH, ui_app
from models.serving.variants import Variant

settings = RecsysSettings()  # configuration only: decorators below need it at import
cache_media_types()
separate_monitor_logs(settings.monitor_max_bytes, settings.monitor_backups)
skip_unexported_tracing()
client_errors_in_one_line()
metrics_dir_per_serve()
retire_sessions_when_idle()
cap_batch_wait(settings.max_batch_wait_ms / 1000)
# Exact versions, resolved once: `bentoml build` pins what this resolves to.
PLAN = serving_plan(settings, Path(__file__))
# With a problem the services declare no model: `serve` resolves declared models before it
# runs `check_model`, and would stop on the placeholder tag without saying the problem.
DECLARED = (None, None) if PLAN.problem else (PLAN.champion, PLAN.challenger)
# Separate scaling: with URLs, `serve` starts no ranking service; the API calls these.
RANKER_URLS = settings.ranker_url_list()


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (frameworks, model, tables) out of the garbage
    collector's sight: otherwise each full collection walks it all, a 100-150 ms pause every
    few seconds under load that showed as the p99 of /recommend."""
    gc.collect()
    gc.freeze()


def documented_limits(func: Any) -> Any:
    """Add the request-guard limits (see models/serving/guard.py) to an API's OpenAPI description."""
    auth = " Needs 'Authorization: Bearer <key>' (401 without)." if settings.api_key_list() else ""
    func.__doc__ = (
        f"{func.__doc__ or ''}\n\nLimits: request body at most {settings.max_body_bytes} bytes "
        f"(413 above); at most {settings.max_in_flight} requests in flight per worker (503 above).{auth}"
    )
    return func


# The adaptive-batching limits of every scoring API, from settings (rows, not requests).
batched_api = functools.partial(
    bentoml.api,
    batchable=settings.batching,
    batch_dim=0,
    max_batch_size=settings.max_batch_size,
    max_latency_ms=settings.max_latency_ms,
)


def _model(tag: str | None) -> bentoml.models.BentoModel | None:
    return bentoml.models.BentoModel(tag) if tag else None


def _check_features(features: np.ndarray) -> np.ndarray:
    if features.ndim != 2 or features.shape[1] != N_FEATURES:
        raise InvalidArgument(f"features: shape {features.shape}, expected (n, {N_FEATURES})")
    return features.astype(FEATURE_DTYPE, copy=False)


@bentoml.service(
    workers=settings.ranker_workers,
    resources={"cpu": str(settings.ranker_cpu), "memory": settings.ranker_memory},
    traffic={"timeout": settings.traffic_timeout_s},
    logging={"access": {"enabled": settings.access_log}},
    runner_connection={"max_requests": settings.runner_max_requests, "max_age": settings.runner_max_age_s},
)
class RankerService:
    """Scores (n, N_FEATURES) float32 matrices with the champion's XGBoost ranker (and the
    challenger's, when one is loaded)."""

    # Declaration order matters: a Bento lists its models in it (champion, then challenger).
    bento_model = _model(DECLARED[0])
    challenger_model = _model(DECLARED[1])

    def __init__(self) -> None:
        cls = type(self)
        champion = open_version(str(cls.bento_model.tag))
        self.tags: dict[str, str | None] = {"champion": champion.tag, "challenger": None}
        self.booster = champion.load_booster(settings.nthread)
        self.challenger_booster = None
        if cls.challenger_model is not None:
            challenger = open_version(str(cls.challenger_model.tag))
            self.tags["challenger"] = challenger.tag
            self.challenger_booster = challenger.load_booster(settings.nthread)

    @bentoml.on_startup
    def drain_on_shutdown(self) -> None:
        delay_sigterm(settings.ranker_shutdown_grace_s)
        if settings.log_format == "json":
            json_server_logs()
        freeze_startup_heap()

    # numpy, not DataFrame: BentoML 1.4's batchable DataFrame inputs are broken
    # (get_batch_size returns a shape tuple); see ../shared/NOTES.md.
    @batched_api()
    def score(self, features: np.ndarray) -> np.ndarray:
        return predict_scores(self.booster, _check_features(features))

    # Its own batch queue: a batch is scored by one booster.
    @batched_api()
    def score_challenger(self, features: np.ndarray) -> np.ndarray:
        if self.challenger_booster is None:
            raise ServiceUnavailable("no challenger loaded (RECSYS_CHALLENGER_MODE is off)")
        return predict_scores(self.challenger_booster, _check_features(features))

    @bentoml.api
    def model_tags(self) -> dict[str, str | None]:
        return self.tags


@bentoml.service(
    workers=settings.api_workers,
    resources={"cpu": str(settings.api_cpu), "memory": settings.api_memory},
    traffic={"timeout": settings.traffic_timeout_s},
    logging={"access": {"enabled": settings.access_log}},
)
class ApiService:
    """The public recommendation API."""

    ranker = bentoml.depends(RankerService, url=RANKER_URLS[0] if RANKER_URLS else None)
    bento_model = _model(DECLARED[0])
    challenger_model = _model(DECLARED[1])

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, before any worker starts: no resolvable version, or a version that fails its
        checks, stops `serve` with one line that says why (`serve` prints a BentoMLException
        as its message, anything else as a traceback)."""
        try:
            if PLAN.problem:
                raise ModelCheckError(PLAN.problem)
            open_version(PLAN.champion)
            if PLAN.challenger:
                open_version(PLAN.challenger)
        except ModelCheckError as err:
            raise BentoMLException(str(err)) from err

    def __init__(self) -> None:
        cls = type(self)
        self.champion = self._load("champion", str(cls.bento_model.tag), "score")
        self.challenger: Variant | None = None
        if cls.challenger_model is not None:
            self.challenger = self._load("challenger", str(cls.challenger_model.tag), "score_challenger")
        # Opened here, in the worker (after the fork): connections must not cross processes.
        state = make_state(settings)
        self.realtime = RealTime(settings, state) if state is not None else None
        # Every worker runs one; a lock per journal lets one export at a time (export_loop.py).
        self.export_loop = (ExportLoop(state, settings.event_log_path, settings.event_export_batch,
                                       settings.event_log_interval_s)
                            if state is not None and settings.event_log_interval_s > 0 else None)  # fmt: skip
        self.ranking = Ranking(settings, self.champion, self.challenger, self._score, self.realtime)
        # BentoML sets up its declared dependency (the first URL); the others are set up in
        # the startup hook below, the same way.
        self._more_rankers = [bentoml.depends(RankerService, url=u).get() for u in RANKER_URLS[1:]]
        if settings.ranker_token is not None:
            for proxy in (self.ranker, *self._more_rankers):
                authorize_dependency(proxy, settings.ranker_token.get_secret_value())
        self.rankers = RankerPool([self.ranker, *self._more_rankers], RANKER_URLS or ["local"],
                                  timeout_s=settings.ranker_timeout_s)  # fmt: skip
        # Concurrent scoring calls of this worker go out as one (models/serving/batching.py).
        self.joined = {
            v.score_api: JoinedCalls(functools.partial(self.rankers.call, v.score_api), v.score_api,
                                     settings.max_batch_size, settings.api_batch_in_flight)
            for v in self.ranking.variants
        } if settings.api_batching else {}  # fmt: skip
        self._ranker_checked = False

    @staticmethod
    def _load(role: Any, tag: str, score_api: str) -> Variant:
        version = open_version(tag)
        recommender = Recommender(version.load_tables(), version.params)
        drift = DriftMonitor(settings, version.tag, version.path, role="api")
        return Variant(role, version, recommender, drift, score_api)

    @bentoml.on_startup
    async def start_drift_flusher(self) -> None:
        await asyncio.gather(*(proxy.__aenter__() for proxy in self._more_rankers))
        self._flushers = [v.drift.start_flusher() for v in self.ranking.variants]
        if self.export_loop is not None:
            self.export_loop.start()
        if settings.log_format == "json":
            json_server_logs()
        freeze_startup_heap()

    @bentoml.on_shutdown
    def close_online_state(self) -> None:
        """Write the queued impressions, export what the log lacks, then close the state
        (events are acknowledged only once durable: none is waiting here)."""
        if self.realtime is not None:
            self.realtime.flush()
        if self.export_loop is not None:
            self.export_loop.stop(settings.event_log_shutdown_wait_s)
        if self.realtime is not None:
            self.realtime.close()

    async def __is_ready__(self) -> bool:
        """/readyz: not ready while the online state cannot take writes (503)."""
        if self.realtime is None:
            return True
        try:
            await asyncio.to_thread(self.realtime.health)
        except BackendUnavailable:
            return False
        return True

    async def _score(self, variant: Variant, features: np.ndarray) -> np.ndarray:
        if not self._ranker_checked:
            await self._check_ranker()
        if len(features) == 0:
            return np.zeros(0, dtype=FEATURE_DTYPE)
        # An unreachable ranking service is a retryable 503 (models/serving/rankers.py), not a 500.
        if joined := self.joined.get(variant.score_api):
            return await joined(features)
        return np.asarray(await self.rankers.call(variant.score_api, features))

    async def _check_ranker(self) -> None:
        """The services resolve the model tags on their own; refuse to mix versions."""
        ours = {"champion": self.champion.tag, "challenger": self.challenger.tag if self.challenger else None}
        for name, tags in (await self.rankers.each("model_tags")).items():
            if tags != ours:
                raise ServiceUnavailable(f"model mismatch: the ranking service {name} serves {tags}, the API {ours}")
        self._ranker_checked = True

    @bentoml.api
    @documented_limits
    async def recommend(
        self,
        user_id: ExternalId,
        k: Annotated[StrictInt, Field(ge=1, le=settings.max_k, description="How many items.")] = 10,
        exclude_seen: StrictBool = True,
    ) -> RecommendResponse:
        """Top-k items for a user; unknown users get the most popular items (a fallback).
        `model_tag` and `variant` name the version that ranked them."""
        return await self.ranking.recommend(user_id, k, exclude_seen)

    @bentoml.api
    @documented_limits
    async def rank(
        self,
        user_id: ExternalId,
        item_ids: Annotated[list[ExternalId], Field(min_length=1, max_length=settings.max_rank_items,
                                                    json_schema_extra={"uniqueItems": True})],  # checked in Ranking
    ) -> RankResponse:
        """The given items ordered by the ranker's score for this user. Unknown item ids are
        a 400 naming them; an unknown user is ranked without history (cold_start)."""
        return await self.ranking.rank(user_id, item_ids)

    @bentoml.api
    @documented_limits
    async def events(
        self,
        events: Annotated[list[EventIn], Field(min_length=1, max_length=settings.max_events)],
    ) -> EventsResponse:
        """Record what users did; answered once the events are durable. All or nothing: a bad
        event is a 400 naming its index, field and rule. An event_id seen before is a duplicate
        and changes nothing (a retry is harmless). Items the served model does not know are
        stored and listed in `unknown_items`. The user's next /recommend and /rank use them,
        on any worker. 503 with Retry-After when the online state cannot take them (nothing
        was stored); 404 when the online state is off (RECSYS_ONLINE_BACKEND=off). With
        RECSYS_EVENT_KEYS, those keys may call this endpoint and no other."""
        if self.realtime is None:
            # 404, not 503: nothing will change on a retry, this deployment takes no events.
            return JSONResponse({"error": "POST /events is off: the online state is off "  # type: ignore[return-value]
                                 "(RECSYS_ONLINE_BACKEND=off; sqlite or redis turn it on)"}, status_code=404)
        try:
            result, unknown = await self.realtime.accept([e.model_dump() for e in events],
                                                         self.champion.recommender.knows)  # fmt: skip
        except InvalidEvent as err:
            raise event_error(err) from err
        except BackendUnavailable as err:
            return JSONResponse({"error": str(err)}, status_code=503,  # type: ignore[return-value]
                                headers={"retry-after": retry_after(err)})
        return EventsResponse(new=result.n_new, duplicates=result.n_duplicate, unknown_items=unknown)

    @bentoml.api
    @documented_limits
    async def score(
        self,
        rows: Annotated[list[FeatureRow], Field(min_length=1, max_length=settings.max_score_rows)],  # type: ignore[valid-type]
    ) -> ScoreResponse:
        """Champion scores for rows of raw features, one field per schema feature."""
        # Large requests build their matrix and count their drift in a thread: on the event
        # loop a 10,000-row request held every other request of this worker for tens of ms.
        offload = len(rows) >= settings.offload_rows
        matrix = await asyncio.to_thread(feature_matrix, rows) if offload else feature_matrix(rows)
        scores = await self._score(self.champion, matrix)
        observe = functools.partial(self.champion.drift.observe, matrix, scores, cold=False, endpoint="score")
        await asyncio.to_thread(observe) if offload else observe()
        return ScoreResponse(scores=scores.tolist(), model_tag=self.champion.tag)

    @bentoml.api(route="/drift")
    @documented_limits
    def drift_status(self) -> dict[str, Any]:
        """Drift of the served traffic against the model's reference profile, merged over
        every worker: PSI and status (ok, warn, alert) per feature and for the score, KS for
        the score, the cold-start share, the window and the model version. With a challenger
        loaded, its own report is under `challenger`."""
        report = self.champion.drift.report()
        report["challenger"] = self.challenger.drift.report() if self.challenger else None
        return report

    @bentoml.api(route="/model")
    @documented_limits
    def model_info(self) -> ModelResponse:
        """The served versions: tag, creation time, metrics, dataset and schema of the
        champion (and of the challenger, if loaded), and how users are routed."""
        infos = [VersionInfo.of(v.tag, v.version.creation_time, v.version.metadata) for v in self.ranking.variants]
        return ModelResponse(
            **infos[0].model_dump(),
            challenger=infos[1] if len(infos) > 1 else None,
            routing=Routing(mode=self.ranking.mode, challenger_share=settings.challenger_share),
        )  # fmt: skip


READ_ONLY_ROUTES = frozenset({"/model", "/drift"})  # they answer GET too
forbid_unknown_fields(ApiService)
patch_openapi("ApiService", {api.route for api in ApiService.apis.values()}, models.__version__, READ_ONLY_ROUTES)
# The page (models/serving/ui.py); the guard below wraps it like every route.
ApiService.mount_asgi_app(ui_app(lambda: bentoml.get_current_service().ranking), path=UI_PATH, name="ui")
ApiService.add_asgi_middleware(
    RequestGuard,
    api_keys=settings.api_key_list(),
    event_keys=settings.event_key_list(),
    max_body_bytes=settings.max_body_bytes,
    max_in_flight=settings.max_in_flight,
    read_only_paths=READ_ONLY_ROUTES,
    public_paths=UI_PUBLIC_PATHS,
)
if settings.ranker_token is not None:
    RankerService.add_asgi_middleware(TokenGuard, token=settings.ranker_token.get_secret_value())
