"""Workarounds for BentoML 1.4.40, all in this one module; each has a test that fails
when it stops working (tests/integration/test_bentoml_patches.py, tests/e2e/test_faults.py).

Shutdown order: on SIGTERM the process manager stops every worker of every service at
once, so the ranking service may close while the API service still finishes requests that
need it (they came back 500). The ranking service keeps serving for a grace period after
SIGTERM (`delay_sigterm`), long enough for the API's in-flight requests to complete.

Response media types: for outputs typed as a root model (`np.ndarray`, `float`, a dict)
BentoML derives the response's media type from a freshly generated JSON schema on every
response (about 13% of a loaded worker's time); `cache_media_types` memoises it per type.

Adaptive batching wait: the dispatcher learns how long to hold a request for a fuller
batch from the average wait of its last 50 batches, which feeds on itself: after a burst it
kept holding single requests ~20 ms at low load (decaying ~5% per 5 s refresh), so /rank
at one client took 24 ms instead of 3.5. `cap_batch_wait` bounds that learned wait; under
load batches still form while the model is busy.

Tracing: BentoML wraps every request of every service in OpenTelemetry's ASGI middleware
even when no exporter is configured (spans are made and dropped). On 2 cores that was the
largest single cost of a request: without it 1-row /score went from ~950 to ~1,700 req/s and
/recommend from ~610 to ~900 (bench/perf.py, two hops per request). `skip_unexported_tracing`
leaves it out unless `tracing.exporter_type` is set; BentoML's `X-BentoML-Request-ID`
response header (a span id) goes with it.

Prometheus files: every `bentoml serve` wipes `$BENTOML_HOME/prometheus_multiproc_dir` as it
starts, also while another serve process of the same home is writing its metrics there, so
that one's /metrics silently lost its counts (the scaling set-up runs three serve processes
on one home; the tests run several). `metrics_dir_per_serve` gives each serve process a
folder of its own below it, and removes those of serve processes that are gone.

Runner connections: the caller of a dependency service renews its HTTP session (its pool of
keep-alive connections) after `runner_connection.max_age` seconds or `max_requests`
requests, and BentoML closes the old session at once, with requests still in flight on it
(500s and 503s: 5 of a 500-request burst with renewal every 50 calls, 72 of 5,272 requests
at 32 clients with renewal every 100). `retire_sessions_when_idle` makes the new session
current and closes the old one only once none of its connections is in use (at the latest
after the client's timeout, when aiohttp has failed whatever was left). With that,
connections can be renewed often, so that the ones behind one Service address spread over
the pods that the address now reaches, new ones included (settings.py).

Monitor logs: every `bentoml.monitor` name shares two process-wide loggers, so a second
monitor name in a worker took over the first one's records (`separate_monitor_logs`).

OpenAPI truthfulness (`/docs.json`):
- BentoML documents a 400 body as `{"error": str, "detail": str}` but sends `detail` as the
  list of pydantic errors; schema-checking clients (schemathesis) reject every 400. The
  served document says what is really sent.
- Optional fields (`X | None`, default null) are marked `nullable`: BentoML keeps only `X`,
  so a null value (a `/model` with no challenger) failed the document's own schema.
- Request bodies with required fields are marked `required` (BentoML leaves it out, so an
  empty body looks valid).
- The responses of the request guard (401, 413, 503; models/serving/guard.py) are added to every
  public operation, so that they are documented and clients can expect them.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import signal
import threading
from typing import Any

_ERROR_ITEM = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "description": "the rule, e.g. less_than_equal"},
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"},
    },
    "required": ["type", "loc", "msg"],
}
GUARD_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
GUARD_RESPONSES = {
    "401": "Missing or invalid API key (only when RECSYS_API_KEYS is set).",
    "415": "Content-Type other than application/json.",
    "413": "Request body over RECSYS_MAX_BODY_BYTES.",
    "503": "Overloaded: RECSYS_MAX_IN_FLIGHT requests already in flight; retry later.",
}
_PATCHED = "__recsys_openapi_patched__"
_RETIRING = "_recsys_retiring_sessions"  # a SessionManager's closing tasks


def _replacing(original: Any, replacement: Any) -> Any:
    """Mark `replacement` as this module's patch of `original` (so that a second call is a
    no-op, and tests reach BentoML's own version through `__wrapped__`)."""
    setattr(replacement, _PATCHED, True)
    replacement.__wrapped__ = original
    return replacement


def _nullable_defaults(node: Any) -> None:
    """Properties whose default is null may be null: say so (BentoML keeps only the first
    member of `X | None`, so a null response value failed its own schema)."""
    if isinstance(node, dict):
        for prop in (node.get("properties") or {}).values():
            if isinstance(prop, dict) and "default" in prop and prop["default"] is None and not prop.get("nullable"):
                if "$ref" in prop:  # OpenAPI 3.0 ignores siblings of $ref
                    prop["allOf"] = [{"$ref": prop.pop("$ref")}]
                prop["nullable"] = True
        for value in node.values():
            _nullable_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _nullable_defaults(value)


