"""The recommender as two BentoML services: `RankerService` (the runner: scores feature
matrices with adaptive batching, its own workers and resources) behind `ApiService` (the
public API: candidates, features, ranking, fallbacks). `bentoml serve service:ApiService`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable
from pydantic import Field, StrictBool, StrictInt
from starlette.responses import JSONResponse

import models
from models.core.recommender import Recommender
from models.core.schema import FEATURE_DTYPE
from models.lifecycle import registry
from models.lifecycle.registry import in_local_store
from models.lifecycle.store import ModelCheckError, open_version
from models.serving.api_schema import (
    EventIn,
    EventsResponse,
    ExternalId,
    FeatureRow,
    ModelResponse,
    RankResponse,
    RecommendResponse,
    ReloadInfo,
    Routing,
    ScoreResponse,
    VersionInfo,
    event_error,
    feature_matrix,
)
from models.serving.batching import JoinedCalls
from models.serving.bentoml_patches import (
    authorize_dependency,
    cache_local_callers,
    cache_media_types,
    cap_batch_wait,
    client_errors_in_one_line,
    delay_sigterm,
    forbid_unknown_fields,
    json_server_logs,
    metrics_dir_per_serve,
    numpy_only_unpickling,
    one_write_bodies,
    patch_openapi,
    retire_sessions_when_idle,
    separate_monitor_logs,
    skip_unexported_tracing,
)
from models.serving.events import InvalidEvent
from models.serving.export_loop import ExportLoop
from models.serving.guard import ConnectionRecycler, RequestGuard, TokenGuard, WorkerLoads
from models.serving.heap import freeze_startup_heap
from models.serving.monitoring import DriftMonitor
from models.serving.online import BackendUnavailable, make_state
from models.serving.orchestration import Ranking
from models.serving.plan import (
    Stages,
    bound_registry_calls,
    follows_registry,
    known_tags,
    serving_plan,
    wanted_stages,
)
from models.serving.rankers import RankerPool
from models.serving.realtime import RealTime, retry_after
from models.serving.reload import StageFollower
from models.serving.settings import RecsysSettings
from models.serving.ui import PUBLIC_PATHS as UI_PUBLIC_PATHS
from models.serving.ui import UI_PATH, ui_app
from models.serving.variants import Role, Variant
from models.serving.versioned import BoosterSet, VersionNotHeld, tag_rows

settings = RecsysSettings()  # configuration only: decorators below need it at import
cache_media_types()
cache_local_callers()
one_write_bodies()
numpy_only_unpickling()
separate_monitor_logs(settings.monitor_max_bytes, settings.monitor_backups)
skip_unexported_tracing()
client_errors_in_one_line()
metrics_dir_per_serve()
retire_sessions_when_idle()
cap_batch_wait(settings.max_batch_wait_ms / 1000)
# Exact versions, resolved once: `bentoml build` pins what this resolves to.
bound_registry_calls()
PLAN = serving_plan(settings, Path(__file__))
# With a problem the services declare no model: `serve` resolves declared models before it
# runs `check_model`, and would stop on the placeholder tag without saying the problem.
# A version missing from the local store is not declared either: BentoML would try to pull
# it from BentoCloud and stop; `check_model` fetches it (registry.ensure_local) instead.
DECLARED = (None, None) if PLAN.problem else tuple(t if t and in_local_store(t) else None
                                                   for t in (PLAN.champion, PLAN.challenger))  # fmt: skip
# Separate scaling: with URLs, `serve` starts no ranking service; the API calls these.
RANKER_URLS = settings.ranker_url_list()
# Live reload: whether the workers follow the registry's stages (models/serving/reload.py).
FOLLOWS = follows_registry(settings, Path(__file__))
SCORE_APIS: dict[Role, str] = {"champion": "score", "challenger": "score_challenger"}


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


def _load_booster(tag: str) -> Any:
    registry.ensure_local(tag)
    return open_version(tag).load_booster(settings.nthread)


@bentoml.service(
    workers=settings.ranker_workers,
    resources={"cpu": str(settings.ranker_cpu), "memory": settings.ranker_memory},
    traffic={"timeout": settings.traffic_timeout_s},
    logging={"access": {"enabled": settings.access_log}},
    runner_connection={"max_requests": settings.runner_max_requests, "max_age": settings.runner_max_age_s},
)
class RankerService:
    """Scores float32 matrices of (version id, N_FEATURES features) rows, each row with the
    XGBoost ranker of the version it names (models/serving/versioned.py): the champion's and
    the challenger's are loaded ahead, the ones before them kept for the calls still naming
    them, any other known version loaded when first named."""

    # Declaration order matters: a Bento lists its models in it (champion, then challenger).
    bento_model = _model(DECLARED[0])
    challenger_model = _model(DECLARED[1])

    def __init__(self) -> None:
        self.stages: Stages = (PLAN.champion, PLAN.challenger)
        self.boosters = BoosterSet(_load_booster, functools.partial(known_tags, settings.model_name))
        self.boosters.install(self.boosters.loaded(t for t in self.stages if t))
        self.follower = StageFollower("ranker", settings.reload_interval_s, FOLLOWS, lambda: self.stages,
                                      functools.partial(wanted_stages, settings), self._prepare, self._commit)  # fmt: skip

    def _prepare(self, stages: Stages) -> Any:
        """The new stages' boosters, and the old stages' kept: calls made before the API
        workers switched still name them."""
        return self.boosters.loaded(t for t in (*stages, *self.stages) if t)

    def _commit(self, held: Any, stages: Stages) -> None:
        self.boosters.install(held)
        self.stages = stages

    @bentoml.on_startup
    async def follow_registry(self) -> None:
        self._follow_task = self.follower.start()

    @bentoml.on_startup
    def drain_on_shutdown(self) -> None:
        delay_sigterm(settings.ranker_shutdown_grace_s)
        if settings.log_format == "json":
            json_server_logs()
        freeze_startup_heap()

    async def _scored(self, features: np.ndarray) -> np.ndarray:
        # Small matrices are scored on the event loop: a thread hop cost more than their
        # prediction. Large ones go to a thread, so the loop keeps reading requests.
        if len(features) >= settings.ranker_offload_rows:
            return await asyncio.to_thread(self._scored_now, features)
        return self._scored_now(features)

    def _scored_now(self, features: np.ndarray) -> np.ndarray:
        try:
            return self.boosters.score(features)
        except ValueError as err:
            raise InvalidArgument(str(err)) from err
        except VersionNotHeld as err:  # retryable: the API's RankerPool tries the next one
            raise ServiceUnavailable(str(err)) from err

    # numpy, not DataFrame: BentoML 1.4's batchable DataFrame inputs are broken
    # (get_batch_size returns a shape tuple); see ../shared/NOTES.md. One argument only
    # (BentoML's batching takes one): the version id is the matrix's first column.
    @batched_api()
    async def score(self, features: np.ndarray) -> np.ndarray:
        return await self._scored(features)

    # Its own batch queue, so the challenger's rows do not wait in the champion's batches;
    # rows name their version, as in `score`.
    @batched_api()
    async def score_challenger(self, features: np.ndarray) -> np.ndarray:
        return await self._scored(features)

    @bentoml.api
    def model_tags(self) -> dict[str, Any]:
        """This worker's stages, the versions it holds, and how following the registry goes."""
        return {"champion": self.stages[0], "challenger": self.stages[1], "held": self.boosters.tags,
                "reload": self.follower.status.as_dict()}  # fmt: skip


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
            for tag in (PLAN.champion, PLAN.challenger):
                if tag:
                    registry.ensure_local(tag)
                    open_version(tag)
        except ModelCheckError as err:
            raise BentoMLException(str(err)) from err

    def __init__(self) -> None:
        champion = self._load("champion", PLAN.champion)
        challenger = self._load("challenger", PLAN.challenger) if PLAN.challenger else None
        # Opened here, in the worker (after the fork): connections must not cross processes.
        state = make_state(settings)
        self.realtime = RealTime(settings, state) if state is not None else None
        # Every worker runs one; a lock per journal lets one export at a time (export_loop.py).
        self.export_loop = (ExportLoop(state, settings.event_log_path, settings.event_export_batch,
                                       settings.event_log_interval_s)
                            if state is not None and settings.event_log_interval_s > 0 else None)  # fmt: skip
        # The served versions live in `ranking` only: a switch replaces them there, and each
        # request keeps the Variant it started with (tables, drift, version id) to its end.
        self.ranking = Ranking(settings, champion, challenger, self._score, self.realtime)
        self.follower = StageFollower("api", settings.reload_interval_s, FOLLOWS, self._stages,
                                      functools.partial(wanted_stages, settings), self._prepare, self._commit)  # fmt: skip
        # BentoML sets up its declared dependency (the first URL); the others are set up in
        # the startup hook below, the same way.
        self._more_rankers = [bentoml.depends(RankerService, url=u).get() for u in RANKER_URLS[1:]]
        if settings.ranker_token is not None:
            for proxy in (self.ranker, *self._more_rankers):
                authorize_dependency(proxy, settings.ranker_token.get_secret_value())
        self.rankers = RankerPool([self.ranker, *self._more_rankers], RANKER_URLS or ["local"],
                                  timeout_s=settings.ranker_timeout_s)  # fmt: skip
        # Concurrent scoring calls of this worker go out as one (models/serving/batching.py).
        # Rows name their version (a leading id column), so calls of different versions
        # may be joined: each caller still gets the scores of its own version's booster.
        self.joined = {
            api: JoinedCalls(functools.partial(self.rankers.call, api), api,
                             settings.max_batch_size, settings.api_batch_in_flight)
            for api in SCORE_APIS.values()
        } if settings.api_batching else {}  # fmt: skip

    @staticmethod
    def _load(role: Role, tag: str) -> Variant:
        registry.ensure_local(tag)
        version = open_version(tag)
        recommender = Recommender(version.load_tables(), version.params)
        drift = DriftMonitor(settings, version.tag, version.path, role="api")
        return Variant(role, version, recommender, drift, SCORE_APIS[role])

    def _stages(self) -> Stages:
        challenger = self.ranking.challenger
        return self.ranking.champion.tag, challenger.tag if challenger else None

    def _prepare(self, stages: Stages) -> tuple[Variant, Variant | None]:
        """The variants of `stages` (in a thread): a version served now is reused, in its new
        role; a new one is checked and loaded (ModelCheckError if it fails)."""
        served = {v.tag: v for v in self.ranking.variants}

        def variant(role: Role, tag: str) -> Variant:
            if tag in served:
                return dataclasses.replace(served[tag], role=role, score_api=SCORE_APIS[role])
            return self._load(role, tag)

        champion = variant("champion", stages[0])
        challenger = variant("challenger", stages[1]) if stages[1] else None
        if challenger is not None and challenger.version_id == champion.version_id:
            raise ModelCheckError(f"model {challenger.tag}: version id {champion.version_id} collides with "
                                  f"{champion.tag}; save the version again (a new tag) to serve both")  # fmt: skip
        return champion, challenger

    def _commit(self, prepared: tuple[Variant, Variant | None], stages: Stages) -> None:
        """Between requests (on the event loop): later requests use the new variants. The
        drift counting of a version no longer served stops; a new one's starts."""
        before = {v.tag: v for v in self.ranking.variants}
        self.ranking.champion, self.ranking.challenger = prepared
        after = {v.tag for v in self.ranking.variants}
        for tag in set(before) - after:
            if task := self._flushers.pop(tag, None):
                task.cancel()
        for v in self.ranking.variants:
            if v.tag not in self._flushers:
                self._flushers[v.tag] = v.drift.start_flusher()

    @bentoml.on_startup
    async def start_drift_flusher(self) -> None:
        await asyncio.gather(*(proxy.__aenter__() for proxy in self._more_rankers))
        self._flushers = {v.tag: v.drift.start_flusher() for v in self.ranking.variants}
        self._follow_task = self.follower.start()
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
        if len(features) == 0:
            return np.zeros(0, dtype=FEATURE_DTYPE)
        # The rows name the version whose features they are: the ranking service scores them
        # with that version's booster or refuses them (a retryable 503), never another's.
        rows = tag_rows(variant.version_id, features)
        # An unreachable ranking service is a retryable 503 (models/serving/rankers.py), not a 500.
        if joined := self.joined.get(variant.score_api):
            return await joined(rows)
        return np.asarray(await self.rankers.call(variant.score_api, rows))

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
                                                         self.ranking.champion.recommender.knows)  # fmt: skip
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
        champion = self.ranking.champion  # one version for the whole request, across a switch
        scores = await self._score(champion, matrix)
        observe = functools.partial(champion.drift.observe, matrix, scores, cold=False, endpoint="score")
        await asyncio.to_thread(observe) if offload else observe()
        return ScoreResponse(scores=scores.tolist(), model_tag=champion.tag)

    @bentoml.api(route="/drift")
    @documented_limits
    def drift_status(self) -> dict[str, Any]:
        """Drift of the served traffic against the model's reference profile, merged over
        every worker: PSI and status (ok, warn, alert) per feature and for the score, KS for
        the score, the cold-start share, the window and the model version. With a challenger
        loaded, its own report is under `challenger`."""
        champion, challenger = self.ranking.champion, self.ranking.challenger
        report = champion.drift.report()
        report["challenger"] = challenger.drift.report() if challenger else None
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
            reload=ReloadInfo(**self.follower.status.as_dict()),
        )  # fmt: skip

    @bentoml.api(route="/admin/reload")
    async def admin_reload(self) -> ReloadInfo:
        """Look at the registry now (this worker; the others at their next poll), and try
        again a version refused before. Needs an admin key (RECSYS_ADMIN_KEYS)."""
        return ReloadInfo(**await self.follower.poll(force=True))


