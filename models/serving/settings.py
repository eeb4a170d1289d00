"""Serving settings: one pydantic-settings class, read from `RECSYS_*` environment variables.

Model parameters (candidate counts, recency weights) are not settings: they are part of a
model version and travel in its metadata, so a version always serves the way it was trained.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.lifecycle.store import DEFAULT_MODEL_NAME


def _bentoml_home() -> Path:
    """BentoML's own default, read when the settings are made (tests point it elsewhere)."""
    return Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))


class RecsysSettings(BaseSettings):
    """Settings of the API and ranking services. Each field is `RECSYS_<NAME>` in the env."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    model_name: str = Field(DEFAULT_MODEL_NAME, description="Model name in the BentoML store.")
    model_tag: str | None = Field(
        None, description="Exact tag (name:version) to serve; overrides RECSYS_MODEL_ALIAS."
    )
    model_alias: Literal["champion", "challenger", "latest"] = Field(
        "champion", description="Which version to serve when no exact tag is set: a registry "
        "stage (`python -m training models ...`) or the newest version."
    )

    # Champion/challenger (models/lifecycle/registry.py, models/serving/variants.py).
    challenger_mode: Literal["off", "split", "shadow"] = Field(
        "off", description="off; split: a share of users is ranked by the challenger; shadow: "
        "the challenger ranks every request too, its results are logged, never returned."
    )
    challenger_share: float = Field(
        0.1, ge=0, le=1, description="Share of users routed to the challenger in split mode "
        "(a stable hash of user_id: a user always gets the same model)."
    )
    challenger_tag: str | None = Field(
        None, description="Exact challenger tag; default: the registry's challenger stage."
    )
    routing_salt: str = Field(
        "recsys", description="Salt of the user hash; change it to draw a new set of users."
    )
    promotion_margin: float = Field(
        0.005, ge=0, description="Retraining promotes a challenger unless its NDCG@10 on the "
        "fresh hold-out is below the champion's by more than this."
    )
    request_log_sample: float = Field(
        0.01, ge=0, le=1, description="Share of /recommend and /rank requests logged (with "
        "the returned items) for `python -m training replay`."
    )

    # The ranking service (the "runner").
    ranker_workers: int = Field(1, ge=1, description="Worker processes of the ranking service.")
    ranker_cpu: int = Field(1, ge=1, description="CPUs the ranking service declares.")
    ranker_memory: str = Field(
        "1Gi", description="Memory the ranking service declares (a worker measured ~290 MB)."
    )
    nthread: int = Field(1, ge=1, description="XGBoost threads per worker (1 wins for small batches).")
    ranker_offload_rows: int = Field(
        2048, ge=1, description="Matrices of at least this many rows are scored in a thread; "
        "smaller ones on the ranking worker's event loop (a thread hop cost more than their prediction)."
    )
    batching: bool = Field(True, description="Adaptive batching of the ranking service's /score.")
    max_batch_size: int = Field(
        4096, gt=1, description="Adaptive batching limit in feature rows (a /recommend call is ~200)."
    )
    max_latency_ms: int = Field(
        1000, ge=1, description="Adaptive batching latency budget; too small sheds load with 503."
    )
    max_batch_wait_ms: float = Field(
        2.0, ge=0, description="Longest the batcher holds a request hoping for a fuller batch "
        "(BentoML learns it from traffic; uncapped it stuck at ~20 ms after bursts)."
    )
    # The API's connections to the ranking service are renewed after this age or count, so
    # that behind one Service address they reach pods the autoscaler added (in the e2e test
    # an added ranking service had its share within ~15 s; with no renewal it got none). Old
    # connections are closed once idle (`retire_sessions_when_idle` in bentoml_patches.py):
    # 0 errors in 500-request bursts. The count makes renewal follow load. One renewal cost
    # ~4 ms of CPU (aiohttp client and server in one process): +40 us on a bare ~150 us call
    # at BentoML's 100, within noise at 1,000 (and /recommend through both services at 32
    # clients showed no difference beyond run-to-run noise).
    runner_max_requests: int = Field(
        1000, ge=1, description="Calls per runner session (a pool of connections) before it is renewed."
    )
    runner_max_age_s: float = Field(
        15.0, gt=0, description="Seconds after which a runner session is renewed: a ranking service "
        "added behind the same address gets its share within about this time."
    )

    ranker_shutdown_grace_s: float = Field(
        3.0, ge=0, description="Seconds the ranking service keeps serving after SIGTERM, so the "
        "API service can finish its in-flight requests."
    )

    # Separate scaling: the API calls ranking services started on their own
    # (`bentoml serve service:RankerService`), and spawns none itself.
    ranker_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for one call to a ranking service; then the next one "
        "is tried (and this one skipped for a while), and with none left the request is a 503."
    )
    ranker_urls: str | None = Field(
        None, description="Comma-separated URLs of ranking services run on their own; requests "
        "go round-robin, and a ranking service that refuses connections is skipped for a while."
    )

    ranker_token: SecretStr | None = Field(
        None, description="Internal token of the ranking service: when set, it answers only "
        "calls that carry it (the API services send it); probes and /metrics stay open. Set the "
        "same value on both services (in Kubernetes, the Secret recsys-ranker-token)."
    )

    # The public API service.
    # Tuned on 2 cores (bench/perf.py): two API workers beside one ranking worker served
    # /recommend ~15% faster than one; the access log costs ~5% (/metrics counts requests).
    api_workers: int = Field(2, ge=1, description="Worker processes of the API service.")
    api_cpu: int = Field(1, ge=1, description="CPUs the API service declares.")
    api_memory: str = Field("1Gi", description="Memory the API service declares (two workers).")
    api_batching: bool = Field(
        True, description="Join the scoring calls an API worker makes while earlier ones are "
        "out into one call to the ranking service (models/serving/batching.py)."
    )
    # Measured on 2 cores (5 s cells, ranking worker scoring on its event loop), 1 against 2:
    # 1-row /score 1,754 vs 1,470 req/s at 16 clients and 3,132 vs 2,816 at 64; /recommend
    # 674 vs 624 at 16 and 892 vs 735 at 64 (p99 113 vs 156 ms). Fuller calls win.
    api_batch_in_flight: int = Field(
        1, ge=1, description="Scoring calls an API worker keeps out at once (per model) when "
        "joining; more calls wait and go out together."
    )
    # Measured on 2 cores, /recommend at 64 clients: see ConnectionRecycler in guard.py.
    max_requests_per_connection: int = Field(
        50, ge=0, description="Requests a client's kept-alive connection to an API worker "
        "serves before it is closed (Connection: close on the last answer), so that connections "
        "spread again over the workers; 0: never closed."
    )
    balance_connections: bool = Field(
        True, description="An API worker with clearly more requests in flight than another "
        "closes a kept-alive connection (Connection: close), so that its client reconnects "
        "to the less busy one (models/serving/guard.py)."
    )
    access_log: bool = Field(False, description="BentoML's per-request access log (both services).")
    log_format: Literal["text", "json"] = Field(
        "text", description="Server log lines as BentoML's text, or one JSON object a line."
    )
    traffic_timeout_s: float = Field(30.0, gt=0, description="Request timeout of both services.")
    max_k: int = Field(100, ge=1, description="Largest k accepted by /recommend.")
    max_rank_items: int = Field(1000, ge=1, description="Most item_ids accepted by /rank.")
    max_score_rows: int = Field(10_000, ge=1, description="Most rows accepted by /score.")
    offload_rows: int = Field(
        1000, ge=1, description="/score requests of at least this many rows build their matrix "
        "and count their drift in a thread, off the event loop that serves the other requests."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body (413 above).")
    max_in_flight: int = Field(
        256, ge=1, description="Requests served at once per API worker; more are a 503 at once."
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated API keys; when set, every endpoint but the health and "
        "readiness probes needs 'Authorization: Bearer <key>'.",
    )
    event_keys: SecretStr | None = Field(
        None,
        description="Comma-separated keys that may only POST /events (for a front end that "
        "reports clicks); other endpoints refuse them with a 403. Needs RECSYS_API_KEYS.",
    )

    # Drift monitoring (models/core/drift.py).
    drift_enabled: bool = Field(True, description="Count served rows for /drift and the PSI gauges.")
    drift_window_s: float = Field(300.0, gt=0, description="Drift window: the last N seconds.")
    drift_window_rows: int | None = Field(
        None, ge=1, description="Drift window by count instead: the newest buckets holding N rows."
    )
    drift_rows_per_s: float | None = Field(
        5000.0, gt=0, description="Rows a worker bins per second at most (the cost under load): beyond, "
        "a request's rows are binned with a chance of 1/w and counted w times (w a power of two, set per time "
        "bucket, a 30th of the window, from the one before), so the counts still estimate every row. Unset: every row.",
    )
    drift_warn: float = Field(0.1, ge=0, description="PSI at or above which a feature is 'warn'.")
    drift_alert: float = Field(0.25, ge=0, description="PSI at or above which a feature is 'alert'.")
    drift_min_rows: int | None = Field(
        None, ge=1, description="Sample (rows; requests for user features) below which a feature's "
        "status is 'insufficient_data'. Unset: per feature, the sample at which a PSI of traffic drawn "
        "from the reference itself stays below drift_warn with probability 0.99, chi2_0.99(bins - 1) "
        "/ drift_warn (217 for 10 bins and warn 0.1; models/core/drift.py min_sample).",
    )
    drift_dir: Path = Field(
        Path(tempfile.gettempdir()) / "recsys-drift",
        description="Where workers share their drift counts (one folder per serve process).",
    )
    monitor_dir: Path = Field(Path("monitoring"), description="bentoml.monitor log folder.")
    monitor_sample: float = Field(
        0.001, ge=0, le=1, description="Share of requests whose features and scores are logged."
    )
    # Bound: workers x monitor names (3) x (backups + 1) x max bytes; the default sample wrote
    # about 6 GB a day before the files were bounded.
    monitor_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Size at which a monitor log file is rotated."
    )
    monitor_backups: int = Field(
        3, ge=0, description="Rotated monitor log files kept per worker and monitor; older ones are deleted."
    )

    # The online state and the event log (models/serving/online/, models/serving/event_log.py).
    online_backend: Literal["sqlite", "redis", "off"] = Field(
        "sqlite", description="Where users' recent events are kept, shared by every worker: sqlite "
        "(one file, the workers of one machine), redis (many replicas), or off (no events API)."
    )
    online_path: Path = Field(
        default_factory=lambda: _bentoml_home() / "online" / "state.sqlite3",
        description="The SQLite file of the online state (default: under BENTOML_HOME, beside the "
        "model store). A local disk: WAL mode does not work over a network file system."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="The Redis server of the online state, when "
        "RECSYS_ONLINE_BACKEND=redis. Run it with appendonly yes and appendfsync always, or "
        "acknowledged events can be lost."
    )
    max_events: int = Field(1000, ge=1, description="Most events accepted in one POST /events.")
    event_max_future_s: float = Field(
        300.0, ge=0, description="How far past the server's clock an event's timestamp may be "
        "(clients' clocks drift; a timestamp further ahead is a 400)."
    )
    online_max_items: int = Field(
        200, ge=1, description="Recent items kept per user (one per item and event type, the "
        "newest); older ones are dropped as new ones arrive."
    )
    online_retention_s: float = Field(
        30 * 86400.0, gt=0, description="Per-user recent items older than this (by event time) "
        "are expired, and a user idle this long is forgotten (Redis: the key's TTL)."
    )
    # A day: clients retry within seconds, a front end that buffers offline within hours.
    # Each id costs ~100 bytes in Redis: at 100 events/s a day of them is ~1 GB.
    online_journal_s: float = Field(
        86400.0, gt=0, description="How long event ids (a retried event_id within this time is "
        "a duplicate), impressions (found by recommendation_id) and exported journal entries "
        "are kept. The event log's reader drops an id repeated later than that."
    )
    online_timeout_s: float = Field(
        2.0, gt=0, description="Longest wait for the online state (SQLite's lock, a Redis "
        "connection or reply); past it the request is a 503 with Retry-After."
    )
    online_sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite's synchronous level: FULL fsyncs each commit (an acknowledged "
        "event survives a power loss); NORMAL survives a crash of the process but may lose the "
        "last commits on a power loss. For events: impressions always commit with NORMAL."
    )
    event_log_path: str = Field(
        default_factory=lambda: str(_bentoml_home() / "event_log"),
        description="The Parquet event log (date=YYYY-MM-DD/ partitions): a local folder or a "
        "URL pyarrow's file systems open (s3://bucket/path, gs://...)."
    )
    event_export_batch: int = Field(
        50_000, ge=1, description="Most journal entries the exporter writes per Parquet file."
    )
    # The exporter inside the service (models/serving/export_loop.py).
    event_log_interval_s: float = Field(
        30.0, ge=0, description="Seconds between exports of the online state's journals to the "
        "event log (then old state is expired), by one API worker at a time, and once more at "
        "shutdown; 0 turns the service's exporter off (export from a job, or another replica)."
    )
    online_impression_linger_ms: float = Field(
        50.0, ge=0, description="How long the impressions' writer waits after the first one for "
        "more, to write them in one commit (nobody waits on an impression; a click that comes "
        "sooner is joined by the worker that served it, from memory). Fewer commits wake the "
        "writer thread less often, and it contends with the request path for the GIL."
    )
    event_log_shutdown_wait_s: float = Field(
        10.0, ge=0, description="Longest a stopping API worker waits for another worker's export "
        "to finish before its own last export."
    )

    # The registry of stages (models/lifecycle/registry.py reads the variable itself: the
    # lifecycle layer has no settings). MLflow's own name, so that its CLI and UI agree.
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias="MLFLOW_TRACKING_URI", description="MLflow's own variable (no "
        "RECSYS_ prefix): the tracking server whose Model Registry holds the stages, shared by "
        "every machine that trains or serves. Unset: an embedded SQLite registry under "
        "BENTOML_HOME (mlflow.db, artifacts in mlartifacts/), for one machine."
    )

    # Live reload (models/serving/reload.py). A switch must land within 10 s of a promotion:
    # a poll every 3 s plus a version's checks and load (about 1 s for the test models,
    # measured in tests/e2e/test_reload_e2e.py) leaves room on a busy machine.
    reload_interval_s: float = Field(
        3.0, ge=0, description="Seconds between two looks at the registry by every worker of both "
        "services; a changed champion or challenger is loaded in the background, checked, and "
        "switched in between requests. 0: off (the versions resolved at start are served)."
    )
    follow_registry: bool = Field(
        False, description="A built Bento serves the versions it pinned; true: it follows the "
        "registry's stages like `bentoml serve service:ApiService` does. RECSYS_MODEL_TAG pins always."
    )
    admin_keys: SecretStr | None = Field(
        None, description="Comma-separated keys that may call POST /admin/reload (look at the "
        "registry now); without any, the endpoint is refused (403)."
    )

    def admin_key_list(self) -> list[str]:
        return _keys(self.admin_keys)

    # Online outcomes and the A/B report (models/core/outcomes.py, training/ab_report.py).
    outcome_window_s: float = Field(
        1800.0, ge=0, description="Attribution window: an event without a recommendation_id (or with "
        "one the log does not hold) counts for the same user's latest impression that showed the "
        "item at most this long before it."
    )
    ab_k: int = Field(10, ge=1, description="CTR@k and MRR count clicks at positions 1..k (10: /recommend's default k).")
    ab_min_effect: float = Field(
        0.1, gt=0, description="Smallest relative change of a metric the A/B report must detect "
        "(0.1: 10% of the champion's value); with ab_alpha and ab_power it sets the minimum sample."
    )
    ab_alpha: float = Field(0.05, gt=0, lt=1, description="Two-sided significance level of the A/B report; its CIs are 1 - alpha.")
    ab_power: float = Field(0.8, gt=0, lt=1, description="Power of the A/B test at ab_min_effect.")
    ab_primary_metric: Literal["ctr", "conversion", "mrr"] = Field(
        "ctr", description="The metric whose verdict is the A/B report's overall verdict."
    )

    # The closed loop (training/loop.py): retrain on the event log, gate, judge, promote.
    loop_interval_s: float = Field(
        300.0, gt=0, description="Seconds between two looks of `python -m training loop` (without --once)."
    )
    loop_min_new_events: int | None = Field(
        10_000, ge=1, description="Retrain when the event log holds at least this many events newer "
        "than the last retrain's (None: this trigger is off)."
    )
    loop_drift_url: str | None = Field(
        None, description="The service's base URL: retrain when its GET /drift says status 'alert' "
        "('insufficient_data' never triggers; None: this trigger is off)."
    )
    loop_max_age_s: float | None = Field(
        None, gt=0, description="Retrain when the champion was promoted longer ago than this (None: off)."
    )
    loop_promote_on: Literal["offline", "online"] = Field(
        "online", description="offline: a version that passes the offline gate becomes the champion; "
        "online: it becomes the challenger (serve in split mode) and is promoted once the A/B report "
        "says it is not worse with the minimum sample reached."
    )
    loop_max_wait_s: float = Field(
        86_400.0, gt=0, description="Longest a challenger of the loop waits for the A/B report's "
        "minimum sample; then it is cleared (not promoted)."
    )

    def ranker_url_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in (self.ranker_urls or "").split(",") if u.strip()]

    def api_key_list(self) -> list[str]:
        return _keys(self.api_keys)

    def event_key_list(self) -> list[str]:
        return _keys(self.event_keys)

    @model_validator(mode="after")
    def _event_keys_need_api_keys(self) -> RecsysSettings:
        # Without API keys every endpoint is open: keys limited to /events would limit nothing.
        if self.event_key_list() and not self.api_key_list():
            raise ValueError("event_keys (RECSYS_EVENT_KEYS) is set but api_keys (RECSYS_API_KEYS) is not: "
                             "event keys only narrow access when API keys are required")  # fmt: skip
        return self


def _keys(value: SecretStr | None) -> list[str]:
    if value is None:
        return []
    return [k.strip() for k in value.get_secret_value().split(",") if k.strip()]
