"""The ranker pool's failover, in-process, over clients that fail in each way a ranking
call can: refused, timed out, an error answer. (tests/e2e/test_scaling.py does it with
real ranking services, one of them frozen.)"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from bentoml.exceptions import InternalServerError, ServiceUnavailable

from models.serving.rankers import RankerPool

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")


class Client:
    """The shape of BentoML's client as the pool uses it: `client.to_async.<api>(...)`."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.calls = 0
        self.to_async = self

    async def score(self, features: Any) -> str:
        self.calls += 1
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        if self.behaviour == "refuse":
            raise aiohttp.ClientConnectionError("connection refused")
        if self.behaviour == "error":
            raise InternalServerError("boom")
        return f"scored by {self.behaviour}"


@pytest.mark.parametrize("failing", ["hang", "refuse", "error"])
def test_every_kind_of_failure_moves_on_to_the_next_ranker(failing: str) -> None:
    bad, good = Client(failing), Client("ok")
    pool = RankerPool([bad, good], ["bad", "good"], timeout_s=0.2)

    async def scenario() -> list[str]:
        return [await pool.call("score", [1.0]) for _ in range(4)]

    assert asyncio.run(scenario()) == ["scored by ok"] * 4
    assert bad.calls >= 1 and good.calls == 4
    if failing in ("hang", "refuse"):
        assert bad.calls == 1, "an unreachable ranker is skipped for its cool-down"


@pytest.mark.parametrize("failing", ["hang", "refuse", "error"])
def test_with_every_ranker_failing_the_call_is_a_503(failing: str) -> None:
    pool = RankerPool([Client(failing), Client(failing)], ["a", "b"], timeout_s=0.2)
    with pytest.raises(ServiceUnavailable, match="ranking service unavailable"):
        asyncio.run(pool.call("score", [1.0]))