def fix_openapi(doc: dict[str, Any], guarded_routes: set[str]) -> dict[str, Any]:
    """Return `doc` (an OpenAPI dict from BentoML) with the fixes above."""
    _nullable_defaults(doc)
    schemas = doc.get("components", {}).get("schemas", {})
    invalid = schemas.get("InvalidArgument")
    if invalid is not None:
        invalid.setdefault("properties", {})["detail"] = {
            "title": "Error Detail",
            "anyOf": [{"type": "string"}, {"type": "array", "items": _ERROR_ITEM}],
        }
    for route, item in doc.get("paths", {}).items():
        operation = item.get("post")
        if operation is None:
            continue
        body = operation.get("requestBody")
        if body is not None:
            schema = body.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("required"):
                body["required"] = True
        if route in guarded_routes:
            responses = operation.setdefault("responses", {})
            for status, description in GUARD_RESPONSES.items():
                responses[status] = {
                    "description": description,
                    "content": {"application/json": {"schema": GUARD_ERROR}},
                }
    return doc


class _FixedSpec:
    """Wraps BentoML's OpenAPI object; `asdict()` (what `/docs.json` serves) is fixed."""

    def __init__(self, spec: Any, guarded_routes: set[str]) -> None:
        self._spec = spec
        self._routes = guarded_routes

    def asdict(self) -> dict[str, Any]:
        return fix_openapi(self._spec.asdict(), self._routes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spec, name)


def patch_openapi(service_name: str, guarded_routes: set[str]) -> None:
    """Make BentoML's OpenAPI generation apply `fix_openapi` for `service_name`. Idempotent."""
    # importlib, not `import a.b.c as m`: the latter resolves `service` through attribute
    # lookups that can hit this project's own top-level `service` module.
    openapi_module = importlib.import_module("_bentoml_sdk.service.openapi")
    original = openapi_module.generate_spec
    if getattr(original, _PATCHED, False):
        original = original.__wrapped__  # type: ignore[attr-defined]

    def generate_spec(svc: Any, *args: Any, **kwargs: Any) -> Any:
        spec = original(svc, *args, **kwargs)
        return _FixedSpec(spec, guarded_routes) if svc.name == service_name else spec

    openapi_module.generate_spec = _replacing(original, generate_spec)


def delay_sigterm(grace_s: float) -> None:
    """Handle SIGTERM in this (worker) process `grace_s` seconds late. Call it from the main
    thread after the server installed its own handler (a service's startup hook)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def handler(signum: int, frame: Any) -> None:
        # The server's handler only sets a flag: calling it from a timer thread is safe.
        threading.Timer(grace_s, previous, args=(signum, frame)).start()

    signal.signal(signal.SIGTERM, handler)


def cache_media_types() -> None:
    """Memoise `IOMixin.mime_type` per class (the schema of a class does not change)."""
    io_models = importlib.import_module("_bentoml_sdk.io_models")
    descriptor = io_models.IOMixin
    current = descriptor.__dict__["mime_type"]
    if getattr(current.__func__, _PATCHED, False):
        return
    original = current.__func__
    cache: dict[type, str] = {}

    def mime_type(cls: type) -> str:
        try:
            return cache[cls]
        except KeyError:
            value = cache[cls] = original(cls)
            return value

    descriptor.mime_type = classmethod(_replacing(original, mime_type))


def cap_batch_wait(max_wait_s: float) -> None:
    """Bound the adaptive batcher's learned wait (`Optimizer.wait`) to `max_wait_s`."""
    dispatcher = importlib.import_module("bentoml._internal.marshal.dispatcher")
    optimizer = dispatcher.Optimizer
    current = optimizer.trigger_refresh
    original = current.__wrapped__ if getattr(current, _PATCHED, False) else current

    def trigger_refresh(self: Any) -> None:
        original(self)
        self.wait = min(self.wait, max_wait_s)

    optimizer.trigger_refresh = _replacing(original, trigger_refresh)


