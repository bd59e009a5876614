"""Export: checkpoint -> artifact -> Retriever round trips, integrity, atomicity, ONNX, float16.

One tiny model is trained once per session (tiny synthetic preset, 1 epoch, seconds) and
exported twice (exact Flat + users + ONNX; HNSW32 + float16 through the export.py CLI).
Tests of the writer's mechanics (checksums, versions, crashes) use the planted parts of
tests/golden/make_golden.py and need no training.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import fit_tiny

import twotower.export as export_mod
import twotower.onnx_export as onnx_export_mod
from twotower.export import (
    ArtifactError,
    export_checkpoint,
    read_manifest,
    verify_artifact,
    write_artifact,
)
from twotower.index import ExactSearch, recall_at_k
from twotower.retrieve import Retriever

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mg = _load(GOLDEN / "make_golden.py", "make_golden")
# Tests on the session's trained checkpoint (the shared ~15-30 s training counts against the first).
slow = pytest.mark.slow


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """One tiny training run (1 epoch) shared by every checkpoint test of this session."""
    root = tmp_path_factory.mktemp("train")
    return {"ckpt": fit_tiny(root, "run"), "root": root}


@pytest.fixture(scope="session")
def exact_artifact(trained) -> Path:
    out = trained["root"] / "art-flat"
    return export_checkpoint(
        trained["ckpt"], str(out), index="Flat", users=True, onnx=True, progress=False
    )


@pytest.fixture(scope="session")
def ann_artifact(trained) -> Path:
    """Exported through the top-level export.py (HNSW32, float16)."""
    cli = _load(REPO / "export.py", "export_cli")
    out = trained["root"] / "art-hnsw"
    argv = ["--checkpoint", trained["ckpt"], "--out", str(out), "--index", "HNSW32"]
    assert cli.main([*argv, "--dtype", "float16", "--holdout", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def reference(trained) -> dict:
    """The checkpoint's own towers and test queries, for exact search without the artifact."""
    from twotower.data.datamodule import TwoTowerDataModule, left_pad_last
    from twotower.model.module import TwoTowerModule

    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    module = TwoTowerModule.load_from_checkpoint(
        trained["ckpt"], map_location="cpu", weights_only=True
    ).eval()
    dm_hp = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if k[0] != "_"}
    data = TwoTowerDataModule(**dm_hp).data
    te = data.test
    window = dm_hp["window"]
    with torch.no_grad():
        item_emb = module.item_embeddings()[2:]  # [N, d]
        hist = torch.from_numpy(left_pad_last(te.history, te.offsets, window))
        query_emb = module.query_tower(hist)  # [Q, d]
    ids = np.asarray(data.item_vocab.ids, dtype=object)
    histories = [
        [str(ids[i - 2]) for i in te.history[te.offsets[q] : te.offsets[q + 1]][-window:] if i >= 2]
        for q in range(len(te))
    ]
    return {"item_emb": item_emb, "query_emb": query_emb, "histories": histories, "data": data}


@pytest.fixture()
def planted_parts() -> dict:
    parts = mg.planted_parts()
    parts.pop("cluster")
    return parts


# ---------------------------------------------------------------------------------- round trips
@slow
def test_round_trip_exact(exact_artifact, reference) -> None:
    r = Retriever.load(exact_artifact)
    assert r.manifest["index"]["factory"] == "Flat"
    exact_scores, exact_rows = ExactSearch(reference["item_emb"]).search(reference["query_emb"], 10)
    recs = r.recommend_batch(reference["histories"], k=10)
    assert len(recs) == len(exact_rows) == len(reference["data"].test) > 0
    for rec, rows, scores in zip(recs, exact_rows, exact_scores, strict=True):
        assert rec.ids == [str(r.ids[i]) for i in rows]
        np.testing.assert_allclose(rec.scores, scores, atol=1e-5)
        assert rec.unknown == []
    # the stored item vectors are the checkpoint's item tower outputs
    np.testing.assert_allclose(r.item_emb, reference["item_emb"].numpy(), atol=1e-6)


