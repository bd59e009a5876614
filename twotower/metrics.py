"""Full-catalogue ranking metrics, shared by training-time validation, ``evaluate`` and the bench.

Every query has exactly one held-out target (the next item). The target is ranked against the
**whole catalogue** (no sampled candidates), with these rules:

* Reserved indices 0 (pad) and 1 (OOV) are never ranked.
* Ties are counted *against* the target: its 0-based rank is the number of other rankable items
  whose score is ``>=`` the target's score, so a constant scorer ranks every target last.
  NaN scores are treated as ``-inf``.
* Optional exclusion (``exclude``, CSR ``(values, offsets)`` per query, e.g.
  :attr:`~twotower.data.prepared.EvalSet.seen`): excluded items are removed from the ranking,
  **except the target itself**, which always stays (a re-listened track can still be a hit;
  removing it would make the query impossible). Recommendation lists from
  :func:`topk_from_scores` exclude every listed item, since a list cannot know the target.
* A pad or OOV target (a cold item that never occurs in training) gets rank :data:`MISS_RANK`,
  which is a miss at every cut-off: such queries are never skipped.

With one target per query, Recall@K equals the hit rate HR@K; both keys are reported so tables
line up with papers that use either name.

Uncertainty: :func:`bootstrap_ci` resamples queries (users or sessions) with replacement;
:func:`paired_diff` resamples the same query indices for two models evaluated on the same queries,
which gives a much tighter interval for their difference than two independent intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from twotower.ids import OOV, PAD

#: Rank given to pad/OOV targets: larger than any cut-off, so a miss everywhere.
MISS_RANK: int = 2**62
#: Number of reserved indices at the start of the item vocabulary (pad, OOV).
NUM_RESERVED: int = 2
#: Upper bound on ``chunk rows x catalogue size`` scores per chunk (32 MB fp32: cache friendly).
MAX_CHUNK_ELEMENTS: int = 1 << 23

ScoreFn = Callable[[slice], Tensor]
Exclude = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------- ranking
def rank_of_targets(
    query_emb: Tensor,
    item_emb: Tensor,
    targets: Tensor,
    exclude: Exclude | None = None,
    chunk_size: int = 2048,
) -> Tensor:
    """0-based rank of each target among the full catalogue by dot-product score.

    Args:
        query_emb: Query vectors, ``[Q, d]``.
        item_emb: Item vectors of the whole vocabulary, ``[V, d]`` (rows 0 and 1 reserved).
        targets: Target item index per query, ``[Q]``.
        exclude: Optional CSR ``(values, offsets)`` of items to remove per query (offsets
            ``[Q + 1]``); the target itself is never removed.
        chunk_size: Queries scored per matmul (further capped so a chunk holds at most
            :data:`MAX_CHUNK_ELEMENTS` scores).

    Returns:
        Ranks ``[Q]`` int64 on the device of ``targets``; :data:`MISS_RANK` for pad/OOV targets.
    """
    if query_emb.ndim != 2 or item_emb.ndim != 2 or query_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"expected query_emb [Q, d] and item_emb [V, d], got {tuple(query_emb.shape)} and "
            f"{tuple(item_emb.shape)}"
        )
    if query_emb.shape[0] != targets.shape[0]:
        raise ValueError(f"{query_emb.shape[0]} queries but {targets.shape[0]} targets")
    item_t = item_emb.float().T  # [d, V]

    def score_fn(rows: slice) -> Tensor:
        return query_emb[rows].float().to(item_t.device) @ item_t  # [b, V]

    return rank_from_scores(
        score_fn, targets, exclude=exclude, chunk_size=chunk_size, num_items=item_emb.shape[0]
    )


def rank_from_scores(
    score_fn: ScoreFn,
    targets: Tensor | np.ndarray,
    exclude: Exclude | None = None,
    chunk_size: int = 2048,
    num_items: int | None = None,
) -> Tensor:
    """0-based target ranks for any scorer (model, baseline), same rules as :func:`rank_of_targets`.

    Args:
        score_fn: ``score_fn(slice(start, stop))`` returns scores ``[stop - start, V]`` for those
            queries (never modified in place, so it may return stored tensors).
        targets: Target item index per query, ``[Q]``.
        exclude: Optional CSR ``(values, offsets)`` of items to remove per query.
        chunk_size: Queries per call of ``score_fn``.
        num_items: Catalogue size ``V``, used to cap the chunk size by memory when known.

    Returns:
        Ranks ``[Q]`` int64 (on the device of ``targets`` when a tensor, else CPU).
    """
    ranks, _ = rank_and_topk_from_scores(
        score_fn, targets, exclude=exclude, k=0, chunk_size=chunk_size, num_items=num_items
    )
    return ranks


def topk_from_scores(
    score_fn: ScoreFn,
    num_queries: int,
    k: int,
    exclude: Exclude | None = None,
    chunk_size: int = 2048,
    num_items: int | None = None,
) -> Tensor:
    """Top-``k`` item indices per query (recommendation lists) for any scorer.

    Reserved indices and every excluded item are removed. When fewer than ``k`` items remain,
    the tail of the row is padded with 0 (pad).

    Args:
        score_fn: As in :func:`rank_from_scores`.
        num_queries: ``Q``.
        k: List length.
        exclude: Optional CSR ``(values, offsets)`` of items to remove per query.
        chunk_size: Queries per call of ``score_fn``.
        num_items: Catalogue size ``V``, used to cap the chunk size by memory when known.

    Returns:
        Item indices ``[Q, k]`` int64 on the CPU, best first.
    """
    targets = np.zeros(num_queries, dtype=np.int64)
    _, ids = rank_and_topk_from_scores(
        score_fn,
        targets,
        exclude=exclude,
        k=k,
        chunk_size=chunk_size,
        num_items=num_items,
        ranks=False,
    )
    assert ids is not None
    return ids


def rank_and_topk_from_scores(
    score_fn: ScoreFn,
    targets: Tensor | np.ndarray,
    exclude: Exclude | None = None,
    k: int = 0,
    chunk_size: int = 2048,
    num_items: int | None = None,
    ranks: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Target ranks and top-``k`` lists in one pass over the scores (what ``evaluate`` uses).

    Args:
        score_fn: As in :func:`rank_from_scores`.
        targets: Target item index per query, ``[Q]``.
        exclude: Optional CSR ``(values, offsets)`` of items to remove per query. For ranks the
            target is kept; for the top-``k`` lists every listed item is removed.
        k: List length; 0 skips the lists.
        chunk_size: Queries per call of ``score_fn``.
        num_items: Catalogue size ``V``, used to cap the chunk size by memory when known.
        ranks: False skips the ranks (the first return value is then all :data:`MISS_RANK`).

    Returns:
        ``(ranks [Q] int64, topk_ids [Q, k] int64 on the CPU or None when k == 0)``.
    """
    out_device = targets.device if isinstance(targets, Tensor) else torch.device("cpu")
    tgt = torch.as_tensor(targets).long().reshape(-1)  # [Q]
    num_queries = tgt.shape[0]
    if exclude is not None:
        _check_csr(exclude, num_queries)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_items is not None:
        chunk_size = max(1, min(chunk_size, MAX_CHUNK_ELEMENTS // max(num_items, 1)))

    all_ranks = torch.full((num_queries,), MISS_RANK, dtype=torch.int64)
    all_ids = torch.zeros((num_queries, k), dtype=torch.int64) if k > 0 else None
    for rows in _chunks(num_queries, chunk_size):
        scores = score_fn(rows)
        b = rows.stop - rows.start
        if scores.ndim != 2 or scores.shape[0] != b:
            raise ValueError(
                f"score_fn({rows}) returned shape {tuple(scores.shape)}, expected [{b}, V]"
            )
        vocab = scores.shape[1]
        device = scores.device
        if scores.dtype != torch.float32:
            scores = scores.float()  # [b, V]
        t = tgt[rows].to(device)  # [b]
        if ((t < 0) | (t >= vocab)).any():
            raise ValueError(f"target index out of range [0, {vocab}) in queries {rows}")
        excl_rows, excl_cols = _exclusion_pairs(exclude, rows, vocab, device)
        if ranks:
            all_ranks[rows] = _chunk_ranks(scores, t, excl_rows, excl_cols).cpu()
        if all_ids is not None:
            all_ids[rows] = _chunk_topk(scores, k, excl_rows, excl_cols).cpu()
    return all_ranks.to(out_device), all_ids


def _counts_against(values: Tensor, target_score: Tensor) -> Tensor:
    """Whether ``values`` count against targets scored ``target_score`` (broadcast).

    ``v >= t``, with NaN treated as ``-inf`` on both sides (a NaN target is tied with every
    ``-inf`` or NaN item, and those ties count against it).
    """
    return (values >= target_score) | (torch.isnan(values) & (target_score == float("-inf")))


def _chunk_ranks(scores: Tensor, t: Tensor, excl_rows: Tensor, excl_cols: Tensor) -> Tensor:
    """Ranks for one chunk, without modifying or copying ``scores`` [b, V].

    Count every item that scores ``>=`` the target (the target itself included), then subtract
    the reserved columns and the excluded items (the target kept) that were counted.
    """
    b = scores.shape[0]
    arange = torch.arange(b, device=scores.device)
    target_score = scores[arange, t]  # [b]
    target_score = torch.where(torch.isnan(target_score), float("-inf"), target_score)  # [b]
    ts = target_score[:, None]  # [b, 1]
    count = (scores >= ts).sum(dim=1, dtype=torch.int64)  # [b]
    neg_inf = torch.nonzero(target_score == float("-inf")).flatten()  # rare: NaN/-inf targets
    if len(neg_inf):
        count[neg_inf] += torch.isnan(scores[neg_inf]).sum(dim=1)
    count -= _counts_against(scores[:, :NUM_RESERVED], ts).sum(dim=1)
    if len(excl_cols):
        # a mask, not a sort: duplicates in the exclusion lists are harmless
        keep = (excl_cols != t[excl_rows]) & (excl_cols >= NUM_RESERVED)
        er, ec = excl_rows[keep], excl_cols[keep]
        removed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # [b, V]
        removed[er, ec] = _counts_against(scores[er, ec], target_score[er])
        count -= removed.sum(dim=1, dtype=torch.int64)
    r = count - 1  # the target itself
    miss = (t == PAD) | (t == OOV)
    return torch.where(miss, torch.full_like(r, MISS_RANK), r)


def _chunk_topk(scores: Tensor, k: int, excl_rows: Tensor, excl_cols: Tensor) -> Tensor:
    """Top-k ids for one chunk; removed items never appear (``scores`` is not modified)."""
    b, vocab = scores.shape
    masked = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    removed = torch.zeros((b, vocab), dtype=torch.bool, device=scores.device)  # [b, V]
    removed[excl_rows, excl_cols] = True
    removed[:, :NUM_RESERVED] = True
    masked.masked_fill_(removed, float("-inf"))  # [b, V]
    kk = min(k, vocab)
    ids = masked.topk(kk, dim=1).indices  # [b, kk]
    ids = torch.where(removed.gather(1, ids), torch.zeros_like(ids), ids)  # [b, kk]
    if kk < k:
        ids = torch.cat([ids, ids.new_zeros((b, k - kk))], dim=1)  # [b, k]
    return ids


def _exclusion_pairs(
    exclude: Exclude | None, rows: slice, vocab: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(row-in-chunk, item) pairs to remove for queries ``rows``."""
    if exclude is None:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    values, offsets = exclude
    lo, hi = int(offsets[rows.start]), int(offsets[rows.stop])
    cols = np.asarray(values[lo:hi], dtype=np.int64)
    lengths = np.diff(np.asarray(offsets[rows.start : rows.stop + 1], dtype=np.int64))
    row_ids = np.repeat(np.arange(rows.stop - rows.start, dtype=np.int64), lengths)
    if len(cols) and (cols.min() < 0 or cols.max() >= vocab):
        raise ValueError(f"excluded item index out of range [0, {vocab}) in queries {rows}")
    return (
        torch.from_numpy(row_ids).to(device),
        torch.from_numpy(cols).to(device),
    )


def _check_csr(exclude: Exclude, num_queries: int) -> None:
    values, offsets = exclude
    if len(offsets) != num_queries + 1:
        raise ValueError(f"exclude offsets have length {len(offsets)}, expected {num_queries + 1}")
    if len(offsets) and (offsets[0] != 0 or offsets[-1] != len(values)):
        raise ValueError("exclude offsets must start at 0 and end at len(values)")


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ---------------------------------------------------------------------------------- metrics
def per_query_metrics(ranks: Tensor | np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query metric values (the bootstrap resamples these).

    Args:
        ranks: 0-based target ranks ``[Q]`` (:data:`MISS_RANK` = miss).
        ks: Cut-offs.

    Returns:
        ``{"recall@K", "hr@K", "ndcg@K", "mrr@K"}`` -> float64 arrays ``[Q]``. With a single
        target per query, recall@K and hr@K are identical (both 1 if rank < K else 0);
        ndcg@K is ``1 / log2(rank + 2)`` and mrr@K is ``1 / (rank + 1)`` inside the cut-off, 0
        outside.
    """
    r = _as_numpy_ranks(ranks)
    out: dict[str, np.ndarray] = {}
    rf = np.minimum(r, 2**52).astype(np.float64)  # exact for any real rank, finite for misses
    for k in ks:
        hit = r < int(k)
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(rf + 2.0), 0.0)
        out[f"mrr@{k}"] = np.where(hit, 1.0 / (rf + 1.0), 0.0)
    return out


def metrics_from_ranks(ranks: Tensor | np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Mean of :func:`per_query_metrics` over all queries (misses included as 0).

    Args:
        ranks: 0-based target ranks ``[Q]``.
        ks: Cut-offs.

    Returns:
        ``{"recall@K": .., "hr@K": .., "ndcg@K": .., "mrr@K": ..}`` for every K (NaN when there
        are no queries).
    """
    per_query = per_query_metrics(ranks, ks)
    return {name: float(v.mean()) if len(v) else float("nan") for name, v in per_query.items()}


def coverage_at_k(topk_ids: Tensor | np.ndarray, num_items: int) -> float:
    """Share of the real catalogue (indices ``2..V-1``) recommended to at least one query.

    Args:
        topk_ids: Recommendation lists ``[Q, k]`` (0 = padding, ignored).
        num_items: Vocabulary size ``V`` including the reserved indices.
    """
    ids = np.asarray(topk_ids.cpu() if isinstance(topk_ids, Tensor) else topk_ids).ravel()
    real = num_items - NUM_RESERVED
    if real <= 0:
        return float("nan")
    distinct = np.unique(ids[ids >= NUM_RESERVED])
    return float(len(distinct) / real)


def mean_popularity(topk_ids: Tensor | np.ndarray, item_counts: np.ndarray) -> float:
    """Mean training count of the recommended items (padding ignored); lower = less mainstream.

    Args:
        topk_ids: Recommendation lists ``[Q, k]``.
        item_counts: Training frequency per item index ``[V]``.
    """
    ids = np.asarray(topk_ids.cpu() if isinstance(topk_ids, Tensor) else topk_ids).ravel()
    ids = ids[ids >= NUM_RESERVED]
    if len(ids) == 0:
        return float("nan")
    return float(np.asarray(item_counts, dtype=np.float64)[ids].mean())


def _as_numpy_ranks(ranks: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(ranks, Tensor):
        return ranks.detach().cpu().numpy().astype(np.int64)
    return np.asarray(ranks, dtype=np.int64)


# -------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    values: np.ndarray | Tensor,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of the mean, resampling queries with replacement.

    Args:
        values: Per-query values ``[Q]`` (e.g. from :func:`per_query_metrics`).
        n: Number of resamples (0 gives ``(mean, nan, nan)``).
        alpha: ``1 - alpha`` is the coverage (0.05: a 95% interval).
        seed: Random seed (same seed, same intervals).

    Returns:
        ``(mean, lo, hi)``.
    """
    res = bootstrap_cis({"v": np.asarray(values, dtype=np.float64)}, n=n, alpha=alpha, seed=seed)
    return res["v"]


def bootstrap_cis(
    per_query: Mapping[str, np.ndarray],
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """:func:`bootstrap_ci` for several metrics at once, with the *same* resampled queries.

    Args:
        per_query: Metric name -> per-query values, all ``[Q]``.
        n: Number of resamples.
        alpha: ``1 - alpha`` is the coverage.
        seed: Random seed.

    Returns:
        Metric name -> ``(mean, lo, hi)``.
    """
    names = list(per_query)
    if not names:
        return {}
    mat = np.stack([np.asarray(per_query[m], dtype=np.float64) for m in names])  # [M, Q]
    q = mat.shape[1]
    means = mat.mean(axis=1) if q else np.full(len(names), np.nan)
    if n <= 0 or q == 0:
        return {m: (float(means[i]), float("nan"), float("nan")) for i, m in enumerate(names)}
    rng = np.random.default_rng(seed)
    boot = np.empty((len(names), n))  # [M, n]
    per_batch = max(1, (1 << 23) // q)  # bound the index matrix at ~64 MB
    for start in range(0, n, per_batch):
        stop = min(n, start + per_batch)
        idx = rng.integers(0, q, size=(stop - start, q))  # [b, Q]
        boot[:, start:stop] = mat[:, idx].mean(axis=2)  # [M, b]
    lo = np.quantile(boot, alpha / 2, axis=1)
    hi = np.quantile(boot, 1 - alpha / 2, axis=1)
    return {m: (float(means[i]), float(lo[i]), float(hi[i])) for i, m in enumerate(names)}


def paired_diff(
    a: np.ndarray | Tensor,
    b: np.ndarray | Tensor,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired bootstrap of ``mean(a) - mean(b)`` for two models on the same queries.

    Each resample draws one set of query indices and uses it for both models, so the interval
    reflects only the per-query differences.

    Args:
        a: Per-query values of model A ``[Q]``.
        b: Per-query values of model B ``[Q]``, same queries in the same order.
        n: Number of resamples.
        alpha: ``1 - alpha`` is the coverage.
        seed: Random seed.

    Returns:
        ``(diff, lo, hi)``; an interval excluding 0 means A and B differ at level ``alpha``.
    """
    av = np.asarray(a, dtype=np.float64)
    bv = np.asarray(b, dtype=np.float64)
    if av.shape != bv.shape:
        raise ValueError(f"paired_diff needs the same queries: shapes {av.shape} vs {bv.shape}")
    return bootstrap_ci(av - bv, n=n, alpha=alpha, seed=seed)
