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

Per-request busywork (1-row /score at 16 clients spent it on every request, both hops):
- BentoML's `APIMethod` descriptor builds a new local caller, `inspect.signature` included,
  at every lookup, and its request handler looks the method up once or twice per request;
  `cache_local_callers` builds it once per service instance.
- A serialised body went out as one ASGI message per chunk (a pickle's header, then each
  array's buffer) plus an empty closing one, each through every middleware, and the
  client's request as one write per chunk; `one_write_bodies` sends one of each.

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
monitor name in a worker took over the first one's records; its files were never pruned,
and were written on the event loop (`separate_monitor_logs`).

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

Pickles from the network: the internal hop (API to ranking service, and its answer) is
BentoML's `application/vnd.bentoml+pickle`. A service served on its own refuses it (415), but
a dependency started by the same `bentoml serve` accepts it from whoever reaches its socket,
and `pickle.loads` runs whatever a payload names. The hop is lean (protocol 5: the arrays'
bytes travel as they are, beside a small header), so it is kept, but `numpy_only_unpickling` loads it with an unpickler that allows numpy's array,
dtype and scalar constructors and nothing else; any other global is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import io
import json
import logging
import logging.handlers
import os
import pickle
import queue
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

_log = logging.getLogger("recsys.bentoml_patches")
_client_log = logging.getLogger("recsys.client_errors")
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
    "403": "An event key outside POST /events (RECSYS_EVENT_KEYS), or an admin route "
           "(/admin/...) while RECSYS_ADMIN_KEYS is not set.",
    "415": "Content-Type other than application/json.",
    "413": "Request body over RECSYS_MAX_BODY_BYTES.",
    "503": "Overloaded: RECSYS_MAX_IN_FLIGHT requests already in flight; retry later.",
}
_PATCHED = "__recsys_openapi_patched__"
_RETIRING = "_recsys_retiring_sessions"  # a SessionManager's closing tasks
_LOCAL_CALLERS = "_recsys_local_callers"  # a service instance's API callers, by name


def _unpatched(current: Any) -> Any:
    """BentoML's own version of `current`, whether or not this module replaced it already
    (patching again, with other settings, replaces the earlier patch)."""
    return current.__wrapped__ if getattr(current, _PATCHED, False) else current


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


def fix_openapi(doc: dict[str, Any], guarded_routes: set[str], version: str = "",
                read_only: frozenset[str] = frozenset()) -> dict[str, Any]:  # fmt: skip
    """Return `doc` (an OpenAPI dict from BentoML) with the fixes above."""
    _nullable_defaults(doc)
    if version and doc.get("info", {}).get("version") in (None, "None"):
        doc["info"]["version"] = version  # BentoML's is the Bento's, "None" outside one
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
        if route in read_only and "get" not in item:  # answered by the guard (GET is read as POST)
            item["get"] = {k: v for k, v in operation.items() if k != "requestBody"} | {
                "operationId": f"{operation.get('operationId', route.strip('/'))}__get"}
    return doc


class _FixedSpec:
    """Wraps BentoML's OpenAPI object; `asdict()` (what `/docs.json` serves) is fixed."""

    def __init__(self, spec: Any, guarded_routes: set[str], version: str, read_only: frozenset[str]) -> None:
        self._spec = spec
        self._routes = guarded_routes
        self._version = version
        self._read_only = read_only

    def asdict(self) -> dict[str, Any]:
        return fix_openapi(self._spec.asdict(), self._routes, self._version, self._read_only)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spec, name)


def patch_openapi(service_name: str, guarded_routes: set[str], version: str = "",
                  read_only: frozenset[str] = frozenset()) -> None:  # fmt: skip
    """Make BentoML's OpenAPI generation apply `fix_openapi` for `service_name`. Idempotent."""
    # importlib, not `import a.b.c as m`: the latter resolves `service` through attribute
    # lookups that can hit this project's own top-level `service` module.
    openapi_module = importlib.import_module("_bentoml_sdk.service.openapi")
    original = openapi_module.generate_spec
    if getattr(original, _PATCHED, False):
        original = original.__wrapped__  # type: ignore[attr-defined]

    def generate_spec(svc: Any, *args: Any, **kwargs: Any) -> Any:
        spec = original(svc, *args, **kwargs)
        return _FixedSpec(spec, guarded_routes, version, read_only) if svc.name == service_name else spec

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