@slow
def test_round_trip_ann_within_measured_recall(ann_artifact, reference) -> None:
    """HNSW top-10 vs exact on the test queries: at least the recall measured on validation
    queries at export time minus 0.05 (different queries), and never below 0.9."""
    m = verify_artifact(ann_artifact)
    assert m["index"]["factory"] == "HNSW32" and m["index"]["tuned_param"] == "efSearch"
    assert m["index"]["ann_recall"] >= 0.95
    r = Retriever.load(ann_artifact)
    assert r.manifest["index"]["search_params"] == {"efSearch": r.index.hnsw.efSearch}
    _, exact_rows = ExactSearch(reference["item_emb"]).search(reference["query_emb"], 10)
    recs = r.recommend_batch(reference["histories"], k=10)
    got = np.array([r.rows_of(rec.ids) for rec in recs])
    measured = recall_at_k(got, exact_rows, 10)
    assert measured >= min(m["index"]["ann_recall"] - 0.05, 0.9)
    assert not (r.path / "holdout.parquet").exists()


@slow
def test_float16_embeddings(ann_artifact, exact_artifact) -> None:
    m = read_manifest(ann_artifact)
    assert m["item_dtype"] == "float16"
    f16 = np.load(ann_artifact / "item_embeddings.npy", allow_pickle=False)
    f32 = np.load(exact_artifact / "item_embeddings.npy", allow_pickle=False)
    assert f16.dtype == np.float16 and f32.dtype == np.float32
    np.testing.assert_allclose(f16.astype(np.float32), f32, atol=1e-3)
    assert os.path.getsize(ann_artifact / "item_embeddings.npy") < 0.6 * os.path.getsize(
        exact_artifact / "item_embeddings.npy"
    )
    r16, r32 = Retriever.load(ann_artifact), Retriever.load(exact_artifact)
    track = str(r32.ids[0])
    assert r16.similar_tracks(track, 5).ids[:3] == r32.similar_tracks(track, 5).ids[:3]


@slow
def test_manifest_contents(exact_artifact, reference) -> None:
    m = verify_artifact(exact_artifact)
    data = reference["data"]
    n = len(data.item_vocab.ids)
    assert m["format_version"] == export_mod.FORMAT_VERSION
    assert m["query_tower"]["class"] == "twotower.model.towers.QueryTower"
    assert m["query_tower"]["args"]["num_items"] == n + 2
    assert m["dim"] == reference["item_emb"].shape[1] and m["metric"] == "ip"
    assert m["num_items"] == n == m["index"]["ntotal"]
    assert m["data"]["split"] == "leave_last_out" and len(m["data"]["fingerprint"]) == 64
    assert m["metrics"]["monitor"] == "val/ndcg@10" and 0 < m["metrics"]["best"] <= 1
    assert m["checkpoint"]["epoch"] == 0
    assert m["index"]["tuned_on"] == "validation queries"
    assert m["index"]["tune_queries"] == int((np.diff(data.valid.offsets) > 0).sum())
    assert m["users"]["count"] == len(data.user_vocab.ids)
    listed = set(m["files"])
    on_disk = {p.name for p in exact_artifact.iterdir()} - {"manifest.json"}
    assert listed == on_disk
    assert {"user_embeddings.npy", "users.parquet", "query_tower.onnx", "holdout.parquet"} <= listed
    for name, info in m["files"].items():
        assert info["bytes"] == (exact_artifact / name).stat().st_size
    vocab = json.loads((exact_artifact / "vocab.json").read_text())
    assert set(vocab) == {"tracks", "users", "contexts"}
    items = pd.read_parquet(exact_artifact / "items.parquet")
    assert list(items.columns) == ["track_id", "title", "artist", "plays"]
    assert [vocab["tracks"][t] for t in items["track_id"]] == list(range(2, n + 2))
    np.testing.assert_array_equal(items["plays"], data.item_counts[2:])
    assert items["title"].notna().all() and (items["plays"] >= 0).all()


@slow
def test_user_embeddings_are_latest_history_queries(exact_artifact, reference) -> None:
    r = Retriever.load(exact_artifact)
    users = pd.read_parquet(exact_artifact / "users.parquet")["user_id"].tolist()
    user_emb = np.load(exact_artifact / "user_embeddings.npy", allow_pickle=False)
    assert user_emb.shape == (len(users), r.manifest["dim"])
    np.testing.assert_allclose(np.linalg.norm(user_emb, axis=1), 1.0, atol=1e-5)
    holdout = pd.read_parquet(exact_artifact / "holdout.parquet")
    for row in holdout.head(20).itertuples():
        latest = [*row.history, row.target]  # test history + the test target
        expected = r.query_embeddings([latest])[0]
        np.testing.assert_allclose(user_emb[users.index(row.query_id)], expected, atol=1e-5)


