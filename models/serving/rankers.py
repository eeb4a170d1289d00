"""The API service's view of the ranking service: the local dependency that `bentoml serve`
starts, or several ranking services run on their own (RECSYS_RANKER_URLS), called
round-robin. Scoring is idempotent, so a call that fails in any way (cannot connect, loses
its connection, times out, or gets an error answer) is retried on the next one; one that
could not be reached or timed out is skipped for a cool-down. When every one failed, the
caller gets a 503 (ServiceUnavailable; the request guard adds Retry-After)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from typing import Any

import aiohttp
import bentoml
from bentoml.exceptions import BentoMLException, ServiceUnavailable


@functools.cache
def _calls() -> Any:
    return bentoml.metrics.Counter(
        name="recsys_ranker_calls_total",
        documentation="Calls from the API to each ranking service, by outcome (ok, or the error type)",
        labelnames=["ranker", "outcome"],
    )


# Every way a ranking call can fail: no connection or a lost one, no answer in time, an
# error answer (BentoML's client maps each HTTP error status to a BentoMLException).
RANKER_FAILURES: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, BentoMLException)
# Failures that say the ranking service itself is out of reach: skip it for a while.
_UNREACHABLE: tuple[type[BaseException], ...] = (aiohttp.ClientConnectionError, TimeoutError)


class RankerPool:
    def __init__(self, clients: list[Any], names: list[str], timeout_s: float, cooldown_s: float = 5.0) -> None:
        if not clients or len(clients) != len(names):
            raise ValueError(f"{len(clients)} ranking clients for {len(names)} names")
        self.clients = clients
        self.names = names
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._down_until = [0.0] * len(clients)
        self._next = itertools.cycle(range(len(clients)))

    def _order(self) -> list[int]:
        """Every client once, starting with the next in turn; those cooling down last."""
        start = next(self._next)
        order = [(start + i) % len(self.clients) for i in range(len(self.clients))]
        now = time.monotonic()
        return sorted(order, key=lambda i: self._down_until[i] > now)

    async def call(self, api: str, *args: Any) -> Any:
        last: BaseException | None = None
        for i in self._order():
            try:
                async with asyncio.timeout(self.timeout_s):
                    result = await getattr(self.clients[i].to_async, api)(*args)
            except RANKER_FAILURES as err:
                if isinstance(err, _UNREACHABLE):
                    self._down_until[i] = time.monotonic() + self.cooldown_s
                _calls().labels(ranker=self.names[i], outcome=type(err).__name__).inc()
                last = err
                continue
            _calls().labels(ranker=self.names[i], outcome="ok").inc()
            return result
        raise ServiceUnavailable(
            f"ranking service unavailable ({', '.join(self.names)}): {type(last).__name__}: {last}"
        ) from last

    async def each(self, api: str) -> dict[str, Any]:
        """`api` on every reachable ranking service, by name (for consistency checks)."""
        out: dict[str, Any] = {}
        for client, name in zip(self.clients, self.names):
            try:
                async with asyncio.timeout(self.timeout_s):
                    out[name] = await getattr(client.to_async, api)()
            except RANKER_FAILURES:
                continue
        if not out:
            raise ServiceUnavailable(f"ranking service unreachable ({', '.join(self.names)})")
        return out
