"""The stage follower with fake stages: it switches on a change, never switches in a
version that fails its checks (and does not retry it until the stages change or a forced
poll), and keeps serving when the registry cannot be read."""

from __future__ import annotations

import asyncio
import logging

import pytest

from models.lifecycle.registry import RegistryError
from models.lifecycle.store import ModelCheckError
from models.serving.plan import Stages, known_tags
from models.serving.reload import StageFollower
from training.pipeline import TrainResult

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")


class FakeWorker:
    def __init__(self) -> None:
        self.served: Stages = ("m:a", None)
        self.registry: Stages | Exception = ("m:a", None)
        self.broken: set[str] = set()
        self.prepared: list[Stages] = []

    def wanted(self) -> Stages:
        if isinstance(self.registry, Exception):
            raise self.registry
        return self.registry

    def prepare(self, stages: Stages) -> Stages:
        self.prepared.append(stages)
        for tag in stages:
            if tag in self.broken:
                raise ModelCheckError(f"model {tag}: digest check failed: ranker.ubj is corrupted or truncated")
        return stages

    def commit(self, prepared: Stages, stages: Stages) -> None:
        assert prepared == stages
        self.served = stages

    def follower(self) -> StageFollower[Stages]:
        return StageFollower("api", 0.01, True, lambda: self.served, self.wanted, self.prepare, self.commit)


@pytest.mark.parametrize("new", [("m:b", None), ("m:a", "m:c"), ("m:c", "m:b")], ids=["champion", "challenger", "both"])
def test_a_changed_stage_is_switched_in(new: Stages) -> None:
    worker = FakeWorker()
    follower = worker.follower()
    worker.registry = new
    status = asyncio.run(follower.poll())
    assert worker.served == new
    assert status["last_attempt"]["result"] == "switched" and status["switched_at"] is not None


def test_unchanged_stages_load_nothing() -> None:
    worker = FakeWorker()
    status = asyncio.run(worker.follower().poll())
    assert worker.prepared == [] and status["last_attempt"] is None and status["checked_at"] is not None


def test_a_version_that_fails_its_checks_is_never_switched_in(caplog: pytest.LogCaptureFixture) -> None:
    worker = FakeWorker()
    follower = worker.follower()
    worker.registry, worker.broken = ("m:bad", None), {"m:bad"}

    async def polls() -> list[dict[str, object]]:
        return [await follower.poll() for _ in range(3)]

    with caplog.at_level(logging.INFO, logger="recsys.reload"):
        statuses = asyncio.run(polls())
    assert worker.served == ("m:a", None)
    assert worker.prepared == [("m:bad", None)]  # tried once, not on every poll
    last = statuses[-1]
    assert last["failures"] == 1 and last["last_attempt"]["result"] == "failed"  # type: ignore[index]
    assert "digest check failed" in last["refused"]["m:bad"]  # type: ignore[index]
    lines = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "not switching to champion m:bad" in lines[0].getMessage() and "still serving champion m:a" in lines[0].getMessage()
    # A forced poll tries again; a repaired version then switches in.
    worker.broken = set()
    asyncio.run(follower.poll(force=True))
    assert worker.served == ("m:bad", None)


def test_a_refused_version_is_tried_again_once_the_stages_change() -> None:
    worker = FakeWorker()
    follower = worker.follower()
    worker.registry, worker.broken = ("m:bad", None), {"m:bad"}
    asyncio.run(follower.poll())
    worker.registry = ("m:b", None)
    asyncio.run(follower.poll())
    assert worker.served == ("m:b", None)


@pytest.mark.parametrize("error", [RegistryError("reg.json: unreadable registry file"),
                                   ModelCheckError("model m: no champion in the registry"),
                                   OSError("connection refused")], ids=["registry", "no champion", "network"])  # fmt: skip
def test_an_unreadable_registry_keeps_the_served_versions(error: Exception) -> None:
    worker = FakeWorker()
    worker.registry = error
    status = asyncio.run(worker.follower().poll())
    assert worker.served == ("m:a", None) and str(error) in str(status["problem"])


def test_a_follower_that_does_not_follow_starts_no_task() -> None:
    worker = FakeWorker()
    follower = StageFollower("ranker", 1.0, False, lambda: worker.served, worker.wanted, worker.prepare, worker.commit)

    async def start() -> object:
        return follower.start()

    assert asyncio.run(start()) is None


def test_the_polling_task_switches_within_its_interval() -> None:
    worker = FakeWorker()
    follower = worker.follower()

    async def run() -> None:
        task = follower.start()
        assert task is not None
        worker.registry = ("m:b", None)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if worker.served == ("m:b", None):
                break
        task.cancel()

    asyncio.run(run())
    assert worker.served == ("m:b", None)


def test_known_tags_list_the_store_first_then_the_registry(trained: TrainResult) -> None:
    """What a ranking service may load when a call names a version it does not hold."""
    name = str(trained.tag).split(":")[0]
    tags = known_tags(name)
    assert next(tags) == trained.tag  # the store's newest, before the registry is read
    assert list(known_tags("no-such-model")) == []