def separate_monitor_logs() -> None:
    """Give each `bentoml.monitor` name loggers of its own.

    BentoML's DefaultMonitor configures the process-wide loggers `bentoml_monitor_data` and
    `bentoml_monitor_schema` for whichever monitor logs first, then for the next one: with
    two monitor names in one worker (drift samples, the request log, the shadow log) every
    record went to the files of the last one initialised. Here each monitor gets the same
    files and JSON format as BentoML's default config, on loggers named after the monitor.
    A user's own log_config_file is left to BentoML."""
    monitoring = importlib.import_module("bentoml._internal.monitoring.default")
    monitor_cls = monitoring.DefaultMonitor
    current = monitor_cls._init_logger
    if getattr(current, _PATCHED, False):
        return
    original = current

    def _init_logger(self: Any) -> None:
        if self.log_config_file is not None:
            original(self)
            return
        import logging.handlers
        from pathlib import Path

        from bentoml._internal.context import server_context
        from pythonjsonlogger.json import JsonFormatter

        worker = server_context.worker_index or 0
        for kind in ("data", "schema"):
            path = Path(self.log_path, self.name, kind, f"{kind}.{worker}.log").absolute()
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = (
                logging.handlers.TimedRotatingFileHandler(path, when="D")
                if kind == "data"
                else logging.handlers.RotatingFileHandler(path)
            )
            handler.setFormatter(JsonFormatter("()", validate=False))
            logger = logging.getLogger(f"bentoml_monitor_{kind}.{self.name}")
            for old in logger.handlers:
                old.close()
            logger.handlers = [handler]
            logger.setLevel(logging.INFO)
            logger.propagate = False
            setattr(self, f"{kind}_logger", logger)

    monitor_cls._init_logger = _replacing(original, _init_logger)



def skip_unexported_tracing() -> None:
    """Leave BentoML's OpenTelemetry middleware out of every service's app while no trace
    exporter is configured (BentoML's `tracing.exporter_type`); with one, it stays."""
    app_module = importlib.import_module("_bentoml_impl.server.app")
    factory = app_module.ServiceAppFactory
    current = factory.__dict__["middlewares"]
    if getattr(current.fget, _PATCHED, False):
        return
    original = current.fget

    def middlewares(self: Any) -> Any:
        from bentoml._internal.configuration.containers import BentoMLContainer
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        stack = original(self)
        if BentoMLContainer.config.tracing.exporter_type.get() is not None:
            return stack
        return [m for m in stack if m.cls is not OpenTelemetryMiddleware]

    factory.middlewares = property(_replacing(original, middlewares))


def metrics_dir_per_serve() -> None:
    """In a serve process (not yet in a worker, which inherits PROMETHEUS_MULTIPROC_DIR):
    point BentoML's Prometheus folder at `<its default>/serve-<pid>`."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    from pathlib import Path

    from bentoml._internal.configuration.containers import BentoMLContainer

    provider = BentoMLContainer.prometheus_multiproc_dir
    base = Path(provider.get())
    if base.name.startswith("serve-"):  # already patched in this process
        return
    for old in base.glob("serve-*"):
        pid = old.name.removeprefix("serve-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    provider.set(str(base / f"serve-{os.getpid()}"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def retire_sessions_when_idle(poll_s: float = 0.25) -> None:
    """On renewal, BentoML's `SessionManager` (the client of a dependency service) hands out
    a new session and closes the old one only when none of its connections is acquired."""
    proxy = importlib.import_module("_bentoml_impl.client.proxy2")
    manager = proxy.SessionManager
    current = manager.get_session
    if getattr(current, _PATCHED, False):
        return
    original_get, original_close = current, manager.close

    async def get_session(self: Any) -> Any:
        old = self._session
        if old is not None and self._should_refresh():
            # BentoML's own code makes the new session; it just never sees the old one.
            self._session = None
            retiring: set[asyncio.Task[None]] = self.__dict__.setdefault(_RETIRING, set())
            task = asyncio.get_running_loop().create_task(_close_when_idle(old, self._timeout.total, poll_s))
            retiring.add(task)
            task.add_done_callback(retiring.discard)
        return await original_get(self)

    async def close(self: Any) -> None:
        retiring = list(self.__dict__.get(_RETIRING, ()))
        for task in retiring:
            task.cancel()  # each closes its session on the way out
        await asyncio.gather(*retiring, return_exceptions=True)
        await original_close(self)

    manager.get_session = _replacing(original_get, get_session)
    manager.close = _replacing(original_close, close)


async def _close_when_idle(session: Any, limit_s: float | None, poll_s: float) -> None:
    """Close `session` once its connector has no acquired connection and no waiter, checked
    every `poll_s` (the first check after `poll_s`: a caller may hold the session between
    `get_session` and its request); at the latest after `limit_s`, the client's total
    timeout, which bounds each request including reading its body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (limit_s or 300.0)
    try:
        while loop.time() < deadline:
            await asyncio.sleep(poll_s)
            if not _in_use(session.connector):
                return
    finally:
        await session.close()


def _in_use(connector: Any) -> bool:
    # aiohttp 3.14 internals: `_acquired` holds connections in use and those being opened,
    # `_waiters` the requests queued for a free one (test_bentoml_patches.py checks this).
    if connector is None or connector.closed:
        return False
    return bool(connector._acquired) or any(connector._waiters.values())
