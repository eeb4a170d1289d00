"""Learned retrieval: EASE (Steck 2019), a closed-form item-item model.

    min_B ||X - XB||² + λ||B||²  subject to diag(B) = 0
    P = (XᵀX + λI)⁻¹,  B = I - P / diag(P)  (column j divided by P_jj), diagonal zero.

X is the binary user × item matrix of a history, restricted to its `max_items` most popular
items so that the n × n algebra stays bounded (`CandidateParams.ease_max_items` says how).
For serving, B is kept sparse: the best `ease_neighbors` weights of each item's row, as a
CSR over the whole catalog in the layout of the co-occurrence index. A user's EASE score of
item j is Σ_{i in history} B_ij, the sum of the rows of the user's items.

λ is given relative to the data, as a multiple of the mean of diag(XᵀX) (the mean number of
users per item), so one value means the same amount of shrinkage on any data set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from models.core.interactions import InteractionLog
from models.core.params import CandidateParams

# Rows of X turned into a Gram matrix at once: bounds the dense temporaries to this many
# users × max_items floats.
_USER_CHUNK = 4096
# Columns of B searched for their best weights at once (bounds argpartition's temporaries).
_COLUMN_CHUNK = 512


def ease_items(history: InteractionLog, n_items: int, max_items: int) -> np.ndarray:
    """The `max_items` items of `history` with the most users (ties: lower index), ascending
    by index; items nobody had are left out."""
    users_per_item = np.bincount(_pairs(history)[1], minlength=n_items)
    order = np.lexsort((np.arange(n_items), -users_per_item))
    top = order[: min(max_items, int((users_per_item > 0).sum()))]
    return np.sort(top).astype(np.int32)


def _pairs(history: InteractionLog) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs: X is binary, a repeated interaction counts once."""
    n_items = int(history.item.max()) + 1 if len(history) else 1
    # A sort and a mask, not np.unique: on ml-25m's 20M keys, 0.5 s against 25 s (numpy 2.4).
    # The log is sorted by user, so the keys are sorted in runs and a stable sort is cheap.
    keys = np.sort(history.user.astype(np.int64) * n_items + history.item, kind="stable")
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
    return (keys // n_items).astype(np.int64), (keys % n_items).astype(np.int64)


@dataclass(frozen=True)
class BinaryRows:
    """X as its ones: row `rows[j]` has a 1 in column `cols[j]`, rows ascending. The users
    (rows) are those with any of the items (columns); a dense X is only made in chunks of
    _USER_CHUNK rows (at ml-25m's 162k users and 3000 items, the dense X alone is 1.9 GB)."""

    rows: np.ndarray  # int64, ascending
    cols: np.ndarray  # int64
    n_rows: int
    n_cols: int

    def dense(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start .. stop of X, float32."""
        stop = self.n_rows if stop is None else stop
        lo, hi = np.searchsorted(self.rows, [start, stop])
        x = np.zeros((stop - start, self.n_cols), dtype=np.float32)
        x[self.rows[lo:hi] - start, self.cols[lo:hi]] = 1.0
        return x

    def gram(self) -> np.ndarray:
        """XᵀX in float64, one dense chunk of rows at a time."""
        g = np.zeros((self.n_cols, self.n_cols), dtype=np.float64)
        for start in range(0, self.n_rows, _USER_CHUNK):
            chunk = self.dense(start, min(start + _USER_CHUNK, self.n_rows))
            g += (chunk.T @ chunk).astype(np.float64)
        return g

    def mean_diagonal(self) -> float:
        """Mean of diag(XᵀX): the mean number of users per item."""
        return float(len(self.rows) / max(self.n_cols, 1))


def binary_rows(history: InteractionLog, items: np.ndarray) -> BinaryRows:
    """X of `history` restricted to `items` (columns in their ascending order), as ones."""
    user, item = _pairs(history)
    col = np.searchsorted(items, item)
    col = np.minimum(col, max(len(items) - 1, 0))
    keep = (items[col] == item) if len(items) else np.zeros(len(item), dtype=bool)
    kept = user[keep]
    # _pairs gives (user, item) sorted by user: a row index is the count of user changes.
    new_user = np.r_[True, kept[1:] != kept[:-1]] if len(kept) else np.zeros(0, dtype=bool)
    row_index = np.cumsum(new_user) - 1
    return BinaryRows(row_index.astype(np.int64), col[keep].astype(np.int64), int(new_user.sum()), len(items))


def binary_matrix(history: InteractionLog, items: np.ndarray) -> np.ndarray:
    """X: float32 (users with any of `items`, len(items)), 1 where the user had the item.
    Columns follow `items` (ascending); users without any of them are left out (zero rows
    add nothing to XᵀX)."""
    return binary_rows(history, items).dense()


def mean_diagonal(x: np.ndarray) -> float:
    """Mean of diag(XᵀX) for binary X: the mean number of users per item."""
    return float(x.sum() / max(x.shape[1], 1))


def gram(x: np.ndarray) -> np.ndarray:
    """G = XᵀX in float64, summed over chunks of users (exact: counts of binary products)."""
    g = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for start in range(0, len(x), _USER_CHUNK):
        chunk = x[start : start + _USER_CHUNK]
        g += (chunk.T @ chunk).astype(np.float64)
    return g


def weights_from_inverse(p: np.ndarray) -> np.ndarray:
    """B = I - P / diag(P) with a zero diagonal, in place of `p` (which it returns)."""
    diag = np.diag(p).copy()
    p /= -diag[None, :]
    np.fill_diagonal(p, 0.0)
    return p


def ease_weights(g: np.ndarray, lam: float) -> np.ndarray:
    """B from G = XᵀX and an absolute λ > 0, through the direct inverse of G + λI."""
    if not lam > 0:
        raise ValueError(f"ease λ must be > 0, got {lam}")
    a = g.astype(np.float64, copy=True)
    a[np.diag_indices_from(a)] += lam
    return weights_from_inverse(np.linalg.inv(a))


@dataclass(frozen=True)
class GramEigen:
    """G = XᵀX = V diag(values) Vᵀ restricted to its non-zero part: V is (n, r), r = rank."""

    values: np.ndarray  # float64 (r,), > 0
    vectors: np.ndarray  # float64 (n, r), orthonormal columns

    @classmethod
    def of(cls, x: np.ndarray) -> GramEigen:
        """From X, through the smaller of XXᵀ (users × users) and XᵀX (items × items): with
        fewer users than items, the user side is far cheaper and gives the same non-zero
        eigenvalues (V = XᵀU / sqrt(values))."""
        n_users, n = x.shape
        tol = 1e-9 * max(n_users, n, 1)
        if n_users < n:
            xd = x.astype(np.float64)
            values, u = np.linalg.eigh(xd @ xd.T)
            keep = values > tol
            values, u = values[keep], u[:, keep]
            return cls(values, (xd.T @ u) / np.sqrt(values))
        return cls.of_gram(gram(x), tol)

    @classmethod
    def of_gram(cls, g: np.ndarray, tol: float) -> GramEigen:
        """From G = XᵀX itself (eigenvalues at most `tol` count as zero)."""
        values, v = np.linalg.eigh(g)
        keep = values > tol
        return cls(values[keep], v[:, keep])

    @classmethod
    def of_rows(cls, x: BinaryRows) -> GramEigen:
        """As `of`, from the ones of X: the dense X only when it is the smaller side."""
        if x.n_rows < x.n_cols:
            return cls.of(x.dense())
        return cls.of_gram(x.gram(), 1e-9 * max(x.n_rows, x.n_cols, 1))

    def inverse(self, lam: float) -> np.ndarray:
        """P(λ) = (G + λI)⁻¹ = I/λ + V diag(1/(values+λ) - 1/λ) Vᵀ (exact: G is zero off
        the span of V, where P is I/λ)."""
        if not lam > 0:
            raise ValueError(f"ease λ must be > 0, got {lam}")
        n = self.vectors.shape[0]
        p = (self.vectors * (1.0 / (self.values + lam) - 1.0 / lam)) @ self.vectors.T
        p[np.diag_indices(n)] += 1.0 / lam
        return p


def ease_weights_path(eigen: GramEigen, lams: Sequence[float]) -> Iterator[np.ndarray]:
    """B(λ) for each λ of `lams` in turn, all from one eigendecomposition (one n × n
    matrix alive at a time)."""
    for lam in lams:
        yield weights_from_inverse(eigen.inverse(lam))


def top_neighbours(
    b: np.ndarray, items: np.ndarray, n_items: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse B of serving: for each target item (column c of B), its k source items
    with the largest positive weights B[a, c] (the weight of items[c] for a user who had
    items[a]). Laid out as a CSR by source item over the whole catalog, like the
    co-occurrence index, so a user's scores are the sum of the rows of their items:
    (indptr int64 (n_items+1,), targets int32, weights float32), each row best first (ties:
    lower item first); items outside `items` have empty rows.

    Per target, not per source: each candidate keeps its strongest evidence, and a source
    row then holds as many entries as it is strong evidence for (k on average). On
    MovieLens-small this kept 2-3 points more candidate recall than the same k per source row.
    """
    n = len(items)
    k = min(k, max(n - 1, 0))
    if n == 0 or k == 0:
        return np.zeros(n_items + 1, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    src_parts: list[np.ndarray] = []
    dst_parts: list[np.ndarray] = []
    w_parts: list[np.ndarray] = []
    # Columns in chunks: argpartition's index array is as large as its input.
    for start in range(0, n, _COLUMN_CHUNK):
        cols = np.ascontiguousarray(b[:, start : start + _COLUMN_CHUNK].T)  # (chunk, n)
        part = np.argpartition(-cols, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(cols, part, axis=1)
        positive = vals > 0
        dst = np.broadcast_to(np.arange(start, start + len(cols))[:, None], part.shape)
        src_parts.append(part[positive])
        dst_parts.append(dst[positive])
        w_parts.append(vals[positive])
    src, dst, w = np.concatenate(src_parts), np.concatenate(dst_parts), np.concatenate(w_parts)
    order = np.lexsort((dst, -w, src))
    src, dst, w = items[src[order]], items[dst[order]], w[order]
    indptr = np.concatenate(([0], np.cumsum(np.bincount(src, minlength=n_items)))).astype(np.int64)
    return indptr, dst.astype(np.int32), w.astype(np.float32)


def build_ease_index(
    history: InteractionLog, n_items: int, params: CandidateParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The EASE neighbour CSR of `history` with λ = params.ease_l2 × mean diag(XᵀX), by
    whichever exact route is cheaper: the user-side eigendecomposition when there are much
    fewer users than items, else the direct inverse."""
    items = ease_items(history, n_items, params.ease_max_items)
    x = binary_rows(history, items)
    lam = params.ease_l2 * x.mean_diagonal()
    if len(items) == 0 or lam <= 0:
        return top_neighbours(np.zeros((0, 0)), items, n_items, params.ease_neighbors)
    if _user_side_is_cheaper(x.n_rows, x.n_cols):
        b = next(ease_weights_path(GramEigen.of(x.dense()), [lam]))
    else:
        b = ease_weights(x.gram(), lam)
    return top_neighbours(b, items, n_items, params.ease_neighbors)


def _user_side_is_cheaper(n_users: int, n: int) -> bool:
    """Flop counts: eigh of u × u (≈ 3u³, measured ~2.5× an inverse of the same size) and
    the rank-u product for P (2n²u), against the n × n inverse (≈ n³)."""
    return 3 * n_users**3 + 2 * n * n * n_users < n**3