def cache_local_callers() -> None:
    """Build each API's local caller once per service instance: BentoML's `APIMethod`
    descriptor makes a new one, `inspect.signature` included, on every attribute access,
    and its request handler looks the method up so once or twice per request."""
    method_module = importlib.import_module("_bentoml_sdk.method")
    api_method = method_module.APIMethod
    current = api_method.__dict__["_local_call"]
    original = _unpatched(current)

    def _local_call(self: Any, instance: Any) -> Any:
        # Kept on the instance (not in a dict keyed by it): it lives and dies with it.
        cache = instance.__dict__.setdefault(_LOCAL_CALLERS, {})
        try:
            return cache[self.name]
        except KeyError:
            caller = cache[self.name] = original(self, instance)
            return caller

    api_method._local_call = _replacing(original, _local_call)


def one_write_bodies() -> None:
    """Send a serialised body as one chunk, both ways of the internal hop: BentoML's
    `IterableResponse` sends each chunk of a payload (a pickle's header, then each array's
    buffer) as an ASGI message of its own plus an empty closing one, and its client posts
    them as separate writes; each message crosses every middleware and each write is a
    system call."""
    io_models = importlib.import_module("_bentoml_sdk.io_models")
    serde = importlib.import_module("_bentoml_impl.serde")
    response = io_models.IterableResponse
    current_call = response.__dict__["__call__"]
    original_call = _unpatched(current_call)

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"".join(self.body_iterator), "more_body": False})
        if self.background is not None:
            await self.background()

    response.__call__ = _replacing(original_call, __call__)
    payload = serde.Payload
    current_chunks = payload.__dict__["aiter_bytes"]
    original_chunks = _unpatched(current_chunks)

    async def aiter_bytes(self: Any) -> Any:
        yield b"".join(self.data)

    payload.aiter_bytes = _replacing(original_chunks, aiter_bytes)


def cap_batch_wait(max_wait_s: float) -> None:
    """Bound the adaptive batcher's learned wait (`Optimizer.wait`) to `max_wait_s`."""
    dispatcher = importlib.import_module("bentoml._internal.marshal.dispatcher")
    optimizer = dispatcher.Optimizer
    current = optimizer.trigger_refresh
    original = _unpatched(current)

    def trigger_refresh(self: Any) -> None:
        original(self)
        self.wait = min(self.wait, max_wait_s)

    optimizer.trigger_refresh = _replacing(original, trigger_refresh)


class _RecordQueueHandler(logging.handlers.QueueHandler):
    """Hands each record to the writer thread as it is: the JSON encoding (a sampled
    /recommend record is ~57 KB) and the write happen there, not on the event loop. A full
    queue drops the record and counts it: logging must never slow or fail a request."""

    def __init__(self, q: queue.Queue[Any], monitor: str) -> None:
        super().__init__(q)
        self.monitor = monitor

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted by the file handler, in the writer thread

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            monitor_log_failed(self.monitor, "queue_full")


class _BoundedFileHandler(logging.handlers.RotatingFileHandler):
    """At most `backups + 1` files of `max_bytes` each; a failed write is counted and
    logged once, never raised."""

    def __init__(self, path: Path, max_bytes: int, backups: int, monitor: str) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, delay=True)
        self.monitor = monitor

    def handleError(self, record: logging.LogRecord) -> None:
        monitor_log_failed(self.monitor, "write_failed", sys.exc_info()[1])


_failures_logged: set[tuple[str, str]] = set()
_listeners: list[logging.handlers.QueueListener] = []


def monitor_log_failed(monitor: str, reason: str, err: BaseException | None = None) -> None:
    from models.serving.monitoring import monitor_log_errors

    monitor_log_errors().labels(monitor=monitor, reason=reason).inc()
    if (monitor, reason) not in _failures_logged:  # once per monitor and reason
        _failures_logged.add((monitor, reason))
        _log.error("monitor log %s: %s (%r); records are dropped and counted in "
                   "recsys_monitor_log_errors_total", monitor, reason, err)  # fmt: skip


