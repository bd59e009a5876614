import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from twotower.model.towers import ENCODERS, ItemTower, QueryTower
from twotower.onnx_export import OnnxQuery
from twotower.query import QueryBatch

V = 30


def _tower(encoder: str, **kw) -> QueryTower:
    torch.manual_seed(0)
    args = dict(num_items=V, dim=16, id_dim=16, encoder=encoder, max_len=12, num_layers=2)
    args.update(kw)
    return QueryTower(**args).eval()


def _left_pad(seqs: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, length - len(s) :] = torch.tensor(s)
    return out


@pytest.mark.parametrize("encoder", ENCODERS)
def test_causal_future_items_do_not_change_earlier_queries(encoder):
    tower = _tower(encoder)
    items = _left_pad([[5, 6, 7, 8, 9, 10, 11], [3, 4, 20, 21, 22]], 10)
    out = tower.forward_sequence(items)  # [2, 10, 16]
    changed = items.clone()
    changed[:, 7] = 29  # position 7 is a real event in both rows
    out2 = tower.forward_sequence(changed)
    torch.testing.assert_close(out[:, :7], out2[:, :7], rtol=0, atol=1e-6)
    # the changed position itself and everything after it do move
    assert (out[:, 7:] - out2[:, 7:]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("encoder", ENCODERS)
def test_padding_invariance(encoder):
    tower = _tower(encoder, num_users=5, use_hour=True, num_contexts=4)
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    users = torch.tensor([2, 3, 4])
    hours = torch.tensor([7, -1, 23])
    ctx = torch.tensor([1, 2, 3])
    a = tower(QueryBatch(_left_pad(seqs, 6), users, hours, ctx))
    b = tower(QueryBatch(_left_pad(seqs, 12), users, hours, ctx))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # every position of the sequence view too (real positions only)
    sa = tower.forward_sequence(_left_pad(seqs, 6))[1]  # [6, d]
    sb = tower.forward_sequence(_left_pad(seqs, 12))[1, 6:]
    torch.testing.assert_close(sa, sb, rtol=0, atol=1e-5)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_l2_normalised_and_forward_is_last_position(encoder):
    tower = _tower(encoder)
    items = _left_pad([[5, 6, 7, 8], [9, 10]], 8)
    seq = tower.forward_sequence(items)
    torch.testing.assert_close(seq.norm(dim=-1), torch.ones(2, 8))
    torch.testing.assert_close(tower(items), seq[:, -1], rtol=0, atol=1e-6)


def test_mean_encoder_is_running_mean_of_embeddings():
    tower = _tower("mean")
    items = _left_pad([[5, 6, 7]], 5)
    states = tower.encode(items)[0]  # [5, id_dim]
    e = tower.item_embedding.weight
    torch.testing.assert_close(states[3], (e[5] + e[6]) / 2)
    torch.testing.assert_close(states[4], (e[5] + e[6] + e[7]) / 3)


def test_longer_history_than_max_len_uses_most_recent():
    tower = _tower("transformer")
    hist = torch.arange(2, 22).unsqueeze(0)  # 20 events > max_len 12
    torch.testing.assert_close(tower(hist), tower(hist[:, -12:]))
    with pytest.raises(ValueError, match="max_len"):
        tower.forward_sequence(hist)


def test_side_inputs_change_the_query():
    tower = _tower("gru", num_users=5, use_hour=True, num_contexts=4)
    hist = _left_pad([[5, 6, 7]] * 2, 4)
    q_users = tower(QueryBatch(hist, torch.tensor([2, 3])))
    assert not torch.allclose(q_users[0], q_users[1])
    q_hours = tower(QueryBatch(hist, torch.tensor([2, 2]), torch.tensor([3, 15])))
    assert not torch.allclose(q_hours[0], q_hours[1])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_standalone_load_from_state_dict(encoder):
    tower = _tower(encoder, num_users=5, use_hour=True, mlp_hidden=32)
    buf = io.BytesIO()
    torch.save(tower.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    import json

    config = json.loads(json.dumps(tower.config))  # what the export manifest stores
    clone = QueryTower(**config).eval()
    clone.load_state_dict(state)
    hist = _left_pad([[5, 6, 7], [8]], 6)
    query = QueryBatch(hist, torch.tensor([1, 2]))
    torch.testing.assert_close(clone(query), tower(query))


def _features(v: int) -> SimpleNamespace:
    artist = np.zeros(v, dtype=np.int64)
    artist[2:] = np.arange(v - 2) % 3 + 1
    genres = np.zeros((v, 2), dtype=np.int64)
    genres[2:, 0] = np.arange(v - 2) % 4 + 1
    return SimpleNamespace(
        artist=artist,
        album=np.zeros(v, dtype=np.int64),
        genres=genres,
        year=np.zeros(v, dtype=np.int64),
        audio=np.random.default_rng(0).normal(size=(v, 3)).astype(np.float32),
    )


def test_item_tower_uses_shared_embedding_and_features():
    torch.manual_seed(0)
    q = QueryTower(num_items=V, dim=16, id_dim=16, encoder="mean")
    tower = ItemTower(q.item_embedding, 16, num_artists=4, num_genres=5, num_audio=3, max_genres=2)
    tower.set_features(_features(V))
    tower.eval()
    assert tower.id_embedding is q.item_embedding
    out = tower(torch.tensor([2, 3, 4]))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    with torch.no_grad():  # identical id vectors: only the side features tell 2 and 3 apart
        q.item_embedding.weight[3] = q.item_embedding.weight[2]
    out = tower(torch.tensor([2, 3]))
    assert not torch.allclose(out[0], out[1])
    ft = _features(V)
    ft.artist[3], ft.genres[3], ft.audio[3] = ft.artist[2], ft.genres[2], ft.audio[2]
    tower.set_features(ft)
    out = tower(torch.tensor([2, 3]))
    torch.testing.assert_close(out[0], out[1])
    # shared weights: a change to the query tower's table moves the item vectors
    with torch.no_grad():
        q.item_embedding.weight[2] += 1.0
    assert not torch.allclose(tower(torch.tensor([2]))[0], out[0])


def test_item_tower_state_dict_round_trip_adopts_feature_widths():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, 8, padding_idx=0)
    tower = ItemTower(emb, 8, num_artists=4, num_genres=5, num_audio=3, max_genres=2).eval()
    tower.set_features(_features(V))
    clone = ItemTower(torch.nn.Embedding(V, 8), 8, num_artists=4, num_genres=5, num_audio=3).eval()
    clone.load_state_dict(tower.state_dict())
    assert clone.genres.shape == (V, 2)
    ids = torch.arange(2, V)
    torch.testing.assert_close(clone(ids), tower(ids))


def test_item_tower_rejects_bad_features():
    emb = torch.nn.Embedding(V, 8, padding_idx=0)
    tower = ItemTower(emb, 8, num_artists=2)
    with pytest.raises(ValueError, match="artist"):
        tower.set_features(_features(V))  # artist indices up to 3 >= table size 2
    with pytest.raises(ValueError, match="rows"):
        tower.set_features(_features(V - 1))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_query_tower_exports_to_onnx_with_dynamic_batch_and_length(encoder):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import warnings

    tower = _tower(encoder, num_users=5, use_hour=True, num_contexts=4)
    names = ["history", "users", "hours", "contexts"]
    example = (_left_pad([[5, 6], [7, 8, 9]], 6), torch.tensor([1, 2]), torch.tensor([3, -1]))
    example = (*example, torch.tensor([1, 2]))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            OnnxQuery(tower, names).eval(),
            example,
            buf,
            input_names=names,
            output_names=["query_emb"],
            dynamic_axes={"history": {0: "b", 1: "l"}, **{n: {0: "b"} for n in names[1:]}},
            dynamo=False,
        )
    session = ort.InferenceSession(buf.getvalue())
    inputs = (_left_pad([[5], [6, 7, 8, 9], [10, 11, 12]], 9), torch.tensor([0, 1, 4]))
    inputs = (*inputs, torch.tensor([0, 12, -1]), torch.tensor([3, 0, 1]))
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    want = tower(QueryBatch(*inputs)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_recency_bias_is_causal_padding_invariant_and_favours_recent_events():
    tower = _tower("transformer", recency_bias=True, num_layers=1)
    assert tower.config["recency_bias"] is True
    torch.testing.assert_close(tower.recency_slope.exp(), torch.tensor([2.0**-4, 2.0**-8]))
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12]]
    a = tower.forward_sequence(_left_pad(seqs, 6))
    b = tower.forward_sequence(_left_pad(seqs, 12))[:, 6:]
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1, 4:], b[1, 4:], rtol=0, atol=1e-5)
    changed = _left_pad(seqs, 6)
    changed[0, 3] = 29
    c = tower.forward_sequence(changed)
    torch.testing.assert_close(a[0, :3], c[0, :3], rtol=0, atol=1e-6)  # still causal

    def early_item_effect(log_slope: float) -> float:
        with torch.no_grad():
            tower.recency_slope.fill_(log_slope)
        hist = _left_pad([[5, 6, 7, 8, 9, 10, 11, 12]], 8)
        other = hist.clone()
        other[0, 0] = 29  # the oldest event
        return (tower(hist) - tower(other)).abs().max().item()

    # a steep slope makes the query (almost) blind to old events; a flat one does not
    assert early_item_effect(math.log(30.0)) < 1e-6 < 1e-3 < early_item_effect(math.log(1e-3))


@pytest.mark.parametrize("encoder", ["gru", "transformer"])
def test_state_dicts_from_before_encoder_modules_still_load(encoder):
    """Checkpoints and exports written before the encoders became modules kept the encoder's
    parameters on the tower (``blocks.0...``, ``gru...``): they load into the same tower."""
    tower = _tower(encoder, recency_bias=encoder == "transformer")
    old = {k.removeprefix("sequence_encoder."): v for k, v in tower.state_dict().items()}
    assert any(k.startswith(("blocks.", "gru.")) for k in old)
    clone = QueryTower(**tower.config).eval()
    clone.load_state_dict(old)  # strict: every key placed, none left over
    hist = _left_pad([[5, 6, 7], [8]], 6)
    torch.testing.assert_close(clone(hist), tower(hist))
