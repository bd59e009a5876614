"""The query contract: one builder, one description in the manifest, every consumer agrees."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from twotower.export import write_artifact
from twotower.model.towers import QueryTower
from twotower.query import FIELDS, QueryBatch, QuerySpec, left_pad_last, spec_of
from twotower.retrieve import Retriever

V = 40  # item vocabulary incl. pad and OOV


def test_builder_left_pads_keeps_the_most_recent_and_slices_rows() -> None:
    values = np.array([5, 6, 7, 8, 9, 2, 3, 4])
    offsets = np.array([0, 5, 5, 8])
    spec = QuerySpec(history_len=3, users=True, hours=True, contexts=False)
    q = spec.build(values, offsets, users=np.array([2, 0, 3]), hours=np.array([7, -1, 23]))
    assert q.history.tolist() == [[7, 8, 9], [0, 0, 0], [2, 3, 4]]
    assert q.users.tolist() == [2, 0, 3] and q.hours.tolist() == [7, -1, 23]
    assert q.contexts is None  # the tower does not read it
    part = spec.build(values, offsets, users=np.array([2, 0, 3]), rows=slice(2, 3))
    assert part.history.tolist() == [[2, 3, 4]] and part.users.tolist() == [3]
    assert part.hours is None  # not given: unknown for every row
    # trim: padded to the longest history of the batch only
    short = QuerySpec(history_len=10).build(np.array([5, 6]), np.array([0, 1, 2]), trim=True)
    assert short.history.tolist() == [[5], [6]]


def test_batch_indexing_and_device_moves_keep_every_field() -> None:
    q = QueryBatch(torch.tensor([[0, 5], [6, 7]]), torch.tensor([2, 3]), torch.tensor([1, 2]), None)
    sub = q[torch.tensor([1])]
    assert sub.history.tolist() == [[6, 7]] and sub.users.tolist() == [3] and sub.contexts is None
    assert len(q.to("cpu")) == 2
    assert QueryBatch.of(q.history).users is None
    arrays = q.numpy_inputs(["history", "users", "contexts"])
    assert arrays["contexts"].tolist() == [0, 0]  # unknown filled with its value
    assert set(arrays) == {"history", "users", "contexts"}


def test_spec_follows_the_tower_config() -> None:
    tower = QueryTower(V, dim=8, id_dim=8, encoder="mean", max_len=6, num_users=5, use_hour=True)
    spec = spec_of(tower, history_len=20)
    assert spec == QuerySpec(history_len=6, users=True, hours=True, contexts=False)
    assert spec.input_names == ["history", "users", "hours"]
    described = spec.describe()
    assert [i["name"] for i in described["inputs"]] == spec.input_names
    hist = described["inputs"][0]
    assert hist["padding"] == "left" and hist["pad_value"] == 0 and hist["oov_value"] == 1
    assert {f.name: f.unknown for f in FIELDS} == {
        "history": 0,
        "users": 0,
        "hours": -1,
        "contexts": 0,
        "skips": 0,
        "gaps": 0,
        "request_gaps": 0,
        "play_hours": -1,
        "play_weekdays": -1,
    }


def test_left_pad_last() -> None:
    out = left_pad_last(np.array([5, 6, 7, 8, 9]), np.array([0, 4, 4, 5]), 3)
    assert out.tolist() == [[6, 7, 8], [0, 0, 0], [0, 0, 9]]
    out = left_pad_last(np.array([5, 6, 7]), np.array([0, 1, 3]), 3, fill=-1)  # clock padding
    assert out.tolist() == [[-1, -1, 5], [-1, 6, 7]]


@pytest.fixture(scope="module")
def full_artifact(tmp_path_factory) -> tuple:
    """An artifact whose query tower reads every field (listener, hour, context type)."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    tower = QueryTower(
        V, dim=8, id_dim=8, encoder="transformer", max_len=6, num_layers=1, num_heads=2,
        dropout=0.0, num_users=5, num_contexts=4, use_hour=True,
    ).eval()  # fmt: skip
    n = V - 2
    ids = [f"t{i}" for i in range(n)]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1).numpy()
    items = pd.DataFrame({"track_id": pd.Series(ids, dtype="string")})
    vocab = {"tracks": ids, "users": ["u0", "u1", "u2"], "contexts": ["radio", "charts"]}
    out = tmp_path_factory.mktemp("query") / "art"
    write_artifact(
        out, query_tower=tower, item_emb=emb, items=items, vocab=vocab, index="Flat", onnx=True
    )
    return out, tower


def test_onnx_encoder_driven_by_the_manifest_alone(full_artifact) -> None:
    """A client that knows only manifest.json and onnxruntime gets the torch tower's vectors."""
    import onnxruntime as ort

    art, tower = full_artifact
    manifest = json.loads((art / "manifest.json").read_text())
    desc = manifest["query_tower"]
    session = ort.InferenceSession(str(art / manifest["onnx"]["file"]))
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in desc["inputs"]]
    rng = np.random.default_rng(0)
    b, length = 5, desc["history_len"]
    feeds = {}
    for spec in desc["inputs"]:  # only what the manifest says: name, dtype, shape, unknown
        shape = [b if a == "batch" else length for a in spec["shape"]]
        value = np.full(shape, spec["unknown"], dtype=spec["dtype"])
        if spec["name"] == "history":
            assert spec["padding"] == "left"
            for r in range(b):  # r real events, the rest padding on the LEFT
                if r:
                    value[r, length - r :] = rng.integers(2, V, r)
        elif spec["name"] == "users":
            value[:3] = [2, 3, 4]
        elif spec["name"] == "hours":
            value[:4] = [0, 9, 23, 17]
        else:
            value[:2] = [2, 3]
        feeds[spec["name"]] = value
    got = session.run([desc["output"]["name"]], feeds)[0]
    with torch.no_grad():
        want = tower(QueryBatch(**{k: torch.from_numpy(v) for k, v in feeds.items()})).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (b, manifest["dim"])


def test_retriever_and_builder_agree(full_artifact) -> None:
    """The Retriever's raw-id path builds the same QueryBatch the index-level builder does."""
    art, tower = full_artifact
    r = Retriever.load(art)
    ctx = {"hour": 9, "context_type": "charts", "user": "u1"}
    got = r.query_embeddings([["t3", "t5", "t7"]], [ctx])
    row_of = {t: i for i, t in enumerate(r.ids)}
    values = np.array([row_of[t] + 2 for t in ("t3", "t5", "t7")])
    query = r.spec.build(
        values, np.array([0, 3]), np.array([3]), np.array([9]), np.array([3])
    )  # u1 -> 3, charts -> 3
    with torch.no_grad():
        want = tower(query).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_readme_onnx_example_runs(full_artifact, capsys) -> None:
    """The README's onnxruntime-only example, run as written against an artifact."""
    import re
    from pathlib import Path

    art, _ = full_artifact
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(
        r"<!-- onnx-example -->\n```python\n(.*?)```\n<!-- /onnx-example -->", readme, re.S
    )
    assert block, "README lost its ONNX example"
    code = block.group(1)
    assert 'art = "runs/default/artifacts"' in code
    code = code.replace('"runs/default/artifacts"', repr(str(art)))
    code = code.replace('["t1781", "t1789"]', '["t3", "t5", "no-such-track"]')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    r = Retriever.load(art)
    want = r.query_embeddings([["t3", "t5", "no-such-track"]])
    np.testing.assert_allclose(scope["query_emb"], want, atol=1e-5)
    assert scope["rows"][0].tolist() == [r.track_rows[t] for t in r.recommend(["t3", "t5"]).ids]
    assert capsys.readouterr().out.strip()
