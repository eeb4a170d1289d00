"""The service side of drift monitoring, in-process: a failing disk impairs counting but
never stops it, and start-up removes what dead serve processes and workers left."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.core.drift import build_profile
from models.core.schema import N_FEATURES
from models.serving.monitoring import DriftMonitor, remove_dead_owners
from models.serving.settings import RecsysSettings
from tests.helpers import dead_pid

RNG = np.random.default_rng(1)
ROWS = RNG.normal(size=(500, N_FEATURES)).astype(np.float32)
SCORES = RNG.normal(size=500).astype(np.float32)


@pytest.fixture
def monitor(tmp_path: Path) -> DriftMonitor:
    model = tmp_path / "model"
    model.mkdir()
    build_profile(ROWS, SCORES, 0.0, RNG.random(20)).save(model)
    settings = RecsysSettings(drift_dir=tmp_path / "drift", monitor_sample=0.0)
    return DriftMonitor(settings, "recsys-test:v1", model, role="api")


# The service's metrics go through bentoml.metrics (multiprocess set-up), which warns of its
# deprecation when used outside a server.
@pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")
def test_a_failing_disk_impairs_counting_the_flusher_survives_and_recovers(monitor: DriftMonitor) -> None:
    observed = 0

    def observe(n: int) -> None:
        nonlocal observed
        monitor.observe(ROWS[:n], SCORES[:n], cold=False, endpoint="score")
        observed += 1

    async def scenario() -> tuple[dict, dict, dict, bool]:
        flusher = monitor.start_flusher()
        observe(10)
        folder = monitor.folder
        shutil.rmtree(folder)
        folder.write_text("not a folder")  # every write now fails (NotADirectoryError)
        # The flusher ticks every second: give it a few failing ticks.
        deadline = asyncio.get_running_loop().time() + 10
        while monitor.counting()["failures"] < 2 and asyncio.get_running_loop().time() < deadline:
            observe(1)
            await asyncio.sleep(0.2)
        impaired = monitor.counting()
        during = monitor.report()
        folder.unlink()
        folder.mkdir()
        while not monitor.counting()["ok"] and asyncio.get_running_loop().time() < deadline + 10:
            observe(1)
            await asyncio.sleep(0.2)
        after = monitor.report()
        alive = not flusher.done()
        flusher.cancel()
        return impaired, during, after, alive

    impaired, during, after, alive = asyncio.run(scenario())
    assert impaired["failures"] >= 2 and not impaired["ok"], impaired
    assert "NotADirectoryError" in impaired["error"]
    assert during["counting"]["ok"] is False and during["features"], during["counting"]
    assert alive, "the flusher task ended"
    assert after["counting"]["ok"] is True, after["counting"]
    # Every request counted while the disk failed is in the report once it works again.
    assert after["requests"] == observed, (after["requests"], observed)


def test_startup_removes_what_dead_owners_left(tmp_path: Path) -> None:
    drift = tmp_path / "drift"
    gone, alive = dead_pid(), os.getpid()
    dead_serve = drift / str(gone) / "recsys-test-v1"
    live_serve = drift / str(alive) / "recsys-test-v1"
    for folder in (dead_serve, live_serve):
        folder.mkdir(parents=True)
    (dead_serve / f"api-{alive}.npz").write_bytes(b"x")
    (live_serve / f"api-{gone}.npz").write_bytes(b"x")  # a worker that died
    (live_serve / f"api-{alive}.npz").write_bytes(b"x")
    remove_dead_owners(drift)
    assert not dead_serve.parent.exists()
    assert sorted(p.name for p in live_serve.iterdir()) == [f"api-{alive}.npz"]
