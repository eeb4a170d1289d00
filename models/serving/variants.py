"""Champion and challenger inside one service: which users the challenger ranks (a stable
hash of user_id), per-version Prometheus metrics, the sampled request log that
`python -m training replay` reads, and the shadow log. service.py wires it in.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

import bentoml

from models.core.metrics import overlap_at_k
from models.core.recommender import Recommender
from models.lifecycle.store import ModelVersion
from models.serving.monitoring import DriftMonitor
from models.serving.settings import RecsysSettings
from models.serving.versioned import version_id

Role = Literal["champion", "challenger"]
REQUEST_LOG = "recsys_requests"
SHADOW_LOG = "recsys_shadow"
_HASH_SPACE = float(2**64)


def user_bucket(user_id: str, salt: str) -> float:
    """A user's fixed place in [0, 1): the same for every request, worker and restart
    (Python's hash() is salted per process, so it would not do)."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE


def routes_to_challenger(user_id: str, share: float, salt: str) -> bool:
    return user_bucket(user_id, salt) < share


@dataclass(frozen=True)
class Variant:
    """One served version: its tables, its drift monitor, and the ranking service's API
    that scores with its booster."""

    role: Role
    version: ModelVersion
    recommender: Recommender
    drift: DriftMonitor
    score_api: str

    @property
    def tag(self) -> str:
        return self.version.tag

    @functools.cached_property
    def version_id(self) -> int:
        """The id its scoring rows carry (models/serving/versioned.py)."""
        return version_id(self.version.tag)


@functools.cache
def _metrics() -> dict[str, Any]:
    """Created once per process (a second registration of a name is an error)."""
    return {
        "responses": bentoml.metrics.Counter(
            name="recsys_responses_total",
            documentation="Ranked responses by endpoint, model version and variant",
            labelnames=["endpoint", "model_version", "variant"],
        ),
        "latency": bentoml.metrics.Histogram(
            name="recsys_ranking_seconds",
            documentation="Candidates, features and scoring of one request, by model version",
            labelnames=["endpoint", "model_version", "variant"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        ),
        "fallbacks": bentoml.metrics.Counter(
            name="recsys_fallbacks_total",
            documentation="Responses made without a history: /recommend for an unknown user (the "
            "popularity fallback), /rank for an unknown user (cold start), by model version",
            labelnames=["endpoint", "model_version"],
        ),
        "shadow": bentoml.metrics.Counter(
            name="recsys_shadow_total",
            documentation="Shadow rankings by the challenger, by outcome (ok or the error type)",
            labelnames=["model_version", "outcome"],
        ),
    }


class TrafficLog:
    """Per-version metrics and the sampled logs of one API worker."""

    def __init__(self, settings: RecsysSettings) -> None:
        self.settings = settings
        self._sample = random.Random()
        self._options = {"log_path": str(settings.monitor_dir)}
        self._shadow_failures_seen: set[tuple[str, str]] = set()

    def served(self, endpoint: str, variant: str, model_tag: str, seconds: float) -> None:
        m = _metrics()
        m["responses"].labels(endpoint=endpoint, model_version=model_tag, variant=variant).inc()
        m["latency"].labels(endpoint=endpoint, model_version=model_tag, variant=variant).observe(seconds)

    def fallback(self, endpoint: str, model_tag: str) -> None:
        _metrics()["fallbacks"].labels(endpoint=endpoint, model_version=model_tag).inc()

    def log_request(self, endpoint: str, variant: str, model_tag: str, request: dict[str, Any],
                    items: list[str]) -> None:  # fmt: skip
        """One served request and what it returned, for replay (sampled)."""
        share = self.settings.request_log_sample
        if not share or self._sample.random() >= share:
            return
        with bentoml.monitor(REQUEST_LOG, monitor_class="default", monitor_options=self._options) as mon:
            mon.log(model_tag, name="model_version", role="feature", data_type="categorical")
            mon.log(variant, name="variant", role="feature", data_type="categorical")
            mon.log(endpoint, name="endpoint", role="feature", data_type="categorical")
            mon.log(request, name="request", role="feature", data_type="categorical")
            mon.log(items, name="items", role="prediction", data_type="categorical")

    def log_shadow(self, endpoint: str, user_id: str, champion: tuple[str, list[str]],
                   challenger: tuple[str, list[str]], seconds: float) -> None:  # fmt: skip
        """Every shadow comparison: both rankings, their overlap, the challenger's latency."""
        _metrics()["shadow"].labels(model_version=challenger[0], outcome="ok").inc()
        with bentoml.monitor(SHADOW_LOG, monitor_class="default", monitor_options=self._options) as mon:
            mon.log(endpoint, name="endpoint", role="feature", data_type="categorical")
            mon.log(user_id, name="user_id", role="feature", data_type="categorical")
            mon.log(champion[0], name="champion_version", role="feature", data_type="categorical")
            mon.log(champion[1], name="champion_items", role="prediction", data_type="categorical")
            mon.log(challenger[0], name="challenger_version", role="feature", data_type="categorical")
            mon.log(challenger[1], name="challenger_items", role="prediction", data_type="categorical")
            mon.log(overlap_at_k(champion[1], challenger[1], 10), name="overlap_at_10", role="feature",
                    data_type="numerical")  # fmt: skip
            mon.log(seconds, name="challenger_seconds", role="feature", data_type="numerical")

    def shadow_failed(self, model_tag: str, error: BaseException) -> bool:
        """Count a failed shadow ranking; True the first time this error type is seen."""
        outcome = type(error).__name__
        _metrics()["shadow"].labels(model_version=model_tag, outcome=outcome).inc()
        first = (model_tag, outcome) not in self._shadow_failures_seen
        self._shadow_failures_seen.add((model_tag, outcome))
        return first
