"""evaluate: the table machinery with baselines, a fake embedding model and an oracle scorer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_baselines import make_eval, make_prepared, ring_data  # tests/ is on sys.path
from torch import Tensor, nn

from twotower.data.prepared import EvalSet
from twotower.evaluate import (
    evaluate_model,
    evaluate_scorers,
    parse_ks,
)
from twotower.metrics import metrics_from_ranks, rank_from_scores
from twotower.query import QuerySpec

N_RING = 10


def ring_next(item: Tensor) -> Tensor:
    return 2 + (item - 2 + 1) % N_RING


class OracleScorer:
    """Knows the ring: puts the successor of the last history item first."""

    name = "oracle"
    num_items = N_RING + 2
    fit_seconds = 1.5

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        last = torch.from_numpy(
            eval_set.history[eval_set.offsets[rows.start + 1 : rows.stop + 1] - 1]
        )
        scores = torch.zeros(rows.stop - rows.start, self.num_items)
        scores[torch.arange(len(last)), ring_next(last)] = 1.0
        return scores


class FakeItemTower(nn.Module):
    def __init__(self, v: int) -> None:
        super().__init__()
        self.id_embedding = nn.Embedding(v, v)
        self.id_embedding.weight.data = torch.eye(v)

    def forward(self, ids: Tensor) -> Tensor:
        return self.id_embedding(ids)


class FakeQueryTower(nn.Module):
    """Query = one-hot of the ring successor of the last history item (left-padded input)."""

    max_len = 4

    def __init__(self, v: int) -> None:
        super().__init__()
        self.v = v
        self.seen_shapes: list[tuple[int, ...]] = []

    def forward(self, query) -> Tensor:
        self.seen_shapes.append(tuple(query.history.shape))
        return nn.functional.one_hot(ring_next(query.history[:, -1]), self.v).float()


class FakeModule(nn.Module):
    def __init__(self, v: int) -> None:
        super().__init__()
        self.query_tower = FakeQueryTower(v)
        self.item_tower = FakeItemTower(v)


def test_scorer_builds_queries_through_the_query_contract() -> None:
    values = np.array([5, 6, 7, 8, 9, 2, 3])
    offsets = np.array([0, 5, 5, 7])
    spec = QuerySpec(3, users=True)
    q = spec.build(values, offsets, users=np.array([4, 0, 2]), rows=slice(1, 3))
    assert q.history.tolist() == [[0, 0, 0], [0, 2, 3]]
    assert q.users.tolist() == [0, 2] and q.hours is None and q.contexts is None


def test_oracle_beats_baselines_with_a_paired_interval() -> None:
    data = ring_data()
    table = evaluate_model(OracleScorer(), data, ks=(1, 10), baselines=["popular"], bootstrap=200)
    oracle, pop = table.row("oracle"), table.row("popular")
    assert oracle.metrics["hr@1"][0] == 1.0 and oracle.metrics["ndcg@10"] == (1.0, 1.0, 1.0)
    # a constant scorer ranks each target last of the 10 ring items: rank 9
    ranks = rank_from_scores(lambda r: torch.ones(r.stop - r.start, 12), data.test.targets)
    assert metrics_from_ranks(ranks, [9, 10]) == metrics_from_ranks(np.full(20, 9), [9, 10])
    assert metrics_from_ranks(ranks, [9])["hr@9"] == 0.0
    assert pop.metrics["ndcg@10"][0] < 0.5
    p = table.paired
    assert p["model"] == "oracle" and p["baseline"] == "popular" and p["metric"] == "ndcg@10"
    assert p["diff"] == pytest.approx(1.0 - pop.metrics["ndcg@10"][0])
    assert p["lo"] > 0
    assert table.paired_all == [p]  # one model row: one comparison
    # every model row gets its comparison with the same best baseline, in row order
    from twotower.baselines import MostPopular
    from twotower.evaluate import evaluate_scorers

    twin = MostPopular().fit(data)
    twin.name = "popularity as a model"
    rows = [(OracleScorer(), "model"), (twin, "model"), (MostPopular().fit(data), "baseline")]
    two = evaluate_scorers(rows, data, "test", (10,), bootstrap=50)
    assert [q["model"] for q in two.paired_all] == ["oracle", "popularity as a model"]
    assert {q["baseline"] for q in two.paired_all} == {"popular"}
    assert two.paired == two.paired_all[0] and two.paired_all[1]["diff"] == 0.0
    assert "popularity as a model - popular" in two.to_markdown()
    # coverage@10: a ring of 10 items, so popularity's one list of 10 covers all of it
    assert table.cutoff == 10 and pop.coverage == pytest.approx(1.0)
    counts = data.item_counts[2:].astype(float)
    assert pop.mean_popularity == pytest.approx(counts.mean())
    assert oracle.fit_seconds == 1.5


def test_embedding_scorer_on_a_fake_module() -> None:
    data = ring_data()
    module = FakeModule(N_RING + 2)
    table = evaluate_model(module, data, ks=(1, 5), bootstrap=0, name="fake")
    row = table.row("fake")
    assert row.metrics["hr@1"][0] == 1.0
    assert math.isnan(row.metrics["hr@1"][1])  # no resamples -> no interval
    assert all(s[1] == FakeQueryTower.max_len for s in module.query_tower.seen_shapes)
    assert table.paired is None  # no baseline


def test_table_text_and_json() -> None:
    data = ring_data()
    table = evaluate_model(
        OracleScorer(), data, ks=(10, 20), baselines=["popular", "cooccurrence"], bootstrap=50
    )
    text = table.to_markdown()
    lines = text.splitlines()
    assert lines[0].startswith("| model") and "recall@10" in lines[0] and "coverage@10" in lines[0]
    assert len({len(line) for line in lines[:5]}) == 1  # padded columns
    assert "oracle" in text and "popular" in text and "cooccurrence" in text
    assert "Paired difference oracle - " in text
    assert "seen items kept" in text  # params["filter_seen"] is False in the hand-made data
    d = json.loads(table.to_json())
    assert [r["name"] for r in d["rows"]] == ["oracle", "popular", "cooccurrence"]
    assert d["rows"][0]["metrics"]["ndcg@10"]["mean"] == 1.0
    assert d["paired"]["baseline"] in ("popular", "cooccurrence")
    assert d["rows"][1]["params"] == {} and "n_last" in d["rows"][2]["params"]


def test_cold_targets_are_misses_and_seen_filtering_follows_params() -> None:
    train = [[2, 3, 4, 5], [3, 4, 5, 6], [2, 3, 4]]
    # query 0: target 4 seen before; query 1: cold target (OOV)
    test = [([4, 2, 3], 4), ([2, 3], 1), ([5], 6)]
    data = make_prepared(train, test, test, num_items=7)
    data.params["filter_seen"] = True
    table = evaluate_model(None, data, ks=(1, 3), baselines=["popular"], bootstrap=0)
    assert table.filter_seen and table.cold_targets == 1
    # counts: 3:3, 4:3, 2:2, 5:2, 6:1. q0 seen {2,3,4} removed except the target 4 -> rank 0;
    # q1 OOV -> miss; q2 seen {5} removed: 3, 4, 2 beat 6 -> rank 3, a miss at 3
    pop = table.row("popular")
    assert pop.metrics["hr@1"][0] == pytest.approx(1 / 3)
    assert pop.metrics["hr@3"][0] == pytest.approx(1 / 3)
    kept = evaluate_model(
        None, data, ks=(1, 3), filter_seen=False, baselines=["popular"], bootstrap=0
    )
    assert not kept.filter_seen
    # without filtering q0's target 4 ties with 3 (count 3): rank 1
    assert kept.row("popular").metrics["hr@1"][0] == 0.0


def test_bad_requests_raise() -> None:
    data = ring_data()
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_model(None, data)
    with pytest.raises(ValueError, match="do not match"):
        evaluate_model(FakeModule(N_RING + 5), data)
    with pytest.raises(ValueError, match="split"):
        evaluate_scorers([(OracleScorer(), "model")], data, split="train")
    empty = ring_data()
    empty.test = make_eval([])
    with pytest.raises(ValueError, match="no queries"):
        evaluate_model(OracleScorer(), empty)
    assert parse_ks("10, 20,50") == (10, 20, 50)
    with pytest.raises(ValueError, match="--ks"):
        parse_ks("10,x")


def test_baselines_on_synthetic_tiny_recover_planted_structure() -> None:
    from twotower.data.pipeline import DataConfig, prepare_data

    data = prepare_data(DataConfig(format="synthetic", options={"preset": "tiny"}, cache_dir=None))
    table = evaluate_model(
        None, data, ks=(10,), baselines=["popular", "cooccurrence"], bootstrap=200
    )
    pop, cooc = table.row("popular"), table.row("cooccurrence")
    # sessions drift within a taste cluster: item-to-item beats global popularity clearly
    assert cooc.metrics["ndcg@10"][1] > pop.metrics["ndcg@10"][2]  # intervals do not overlap
    assert cooc.coverage > 5 * pop.coverage  # and it personalises
    assert cooc.mean_popularity < pop.mean_popularity
    assert table.num_queries == len(data.test)


@pytest.mark.slow
def test_evaluate_checkpoint_and_cli(tmp_path, monkeypatch, capsys) -> None:
    """Train the tiny config 1 epoch, then ``twotower evaluate`` its checkpoint."""
    from twotower.cli import main
    from twotower.evaluate import evaluate_checkpoint
    from twotower.train import fit

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # runs/ and the data cache go to the temporary folder
    trainer, module, dm = fit([repo / "configs" / "tiny.yaml"], {"trainer.max_epochs": 1})
    ckpt = trainer.checkpoint_callback.best_model_path
    in_memory = evaluate_model(module, dm.data, ks=(10,), bootstrap=0)
    table = evaluate_checkpoint(ckpt, ks=(10,), bootstrap=0)
    # the checkpoint rebuilds the same data and the same model: identical numbers
    assert table.row("two-tower").metrics["ndcg@10"][0] == pytest.approx(
        in_memory.row("two-tower").metrics["ndcg@10"][0], abs=1e-9
    )
    assert table.row("two-tower").fit_seconds > 0
    out = tmp_path / "table.json"
    rc = main(["evaluate", "--checkpoint", ckpt, "--baselines", "-k", "5,10", "--bootstrap", "50",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "| two-tower" in text and "| popular" in text and "Paired difference" in text
    d = json.loads(out.read_text())
    assert d["ks"] == [5, 10] and d["paired"]["model"] == "two-tower"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
