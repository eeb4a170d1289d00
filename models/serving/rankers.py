"""The API service's view of the ranking service: the local dependency that `bentoml serve`
starts, or several ranking services run on their own (RECSYS_RANKER_URLS), called
round-robin. Scoring is idempotent, so a call that cannot connect (or loses its
connection) is retried on the next one, and that one is skipped for a cool-down."""

from __future__ import annotations

import functools
import itertools
import time
from typing import Any

import aiohttp
import bentoml
from bentoml.exceptions import ServiceUnavailable


@functools.cache
def _calls() -> Any:
    return bentoml.metrics.Counter(
        name="recsys_ranker_calls_total",
        documentation="Calls from the API to each ranking service, by outcome (ok, or the connection error)",
        labelnames=["ranker", "outcome"],
    )


class RankerPool:
    def __init__(self, clients: list[Any], names: list[str], cooldown_s: float = 5.0) -> None:
        if not clients or len(clients) != len(names):
            raise ValueError(f"{len(clients)} ranking clients for {len(names)} names")
        self.clients = clients
        self.names = names
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
        last: aiohttp.ClientError | None = None
        for i in self._order():
            try:
                result = await getattr(self.clients[i].to_async, api)(*args)
            except aiohttp.ClientConnectionError as err:
                # Refused, reset or disconnected: try the next ranking service.
                self._down_until[i] = time.monotonic() + self.cooldown_s
                _calls().labels(ranker=self.names[i], outcome=type(err).__name__).inc()
                last = err
                continue
            except aiohttp.ClientError as err:
                raise ServiceUnavailable(f"ranking service {self.names[i]} failed: {err}") from err
            _calls().labels(ranker=self.names[i], outcome="ok").inc()
            return result
        raise ServiceUnavailable(f"ranking service unreachable ({', '.join(self.names)}): {last}") from last

    async def each(self, api: str) -> dict[str, Any]:
        """`api` on every reachable ranking service, by name (for consistency checks)."""
        out: dict[str, Any] = {}
        for client, name in zip(self.clients, self.names):
            try:
                out[name] = await getattr(client.to_async, api)()
            except aiohttp.ClientConnectionError:
                continue
        if not out:
            raise ServiceUnavailable(f"ranking service unreachable ({', '.join(self.names)})")
        return out
