"""Shared fixtures. Every test session gets its own temporary BENTOML_HOME, set before
BentoML is imported, so tests never read or write the user's model store (nor, with
MLFLOW_TRACKING_URI unset, the user's MLflow registry)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SESSION_HOME = tempfile.mkdtemp(prefix="recsys-test-bentoml-")
os.environ["BENTOML_HOME"] = _SESSION_HOME
os.environ.pop("RECSYS_MODEL_TAG", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded registry of the session home, never a real server
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import pytest  # noqa: E402

from tests.helpers import (  # noqa: E402
    MOVIELENS_DIR,
    PROJECT_ROOT,
    ServerProcess,
    small_synthetic,
    start_mlflow_server,
    start_server,
)
from training.datasets import Dataset  # noqa: E402
from training.pipeline import TrainConfig, TrainResult, train  # noqa: E402


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return Path(_SESSION_HOME)


@pytest.fixture(scope="session")
def synthetic_dataset() -> Dataset:
    return small_synthetic()


@pytest.fixture(scope="session")
def fast_config() -> TrainConfig:
    """The base ranker parameters only: the tuning has tests of its own (test_tuning.py)."""
    return TrainConfig(tune_budget_s=0)


@pytest.fixture(scope="session")
def trained(synthetic_dataset: Dataset, fast_config: TrainConfig) -> TrainResult:
    """One small model version in the session store, shared by the tests that only read it."""
    result = train(synthetic_dataset, fast_config, model_name="recsys-test")
    assert result.tag is not None
    return result


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    if not (MOVIELENS_DIR / "ratings.csv").is_file():
        pytest.skip(f"MovieLens ml-latest-small not found at {MOVIELENS_DIR} (CI has it in ../shared)")
    return MOVIELENS_DIR


@pytest.fixture(scope="session")
def server(trained: TrainResult, bentoml_home: Path) -> Iterator[ServerProcess]:
    """A real `bentoml serve` of the session's model on a free loopback port."""
    assert trained.tag is not None
    proc = start_server(
        ["service:ApiService"], cwd=PROJECT_ROOT,
        env={"BENTOML_HOME": str(bentoml_home), "RECSYS_MODEL_TAG": trained.tag},
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real `mlflow server` (SQLite backend, local artifact folder) on a free loopback port:
    the shared registry of machines that share nothing else. Its URL is their
    MLFLOW_TRACKING_URI; it is stopped by its PID with every descendant."""
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield proc
    finally:
        proc.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples", type=int, default=60,
        help="schemathesis examples per operation in tests/e2e/test_fuzz.py (CI: 60)",
    )  # fmt: skip
