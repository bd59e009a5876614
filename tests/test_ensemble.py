"""Ensembles of trained models served as one two-tower model (twotower/model/ensemble.py).

By hand on small towers: the concatenated, weighted vectors give the weighted sum of the members'
scores, the config rebuilds the tower, inconsistent members are refused, ONNX matches torch.
End to end on the tiny synthetic preset: two seeds export as one artifact whose served scores
are the ensemble's, evaluate as one row, and members trained on other data are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import fit_tiny

from twotower.model.ensemble import (
    EnsembleModel,
    EnsembleQueryTower,
    bias_columns,
    temperature_weights,
)
from twotower.model.towers import ItemTower, QueryTower

REPO = Path(__file__).resolve().parents[1]
V = 15


def _member(seed: int, dim: int, item_bias: bool) -> tuple[QueryTower, ItemTower]:
    torch.manual_seed(seed)
    query = QueryTower(
        V, dim=dim, id_dim=8, encoder="transformer", max_len=6, num_layers=1, item_bias=item_bias
    ).eval()
    item = ItemTower(query.item_embedding, dim, num_artists=3, bias=item_bias).eval()
    if item.bias is not None:
        with torch.no_grad():
            item.bias.uniform_(-0.5, 0.5)
    return query, item


def _ensemble() -> tuple[EnsembleQueryTower, list[tuple[QueryTower, ItemTower]], list[float]]:
    members = [_member(0, 8, False), _member(1, 6, True)]
    weights = temperature_weights([0.05, 0.1])
    tower = EnsembleQueryTower([q.config for q, _ in members], weights).eval()
    for t, (q, _) in zip(tower.members, members, strict=True):
        t.load_state_dict(q.state_dict())
    return tower, members, weights


def test_weights_are_the_mean_of_the_members_logits() -> None:
    assert temperature_weights([0.05, 0.1]) == pytest.approx([2 / 3, 1 / 3])
    assert temperature_weights([0.2, 0.2, 0.2]) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="positive"):
        temperature_weights([0.05, 0.0])


def test_concatenated_vectors_score_the_weighted_sum_of_members() -> None:
    tower, members, weights = _ensemble()
    history = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 7, 2, 9, 9, 1]])
    ids = torch.arange(V)
    query_emb = tower(history)  # [2, 14]
    item_emb = torch.cat([item(ids) for _, item in members], dim=-1)  # [V, 14]
    assert query_emb.shape == (2, 14) and tower.config["dim"] == 14
    pairs = zip(weights, members, strict=True)
    expected = sum(w * (q(history) @ item(ids).T) for w, (q, item) in pairs)  # [2, V]
    torch.testing.assert_close(query_emb @ item_emb.T, expected)
    # the second member's bias sits in the last column; a plain tower's in its own last
    assert bias_columns(tower.config) == [13]
    assert bias_columns(members[1][0].config) == [5] and bias_columns(members[0][0].config) == []


def test_config_rebuilds_the_tower_and_catches_inconsistency() -> None:
    tower, _, _ = _ensemble()
    clone = EnsembleQueryTower(**tower.config).eval()
    clone.load_state_dict(tower.state_dict())
    history = torch.tensor([[0, 1, 2, 3]])
    torch.testing.assert_close(clone(history), tower(history))
    config = tower.config
    with pytest.raises(ValueError, match="dim=99"):
        EnsembleQueryTower(**{**config, "dim": 99})
    with pytest.raises(ValueError, match="unknown ensemble config keys"):
        EnsembleQueryTower(**{**config, "colour": 1})
    other = QueryTower(V + 1, dim=8, id_dim=8, encoder="mean", max_len=6).config
    with pytest.raises(ValueError, match="num_items"):
        EnsembleQueryTower([config["members"][0], other])
    with pytest.raises(ValueError, match="2 weights for 1 members"):
        EnsembleQueryTower(config["members"][:1], [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        EnsembleQueryTower([])


def test_onnx_matches_torch(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from twotower.onnx_export import ONNX_TOLERANCE, export_onnx

    tower, _, _ = _ensemble()
    info = export_onnx(tower, tmp_path / "q.onnx", history_len=6)
    assert info["max_abs_diff"] <= ONNX_TOLERANCE


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ensemble")
    return {
        "root": root,
        "a": fit_tiny(root, "a", seed_everything=0),
        "b": fit_tiny(root, "b", seed_everything=1, **{"model.item_bias": True}),
    }


@pytest.mark.slow
def test_two_seeds_export_and_serve_as_one_model(seeds) -> None:
    from twotower.export import export_checkpoint, read_manifest
    from twotower.model.module import TwoTowerModule
    from twotower.retrieve import Retriever

    out = export_checkpoint(
        [seeds["a"], seeds["b"]], str(seeds["root"] / "art"), index="Flat", onnx=True,
        progress=False,
    )  # fmt: skip
    manifest = read_manifest(out)
    assert [m["file"] for m in manifest["ensemble"]] == [
        str(Path(seeds[k]).resolve()) for k in "ab"
    ]
    assert sum(m["weight"] for m in manifest["ensemble"]) == pytest.approx(1.0)
    retriever = Retriever.load(out)
    modules = [
        TwoTowerModule.load_from_checkpoint(seeds[k], map_location="cpu", weights_only=True)
        for k in "ab"
    ]
    model = EnsembleModel(modules).eval()
    emb = np.asarray(retriever.item_emb, dtype=np.float32)  # [N, d]
    np.testing.assert_allclose(emb, model.item_embeddings()[2:].numpy(), atol=1e-6)
    assert retriever.bias_columns == [emb.shape[1] - 1]  # member b's bias, last column

    history = [str(t) for t in retriever.ids[5:9]]
    rec = retriever.recommend(history, k=5)
    query_emb = retriever.query_embeddings([history])[0]  # [d]
    rows = retriever.rows_of(rec.ids)
    np.testing.assert_allclose(rec.scores, emb[rows] @ query_emb, atol=1e-5)
    # the served score is the weighted sum of the members' own scores
    w = [m["weight"] for m in manifest["ensemble"]]
    dims = [m.query_tower.config["dim"] for m in modules]
    q_parts = np.split(query_emb, np.cumsum(dims)[:-1])
    e_parts = np.split(emb[rows], np.cumsum(dims)[:-1], axis=1)
    member_scores = [e @ (q / wk) for q, e, wk in zip(q_parts, e_parts, w, strict=True)]
    np.testing.assert_allclose(
        rec.scores, sum(wk * s for wk, s in zip(w, member_scores, strict=True)), atol=1e-5
    )
    assert len(retriever.similar_tracks(history[0], k=3)) == 3


@pytest.mark.slow
def test_ensemble_evaluates_as_one_row_and_a_self_ensemble_equals_the_model(seeds) -> None:
    from twotower.evaluate import evaluate_checkpoint

    single = evaluate_checkpoint(seeds["a"], split="valid", ks=(10,), bootstrap=10)
    twice = evaluate_checkpoint([seeds["a"], seeds["a"]], split="valid", ks=(10,), bootstrap=10)
    assert twice.rows[0].name == "two-tower ensemble of 2"
    np.testing.assert_array_equal(twice.rows[0].ranks, single.rows[0].ranks)
    both = evaluate_checkpoint(
        [seeds["a"], seeds["b"]], split="valid", ks=(10,), baselines=["popular"], bootstrap=10
    )
    ens, pop = both.row("two-tower ensemble of 2"), both.row("popular")
    assert ens.metrics["ndcg@10"][0] > 1.5 * pop.metrics["ndcg@10"][0]


@pytest.mark.slow
def test_members_on_other_data_are_refused(seeds) -> None:
    from twotower.export import ArtifactError, export_checkpoint

    other = fit_tiny(seeds["root"], "other", **{"data.options.n_users": 150})
    with pytest.raises(ArtifactError, match="other data"):
        export_checkpoint([seeds["a"], other], str(seeds["root"] / "bad"), progress=False)
    assert not (seeds["root"] / "bad").exists()
