"""What ``twotower pipeline`` exports by default: ONNX query tower and listener embeddings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_pipeline_run import tiny_run

from twotower.export import verify_artifact
from twotower.pipeline import _want_onnx, _want_users


@pytest.mark.slow
def test_pipeline_artifacts_hold_onnx_and_listener_embeddings(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    art = tiny_run(tmp_path_factory) / "artifacts"
    for name in ("query_tower.onnx", "user_embeddings.npy", "users.parquet"):
        assert (art / name).is_file(), name
    verify_artifact(art)  # every file is in the manifest with its checksum
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["users"]["count"] == 300
    assert manifest["onnx"]
    emb = np.load(art / "user_embeddings.npy", allow_pickle=False)
    users = pd.read_parquet(art / "users.parquet")
    assert emb.shape == (300, manifest["dim"]) and len(users) == 300
    assert np.isfinite(emb).all()


def test_export_switches(monkeypatch):
    assert _want_onnx(False) is False and _want_onnx(True) is True
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    assert _want_onnx(None) is False  # not installed: skipped with a warning, not an error

    class NoListeners:
        num_users = 2  # pad and OOV only (sessions without listener ids)

    class Listeners:
        num_users = 302

    assert _want_users(True, NoListeners()) is False
    assert _want_users(True, Listeners()) is True
    assert _want_users(False, Listeners()) is False


def test_cli_has_the_off_switches():
    from twotower.cli import build_parser

    args = build_parser().parse_args(["pipeline", "--config", "c.yaml", "--no-onnx", "--no-users"])
    assert args.no_onnx and args.no_users
    args = build_parser().parse_args(["pipeline", "--config", "c.yaml"])
    assert not args.no_onnx and not args.no_users and not args.onnx
