"""Retriever on planted artifacts (no training): the committed golden one and fresh ones.

The planted model (tests/golden/make_golden.py) has clustered item vectors and a query tower
whose query is the normalised mean of the history's vectors, so every answer is computed here
independently with numpy.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twotower.export import write_artifact
from twotower.retrieve import Recommendations, Retriever, UnknownTrackError

GOLDEN = Path(__file__).resolve().parent / "golden"
REPO = Path(__file__).resolve().parents[1]


def _make_golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mg = _make_golden_module()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Retriever, np.ndarray, np.ndarray]:
    """A fresh planted artifact: 8 clusters x 10 tracks, dim 16, exact Flat index."""
    parts = mg.planted_parts(n_clusters=8, per_cluster=10, dim=16, seed=1)
    cluster = parts.pop("cluster")
    out = write_artifact(tmp_path_factory.mktemp("planted") / "art", index="Flat", **parts)
    return Retriever.load(out), parts["item_emb"], cluster


def _ids(rows) -> list[str]:
    return [f"g{r:02d}" for r in rows]


def test_golden_artifact_known_recommendation() -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())
    r = Retriever.load(GOLDEN / "artifact")
    assert r.manifest["format_version"].startswith("1.")
    e = expected["recommend"]
    rec = r.recommend(e["history"], k=e["k"], exclude=e["exclude"])
    assert rec.ids == e["ids"]
    np.testing.assert_allclose(rec.scores, e["scores"], atol=1e-5)
    # the planted structure: the other four tracks of the history's cluster come first
    assert {expected["cluster"][t] for t in rec.ids[:4]} == {0}
    assert rec.titles[0] == f"Golden track {int(e['ids'][0][1:])}"
    assert rec.artists[:4] == ["Artist A"] * 4
    s = expected["similar"]
    sim = r.similar_tracks(s["track"], k=s["k"])
    assert sim.ids == s["ids"]
    np.testing.assert_allclose(sim.scores, s["scores"], atol=1e-5)


def test_recommend_matches_hand_computed(planted) -> None:
    r, vectors, cluster = planted
    history = [20, 21, 25]  # cluster 2
    rec = r.recommend(_ids(history), k=7, exclude="history")
    rows, scores = mg.expected_top(vectors, history, 7, exclude=history)
    assert rec.ids == _ids(rows)
    np.testing.assert_allclose(rec.scores, scores, atol=1e-5)
    assert set(cluster[rows]) == {2}  # 7 remaining cluster mates, all planted neighbours
    assert isinstance(rec, Recommendations) and len(rec) == 7
    frame = rec.to_frame()
    assert frame["rank"].tolist() == list(range(1, 8))
    assert frame["track_id"].tolist() == rec.ids
    assert rec.titles[0] == f"Golden track {rows[0]}" and rec.artists[0] == "Artist C"
    assert f"Golden track {rows[0]}" in rec.format().splitlines()[1]


def test_exclude_variants(planted) -> None:
    r, vectors, _ = planted
    history = _ids([30, 31])
    with_history = r.recommend(history, k=3, exclude=None)
    assert set(with_history.ids[:2]) == set(history)  # the history is its own best match
    no_history = r.recommend(history, k=3, exclude="history")
    assert not set(no_history.ids) & set(history)
    explicit = r.recommend(history, k=3, exclude=[*history, no_history.ids[0], "nope"])
    assert explicit.ids == r.recommend(history, k=4, exclude="history").ids[1:]
    with pytest.raises(ValueError, match="exclude must be"):
        r.recommend(history, exclude="everything")


def test_unknown_ids_reported_not_dropped_silently(planted) -> None:
    r, vectors, _ = planted
    rec = r.recommend(["zz1", "g40", "zz2", "g41", "zz1"], k=5, exclude="history")
    assert rec.unknown == ["zz1", "zz2"]  # in order, once each
    assert rec.ids == r.recommend(["g40", "g41"], k=5, exclude="history").ids
    nothing = r.recommend(["zz1"], k=4)
    assert nothing.unknown == ["zz1"] and len(nothing) == 4  # the model's history-less query
    assert r.recommend([], k=4).ids == nothing.ids


def test_batch_equals_single(planted) -> None:
    r, _, _ = planted
    histories = [_ids([1, 2]), _ids([55]), ["x", *_ids([70, 71, 72])], []]
    batch = r.recommend_batch(histories, k=6, exclude="history", batch_size=3)
    for h, b in zip(histories, batch, strict=True):
        single = r.recommend(h, k=6, exclude="history")
        assert b.ids == single.ids and b.unknown == single.unknown
        np.testing.assert_allclose(b.scores, single.scores, atol=1e-6)
    per_query = r.recommend_batch(histories[:2], k=2, exclude=[histories[0], []])
    assert not set(per_query[0].ids) & set(histories[0])
    assert per_query[1].ids[0] == "g55"


def test_history_truncated_to_history_len(planted) -> None:
    r, vectors, _ = planted
    assert r.history_len == 10
    long = _ids(range(0, 30))  # 30 events; only the last 10 (rows 20..29) count
    rec = r.recommend(long, k=5)
    rows, scores = mg.expected_top(vectors, list(range(20, 30)), 5, exclude=[])
    assert rec.ids == _ids(rows)


def test_similar_tracks(planted) -> None:
    r, vectors, cluster = planted
    sim = r.similar_tracks("g13", k=5)
    assert "g13" not in sim.ids
    rows, scores = mg.expected_top(vectors, [13], 5, exclude=[13])
    assert sim.ids == _ids(rows) and set(cluster[rows]) == {1}
    np.testing.assert_allclose(sim.scores, scores, atol=1e-5)
    with pytest.raises(KeyError, match="unknown track id 'nope'"):
        r.similar_tracks("nope")
    with pytest.raises(UnknownTrackError):
        r.similar_tracks("")
    assert len(r.similar_tracks("g00", k=500)) == 79  # whole catalogue minus itself


def test_context_handling(planted) -> None:
    r, _, _ = planted
    rec = r.recommend(["g01"], k=3, context={"hour": 7, "context_type": "radio"})
    assert "this model does not use the hour of day" in rec.notes
    rec = r.recommend(["g01"], k=3, context={"context_type": "space", "user": "u9"})
    assert any("'space' not in the vocabulary" in n for n in rec.notes)
    assert any("'u9' not in the vocabulary" in n for n in rec.notes)
    with pytest.raises(ValueError, match="hour must be an integer 0..23"):
        r.recommend(["g01"], context={"hour": 24})
    with pytest.raises(ValueError, match="unknown context keys"):
        r.recommend(["g01"], context={"weather": "rain"})
    with pytest.raises(ValueError, match="k must be"):
        r.recommend(["g01"], k=0)


def test_cli_recommend_and_similar(capsys) -> None:
    from twotower.cli import main

    assert main(["recommend", "--artifacts", str(GOLDEN / "artifact"), "--history",
                 "g00, g01,nope", "-k", "3"]) == 0  # fmt: skip
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "track_id", "title"]
    rows, _ = mg.expected_top(mg.planted_vectors()[0], [0, 1], 3, exclude=[])  # no exclusion:
    assert [ln.split()[1] for ln in lines[1:]] == _ids(rows)  # the data did not filter seen
    assert 'unknown track ids (not used): ["nope"]' in out.err  # JSON: ids may hold commas
    assert main(["similar", "--artifacts", str(GOLDEN / "artifact"), "--track", "g06"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["1", "g08"]
    assert main(["similar", "--artifacts", str(GOLDEN / "artifact"), "--track", "zzz"]) == 2
    assert "unknown track id 'zzz'" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch + faiss: ~5 s
def test_loading_does_not_import_lightning() -> None:
    code = (
        "import sys\n"
        "from twotower.retrieve import Retriever\n"
        f"r = Retriever.load({str(GOLDEN / 'artifact')!r})\n"
        "assert r.recommend(['g00'], k=2).ids\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'lightning_fabric', 'torchmetrics'))\n"
        "print(bad)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