def api_worker_loads() -> WorkerLoads | None:
    """This API worker's slot among the API workers of its `bentoml serve` (in that serve's
    own metrics folder, models/serving/bentoml_patches.py); none with one worker or outside
    a serve."""
    from bentoml._internal.context import server_context

    folder, index = os.environ.get("PROMETHEUS_MULTIPROC_DIR"), server_context.worker_index
    if settings.api_workers < 2 or not folder or not index or index > settings.api_workers:
        return None
    path = Path(folder) / f"api-worker-loads-{os.getppid()}.bin"
    try:
        return WorkerLoads(path, settings.api_workers, index - 1)
    except OSError as err:  # connections then spread by RECSYS_MAX_REQUESTS_PER_CONNECTION alone
        logging.getLogger("recsys.guard").warning("connections are not balanced by load: %s: %s", path, err)
        return None


READ_ONLY_ROUTES = frozenset({"/model", "/drift"})  # they answer GET too
ADMIN_ROUTES = frozenset({"/admin/reload"})  # admin keys only (RECSYS_ADMIN_KEYS)
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
    admin_keys=settings.admin_key_list(),
    admin_paths=ADMIN_ROUTES,
)
ApiService.add_asgi_middleware(ConnectionRecycler, max_requests=settings.max_requests_per_connection,
                               loads=api_worker_loads if settings.balance_connections else None)
if settings.ranker_token is not None:
    RankerService.add_asgi_middleware(TokenGuard, token=settings.ranker_token.get_secret_value())