def drain_monitor_logs() -> None:
    """Wait until the writer threads have written every record queued so far."""
    for listener in _listeners:
        listener.queue.join()  # type: ignore[attr-defined]


def separate_monitor_logs(max_bytes: int, backups: int, queue_size: int = 10_000) -> None:
    """Give each `bentoml.monitor` name loggers of its own, bounded files, and a writer
    thread.

    BentoML's DefaultMonitor configures the process-wide loggers `bentoml_monitor_data` and
    `bentoml_monitor_schema` for whichever monitor logs first, then for the next one: with
    two monitor names in one worker (drift samples, the request log, the shadow log) every
    record went to the files of the last one initialised. Its files also rotate daily with
    no limit on how many are kept (about 6 GB a day at our default sample), encode JSON on
    the caller's thread (the event loop), and a folder that cannot be written failed the
    request. Here each monitor gets BentoML's file layout and JSON format, on loggers named
    after the monitor, in at most `backups + 1` files of `max_bytes` per worker, written by
    a thread. A user's own log_config_file is left to BentoML."""
    monitoring = importlib.import_module("bentoml._internal.monitoring.default")
    monitor_cls = monitoring.DefaultMonitor
    current = monitor_cls._init_logger
    original = _unpatched(current)

    def _init_logger(self: Any) -> None:
        if self.log_config_file is not None:
            original(self)
            return
        from bentoml._internal.context import server_context
        from pythonjsonlogger.json import JsonFormatter

        worker = server_context.worker_index or 0
        for kind in ("data", "schema"):
            logger = logging.getLogger(f"bentoml_monitor_{kind}.{self.name}")
            for old in logger.handlers:
                old.close()
            logger.setLevel(logging.INFO)
            logger.propagate = False
            setattr(self, f"{kind}_logger", logger)
            path = Path(self.log_path, self.name, kind, f"{kind}.{worker}.log").absolute()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                monitor_log_failed(self.name, "unwritable_dir", err)
                logger.handlers = [logging.NullHandler()]
                continue
            handler = _BoundedFileHandler(path, max_bytes, backups, self.name)
            handler.setFormatter(JsonFormatter("()", validate=False))
            records: queue.Queue[Any] = queue.Queue(queue_size)
            listener = logging.handlers.QueueListener(records, handler)
            listener.start()
            _listeners.append(listener)
            atexit.register(listener.stop)  # writes what is still queued
            logger.handlers = [_RecordQueueHandler(records, self.name)]

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
    from bentoml._internal.configuration.containers import BentoMLContainer

    from models.lifecycle.store import pid_alive

    provider = BentoMLContainer.prometheus_multiproc_dir
    base = Path(provider.get())
    if base.name.startswith("serve-"):  # already patched in this process
        return
    for old in base.glob("serve-*"):
        pid = old.name.removeprefix("serve-")
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    provider.set(str(base / f"serve-{os.getpid()}"))



def authorize_dependency(proxy: Any, token: str) -> None:
    """Send `Authorization: Bearer <token>` on every call of a `bentoml.depends` client.

    BentoML 1.4's RemoteProxy takes no token (its AsyncClient reads one only from
    BENTO_CLOUD_API_KEY, its cloud's variable); its sessions are made from the client's
    `default_headers`, so the header goes there (and into a session already made)."""
    client = proxy.to_async
    value = f"Bearer {token}"
    client.default_headers["Authorization"] = value  # the same dict its session manager uses
    manager = client._session_manager
    if manager._session is not None:
        manager._session.headers["Authorization"] = value


