"""Scale-out behind one address: the API reaches its ranking services through one URL (a
Kubernetes Service), here a round-robin TCP proxy that sends each new connection to the
next of its backends. A ranking service added under load must get its share of the calls
soon, with no failed request: the API's connections to the ranking service are renewed
every `RECSYS_RUNNER_MAX_AGE_S` seconds, and the old ones are closed only when idle
(models/serving/bentoml_patches.py, `retire_sessions_when_idle`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import httpx
import pytest

from tests.helpers import PROJECT_ROOT, ServerProcess, start_server
from training.pipeline import TrainResult

pytestmark = pytest.mark.e2e

CLIENTS = 16
RATE = 160.0  # requests/s in all: enough calls to count, CPU left for the servers on 2 cores
SPREAD_WITHIN_S = 60.0
WINDOW_S = 10.0  # the share is counted over the last WINDOW_S seconds
MIN_SHARE = 0.3


class RoundRobinProxy:
    """A TCP proxy on 127.0.0.1, on an event loop in a thread of its own: each new
    connection goes to the next backend of its current list (a Service's endpoints)."""

    def __init__(self, backends: list[str]) -> None:
        self._backends = [self._address(url) for url in backends]
        self._turn = 0
        self.connections: Counter[str] = Counter()  # by backend "host:port"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.url = "http://127.0.0.1:{}".format(self._server.sockets[0].getsockname()[1])

    @staticmethod
    def _address(url: str) -> tuple[str, int]:
        parsed = urlparse(url)
        assert parsed.hostname == "127.0.0.1" and parsed.port, url
        return parsed.hostname, parsed.port

    def add(self, url: str) -> None:
        address = self._address(url)
        self._loop.call_soon_threadsafe(self._backends.append, address)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self._backends[self._turn % len(self._backends)]
        self._turn += 1
        self.connections[f"{host}:{port}"] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass  # the other side went away: close this one too
        finally:
            sink.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class Load:
    """CLIENTS clients on /recommend, paced to RATE requests/s in all, in a thread, until
    `stop()` or `max_s` seconds (bounded in time and count)."""

    def __init__(self, url: str, users: list[str], max_s: float) -> None:
        self.url, self.users, self.max_s = url, users, max_s
        self.outcomes: Counter[str] = Counter()  # "200", other statuses, error names
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        interval = CLIENTS / RATE
        timeout = aiohttp.ClientTimeout(total=35)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def client(c: int) -> None:
                i = c
                while not self._stop.is_set() and time.monotonic() < deadline and i < RATE * self.max_s:
                    started = time.monotonic()
                    body = {"user_id": self.users[i % len(self.users)], "k": 10}
                    try:
                        async with session.post(f"{self.url}/recommend", json=body) as resp:
                            await resp.read()
                            self.outcomes[str(resp.status)] += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                        self.outcomes[type(err).__name__] += 1
                    i += CLIENTS
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

            await asyncio.gather(*(client(c) for c in range(CLIENTS)))

    @property
    def ok(self) -> int:
        return self.outcomes["200"]

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load did not stop"
        return self.outcomes


def scored(ranker: ServerProcess) -> float:
    """Requests the ranking service answered on /score (its own BentoML counter)."""
    text = httpx.get(f"{ranker.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bentoml_service_request_total") and 'endpoint="/score"' in line)  # fmt: skip


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture
def servers(trained: TrainResult, bentoml_home: Path) -> Iterator[dict[str, object]]:
    env = {"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": str(trained.tag)}
    started: list[ServerProcess] = []
    proxy: RoundRobinProxy | None = None
    try:
        started.append(start_server(["service:RankerService"], cwd=PROJECT_ROOT, env=env))
        proxy = RoundRobinProxy([started[0].url])
        started.append(start_server(["service:ApiService"], cwd=PROJECT_ROOT,
                                    env={**env, "RECSYS_RANKER_URLS": proxy.url}))  # fmt: skip
        yield {"env": env, "started": started, "proxy": proxy}
    finally:
        for proc in reversed(started):
            proc.stop()
        if proxy is not None:
            proxy.close()


def test_a_ranking_service_added_behind_the_address_gets_its_share(
    servers: dict[str, object], trained: TrainResult
) -> None:
    env, started, proxy = servers["env"], servers["started"], servers["proxy"]
    assert isinstance(started, list) and isinstance(proxy, RoundRobinProxy) and isinstance(env, dict)
    ranker_a, api = started
    load = Load(api.url, [f"u{i}" for i in range(200)], max_s=SPREAD_WITHIN_S + 60)
    try:
        wait_for(lambda: load.ok >= 100, 30, f"100 answered requests before scaling out ({load.outcomes})")
        ranker_b = start_server(["service:RankerService"], cwd=PROJECT_ROOT, env=env)
        started.append(ranker_b)
        proxy.add(ranker_b.url)
        added = time.monotonic()
        samples: list[tuple[float, float, float]] = []  # (time, /score calls of A, of B)
        share = 0.0
        while time.monotonic() - added < SPREAD_WITHIN_S:
            now = time.monotonic()
            samples.append((now, scored(ranker_a), scored(ranker_b)))
            past = [s for s in samples if s[0] <= now - WINDOW_S]
            if past:
                _, a0, b0 = past[-1]
                a, b = samples[-1][1] - a0, samples[-1][2] - b0
                share = b / (a + b) if a + b >= 50 else 0.0
                if share >= MIN_SHARE:
                    break
            time.sleep(1.0)
    finally:
        outcomes = load.stop()
    history = [(round(t - added), int(a), int(b)) for t, a, b in samples[::5]]
    assert share >= MIN_SHARE, (
        f"the added ranking service took {share:.0%} of the last {WINDOW_S:.0f} s of calls, "
        f"not {MIN_SHARE:.0%}, within {SPREAD_WITHIN_S:.0f} s; (s after adding, calls A, B): {history}; "
        f"proxy connections: {dict(proxy.connections)}"
    )
    assert set(outcomes) == {"200"}, f"failed requests: {outcomes}"
    print(f"share {share:.0%} after {samples[-1][0] - added:.0f} s; requests {dict(outcomes)}; "
          f"proxy connections {dict(proxy.connections)}")
