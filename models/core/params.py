"""Model parameters of candidate generation and the co-occurrence index.

They are part of a model version (saved in its metadata), not serving settings: a version is
always served with the parameters it was trained and evaluated with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class CandidateParams:
    """How candidates are generated and how the co-occurrence index is built."""

    recent_items: int = 20  # the user's last items that seed co-occurrence
    recency_decay: float = 0.85  # weight of the n-th most recent item: decay**n
    cooc_window: int = 10  # pairs are counted within this many steps of a timeline
    cooc_neighbors: int = 100  # neighbours kept per item in the index
    n_cooc: int = 150  # candidates from co-occurrence
    n_pop: int = 50  # candidates from popularity
    recent_quantile: float = 0.9  # "recent" popularity: interactions after this time quantile

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value <= 0:
                raise ValueError(f"CandidateParams.{f.name} must be > 0, got {value}")
        if not 0 < self.recency_decay <= 1 or not 0 < self.recent_quantile < 1:
            raise ValueError("recency_decay must be in (0, 1] and recent_quantile in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown candidate parameters {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)
