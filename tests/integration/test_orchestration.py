"""Per-request orchestration in-process: a shadow ranking that fails in any way (the
ranking service's error answer, a timeout, a lost connection, a request the challenger
cannot take, or a bug) is counted and logged, and never touches the response."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from bentoml.exceptions import InternalServerError, ServiceUnavailable

from models.core.ranking import predict_scores
from models.core.recommender import Recommender
from models.lifecycle.store import open_version
from models.serving.monitoring import DriftMonitor
from models.serving.orchestration import Ranking
from models.serving.settings import RecsysSettings
from models.serving.variants import Variant, _metrics
from training.pipeline import TrainResult

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")


def variant(role: str, tag: str, settings: RecsysSettings) -> Variant:
    version = open_version(tag)
    drift = DriftMonitor(settings, version.tag, version.path, role="api")
    return Variant(role, version, Recommender.of(version), drift, f"score_{role}")  # type: ignore[arg-type]


def shadow_count(tag: str, outcome: str) -> float:
    return _metrics()["shadow"].labels(model_version=tag, outcome=outcome)._value.get()


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (InternalServerError("ranking service: 500"), logging.WARNING),
        (ServiceUnavailable("ranking service unavailable"), logging.WARNING),
        (TimeoutError(), logging.WARNING),
        (aiohttp.ServerDisconnectedError(), logging.WARNING),
        (ZeroDivisionError("a bug"), logging.ERROR),  # unexpected: still counted, logged as an error
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x),
)
def test_a_failing_shadow_ranking_is_counted_and_logged_once(
    trained: TrainResult, tmp_path: Path, caplog: pytest.LogCaptureFixture, error: BaseException, level: int
) -> None:
    assert trained.tag is not None
    settings = RecsysSettings(challenger_mode="shadow", drift_dir=tmp_path, monitor_sample=0.0,
                              request_log_sample=0.0, monitor_dir=tmp_path / "monitor")  # fmt: skip
    champion, challenger = variant("champion", trained.tag, settings), variant("challenger", trained.tag, settings)
    booster = champion.version.load_booster(nthread=1)
    outcome = type(error).__name__
    before = shadow_count(challenger.tag, outcome)

    async def score(v: Variant, features: np.ndarray) -> np.ndarray:
        if v.role == "challenger":
            raise error
        return predict_scores(booster, features)

    async def scenario() -> list[str]:
        ranking = Ranking(settings, champion, challenger, score)
        users = [f"u{i}" for i in range(5)]
        served = [(await ranking.recommend(u, 5, True)).variant for u in users]
        pending = set(ranking._shadow_tasks)
        if pending:  # asyncio.wait, not gather: a task's own error is what is under test
            _, late = await asyncio.wait(pending, timeout=30)
            assert not late, f"{len(late)} shadow rankings still running after 30 s"
        await asyncio.sleep(0)  # the done-callbacks run
        return served

    with caplog.at_level(logging.WARNING, logger="recsys.shadow"):
        served = asyncio.run(scenario())
    assert served == ["champion"] * 5
    assert shadow_count(challenger.tag, outcome) - before == 5
    lines = [r for r in caplog.records if r.name == "recsys.shadow" and outcome in r.getMessage()]
    assert lines and all(r.levelno == level for r in lines)
    if level == logging.WARNING:
        assert len(lines) == 1, "one line per error type, not one per request"
