"""Model parameters of candidate generation and its indexes (co-occurrence, EASE).

They are part of a model version (saved in its metadata), not serving settings: a version is
always served with the parameters it was trained and evaluated with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CandidateParams:
    """How candidates are generated and how the co-occurrence and EASE indexes are built."""

    recent_items: int = 20  # the user's last items that seed co-occurrence (chosen in training)
    recency_decay: float = 0.85  # weight of the n-th most recent item: decay**n
    # The user's last items EASE sums over (its candidates and features; chosen in
    # training). It can be longer than recent_items: EASE models taste, which lasts, where
    # co-occurrence follows the last items.
    ease_history: int = 20
    cooc_window: int = 10  # pairs are counted within this many steps of a timeline
    cooc_neighbors: int = 100  # neighbours kept per item in the index
    # The candidate budget by source. Training chooses the mix on validation
    # (training/retrieval.py); the default splits the 150 neighbour candidates of the
    # two-source model evenly between its two neighbour sources.
    n_cooc: int = 75  # candidates from co-occurrence
    n_ease: int = 75  # candidates from EASE, not already chosen
    n_pop: int = 50  # candidates from popularity
    # EASE λ as a multiple of the mean of diag(XᵀX); chosen on validation, the default is
    # the geometric centre of the search grid.
    ease_l2: float = 8.0
    # EASE models the history's most popular items only. The rule: with more users than
    # items, EASE costs one n × n inverse (~n³ flops) per table build (5 per run) and ~7
    # inverse-equivalents in the λ search (an eigendecomposition ≈ 2.5, a product per λ
    # ≈ 0.7): ~12 per run, measured 2.8 s each at n = 3000 (6.5 s at 4000) on 2 busy cores,
    # ~35 s of the 3-minute training budget. Memory: an n × n float64 matrix, 72 MB.
    ease_max_items: int = 3000
    ease_neighbors: int = 100  # EASE weights kept per item
    recent_quantile: float = 0.9  # "recent" popularity: interactions after this time quantile
    # The popularity order (the popularity source, the pop_rank feature, the cold-start
    # fallback) sorts by (1 - pop_trend) * log1p(all-time count) + pop_trend * log1p(recent
    # count): 0 is all-time popularity, 1 what is popular lately. Chosen on validation with
    # recent_quantile (training/retrieval.py).
    pop_trend: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (value == 0 and f.name != "pop_trend"):
                raise ValueError(f"CandidateParams.{f.name} must be > 0, got {value}")
        if not 0 < self.recency_decay <= 1 or not 0 < self.recent_quantile < 1:
            raise ValueError("recency_decay must be in (0, 1] and recent_quantile in (0, 1)")
        if not 0 <= self.pop_trend <= 1:
            raise ValueError(f"CandidateParams.pop_trend must be in [0, 1], got {self.pop_trend}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateParams:
        if "ease_history" not in data and "recent_items" in data:
            # Versions from before ease_history summed EASE over the recent items.
            data = {**data, "ease_history": data["recent_items"]}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown candidate parameters {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)
