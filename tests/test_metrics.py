"""Full-catalogue metrics against a plain brute-force reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.metrics import (
    MISS_RANK,
    bootstrap_ci,
    bootstrap_cis,
    coverage_at_k,
    mean_popularity,
    metrics_from_ranks,
    paired_diff,
    per_query_metrics,
    rank_from_scores,
    rank_of_targets,
    topk_from_scores,
)


# --------------------------------------------------------------------- brute-force reference
def brute_rank(scores: list[float], target: int, excluded: set[int]) -> int | None:
    """Rank by sorting: position of the target when ties are broken against it; None = miss."""
    if target in (0, 1):
        return None
    cands = [j for j in range(2, len(scores)) if j == target or j not in excluded]
    # sort by score descending; among ties the target goes last
    order = sorted(cands, key=lambda j: (-scores[j], 1 if j == target else 0))
    return order.index(target)


def brute_metrics(ranks: list[int | None], k: int) -> dict[str, float]:
    hits = [r is not None and r < k for r in ranks]
    ndcg = [1 / math.log2(r + 2) if h else 0.0 for r, h in zip(ranks, hits, strict=True)]
    mrr = [1 / (r + 1) if h else 0.0 for r, h in zip(ranks, hits, strict=True)]
    n = len(ranks)
    return {
        f"hr@{k}": sum(hits) / n,
        f"recall@{k}": sum(hits) / n,
        f"ndcg@{k}": sum(ndcg) / n,
        f"mrr@{k}": sum(mrr) / n,
    }


def to_csr(sets: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(sets) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in sets])
    values = np.array([x for s in sets for x in s], dtype=np.int64)
    return values, offsets


def random_case(seed: int, q: int = 37, v: int = 23, d: int = 4, tie_levels: int = 3):
    """Integer-valued embeddings so many exact ties occur; some pad/OOV targets; seen sets."""
    rng = np.random.default_rng(seed)
    query = rng.integers(-1, 2, size=(q, d)).astype(np.float32)
    items = rng.integers(-tie_levels, tie_levels + 1, size=(v, d)).astype(np.float32)
    targets = rng.integers(0, v, size=q)
    seen = [sorted(set(rng.integers(0, v, size=rng.integers(0, 6)).tolist())) for _ in range(q)]
    # make sure some targets are inside their own seen set
    for i in range(0, q, 5):
        seen[i] = sorted(set(seen[i]) | {int(targets[i])})
    return query, items, targets, seen


# --------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_seen", [False, True])
def test_rank_matches_brute_force(seed: int, use_seen: bool) -> None:
    query, items, targets, seen = random_case(seed)
    scores = query @ items.T
    exclude = to_csr(seen) if use_seen else None
    got = rank_of_targets(
        torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(targets), exclude
    )
    for i in range(len(targets)):
        ref = brute_rank(scores[i].tolist(), int(targets[i]), set(seen[i]) if use_seen else set())
        assert got[i].item() == (MISS_RANK if ref is None else ref), i
    assert (got == MISS_RANK).any(), "the case should contain pad/OOV targets"


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 36, 37, 1000])
def test_chunking_does_not_change_results(chunk_size: int) -> None:
    query, items, targets, seen = random_case(7)
    args = (torch.from_numpy(query), torch.from_numpy(items), torch.from_numpy(targets))
    full = rank_of_targets(*args, exclude=to_csr(seen), chunk_size=10_000)
    chunked = rank_of_targets(*args, exclude=to_csr(seen), chunk_size=chunk_size)
    assert torch.equal(full, chunked)
    fn = lambda s: torch.from_numpy(query[s] @ items.T)  # noqa: E731
    top_full = topk_from_scores(fn, len(targets), 6, to_csr(seen), chunk_size=10_000)
    top_chunk = topk_from_scores(fn, len(targets), 6, to_csr(seen), chunk_size=chunk_size)
    assert torch.equal(top_full, top_chunk)


def test_constant_scorer_gets_no_credit() -> None:
    v = 50
    targets = torch.arange(2, 12)
    ranks = rank_from_scores(lambda s: torch.zeros(s.stop - s.start, v), targets)
    assert (ranks == v - 3).all()  # 48 real items, the target is tied with all 47 others: last
    assert metrics_from_ranks(ranks, [10])["hr@10"] == 0.0


def test_reserved_items_never_ranked_and_cold_target_is_a_miss() -> None:
    # pad/OOV have the highest scores but must not push the target down
    scores = torch.tensor([[100.0, 100.0, 3.0, 2.0, 1.0]] * 3)
    ranks = rank_from_scores(lambda s: scores[s], torch.tensor([2, 1, 0]))
    assert ranks.tolist() == [0, MISS_RANK, MISS_RANK]
    m = metrics_from_ranks(ranks, [1, 100])
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@100"] == pytest.approx(1 / 3)
    assert m["ndcg@100"] == pytest.approx(1 / 3)


def test_seen_filtering_keeps_the_target() -> None:
    scores = torch.tensor([[0.0, 0.0, 5.0, 4.0, 3.0, 2.0]])
    # target 5 (score 2): items 2, 3 seen -> removed, target also seen -> kept
    ranks = rank_from_scores(lambda s: scores[s], torch.tensor([5]), to_csr([[2, 3, 5]]))
    assert ranks.tolist() == [1]  # only item 4 beats it
    top = topk_from_scores(lambda s: scores[s], 1, 4, to_csr([[2, 3, 5]]))
    assert top.tolist() == [[4, 0, 0, 0]]  # lists drop every seen item; padded with 0


def test_duplicate_and_reserved_exclusions_are_harmless() -> None:
    scores = torch.tensor([[9.0, 9.0, 5.0, 4.0, 3.0, 2.0]])
    ex = to_csr([[3, 3, 0, 1, 2, 2, 5]])  # duplicates, reserved ids and the target itself
    assert rank_from_scores(lambda s: scores[s], torch.tensor([5]), ex).tolist() == [1]
    top = topk_from_scores(lambda s: scores[s], 1, 2, ex)
    assert top.tolist() == [[4, 0]]


def test_nan_scores_never_help() -> None:
    scores = torch.tensor([[0.0, 0.0, float("nan"), 1.0, float("nan")]])
    assert rank_from_scores(lambda s: scores[s], torch.tensor([2])).tolist() == [2]
    assert rank_from_scores(lambda s: scores[s], torch.tensor([3])).tolist() == [0]


def test_score_fn_output_not_modified() -> None:
    stored = torch.tensor([[0.0, 0.0, 1.0, 2.0]])
    rank_from_scores(lambda s: stored[s], torch.tensor([2]), to_csr([[3]]))
    assert stored.tolist() == [[0.0, 0.0, 1.0, 2.0]]


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="out of range"):
        rank_from_scores(lambda s: torch.zeros(1, 4), torch.tensor([4]))
    with pytest.raises(ValueError, match="offsets"):
        rank_from_scores(lambda s: torch.zeros(1, 4), torch.tensor([2]), to_csr([[2], [3]]))
    with pytest.raises(ValueError, match="queries"):
        rank_of_targets(torch.zeros(2, 3), torch.zeros(5, 3), torch.tensor([2]))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    q=st.integers(1, 12),
    v=st.integers(3, 15),
    chunk=st.integers(1, 13),
)
def test_property_against_brute_force(seed: int, q: int, v: int, chunk: int) -> None:
    query, items, targets, seen = random_case(seed, q=q, v=v, d=2, tie_levels=1)
    scores = query @ items.T
    got = rank_of_targets(
        torch.from_numpy(query),
        torch.from_numpy(items),
        torch.from_numpy(targets),
        to_csr(seen),
        chunk_size=chunk,
    )
    ref = [brute_rank(scores[i].tolist(), int(targets[i]), set(seen[i])) for i in range(q)]
    assert got.tolist() == [MISS_RANK if r is None else r for r in ref]
    for k in (1, 3, 10):
        m = metrics_from_ranks(got, [k])
        for name, value in brute_metrics(ref, k).items():
            assert m[name] == pytest.approx(value)


def test_topk_against_brute_force() -> None:
    query, items, targets, seen = random_case(3, tie_levels=50)  # few ties: order is defined
    scores = query @ items.T + np.arange(items.shape[0]) * 1e-3  # break remaining ties
    top = topk_from_scores(lambda s: torch.from_numpy(scores[s]), len(targets), 5, to_csr(seen))
    for i in range(len(targets)):
        cands = [j for j in range(2, items.shape[0]) if j not in set(seen[i])]
        ref = sorted(cands, key=lambda j: -scores[i, j])[:5]
        assert top[i].tolist() == ref


# --------------------------------------------------------------------------------- metrics
def test_metric_values_by_hand() -> None:
    ranks = np.array([0, 1, 9, 10, MISS_RANK])
    m = metrics_from_ranks(ranks, [10])
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["recall@10"] == m["hr@10"]
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 10) / 5)
    pq = per_query_metrics(torch.tensor(ranks), [1])
    assert pq["hr@1"].tolist() == [1, 0, 0, 0, 0]


def test_coverage_and_popularity() -> None:
    topk = np.array([[2, 3, 0], [3, 4, 0]])
    assert coverage_at_k(topk, num_items=12) == pytest.approx(3 / 10)
    counts = np.array([0, 0, 10, 20, 60] + [0] * 7)
    assert mean_popularity(torch.tensor(topk), counts) == pytest.approx((10 + 20 + 20 + 60) / 4)


# ------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_covers_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = (rng.random(100) < 0.3).astype(float)
    large = (rng.random(10_000) < 0.3).astype(float)
    m_s, lo_s, hi_s = bootstrap_ci(small, n=500, seed=1)
    m_l, lo_l, hi_l = bootstrap_ci(large, n=500, seed=1)
    assert lo_s <= m_s <= hi_s and lo_l <= m_l <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5  # width ~ 1/sqrt(Q): 100x the queries, 1/10 width
    # binomial standard error: 95% half-width ~ 1.96 * sqrt(p(1-p)/Q)
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 * math.sqrt(0.3 * 0.7 / 10_000), rel=0.2)
    assert bootstrap_ci(small, n=500, seed=1) == (m_s, lo_s, hi_s)  # deterministic


def test_bootstrap_cis_shares_resamples() -> None:
    v = np.random.default_rng(0).random(200)
    res = bootstrap_cis({"a": v, "b": v}, n=200, seed=3)
    assert res["a"] == res["b"]
    assert bootstrap_ci(v, n=0)[1] != bootstrap_ci(v, n=0)[1]  # NaN without resamples


def test_paired_diff_is_tighter_than_independent() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random(2000) < 0.4).astype(float)
    better = base.copy()
    flip = rng.choice(np.flatnonzero(base == 0), 60, replace=False)
    better[flip] = 1.0  # B = A plus 60 extra hits on the same queries: +0.03
    diff, lo, hi = paired_diff(better, base, n=1000, seed=0)
    assert diff == pytest.approx(0.03)
    assert lo > 0  # a paired test sees the consistent gain ...
    _, lo_a, hi_a = bootstrap_ci(better, n=1000, seed=0)
    _, lo_b, hi_b = bootstrap_ci(base, n=1000, seed=0)
    assert lo_a < hi_b  # ... which two independent intervals cannot separate
    assert hi - lo < (hi_a - lo_a) / 2
    with pytest.raises(ValueError, match="same queries"):
        paired_diff(base, base[:-1])
