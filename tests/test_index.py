"""One test suite for every retriever: exact search and the FAISS index types.

Planted structure: item vectors are noisy copies of 40 cluster centres on the unit sphere, and
every query is a slightly perturbed copy of a known item, so the right top-1 is that item and
its exact top-10 are its closest cluster mates.

Tolerances: exact search and Flat must return the planted item first for every query and agree
with each other exactly; tuned ANN indexes (HNSW32, IVF-Flat, IVF-PQ re-ranked with RFlat, and
the refined IVF-PQ that ``auto`` picks above 5M tracks, sized by :func:`ivfpq_spec` for this
catalogue) must reach recall@10 >= 0.95 against exact search and the planted top-1 for >= 98%
of queries. Pure
IVF-PQ with d/2 one-byte codes is lossy by construction (its ceiling is set by the code size,
not by nprobe; ~0.8 here because cluster mates have near-equal scores), so it must reach
recall@10 >= 0.70 and the planted top-1 for >= 95% of queries.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from twotower.index import (
    ExactSearch,
    Searcher,
    auto_spec,
    build_index,
    check_index,
    get_search_params,
    ivfpq_spec,
    load_index,
    recall_at_k,
    save_index,
    search_param_name,
    set_search_param,
    tune_index,
)

V, D, C, Q = 4000, 32, 40, 200


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """OpenMP spin-waits make FAISS training 5x slower on a shared 2-core machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(C, D))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, C, V)
    x = centres[labels] + 0.35 * rng.normal(size=(V, D)) / np.sqrt(D)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = rng.choice(V, Q, replace=False)
    q = x[truth] + 0.05 * rng.normal(size=(Q, D)) / np.sqrt(D)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x.astype(np.float32), q.astype(np.float32), truth


# spec -> (min recall@10 vs exact after tuning, min share of queries with the planted top-1)
CASES = {
    "exact-numpy": (1.0, 1.0),
    "exact-torch": (1.0, 1.0),
    "Flat": (1.0, 1.0),
    "HNSW32": (0.95, 0.98),
    "IVF64,Flat": (0.95, 0.98),
    "IVF64,PQ16,RFlat": (0.95, 0.98),
    "IVF64,PQ16": (0.70, 0.95),
    # what auto_spec picks above HNSW_MAX, sized for this catalogue: IVF256,PQ16,RFlat
    ivfpq_spec(V, D): (0.95, 0.98),
}


@pytest.fixture(scope="module")
def tuned(planted: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, tuple]:
    x, q, _ = planted
    out = {}
    for spec in CASES:
        if spec == "exact-numpy":
            index = ExactSearch(x)
        elif spec == "exact-torch":
            index = ExactSearch(torch.from_numpy(x), chunk_size=64)
        else:
            index = build_index(x, spec)
        out[spec] = (index, tune_index(index, x, q, k=10, target_recall=0.95))
    return out


@pytest.mark.parametrize("spec", list(CASES))
def test_retriever_finds_planted_neighbours(spec: str, planted, tuned) -> None:
    x, q, truth = planted
    index, info = tuned[spec]
    min_recall, min_top1 = CASES[spec]
    assert isinstance(index, Searcher)
    scores, ids = index.search(q, 10)
    assert scores.shape == ids.shape == (Q, 10)
    assert ids.dtype == np.int64
    assert (ids >= 0).all() and (ids < V).all()
    # scores are the inner products of the returned rows (PQ: approximated from codes), best first
    atol = 0.05 if spec.endswith("PQ16") else 1e-4
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=atol)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert (ids[:, 0] == truth).mean() >= min_top1
    _, exact_ids = ExactSearch(x).search(q, 10)
    measured = recall_at_k(ids, exact_ids, 10)
    assert measured >= min_recall
    assert info["recall_at_10"] == pytest.approx(measured)
    assert info["param"] == search_param_name(index)
    if info["param"] is not None:
        assert get_search_params(index)[info["param"]] == info["value"]


