"""Single-stage baselines for bench/quality.py and the statistics it reports.

EASE (closed form, Steck 2019), implicit ALS and ItemKNN cosine score every item for the rows
of a binary user × item matrix; `rank_rows` turns scores into top-n lists without the seen
items; `judge` gives the per-user metrics, `ndcg_curve` NDCG@k for k = 1..K, and
`paired_bootstrap` the interval of one system's gain over another on the same users.
Everything here is numpy and scipy, apart from ALS (the `implicit` package).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from models.core.interactions import InteractionLog
from models.core.metrics import METRIC_NAMES, ranking_metrics
from training.datasets import EXPLORE, STAY, SyntheticWorld


def user_item_matrix(log: InteractionLog, n_items: int, users: np.ndarray | None = None) -> sp.csr_matrix:
    """Binary (users × items) matrix of `log`: every user of the log's index space, or only
    the rows of `users`, in that order. Repeated interactions count once."""
    matrix = sp.csr_matrix(
        (np.ones(len(log), dtype=np.float64), (log.user, log.item)), shape=(log.n_users, n_items)
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix if users is None else matrix[users]


def popular_items(train: sp.csr_matrix, max_items: int) -> np.ndarray:
    """The at most `max_items` items with the most interactions in `train` (at least one),
    most popular first, ties by index."""
    count = np.asarray(train.sum(axis=0)).ravel()
    order = np.lexsort((np.arange(len(count)), -count))
    return order[count[order] > 0][:max_items]


# -- EASE ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EaseFit:
    """One eigendecomposition G = V diag(w) Vᵀ of the Gram matrix on the item universe."""

    universe: np.ndarray  # item indices the model knows, most popular first
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    n_items: int

    @property
    def mean_diag(self) -> float:
        """Mean of diag(XᵀX), i.e. mean interactions per item: the scale of λ."""
        return float(np.mean((self.eigenvectors**2) @ self.eigenvalues)) if len(self.universe) else 0.0


def fit_ease(train: sp.csr_matrix, max_items: int) -> EaseFit:
    """Decompose XᵀX restricted to the `max_items` most popular items of `train`: every λ then
    costs matrix products, not an inversion."""
    universe = popular_items(train, max_items)
    x = train[:, universe]
    gram = (x.T @ x).toarray()
    w, v = np.linalg.eigh(gram)
    return EaseFit(universe, np.maximum(w, 0.0), v, train.shape[1])


def ease_scores(fit: EaseFit, seen: sp.csr_matrix, lambdas: Sequence[float]) -> Iterator[tuple[float, np.ndarray]]:
    """(λ, scores of every row of `seen` for every item) per λ. With P = (G + λI)⁻¹ the EASE
    weights are B = I - P diag(P)⁻¹ (zero diagonal), so x B = x - (x P) / diag(P), and
    P = V diag(1/(w + λ)) Vᵀ. Items outside the universe score -inf."""
    x = seen[:, fit.universe].toarray()
    xv = x @ fit.eigenvectors
    v2 = fit.eigenvectors**2
    for lam in lambdas:
        if lam <= 0:
            raise ValueError(f"EASE lambda must be > 0, got {lam}")
        inv = 1.0 / (fit.eigenvalues + lam)
        diag_p = v2 @ inv
        xp = (xv * inv) @ fit.eigenvectors.T
        scores = np.full((seen.shape[0], fit.n_items), -np.inf)
        scores[:, fit.universe] = x - xp / diag_p
        yield lam, scores


# -- ItemKNN -------------------------------------------------------------------------------


def knn_scores(
    train: sp.csr_matrix, seen: sp.csr_matrix, ks: Sequence[int], shrink: float, block: int = 512
) -> dict[int, np.ndarray]:
    """ItemKNN cosine scores of the rows of `seen`, for every k of `ks` in one pass:
    score(u, j) = sum of sim(i, j) over the items i of u among j's k most similar other items,
    with sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i| |U_j|) + shrink). A k of n_items - 1 or more keeps
    every neighbour; the keys are the ks so capped. Similarities are built a block of columns at
    a time, so memory is n_items × block beyond the scores."""
    if shrink < 0:
        raise ValueError(f"ItemKNN shrink must be >= 0, got {shrink}")
    n_items = train.shape[1]
    capped = sorted({min(int(k), n_items - 1) for k in ks})
    if not capped or capped[0] < 1:
        raise ValueError(f"ItemKNN needs k >= 1 and at least 2 items, got ks {list(ks)} for {n_items} items")
    xt = train.T.tocsr()
    csc = train.tocsc()
    rows = seen.tocsr()
    norm = np.sqrt(np.asarray(train.sum(axis=0)).ravel())
    out = {k: np.zeros((seen.shape[0], n_items), dtype=np.float32) for k in capped}
    for start in range(0, n_items, block):
        cols = np.arange(start, min(start + block, n_items))
        co = (xt @ csc[:, cols]).toarray()
        denom = norm[:, None] * norm[None, cols] + shrink
        sim = np.divide(co, denom, out=np.zeros_like(co), where=denom > 0)
        # An item is not its own neighbour. With sim 0 it ranks below every real neighbour, so
        # it only fills a slot when fewer than k items have any similarity, and adds nothing.
        sim[cols, np.arange(len(cols))] = 0.0
        for k in capped:
            if k >= n_items - 1:
                kept = sim
            else:
                top = np.argpartition(-sim, k - 1, axis=0)[:k]
                kept = np.zeros_like(sim)
                np.put_along_axis(kept, top, np.take_along_axis(sim, top, axis=0), axis=0)
            out[k][:, cols] = rows @ kept
    return out


# -- ALS -----------------------------------------------------------------------------------


def als_scores(
    train: sp.csr_matrix, seen: sp.csr_matrix, factors: int, regularization: float, seed: int, threads: int,
    iterations: int = 15,
) -> np.ndarray:
    """implicit's ALS fitted on `train`; the rows of `seen` are folded in (their factors solved
    from those rows with the item factors fixed), so users new since the history are scored
    too, from what they did online."""
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=factors, regularization=regularization, iterations=iterations,
                                    random_state=seed, num_threads=threads)  # fmt: skip
    model.fit(train.astype(np.float32).tocsr(), show_progress=False)
    rows = seen.astype(np.float32).tocsr()
    user_factors = model.recalculate_user(np.arange(rows.shape[0]), rows)
    return np.asarray(user_factors @ model.item_factors.T, dtype=np.float64)


# -- lists and metrics ---------------------------------------------------------------------


def oracle_scores(
    world: SyntheticWorld, item_numbers: np.ndarray, user_numbers: np.ndarray, last_items: np.ndarray,
    horizons: np.ndarray,
) -> np.ndarray:
    """The synthetic generator's own chance of each item in a user's next `horizons[j]`
    draws (a ceiling no model reaches; it reads the truth behind the data): the topic of a
    draw s steps ahead is the current one (`last_items[j]`'s) with probability STAY**s, else
    the user's long-run mixture (favourites, or by popularity when exploring), and an item
    within its topic by weight. Summed over the horizon's draws, ignoring that an item drawn
    twice counts once. Rows: `user_numbers` (generator user numbers); columns: the data
    set's items, whose generator numbers are `item_numbers`."""
    taste = world.taste
    topic = world.item_topic[item_numbers]
    weight = world.item_weight[item_numbers]
    n_topics = len(taste.topic_pop)
    within = weight / np.maximum(np.bincount(topic, weights=weight, minlength=n_topics)[topic], 1e-300)
    mixture = np.zeros((len(user_numbers), n_topics))
    rows = np.repeat(np.arange(len(user_numbers)), taste.favourites.shape[1])
    np.add.at(mixture, (rows, taste.favourites[user_numbers].ravel()),
              (1 - EXPLORE) * taste.fav_weights[user_numbers].ravel())  # fmt: skip
    mixture += EXPLORE * taste.topic_pop
    # Mean over s = 1..H of STAY**s: the share of the horizon still in the current topic.
    h = np.maximum(horizons, 1).astype(np.float64)
    stay = STAY * (1 - STAY**h) / ((1 - STAY) * h)
    current = np.zeros_like(mixture)
    current[np.arange(len(user_numbers)), topic[last_items]] = 1.0
    topic_chance = stay[:, None] * current + (1 - stay[:, None]) * mixture
    return topic_chance[:, topic] * within[None, :] * h[:, None]


def rank_rows(scores: np.ndarray, seen: sp.csr_matrix, tie: np.ndarray, n: int) -> list[np.ndarray]:
    """Per row: the `n` best items by score without the seen ones, ties by `tie` (lower
    first, e.g. popularity rank); items scored -inf are never listed."""
    scores = np.array(scores, dtype=np.float64)
    rows, cols = seen.nonzero()
    scores[rows, cols] = -np.inf
    order = np.lexsort((np.broadcast_to(tie, scores.shape), -scores), axis=-1)[:, :n]
    finite = np.isfinite(np.take_along_axis(scores, order, axis=-1))
    return [o[f].astype(np.int32) for o, f in zip(order, finite, strict=True)]


def judge(ranked: Sequence[np.ndarray], relevant: Sequence[np.ndarray], k: int, depth: int) -> dict[str, np.ndarray]:
    """Per user: the metrics at `k` (models.core.metrics' definitions) and `recall@depth`,
    the share of the user's relevant items anywhere in the first `depth` of the list."""
    rows = [ranking_metrics(r, rel, k) for r, rel in zip(ranked, relevant, strict=True)]
    out = {m: np.array([row[m] for row in rows]) for m in METRIC_NAMES}
    out[f"recall@{depth}"] = np.array(
        [np.isin(rel, r[:depth]).mean() if len(rel) else 0.0 for r, rel in zip(ranked, relevant, strict=True)]
    )
    return out


def ndcg_curve(ranked: Sequence[np.ndarray], relevant: Sequence[np.ndarray], k_max: int) -> np.ndarray:
    """Mean NDCG@k over users for k = 1..k_max (binary relevance, as ranking_metrics)."""
    hits = np.zeros((len(ranked), k_max))
    n_rel = np.zeros(len(ranked))
    for u, (r, rel) in enumerate(zip(ranked, relevant, strict=True)):
        top = np.asarray(r[:k_max])
        hits[u, : len(top)] = np.isin(top, rel)
        n_rel[u] = len({int(x) for x in rel})
    discount = 1.0 / np.log2(np.arange(2, k_max + 2))
    dcg = np.cumsum(hits * discount, axis=1)
    ideal_n = np.minimum(n_rel[:, None], np.arange(1, k_max + 1)[None, :]).astype(np.int64)
    ideal = np.concatenate(([0.0], np.cumsum(discount)))[ideal_n]
    ndcg = np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)
    return ndcg.mean(axis=0) if len(ranked) else np.zeros(k_max)