@slow
def test_holdout_rows_are_test_examples(exact_artifact, reference) -> None:
    holdout = pd.read_parquet(exact_artifact / "holdout.parquet")
    data = reference["data"]
    assert list(holdout.columns) == ["query_id", "history", "target", "hour", "context_type"]
    assert len(holdout) == int((data.test.targets >= 2).sum())
    first = holdout.iloc[0]
    assert first["query_id"] == data.user_vocab.ids[data.test.users[0] - 2]
    assert first["target"] == data.item_vocab.ids[data.test.targets[0] - 2]
    assert list(first["history"]) == reference["histories"][0]


@slow
def test_onnx_parity(exact_artifact, reference) -> None:
    import onnxruntime as ort

    m = read_manifest(exact_artifact)
    assert m["onnx"]["max_abs_diff"] <= 1e-4 and m["onnx"]["inputs"] == ["history"]
    r = Retriever.load(exact_artifact)
    session = ort.InferenceSession(str(exact_artifact / "query_tower.onnx"))
    from twotower.data.datamodule import left_pad_last

    te = reference["data"].test
    for length in (r.history_len, 5):  # the length axis is dynamic
        hist = left_pad_last(te.history, te.offsets, length)
        got = session.run(None, {"history": hist})[0]
        with torch.no_grad():
            want = r.query_tower(torch.from_numpy(hist)).numpy()
        assert np.abs(got - want).max() <= 1e-4


