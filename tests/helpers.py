"""Test helpers: paths, a small seeded dataset, and the server helpers of bench/servers.py."""

from __future__ import annotations

import os
from pathlib import Path

from bench.servers import BENTOML_BIN, ServerProcess, free_port, start_server, wait_ready
from training.datasets import Dataset, synthetic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MOVIELENS_DIR = Path(
    os.environ.get("RECSYS_MOVIELENS_DIR", PROJECT_ROOT.parent / "shared" / "data" / "movielens-small")
)


def small_synthetic(seed: int = 3) -> Dataset:
    """Small enough to train in seconds, large enough for the ranker to beat the baselines."""
    return synthetic(n_users=600, n_items=400, n_interactions=30_000, n_topics=20, seed=seed)


__all__ = [
    "BENTOML_BIN", "MOVIELENS_DIR", "PROJECT_ROOT", "ServerProcess", "free_port",
    "small_synthetic", "start_server", "wait_ready",
]  # fmt: skip
