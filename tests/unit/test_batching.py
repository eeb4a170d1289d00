"""models/serving/batching.py: an API worker's concurrent scoring calls are joined, each caller
gets exactly its own scores, and nothing is held back, lost or mixed up."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from models.serving.batching import JoinedCalls


class FakeRanker:
    """Scores a row as the sum of its values after `delay_s`; records every call."""

    def __init__(self, delay_s: float = 0.01, fail_with: Exception | None = None) -> None:
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.calls: list[int] = []  # rows per call
        self.out = 0
        self.most_out = 0

    async def __call__(self, features: np.ndarray) -> list[float]:
        self.calls.append(len(features))
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_with is not None:
                raise self.fail_with
            return features.sum(axis=1).tolist()
        finally:
            self.out -= 1


def requests(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((int(rng.integers(1, 9)), 3)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("max_in_flight", [1, 2, 4])
@pytest.mark.parametrize("max_rows", [20, 4096])
def test_concurrent_calls_are_joined_and_each_gets_its_own_scores(max_in_flight: int, max_rows: int) -> None:
    ranker = FakeRanker()
    joined = JoinedCalls(ranker, "score", max_rows=max_rows, max_in_flight=max_in_flight)
    batch = requests(60)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(joined(x) for x in batch))

    results = asyncio.run(main())
    for x, scores in zip(batch, results):
        np.testing.assert_allclose(scores, x.sum(axis=1), rtol=1e-6)
    assert sum(ranker.calls) == sum(len(x) for x in batch)
    assert len(ranker.calls) < len(batch) / 2  # joined, not one call each
    assert ranker.most_out <= max_in_flight
    # No call over max_rows, except a single request that is bigger on its own.
    assert all(rows <= max(max_rows, max(len(x) for x in batch)) for rows in ranker.calls)


@pytest.mark.parametrize("yields", [0, 3])
def test_a_lone_call_goes_out_after_its_event_loop_turns_only(yields: int) -> None:
    """No timer: with nothing out, a call reaches the ranking service `yields` event-loop
    turns after its request, whatever the ranking service's delay."""
    ranker = FakeRanker(delay_s=0.2)
    joined = JoinedCalls(ranker, "score", max_rows=100, max_in_flight=1, yields=yields)

    async def main() -> None:
        task = asyncio.create_task(joined(np.ones((2, 3), np.float32)))
        await asyncio.sleep(0)  # the task runs up to its await
        for _ in range(yields + 1):  # the sending task starts, and takes its turns
            assert ranker.calls == []
            await asyncio.sleep(0)
        assert ranker.calls == [2]
        np.testing.assert_allclose(await task, [3.0, 3.0])

    asyncio.run(main())


def test_requests_made_during_the_turns_join_the_call() -> None:
    ranker = FakeRanker(delay_s=0.01)
    joined = JoinedCalls(ranker, "score", max_rows=100, max_in_flight=1, yields=3)

    async def main() -> None:
        first = asyncio.create_task(joined(np.ones((1, 3), np.float32)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the sending task has started its turns
        rest = [asyncio.create_task(joined(np.ones((1, 3), np.float32))) for _ in range(2)]
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert ranker.calls == [3]


def test_an_error_reaches_every_caller_of_its_call_and_later_calls_work() -> None:
    ranker = FakeRanker(fail_with=ConnectionError("ranker down"))
    joined = JoinedCalls(ranker, "score", max_rows=4096, max_in_flight=1)
    batch = requests(10)

    async def main() -> list[Any]:
        return await asyncio.gather(*(joined(x) for x in batch), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, ConnectionError) and "ranker down" in str(r) for r in results)
    ranker.fail_with = None
    np.testing.assert_allclose(asyncio.run(joined(batch[0])), batch[0].sum(axis=1), rtol=1e-6)


def test_a_wrong_number_of_scores_is_an_error_not_a_misaligned_answer() -> None:
    async def short(features: np.ndarray) -> list[float]:
        return [0.0] * (len(features) - 1)

    joined = JoinedCalls(short, "score", max_rows=4096, max_in_flight=1)
    with pytest.raises(RuntimeError, match="scores for"):
        asyncio.run(joined(np.ones((3, 3), np.float32)))


def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    ranker = FakeRanker(delay_s=0.05)
    joined = JoinedCalls(ranker, "score", max_rows=4096, max_in_flight=1)
    batch = requests(8)

    async def main() -> list[Any]:
        first = asyncio.create_task(joined(batch[0]))  # goes out alone
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(joined(x)) for x in batch[1:]]
        await asyncio.sleep(0)
        waiting[2].cancel()  # gave up while queued
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[3], asyncio.CancelledError)
    for i in (0, 1, 2, 4, 5, 6, 7):
        np.testing.assert_allclose(results[i], batch[i].sum(axis=1), rtol=1e-6)
    assert sum(ranker.calls) == sum(len(x) for i, x in enumerate(batch) if i != 3)


@pytest.mark.parametrize("max_rows, max_in_flight", [(0, 1), (10, 0)])
def test_limits_are_checked(max_rows: int, max_in_flight: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        JoinedCalls(FakeRanker(), "score", max_rows=max_rows, max_in_flight=max_in_flight)