def test_onnx_mismatch_fails_the_export(tmp_path, planted_parts, monkeypatch) -> None:
    monkeypatch.setattr(onnx_export_mod, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(ArtifactError, match="ONNX query tower differs from torch"):
        write_artifact(tmp_path / "art", onnx=True, **planted_parts)
    assert not (tmp_path / "art").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_cli_errors(tmp_path, capsys) -> None:
    cli = _load(REPO / "export.py", "export_cli")
    assert cli.main(["--checkpoint", str(tmp_path / "none.ckpt"), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@slow
def test_recommend_split_out(exact_artifact, reference, tmp_path) -> None:
    from twotower.cli import main

    out = tmp_path / "top.parquet"
    args = ["recommend", "--artifacts", str(exact_artifact), "--split-out", str(out), "-k", "5"]
    assert main(args) == 0
    table = pd.read_parquet(out)
    assert len(table) == len(reference["data"].test) * 5
    assert list(table.columns) == ["query", "user_id", "target", "rank", "track_id", "score"]
    r = Retriever.load(exact_artifact)
    first = r.recommend(reference["histories"][0], k=5)
    assert table[table["query"] == 0]["track_id"].tolist() == first.ids


# ---------------------------------------------------------------------------------- integrity
def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["item_embeddings.npy", "index.faiss", "query_tower.pt"])
def test_checksum_refusal(tmp_path, name) -> None:
    art = tmp_path / "art"
    shutil.copytree(GOLDEN / "artifact", art)
    Retriever.load(art)
    _flip_byte(art / name)
    with pytest.raises(ArtifactError, match=rf"{name}: checksum mismatch"):
        verify_artifact(art)
    with pytest.raises(ArtifactError, match=name):
        Retriever.load(art)


def test_missing_or_truncated_file_refused(tmp_path) -> None:
    art = tmp_path / "art"
    shutil.copytree(GOLDEN / "artifact", art)
    (art / "vocab.json").unlink()
    with pytest.raises(ArtifactError, match=r"vocab.json: missing"):
        verify_artifact(art)
    shutil.copy(GOLDEN / "artifact" / "vocab.json", art / "vocab.json")
    with open(art / "items.parquet", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match=r"items.parquet: 100 bytes, the manifest says"):
        verify_artifact(art)
    with pytest.raises(ArtifactError, match="artifact folder not found"):
        verify_artifact(tmp_path / "nothing")


def test_newer_format_refused(tmp_path) -> None:
    art = tmp_path / "art"
    shutil.copytree(GOLDEN / "artifact", art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = "1.9"  # newer minor: still readable
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert verify_artifact(art)["format_version"] == "1.9"
    manifest["format_version"] = "2.0"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"format 2.0 is newer than this twotower"):
        Retriever.load(art)
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        read_manifest(art)


def test_tower_class_must_be_ours(tmp_path) -> None:
    art = tmp_path / "art"
    shutil.copytree(GOLDEN / "artifact", art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["query_tower"]["class"] = "os.system"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a twotower class"):
        Retriever.load(art)


# ---------------------------------------------------------------------------------- atomicity
def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_crash_mid_write_keeps_previous_export(tmp_path, planted_parts, monkeypatch) -> None:
    out = tmp_path / "art"
    write_artifact(out, **planted_parts)
    before = _snapshot(out)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export_mod.torch, "save", boom)  # after index and embeddings are written
    with pytest.raises(OSError, match="simulated"):
        write_artifact(out, **planted_parts)
    assert _snapshot(out) == before
    verify_artifact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # temp folder cleaned up


def test_hard_crash_leaves_nothing_that_looks_valid(tmp_path, planted_parts, monkeypatch) -> None:
    """A kill -9 mid-write: no cleanup runs; the leftover is a hidden folder without manifest."""
    out = tmp_path / "art"
    write_artifact(out, **planted_parts)
    before = _snapshot(out)

    def killed(*args, **kwargs):
        raise OSError("killed (simulated)")

    monkeypatch.setattr(export_mod.shutil, "rmtree", lambda *a, **k: None)  # no cleanup runs
    monkeypatch.setattr(export_mod.np, "save", killed)  # after index.faiss and items.parquet
    with pytest.raises(OSError, match="simulated"):
        write_artifact(out, **planted_parts)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "art"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".art.tmp-")
    assert not (leftovers[0] / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="not a complete twotower export"):
        verify_artifact(leftovers[0])
    assert _snapshot(out) == before


def test_crash_between_renames_rolls_back(tmp_path, planted_parts, monkeypatch) -> None:
    out = tmp_path / "art"
    write_artifact(out, **planted_parts)
    before = _snapshot(out)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old aside succeeded; moving the new one in fails
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(export_mod, "_exchange", lambda a, b: False)  # the two-rename fallback
    monkeypatch.setattr(export_mod.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_artifact(out, **planted_parts)
    assert calls[0][0] == "art" and calls[1][1] == "art"
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_replaces_previous_export_and_refuses_foreign_folder(tmp_path, planted_parts) -> None:
    out = tmp_path / "art"
    write_artifact(out, **planted_parts)
    first = read_manifest(out)
    write_artifact(out, index="HNSW32", **planted_parts)
    assert read_manifest(out)["index"]["factory"] == "HNSW32" != first["index"]["factory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the old one is gone
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        write_artifact(foreign, **planted_parts)
    assert (foreign / "notes.txt").read_text() == "precious"


def test_write_artifact_validates_inputs(tmp_path, planted_parts) -> None:
    bad = dict(planted_parts, item_emb=planted_parts["item_emb"][:-1])
    with pytest.raises(ValueError, match="one row per real track"):
        write_artifact(tmp_path / "a", **bad)
    items = planted_parts["items"].copy()
    items["track_id"] = items["track_id"][::-1].to_numpy()
    with pytest.raises(ValueError, match="items.track_id must equal"):
        write_artifact(tmp_path / "a", **dict(planted_parts, items=items))
    with pytest.raises(ValueError, match="dtype"):
        write_artifact(tmp_path / "a", dtype="int8", **planted_parts)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("encoder", ["mean", "gru", "transformer"])
def test_onnx_parity_every_encoder_with_side_inputs(tmp_path, encoder) -> None:
    from twotower.model.towers import QueryTower

    torch.manual_seed(0)
    tower = QueryTower(
        num_items=40, dim=8, id_dim=8, encoder=encoder, max_len=6, num_layers=2, num_heads=2,
        dropout=0.0, num_users=5, num_contexts=4, use_hour=True, mlp_hidden=16,
    ).eval()  # fmt: skip
    info = export_mod.export_onnx(tower, tmp_path / "q.onnx", history_len=6)
    assert info["inputs"] == ["history", "users", "hours", "contexts"]
    assert info["max_abs_diff"] <= 1e-4