def test_exact_and_flat_agree(planted) -> None:
    x, q, _ = planted
    s1, i1 = ExactSearch(x).search(q, 10)
    s2, i2 = build_index(x, "Flat").search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_exact_search_hand_computed() -> None:
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)
    scores, ids = ExactSearch(items).search(np.array([[0.8, 0.6]]), 3)
    np.testing.assert_array_equal(ids, [[2, 0, 1]])  # 0.96, 0.8, 0.6
    np.testing.assert_allclose(scores, [[0.96, 0.8, 0.6]], atol=1e-6)
    # k larger than the catalogue: padded with -1 like FAISS
    _, ids = ExactSearch(items).search(np.array([[0.8, 0.6]]), 6)
    np.testing.assert_array_equal(ids[0, 4:], [-1, -1])
    # l2 metric returns squared distances, smallest first (same as faiss IndexFlatL2)
    d2, ids = ExactSearch(items, metric="l2").search(np.array([[1.0, 0.0]]), 2)
    np.testing.assert_array_equal(ids, [[0, 2]])
    np.testing.assert_allclose(d2, [[0.0, 0.8]], atol=1e-6)
    fd, fi = build_index(items, "Flat", metric="l2").search(np.array([[1.0, 0.0]], "f4"), 2)
    np.testing.assert_array_equal(fi, ids)
    np.testing.assert_allclose(fd, d2, atol=1e-6)


def test_tune_raises_the_knob_until_target(planted) -> None:
    x, q, _ = planted
    index = build_index(x, "IVF64,Flat")
    set_search_param(index, "nprobe", 1)
    _, ids1 = index.search(q, 10)
    exact = ExactSearch(x).search(q, 10)[1]
    low = recall_at_k(ids1, exact)
    info = tune_index(index, x, q, target_recall=0.999)
    assert info["param"] == "nprobe" and info["value"] > 1
    assert info["recall_at_10"] >= 0.999 > low
    # impossible target: the largest value (nprobe = nlist, i.e. exhaustive) is kept
    info = tune_index(build_index(x, "IVF64,Flat"), x, q, target_recall=1.01)
    assert info["value"] == 64 and info["recall_at_10"] == pytest.approx(1.0)


def test_auto_spec_thresholds() -> None:
    assert auto_spec(49_999, 64) == "Flat"
    assert auto_spec(50_000, 64) == "HNSW32"
    assert auto_spec(5_000_000, 64) == "HNSW32"
    # 4 * sqrt(2e7) = 17.9k -> 2^14 lists; PQ codes re-scored exactly (RFlat) to keep recall
    assert auto_spec(20_000_000, 64) == "IVF16384,PQ32,RFlat"
    assert auto_spec(5_000_001, 64) == ivfpq_spec(5_000_001, 64) == "IVF8192,PQ32,RFlat"
    assert ivfpq_spec(20_000_000, 64, refine=False) == "IVF16384,PQ32"
    assert ivfpq_spec(V, D) == "IVF256,PQ16,RFlat"  # the suite's case above
    assert build_index(np.eye(8, dtype=np.float32), "auto").ntotal == 8