# -- paired bootstrap ----------------------------------------------------------------------


@dataclass(frozen=True)
class PairedInterval:
    """Gain of system a over system b on the same users: point values and percentile intervals."""

    ratio: float
    ratio_lo: float
    ratio_hi: float
    diff: float
    diff_lo: float
    diff_hi: float
    n_users: int
    n_resamples: int
    level: float


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int, level: float = 0.95) -> PairedInterval:
    """Resample users with replacement (the same users for both systems) and take the
    percentile interval of mean(a)/mean(b) and of mean(a) - mean(b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two 1-d arrays of one non-zero length, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    mean_a, mean_b = np.empty(n_resamples), np.empty(n_resamples)
    chunk = max(1, 2_000_000 // len(a))  # bounded memory: chunk × users indices at a time
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, len(a), size=(size, len(a)))
        mean_a[start : start + size] = a[idx].mean(axis=1)
        mean_b[start : start + size] = b[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = mean_a / mean_b
        ratio = a.mean() / b.mean() if b.mean() > 0 else np.inf
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    r_lo, r_hi = np.nanpercentile(ratios, tails)  # 0/0 when both means are 0
    d_lo, d_hi = np.percentile(mean_a - mean_b, tails)
    return PairedInterval(float(ratio), float(r_lo), float(r_hi), float(a.mean() - b.mean()), float(d_lo),
                          float(d_hi), len(a), n_resamples, level)  # fmt: skip