def client_errors_in_one_line() -> None:
    """Log a client's error (a 400 or another 4xx) as one WARNING line that names the
    endpoint, the status and the fields at fault, never their values; keep ERROR with the
    traceback for the service's own faults. And head a 400 with the request it was about
    (`2 validation errors in the /recommend request`), not BentoML's `2 validation error
    for Input`.

    BentoML logs every 400 as `Exception on /recommend [POST]` at ERROR with a traceback
    that repeats the client's input (pydantic errors carry it)."""
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    app_module = importlib.import_module("_bentoml_impl.server.app")
    current = app_module.log_exception
    original = _unpatched(current)

    def log_exception(request: Any, exc_info: Any = True) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, ValidationError):
            fields = ", ".join(f"{'.'.join(str(x) for x in e['loc']) or '(body)'} ({e['type']})"
                               for e in err.errors(include_input=False)[:20])  # fmt: skip
            _client_log.warning("%s %s 400: %s", request.method, request.url.path, fields)
        elif isinstance(err, BentoMLException) and 400 <= err.error_code.value < 500:
            _client_log.warning("%s %s %d: %s", request.method, request.url.path, err.error_code.value,
                                type(err).__name__)  # fmt: skip
        else:
            original(request, exc_info)

    app_module.log_exception = _replacing(original, log_exception)

    factory = app_module.ServiceAppFactory
    wrapper = factory.api_endpoint_wrapper
    original_wrapper = _unpatched(wrapper)

    async def api_endpoint_wrapper(self: Any, name: str, request: Any) -> Any:
        response = await original_wrapper(self, name, request)
        if response.status_code == 400:
            body = json.loads(response.body)
            if isinstance(body, dict) and isinstance(body.get("detail"), list):
                n = len(body["detail"])
                body["error"] = f"{n} validation error{'s' * (n != 1)} in the {self.service.apis[name].route} request"
                response.body = json.dumps(body).encode()
                response.headers["content-length"] = str(len(response.body))
        return response

    factory.api_endpoint_wrapper = _replacing(original_wrapper, api_endpoint_wrapper)


def forbid_unknown_fields(service: Any) -> None:
    """Make every API of `service` refuse fields it does not know (a 400 naming them):
    BentoML's input models ignore them, so `{"user_id": "u1", "K": 5}` answered with the
    default k and no word about the typo."""
    for api in service.apis.values():
        spec = api.input_spec
        if spec.model_config.get("extra") != "forbid":
            spec.model_config["extra"] = "forbid"
            spec.model_rebuild(force=True)


def json_server_logs() -> None:
    """Log as one JSON object a line (time, level, logger, BentoML's component, message)
    through the handlers BentoML's server set up, for log shippers. Call it in a worker."""
    from pythonjsonlogger.json import JsonFormatter

    formatter = JsonFormatter("%(asctime)s %(levelname)s %(name)s %(component)s %(message)s",
                              rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})  # fmt: skip
    for logger in (logging.getLogger(), logging.getLogger("bentoml")):
        for handler in logger.handlers:
            handler.setFormatter(formatter)



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


# What a pickle from the network may name (numpy 2): arrays (out-of-band buffers, protocol 5,
# or in-band), their dtypes, and numpy scalars. Containers and plain values need no global.
NUMPY_GLOBALS = frozenset({("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.numeric", "_frombuffer"),
                           ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar")})  # fmt: skip


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the pickle names {module}.{name}: only numpy arrays, dtypes and scalars are "
                                     "accepted (application/vnd.bentoml+pickle)")  # fmt: skip


def numpy_only_unpickling() -> None:
    """Load every `application/vnd.bentoml+pickle` body (requests and the answers of
    dependency services) with NumpyOnlyUnpickler; a refused one is BadInput (400)."""
    from bentoml.exceptions import BadInput

    serde = importlib.import_module("_bentoml_impl.serde")
    current = serde.PickleSerde.__dict__["deserialize_value"]
    original = _unpatched(current)

    def deserialize_value(self: Any, payload: Any) -> Any:
        data = b"".join(payload.data)
        lengths = payload.metadata.get("buffer-lengths")
        try:
            if lengths is None:
                return NumpyOnlyUnpickler(io.BytesIO(data)).load()
            sizes = [int(n) for n in lengths.split(",")]
            view = memoryview(data)
            start, buffers = sizes[0], []
            for size in sizes[1:]:
                buffers.append(pickle.PickleBuffer(view[start:start + size]))
                start += size
            return NumpyOnlyUnpickler(io.BytesIO(view[:sizes[0]]), buffers=buffers).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                OverflowError) as err:  # what a malformed payload raises (a client error)
            raise BadInput(f"application/vnd.bentoml+pickle body refused: {err}") from err

    serde.PickleSerde.deserialize_value = _replacing(original, deserialize_value)
