"""models/serving/bentoml_patches.py: the served OpenAPI document is fixed, and the fixes are
still needed (if BentoML's own document becomes right, the second test says so)."""

from __future__ import annotations

import asyncio
import importlib
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from models.serving.bentoml_patches import GUARD_RESPONSES

PUBLIC = ("/recommend", "/rank", "/score", "/model")


@pytest.fixture(scope="module")
def docs() -> tuple[dict[str, Any], dict[str, Any]]:
    """(served document, BentoML's own document) for ApiService."""
    import service

    openapi_module = importlib.import_module("_bentoml_sdk.service.openapi")
    served = service.ApiService.openapi_spec.asdict()
    original = openapi_module.generate_spec.__wrapped__(service.ApiService).asdict()
    return served, original


def test_served_document_is_fixed(docs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    served, _ = docs
    detail = served["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]
    assert {"type": "array"}.items() <= detail["anyOf"][1].items()
    for path in PUBLIC:
        responses = served["paths"][path]["post"]["responses"]
        assert set(GUARD_RESPONSES) <= {str(code) for code in responses}
    for path in ("/recommend", "/rank", "/score"):
        assert served["paths"][path]["post"]["requestBody"]["required"] is True
    challenger = model_response(served)["properties"]["challenger"]
    assert challenger["nullable"] is True and challenger["allOf"][0]["$ref"].endswith("/VersionInfo")


def model_response(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["paths"]["/model"]["post"]["responses"][200]["content"]["application/json"]["schema"]


def test_bentomls_own_document_still_needs_the_fixes(docs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    _, original = docs
    detail = original["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]
    assert detail.get("type") == "string", "BentoML documents 400 details right now: drop the fix"
    assert not original["paths"]["/recommend"]["post"]["requestBody"].get("required")
    assert "nullable" not in model_response(original)["properties"]["challenger"]


def test_media_types_are_computed_once_per_output_type(monkeypatch: pytest.MonkeyPatch) -> None:
    import service

    io_models = importlib.import_module("_bentoml_sdk.io_models")
    output = service.RankerService.apis["score"].output_spec
    assert issubclass(output, io_models.IORootModel)  # the slow path: schema per response
    calls = []
    original = output.model_json_schema

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(output, "model_json_schema", counting)
    first = output.mime_type()
    for _ in range(5):
        assert output.mime_type() == first == "application/json"
    assert len(calls) <= 1


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "bentoml-own"])
def test_batcher_wait_is_capped(patched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real CorkDispatcher under a burst of slow batches learns to hold requests as long
    as they queued (~tens of ms), and then held a lone request that long at low load. With
    the patch the wait it learns and the time it holds a lone request stay near the cap;
    BentoML's own code learns more than the cap (if not, the patch can go)."""
    import service  # applies the patch with the setting

    dispatcher = importlib.import_module("bentoml._internal.marshal.dispatcher")
    cap = service.settings.max_batch_wait_ms / 1000
    batch_s = max(0.1, 50 * cap)  # queued requests wait up to this long: far above the cap
    optimizer = dispatcher.Optimizer
    if not patched:
        monkeypatch.setattr(optimizer, "trigger_refresh", optimizer.trigger_refresh.__wrapped__)
    refresh = optimizer.trigger_refresh
    refreshes: list[tuple[float, float]] = []  # (mean wait it learned from, wait it set)

    def observed_refresh(self: Any) -> None:
        refresh(self)
        if self.o_stat:
            refreshes.append((statistics.mean(w for *_, w in self.o_stat), self.wait))

    monkeypatch.setattr(optimizer, "trigger_refresh", observed_refresh)
    monkeypatch.setattr(optimizer, "INTERVAL_REFRESH_PARAMS", 0.2)  # BentoML's 5 s, shortened

    def learned_from_long_waits() -> bool:
        return any(seen > 2 * cap for seen, _ in refreshes[-3:])

    async def drive() -> float:
        cork = dispatcher.CorkDispatcher(max_latency_in_ms=60_000, max_batch_size=64,
                                         fallback=lambda: None, get_batch_size=lambda _: 1)  # fmt: skip

        async def slow_batch(batch: Sequence[int]) -> list[int]:
            await asyncio.sleep(batch_s)
            return list(batch)

        call = cork(slow_batch)
        deadline = time.monotonic() + 60
        calls = []
        try:
            # Open loop (requests arrive while a batch is busy and wait for it): a burst.
            while not learned_from_long_waits() and time.monotonic() < deadline:
                calls.append(asyncio.ensure_future(call(1)))
                await asyncio.sleep(batch_s / 10)
            await asyncio.gather(*calls)
            assert learned_from_long_waits(), f"no refresh learned from long waits in 60 s: {refreshes[-5:]}"
            await call(1)  # alone: how long does the dispatcher hold it?
            return float(cork.optimizer.o_stat[-1][2])  # the dispatcher's own record of that wait
        finally:
            cork.shutdown()

    held_alone = asyncio.run(drive())
    learned = [wait for seen, wait in refreshes if seen > 2 * cap]
    if patched:
        assert max(learned) <= cap, f"learned waits {learned} over the cap {cap}"
        # The controller ticks every 1 ms; a busy machine adds some: far below the ~batch_s uncapped.
        assert held_alone < cap + batch_s / 10, f"a lone request was held {held_alone * 1000:.1f} ms"
    else:
        assert max(learned) > cap, "BentoML no longer learns a wait above the cap: drop cap_batch_wait"
        assert held_alone > cap, f"BentoML held a lone request only {held_alone * 1000:.1f} ms"


@pytest.mark.parametrize("service_name", ["ApiService", "RankerService"])
def test_tracing_middleware_only_with_an_exporter(service_name: str) -> None:
    """BentoML's own stack has the OpenTelemetry middleware; ours drops it while no
    exporter is configured and keeps it when one is."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    import service  # applies the patch

    svc = getattr(service, service_name)
    svc.inject_config()
    factory = ServiceAppFactory(svc, is_main=service_name == "ApiService")
    original = type(factory).middlewares.fget.__wrapped__

    def has_tracing(stack: list[Any]) -> bool:
        return any(m.cls is OpenTelemetryMiddleware for m in stack)

    exporter = BentoMLContainer.config.tracing.exporter_type
    assert exporter.get() is None
    assert has_tracing(original(factory)), "BentoML no longer adds tracing unasked: drop the patch"
    assert not has_tracing(factory.middlewares)
    exporter.set("otlp")
    try:
        assert has_tracing(factory.middlewares)
    finally:
        exporter.set(None)


# BentoML's own config names the deprecated `pythonjsonlogger.jsonlogger` module.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("patched", [True, False], ids=["patched", "bentoml-own"])
def test_each_monitor_name_writes_its_own_files(
    patched: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the patch, two monitor names in one process keep their records apart; without
    it (BentoML's own logger set-up) the second name takes the first one's records — if
    that stops happening, BentoML fixed it and the patch can go."""
    import bentoml
    from bentoml._internal.monitoring.default import DefaultMonitor

    from models.serving.bentoml_patches import drain_monitor_logs, separate_monitor_logs

    separate_monitor_logs(max_bytes=1 << 20, backups=1)
    if not patched:
        monkeypatch.setattr(DefaultMonitor, "_init_logger", DefaultMonitor._init_logger.__wrapped__)
    names = [f"recsys_test_{tmp_path.name}_{x}" for x in ("a", "b")]
    for name in (names[0], names[1], names[0], names[0]):
        with bentoml.monitor(name, monitor_options={"log_path": str(tmp_path)}) as mon:
            mon.log(name, name="which", role="feature", data_type="categorical")
    drain_monitor_logs()
    found = {n: [json.loads(line)["which"] for line in (tmp_path / n / "data" / "data.0.log").read_text().splitlines()]
             for n in names}  # fmt: skip
    if patched:
        assert found == {names[0]: [names[0]] * 3, names[1]: [names[1]]}
    else:
        assert found[names[1]] != [names[1]], "BentoML keeps monitor names apart now: drop separate_monitor_logs"


def _monitor_lines(name: str, log_path: Path, n: int, payload: int) -> None:
    import bentoml

    for i in range(n):
        with bentoml.monitor(name, monitor_options={"log_path": str(log_path)}) as mon:
            mon.log(i, name="i", role="feature", data_type="numerical")
            mon.log("x" * payload, name="payload", role="feature", data_type="categorical")


@pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")
def test_monitor_logs_are_bounded_and_written_off_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BentoML's own files rotate daily and are never pruned, and it encodes and writes on
    the caller's thread (the event loop): here at most backups + 1 files of max_bytes per
    worker, written by a thread, and the newest records are kept."""
    import threading

    from models.serving import bentoml_patches

    writers: set[str] = set()
    emit = bentoml_patches._BoundedFileHandler.emit

    def spy(self: Any, record: Any) -> None:
        writers.add(threading.current_thread().name)
        emit(self, record)

    monkeypatch.setattr(bentoml_patches._BoundedFileHandler, "emit", spy)
    max_bytes, backups = 20_000, 2
    bentoml_patches.separate_monitor_logs(max_bytes=max_bytes, backups=backups)
    name = f"recsys_bound_{tmp_path.name}"
    _monitor_lines(name, tmp_path, n=400, payload=500)  # ~200 KB of records
    bentoml_patches.drain_monitor_logs()
    files = sorted((tmp_path / name / "data").iterdir())
    assert len(files) == backups + 1, [f.name for f in files]
    assert all(f.stat().st_size <= max_bytes + 1_000 for f in files)
    newest = [json.loads(line)["i"] for line in (tmp_path / name / "data" / "data.0.log").read_text().splitlines()]
    assert newest[-1] == 399
    assert writers and threading.current_thread().name not in writers, writers


@pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")
def test_an_unwritable_monitor_folder_never_fails_the_caller(tmp_path: Path) -> None:
    from models.serving import bentoml_patches
    from models.serving.monitoring import monitor_log_errors

    bentoml_patches.separate_monitor_logs(max_bytes=1 << 20, backups=1)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # as root, permissions do not stop a write; this does
    name = f"recsys_unwritable_{tmp_path.name}"
    _monitor_lines(name, blocked, n=3, payload=10)  # must not raise
    bentoml_patches.drain_monitor_logs()
    counted = monitor_log_errors().labels(monitor=name, reason="unwritable_dir")._value.get()
    assert counted >= 1


def test_dependency_clients_take_no_token_so_the_header_is_set_by_hand() -> None:
    """BentoML's RemoteProxy (what `bentoml.depends` gives) has no token parameter: if it
    gets one, `authorize_dependency` can go."""
    import inspect

    from _bentoml_impl.client import RemoteProxy

    from models.serving.bentoml_patches import authorize_dependency

    assert "token" not in inspect.signature(RemoteProxy.__init__).parameters
    proxy = RemoteProxy("http://127.0.0.1:9")
    authorize_dependency(proxy, "t0ken")
    assert proxy.to_async._session_manager._headers["Authorization"] == "Bearer t0ken"


async def _renew_during_a_request() -> tuple[str, bool, bool]:
    """A real aiohttp server on loopback holds one request open while BentoML's session
    manager (a dependency's client) renews its session. Returns (how the held request
    ended, whether the old session was closed while it was held, whether it is closed
    after the request, polled with a deadline)."""
    from _bentoml_impl.client.proxy2 import SessionManager
    from aiohttp import web

    from models.serving.bentoml_patches import _in_use

    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="done")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/fast", fast)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # max_age 0: every get_session finds the session due for renewal.
    manager = SessionManager(f"http://127.0.0.1:{port}", timeout=10, headers={}, max_age=0.0)
    try:
        old = await manager.get_session()

        async def held() -> str:
            async with old.get("/slow") as resp:
                return await resp.text()

        request = asyncio.create_task(held())
        await asyncio.wait_for(arrived.wait(), 5)
        new = await manager.get_session()  # renewal with the request in flight
        assert new is not old and not new.closed
        async with new.get("/fast") as resp:
            assert await resp.text() == "fast"
        closed_while_held = old.closed
        # What the patch waits for (aiohttp internals): the held request keeps the old
        # session's connector in use.
        assert closed_while_held or _in_use(old.connector)
        release.set()
        try:
            outcome = await asyncio.wait_for(request, 5)
        except aiohttp.ClientConnectionError as err:
            outcome = f"{type(err).__name__}: {err}"
        deadline = asyncio.get_running_loop().time() + 5
        while not old.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return outcome, closed_while_held, old.closed
    finally:
        await manager.close()
        await runner.cleanup()


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "bentoml-own"])
def test_renewed_runner_session_closes_only_when_idle(patched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """BentoML's own SessionManager closes the session it renews with a request still in
    flight on it (the 500s "Server disconnected" under bursts); the patched one lets the
    request finish and closes the old session afterwards. If BentoML's own stops failing
    the request, the patch can go."""
    from _bentoml_impl.client.proxy2 import SessionManager

    from models.serving.bentoml_patches import retire_sessions_when_idle

    retire_sessions_when_idle()
    if not patched:
        monkeypatch.setattr(SessionManager, "get_session", SessionManager.get_session.__wrapped__)
        monkeypatch.setattr(SessionManager, "close", SessionManager.close.__wrapped__)
    outcome, closed_while_held, closed_after = asyncio.run(_renew_during_a_request())
    if patched:
        assert (outcome, closed_while_held, closed_after) == ("done", False, True)
    else:
        assert closed_while_held and outcome != "done", (
            f"BentoML no longer closes a renewed session under a request ({outcome!r}): "
            "drop retire_sessions_when_idle"
        )


class _Opens:
    """A pickle that, loaded, opens (creates) a file: what a hostile body could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _pickle_payload(value: Any) -> Any:
    """A body as BentoML's client sends it (protocol 5, out-of-band buffers)."""
    serde = importlib.import_module("_bentoml_impl.serde")
    payload = serde.PickleSerde().serialize_value(value)
    return serde.Payload([bytes(chunk) for chunk in payload.data], dict(payload.metadata))


def test_pickled_arrays_and_scalars_still_load() -> None:
    import numpy as np

    import service  # noqa: F401  (applies the patches)

    serde = importlib.import_module("_bentoml_impl.serde")
    value = {"features": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.float32(2.5), "rows": [1, "a", None]}
    got = serde.PickleSerde().deserialize_value(_pickle_payload(value))
    assert np.array_equal(got["features"], value["features"]) and got["features"].dtype == np.float32
    assert got["n"] == np.float32(2.5) and got["rows"] == [1, "a", None]


@pytest.mark.parametrize("out_of_band", [True, False], ids=["with buffer lengths", "one pickle"])
def test_a_pickle_naming_any_other_global_is_refused_and_never_runs(tmp_path: Path, out_of_band: bool) -> None:
    import pickle

    from bentoml.exceptions import BadInput

    import service  # noqa: F401

    serde = importlib.import_module("_bentoml_impl.serde")
    target = tmp_path / "ran"
    payload = (_pickle_payload({"features": _Opens(target)}) if out_of_band
               else serde.Payload([pickle.dumps(_Opens(target))], {}))  # fmt: skip
    with pytest.raises(BadInput, match=r"names io\.open"):
        serde.PickleSerde().deserialize_value(payload)
    assert not target.exists()


def test_bentomls_own_unpickling_still_loads_any_global() -> None:
    """The day BentoML restricts what its pickle serde loads, this fails: drop the patch."""
    from collections import OrderedDict

    import service  # noqa: F401

    serde = importlib.import_module("_bentoml_impl.serde")
    own = serde.PickleSerde.deserialize_value.__wrapped__
    assert own(serde.PickleSerde(), _pickle_payload(OrderedDict(a=1))) == OrderedDict(a=1)


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "bentoml-own"])
def test_an_apis_local_caller_is_built_once_per_instance(patched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """BentoML builds it (with `inspect.signature`) at every lookup; the day it stops, the
    bentoml-own case fails: drop `cache_local_callers`."""
    import service

    api_method = importlib.import_module("_bentoml_sdk.method").APIMethod
    if not patched:
        monkeypatch.setattr(api_method, "_local_call", api_method._local_call.__wrapped__)
    method = service.RankerService.apis["model_tags"]
    first, second = (object.__new__(service.RankerService.inner) for _ in range(2))
    assert (method._local_call(first) is method._local_call(first)) is patched
    assert method._local_call(first) is not method._local_call(second)  # never shared across instances


def _sent_messages(response: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(response({"type": "http"}, None, send))
    return sent


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "bentoml-own"])
def test_a_serialised_body_goes_out_in_one_piece(patched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer is one body message and the internal request one chunk; BentoML's own
    send each chunk of the payload apart (the bentoml-own case fails once it stops)."""
    import numpy as np

    import service  # noqa: F401

    io_models = importlib.import_module("_bentoml_sdk.io_models")
    serde = importlib.import_module("_bentoml_impl.serde")
    if not patched:
        monkeypatch.setattr(io_models.IterableResponse, "__call__", io_models.IterableResponse.__call__.__wrapped__)
        monkeypatch.setattr(serde.Payload, "aiter_bytes", serde.Payload.aiter_bytes.__wrapped__)
    payload = serde.PickleSerde().serialize_value(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert len(payload.data) == 2  # the pickle's header, then the array's own buffer
    whole = b"".join(bytes(chunk) for chunk in payload.data)

    sent = _sent_messages(io_models.IterableResponse(content=payload.data, headers=payload.headers))
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert b"".join(bytes(m["body"]) for m in bodies) == whole and not bodies[-1]["more_body"]
    assert (len(bodies) == 1) is patched

    async def chunks() -> list[bytes]:
        return [bytes(c) async for c in payload.aiter_bytes()]

    got = asyncio.run(chunks())
    assert b"".join(got) == whole
    assert (len(got) == 1) is patched
