"""Old vs new: hand-computed ranks across different catalogues, and real runs of the tiny preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_pipeline_run import TINY, runs_dir, tiny_run

from twotower.cli import main
from twotower.compare import (
    OOV_ID,
    PAD_ID,
    ModelSide,
    RawQueries,
    compare_runs,
    compare_sides,
    load_side,
    overlap_at_k,
    recall_curve,
    score_queries,
)
from twotower.metrics import MISS_RANK
from twotower.query import QuerySpec


# ------------------------------------------------------------------------------ hand-built
def _side(name: str, tracks: list[str], vectors: dict[str, list[float]], nxt: dict[str, str]):
    """A model whose query is the vector of ``nxt[last history track]`` (zeros if none)."""
    emb = torch.tensor([vectors[t] for t in tracks], dtype=torch.float32)  # [N, d]
    padded = torch.cat([torch.zeros(2, emb.shape[1]), emb])  # [N + 2, d]
    row = {t: i + 2 for i, t in enumerate(tracks)}
    lut = torch.tensor(
        [0, 0, *[row.get(nxt.get(t, ""), 0) for t in tracks]], dtype=torch.long
    )  # index -> index of its successor (0: none)

    def encode(query):
        return padded[lut[query.history[:, -1]]]  # [Q, d]

    tracks = np.array(tracks, dtype=object)
    return ModelSide(name, name, tracks, emb, encode, QuerySpec(3, True, True, True))


def _queries(histories: list[list[str]], targets: list[str], filter_seen=False) -> RawQueries:
    lens = [len(h) for h in histories]
    flat = np.array([t for h in histories for t in h], dtype=object)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    seen = [list(dict.fromkeys(h)) for h in histories]
    n = len(targets)
    return RawQueries(
        history=flat,
        offsets=off,
        targets=np.array(targets, dtype=object),
        users=np.full(n, PAD_ID, dtype=object),
        hours=np.full(n, -1),
        contexts=np.full(n, PAD_ID, dtype=object),
        seen=np.array([t for s in seen for t in s], dtype=object),
        seen_offsets=np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64),
        filter_seen=filter_seen,
        label="hand-built",
    )


# A: catalogue a, b, c; query = vector of the last track itself ("play it again").
SIDE_A = _side("A", ["a", "b", "c"], {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1]},
               {"a": "a", "b": "b", "c": "c"})  # fmt: skip
# B: catalogue b, a, d (no c; d is new); query = vector of the successor: a -> b, b -> d.
SIDE_B = _side("B", ["b", "a", "d"], {"b": [1, 0, 0], "a": [0, 1, 0], "d": [0, 0, 1]},
               {"a": "b", "b": "d"})  # fmt: skip
QUERIES = _queries([["a"], ["a"], ["b"], ["b"]], ["a", "b", "c", "d"])


def test_ranks_map_raw_ids_and_count_missing_targets_as_misses():
    # ties count against the target: a zero-score target behind one 1 and one 0 has rank 2
    ra = score_queries(SIDE_A, QUERIES, k=1)
    assert ra.ranks.tolist() == [0, 2, 2, MISS_RANK]  # d is not in A's catalogue
    assert ra.missing_targets == 1
    assert ra.topk[:, 0].tolist() == ["a", "a", "b", "b"]
    rb = score_queries(SIDE_B, QUERIES, k=1)
    assert rb.ranks.tolist() == [2, 0, MISS_RANK, 0]  # c is not in B's catalogue
    assert rb.missing_targets == 1
    assert rb.topk[:, 0].tolist() == ["b", "b", "d", "d"]


def test_seen_filtering_removes_history_but_keeps_the_target():
    q = _queries([["a"], ["a"]], ["a", "b"], filter_seen=True)
    ranks = score_queries(SIDE_A, q, k=2).ranks.tolist()
    # query 0: the seen target a stays ranked first; query 1: a is removed, b ties with c
    assert ranks == [0, 1]


def test_report_values_by_hand():
    rep = compare_sides(SIDE_A, SIDE_B, QUERIES, ks=(1, 2), bootstrap=200)
    r1 = rep.metrics["recall@1"]
    assert r1.a[0] == pytest.approx(0.25) and r1.b[0] == pytest.approx(0.5)
    assert r1.diff[0] == pytest.approx(0.25)
    assert (r1.better, r1.worse, r1.same) == (2, 1, 1)  # B wins q1, q3; loses q0; q2 misses
    nd2 = rep.metrics["ndcg@2"]
    assert nd2.a[0] == pytest.approx(0.25) and nd2.b[0] == pytest.approx(0.5)
    assert rep.missing_targets == {"a": 1, "b": 1}
    assert rep.catalogue == {"a": 3, "b": 3, "shared": 2}
    assert rep.overlap[1] == 0.0
    assert rep.curve["a"][:4] == pytest.approx([0.25, 0.25, 0.75, 0.75])
    assert rep.curve["b"][:4] == pytest.approx([0.5, 0.5, 0.75, 0.75])
    md = rep.to_markdown()
    assert "| recall@1 | 0.2500" in md and "A 1, B 1 of 4" in md
    doc = json.loads(rep.to_json())
    assert doc["metrics"]["recall@1"]["better"] == 2
    assert doc["recall_curve"]["k"][:3] == [1, 2, 3]


def test_same_model_gives_zero_difference_and_full_overlap():
    rep = compare_sides(SIDE_A, SIDE_A, QUERIES, ks=(1, 2), bootstrap=100)
    for c in rep.metrics.values():
        assert c.diff == (0.0, 0.0, 0.0)
        assert (c.better, c.worse, c.same) == (0, 0, 4)
    assert rep.overlap == {1: 1.0, 2: 1.0}


def test_curve_and_overlap_helpers():
    assert recall_curve(np.array([0, 2, MISS_RANK]), 4).tolist() == pytest.approx(
        [1 / 3, 1 / 3, 2 / 3, 2 / 3]
    )
    a = np.array([["x", "y"], ["x", PAD_ID]], dtype=object)
    b = np.array([["y", "z"], ["x", PAD_ID]], dtype=object)
    assert overlap_at_k(a, b, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert OOV_ID != PAD_ID


# ------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.mark.slow
def test_run_vs_its_own_checkpoint_matches_the_evaluated_metrics(run_a):
    lineage = json.loads((run_a / "lineage.json").read_text())
    rep = compare_runs(run_a, run_a / lineage["checkpoint"]["path"], bootstrap=200)
    metrics = json.loads((run_a / "metrics.json").read_text())
    model = next(r for r in metrics["rows"] if r["kind"] == "model")["metrics"]
    assert rep.num_queries == metrics["num_queries"]
    for name, c in rep.metrics.items():
        # the artifact (A) and the checkpoint (B) rank exactly like `evaluate` did
        assert c.a[0] == pytest.approx(model[name]["mean"], abs=1e-9)
        assert c.b[0] == pytest.approx(model[name]["mean"], abs=1e-9)
        assert c.diff[0] == 0.0 and c.better == c.worse == 0
    assert all(v == 1.0 for v in rep.overlap.values())


def _rows_of(side: ModelSide, rows: np.ndarray, name: str) -> ModelSide:
    """``side`` restricted to (or reordered by) catalogue ``rows``: same tower, same vectors.

    Its encoder maps its own indices back to ``side``'s; tracks it lacks are OOV to it.
    """
    lut = torch.from_numpy(np.concatenate([[0, 1], rows + 2]).astype(np.int64))

    def encode(query):
        return side.tower(query.with_history(lut[query.history]))

    return ModelSide(
        name, name, side.track_ids[rows], side.item_emb[rows], encode, side.spec,
        side.user_ids, side.context_ids,
    )  # fmt: skip


@pytest.mark.slow
def test_other_catalogues_go_through_raw_ids(run_a):
    from twotower.compare import data_config_of
    from twotower.data.pipeline import prepare_data

    side_a = load_side(run_a)
    queries = RawQueries.from_prepared(prepare_data(data_config_of(side_a)), "test")
    # the same model with its catalogue rows reversed: identical results through raw ids
    side_r = _rows_of(side_a, np.arange(side_a.num_tracks)[::-1].copy(), "reversed")
    assert side_r.track_ids[0] != side_a.track_ids[0]
    same = compare_sides(side_a, side_r, queries, ks=(10,), bootstrap=50)
    assert (score_queries(side_r, queries).ranks == score_queries(side_a, queries).ranks).all()
    assert same.metrics["ndcg@10"].diff[0] == 0.0 and same.overlap[10] == 1.0
    # a third of the catalogue dropped: those targets are misses for that side, and counted
    keep = np.flatnonzero(np.arange(side_a.num_tracks) % 3 != 0)
    side_c = _rows_of(side_a, keep, "subset")
    rep = compare_sides(side_a, side_c, queries, ks=(10,), bootstrap=100)
    dropped = set(np.delete(side_a.track_ids, keep))
    is_dropped = np.array([t in dropped for t in queries.targets])
    assert is_dropped.sum() > 0
    assert rep.missing_targets == {"a": 0, "b": int(is_dropped.sum())}
    assert rep.catalogue == {"a": 500, "b": len(keep), "shared": len(keep)}
    assert (score_queries(side_c, queries).ranks[is_dropped] == MISS_RANK).all()
    assert rep.metrics["recall@10"].b[0] < rep.metrics["recall@10"].a[0]
    assert f"B {int(is_dropped.sum())} of 300" in rep.to_markdown()


@pytest.mark.slow
def test_cli_with_artifact_folders_and_a_data_config(run_a, tmp_path_factory, tmp_path, capsys):
    base = runs_dir(tmp_path_factory)
    run_b = tiny_run(tmp_path_factory, "tiny-b")
    md, js, png = tmp_path / "c.md", tmp_path / "c.json", tmp_path / "c.png"
    rc = main(
        ["compare", str(run_a / "artifacts"), str(run_b / "artifacts"),
         "--data-config", str(TINY), "--set", f"cache_dir={base / 'cache'}",
         "--bootstrap", "100", "--md", str(md), "--json", str(js), "--png", str(png)]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "| recall@10 |" in out and md.read_text() in out
    doc = json.loads(js.read_text())
    assert doc["num_queries"] == 300 and doc["a"]["name"] == "tiny-a"
    # same seed, same data: the twin runs recommend the same lists
    assert doc["overlap"]["10"] == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "queries from --data-config" in " ".join(doc["notes"])
