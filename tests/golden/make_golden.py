"""Make the committed golden artifact: ``python tests/golden/make_golden.py``.

A tiny model with planted structure (no training, so it is exactly reproducible): 24 tracks in
4 clusters of 6 ("Artist A".."Artist D"), 8-dimensional item vectors = cluster centre + noise,
and a ``mean``-encoder QueryTower whose id embedding holds those vectors and whose output head
is the identity, so a query is the normalised mean of its history's vectors. The expected
answers are computed here with plain numpy (independently of the Retriever) and stored in
``expected.json``; ``tests/test_retrieve.py`` checks the committed artifact against them.

Regenerate only when the artifact format changes on purpose (bump FORMAT_VERSION then).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
N_CLUSTERS, PER_CLUSTER, DIM = 4, 6, 8


def planted_vectors(
    n_clusters: int = N_CLUSTERS, per_cluster: int = PER_CLUSTER, dim: int = DIM, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised item vectors ``[n_clusters * per_cluster, dim]`` and their cluster."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n_clusters]  # orthonormal rows
    cluster = np.repeat(np.arange(n_clusters), per_cluster)
    x = centres[cluster] + 0.3 * rng.normal(size=(len(cluster), dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), cluster


def planted_tower(vectors: np.ndarray, max_len: int = 10) -> torch.nn.Module:
    """A QueryTower whose query is the normalised mean of the history's planted vectors."""
    from twotower.model.towers import QueryTower

    n, dim = vectors.shape
    tower = QueryTower(
        num_items=n + 2,
        dim=dim,
        id_dim=dim,
        encoder="mean",
        max_len=max_len,
        num_layers=1,
        num_heads=1,
        dropout=0.0,
    )
    with torch.no_grad():
        tower.item_embedding.weight.zero_()
        tower.item_embedding.weight[2:] = torch.from_numpy(vectors)
        tower.head.weight.copy_(torch.eye(dim))
        tower.head.bias.zero_()
    return tower.eval()


def planted_parts(
    n_clusters: int = N_CLUSTERS, per_cluster: int = PER_CLUSTER, dim: int = DIM, seed: int = 0
) -> dict:
    """Everything :func:`twotower.export.write_artifact` needs, plus the planted clusters."""
    vectors, cluster = planted_vectors(n_clusters, per_cluster, dim, seed)
    ids = [f"g{i:02d}" for i in range(len(vectors))]
    items = pd.DataFrame(
        {
            "track_id": pd.Series(ids, dtype="string"),
            "title": pd.Series([f"Golden track {i}" for i in range(len(ids))], dtype="string"),
            "artist": pd.Series([f"Artist {'ABCDEFGH'[c]}" for c in cluster], dtype="string"),
            "plays": np.arange(len(ids), 0, -1, dtype=np.int64),
        }
    )
    return {
        "query_tower": planted_tower(vectors),
        "item_emb": vectors,
        "items": items,
        "vocab": {"tracks": ids, "users": [], "contexts": ["radio", "charts"]},
        "cluster": cluster,
    }


def expected_top(vectors: np.ndarray, history: list[int], k: int, exclude: list[int]) -> list:
    """Independent numpy answer: rows and scores of the top-k for a history of rows."""
    q = vectors[history].mean(0)
    q /= np.linalg.norm(q)
    scores = vectors @ q
    scores[exclude] = -np.inf
    rows = np.argsort(-scores, kind="stable")[:k]
    return [[int(r) for r in rows], [float(scores[r]) for r in rows]]


def main() -> None:
    """Write ``artifact/`` and ``expected.json`` next to this script."""
    from twotower.export import write_artifact

    parts = planted_parts()
    cluster = parts.pop("cluster")
    vectors = parts["item_emb"]
    out = HERE / "artifact"
    if out.exists():
        shutil.rmtree(out)
    write_artifact(out, index="Flat", **parts)
    ids = parts["vocab"]["tracks"]
    history = [0, 1]  # two tracks of cluster A
    rows, scores = expected_top(vectors, history, 5, exclude=history)
    assert {int(cluster[r]) for r in rows[:4]} == {0}, "planted structure lost"
    sim_rows, sim_scores = expected_top(vectors, [6], 3, exclude=[6])
    assert {int(cluster[r]) for r in sim_rows} == {1}, "planted structure lost"
    expected = {
        "recommend": {
            "history": [ids[i] for i in history],
            "k": 5,
            "exclude": "history",
            "ids": [ids[r] for r in rows],
            "scores": scores,
        },
        "similar": {
            "track": ids[6],
            "k": 3,
            "ids": [ids[r] for r in sim_rows],
            "scores": sim_scores,
        },
        "cluster": {ids[i]: int(c) for i, c in enumerate(cluster)},
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({total:,} bytes) and {HERE / 'expected.json'}")


if __name__ == "__main__":
    main()