def test_refined_index_beats_plain_pq_and_keeps_its_params(tmp_path, planted, tuned) -> None:
    """RFlat re-scoring lifts IVF-PQ recall at equal nprobe; k_factor survives save/load."""
    x, q, _ = planted
    spec = ivfpq_spec(V, D)
    _, exact = ExactSearch(x).search(q, 10)
    plain = build_index(x, ivfpq_spec(V, D, refine=False))
    refined = build_index(x, spec)
    set_search_param(plain, "nprobe", 32)
    set_search_param(refined, "nprobe", 32)
    r_plain = recall_at_k(plain.search(q, 10)[1], exact)
    r_refined = recall_at_k(refined.search(q, 10)[1], exact)
    assert r_refined >= 0.95 and r_refined >= r_plain + 0.05, (r_plain, r_refined)
    # refined scores are exact inner products (not PQ approximations)
    scores, ids = refined.search(q, 10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-5)
    assert search_param_name(refined) == "nprobe"
    set_search_param(refined, "k_factor", 8)
    save_index(refined, tmp_path / "r.faiss")
    for mmap in (False, True):
        loaded = load_index(tmp_path / "r.faiss", mmap=mmap)
        check_index(loaded, V, D)
        assert get_search_params(loaded) == {"nprobe": 32, "k_factor": 8}
        np.testing.assert_array_equal(loaded.search(q, 10)[1], refined.search(q, 10)[1])
    with pytest.raises(ValueError, match="k_factor needs a refined index"):
        set_search_param(plain, "k_factor", 8)


def _make_golden():
    path = Path(__file__).resolve().parent / "golden" / "make_golden.py"
    spec = importlib.util.spec_from_file_location("make_golden", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refined_index_through_export_and_retriever(tmp_path) -> None:
    """write_artifact tunes the refined index, the manifest keeps k_factor, Retriever restores it.

    640 planted tracks (8 clusters x 80, dim 16): the served similar-track lists of the
    IVF-PQ + RFlat artifact must match exact search (recall@10 >= 0.95).
    """
    from twotower.export import write_artifact
    from twotower.retrieve import Retriever

    parts = _make_golden().planted_parts(n_clusters=8, per_cluster=80, dim=16, seed=3)
    parts.pop("cluster")
    emb = parts["item_emb"]
    spec = ivfpq_spec(len(emb), emb.shape[1])
    assert spec == "IVF128,PQ8,RFlat"
    out = write_artifact(tmp_path / "art", index=spec, **parts)
    r = Retriever.load(out)
    m = r.manifest["index"]
    assert m["factory"] == spec and m["tuned_param"] == "nprobe"
    assert m["search_params"]["k_factor"] == 4 and m["ann_recall"] >= 0.95
    assert isinstance(faiss.downcast_index(r.index), faiss.IndexRefine)
    assert get_search_params(r.index) == m["search_params"]
    rows = np.arange(0, len(emb), 7)
    _, exact = ExactSearch(emb).search(emb[rows], 11)  # the track itself comes first
    got = [r.rows_of(r.similar_tracks(str(parts["vocab"]["tracks"][i]), k=10).ids) for i in rows]
    assert recall_at_k(np.stack(got), exact[:, 1:], 10) >= 0.95


def test_save_load_round_trip(tmp_path, planted) -> None:
    x, q, _ = planted
    index = build_index(x, "HNSW32")
    set_search_param(index, "efSearch", 48)
    save_index(index, tmp_path / "i.faiss")
    for mmap in (False, True):
        loaded = load_index(tmp_path / "i.faiss", mmap=mmap)
        check_index(loaded, V, D)
        assert get_search_params(loaded) == {"efSearch": 48}
        np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    with pytest.raises(ValueError, match="expected 10 of dim 32"):
        check_index(loaded, 10, D)


def test_clear_errors(tmp_path) -> None:
    x = np.eye(16, dtype=np.float32)
    with pytest.raises(ValueError, match="invalid FAISS index spec 'Bogus12'"):
        build_index(x, "Bogus12")
    with pytest.raises(ValueError, match="only 16 items"):
        build_index(x, "IVF64,Flat")
    with pytest.raises(ValueError, match="metric"):
        build_index(x, "Flat", metric="cosine")
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "missing.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        load_index(tmp_path / "junk.faiss")
    with pytest.raises(ValueError, match="queries must be"):
        ExactSearch(x).search(np.ones((2, 3), "f4"), 2)
    with pytest.raises(ValueError, match="efSearch"):
        set_search_param(build_index(x, "Flat"), "efSearch", 10)
