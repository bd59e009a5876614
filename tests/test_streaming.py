"""Streaming Parquet input (sharded by rank and worker) and hashed vocabularies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from twotower.data.schema import DataError
from twotower.data.streaming import (
    ROW_KEY,
    ParquetStream,
    list_fragments,
    plan_shard,
    stream_bucket_counts,
    stream_counts,
    stream_vocab,
)
from twotower.ids import (
    HashVocab,
    Vocab,
    expected_collision_rate,
    expected_occupied,
    fmix64,
    fnv1a64,
    hash_buckets,
)

# Three files with uneven row groups (sizes chosen so that shard cuts fall inside row groups).
FILE_ROWS = (("a.parquet", 1000, 128), ("b.parquet", 337, 50), ("sub/c.parquet", 1500, 999))
TOTAL = sum(n for _, n, _ in FILE_ROWS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Plays with a unique ``play`` number per row and a Zipf-ish ``track_id``."""
    root = tmp_path_factory.mktemp("plays")
    rng = np.random.default_rng(0)
    start = 0
    for name, n, rg in FILE_ROWS:
        tracks = rng.zipf(1.3, n) % 500
        frame = pd.DataFrame(
            {
                "play": np.arange(start, start + n, dtype=np.int64),
                "user_id": pd.Series([f"u{x}" for x in rng.integers(0, 50, n)], dtype="string"),
                "track_id": pd.Series([f"t{x}" for x in tracks], dtype="string"),
            }
        )
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pandas(frame, preserve_index=False), root / name, row_group_size=rg
        )
        start += n
    return root


def _all_plays(root: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(root / name) for name, _, _ in FILE_ROWS], ignore_index=True)


def test_fragments_follow_files_and_row_groups(dataset: Path) -> None:
    frags = list_fragments(dataset)
    # a: 8 groups of <=128, b: 7 of <=50, c: 2 (999 + 501); global starts are cumulative
    assert [Path(f.path).name for f in frags] == ["a.parquet"] * 8 + ["b.parquet"] * 7 + [
        "c.parquet"
    ] * 2
    assert sum(f.num_rows for f in frags) == TOTAL
    assert [f.start for f in frags[:3]] == [0, 128, 256] and frags[-1].num_rows == 501
    # plan_shard cuts the concatenation into balanced contiguous ranges
    pieces = plan_shard(frags, 4, 1)
    assert sum(p.num_rows for p in pieces) == TOTAL // 4
    assert pieces[0].fragment.start + pieces[0].lo == TOTAL // 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_row_once_per_epoch_two_ranks_two_workers(dataset: Path, shuffle: bool) -> None:
    """2 DDP ranks (passed explicitly) x 2 DataLoader worker processes: a partition of the rows."""
    seen: list[np.ndarray] = []
    per_shard: dict[tuple[int, int], int] = {}
    for rank in (0, 1):
        stream = ParquetStream(
            dataset,
            ["play", "track_id"],
            chunk_rows=100,
            rank=rank,
            world_size=2,
            shuffle=shuffle,
            seed=3,
            row_index=True,
        )
        stream.set_epoch(1)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        for chunk in loader:
            assert len(chunk["play"]) <= 100  # memory bound: never more than a chunk
            np.testing.assert_array_equal(chunk["play"], chunk[ROW_KEY])
            seen.append(np.asarray(chunk["play"]))
        for w in (0, 1):
            per_shard[(rank, w)] = stream.num_rows((w, 2))
    rows = np.concatenate(seen)
    assert len(rows) == TOTAL and len(np.unique(rows)) == TOTAL  # every row, exactly once
    sizes = sorted(per_shard.values())
    assert sum(sizes) == TOTAL and sizes[-1] - sizes[0] <= 1  # balanced: equal DDP steps


def test_workers_played_in_process_partition_rows_and_shuffle_by_epoch(dataset: Path) -> None:
    def epoch_rows(epoch: int, shuffle: bool) -> list[np.ndarray]:
        out = []
        for rank in (0, 1):
            s = ParquetStream(dataset, ["play"], 64, rank, 2, shuffle=shuffle, seed=7)
            s.set_epoch(epoch)
            for w in (0, 1):
                out.append(np.concatenate([c["play"] for c in s.iter_chunks((w, 2))]))
        return out

    plain = epoch_rows(0, False)
    np.testing.assert_array_equal(np.concatenate(plain), np.arange(TOTAL))  # order preserved
    e0, e0_again, e1 = epoch_rows(0, True), epoch_rows(0, True), epoch_rows(1, True)
    for parts in (e0, e1):
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(TOTAL))
    assert all(np.array_equal(a, b) for a, b in zip(e0, e0_again, strict=True))  # seeded
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))  # new order per epoch


def test_streaming_counts_and_vocab_equal_in_memory(dataset: Path) -> None:
    plays = _all_plays(dataset)
    counts = stream_counts(dataset, "track_id", chunk_rows=97)
    expected = plays["track_id"].value_counts()
    assert counts.sort_index().to_dict() == expected.sort_index().to_dict()
    assert stream_vocab(dataset, "track_id", chunk_rows=97) == Vocab.build(plays["track_id"])
    assert stream_vocab(dataset, "track_id", min_count=5, chunk_rows=300) == Vocab.build(
        plays["track_id"], min_count=5
    )
    hv = HashVocab(64)
    by_bucket = stream_bucket_counts(dataset, "track_id", hv, chunk_rows=97)
    np.testing.assert_array_equal(
        by_bucket, np.bincount(hv.lookup(plays["track_id"]), minlength=len(hv))
    )
    assert by_bucket.sum() == TOTAL and by_bucket[:2].sum() == 0


def test_stream_errors_name_the_file(tmp_path: Path, dataset: Path) -> None:
    with pytest.raises(DataError, match="no such Parquet"):
        ParquetStream(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        list_fragments(tmp_path / "empty")
    with pytest.raises(DataError, match=r"a.parquet: missing column\(s\) \['nope'\]"):
        ParquetStream(dataset, ["play", "nope"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x.parquet: not a readable Parquet file"):
        list_fragments(bad)
    with pytest.raises(ValueError, match="rank 2"):
        ParquetStream(dataset, rank=2, world_size=2)


# ---------------------------------------------------------------------------------- hashing
def _fnv_reference(text: str, seed: int = 0) -> int:
    h = 0xCBF29CE484222325
    data = (seed.to_bytes(8, "little") if seed else b"") + text.encode("utf-8")
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    return h


def test_fnv_known_vectors() -> None:
    # published FNV-1a 64 test vectors
    got = fnv1a64(["", "a", "foobar"])
    assert [int(x) for x in got] == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    assert int(fmix64(np.array([0], np.uint64))[0]) == 0  # fmix64 fixes 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=12), min_size=1, max_size=20), st.integers(0, 3))
def test_fnv_matches_pure_python(ids: list[str], seed: int) -> None:
    got = fnv1a64(ids, seed=seed)
    assert [int(x) for x in got] == [_fnv_reference(t, seed) for t in ids]


def test_hash_vocab_lookup_semantics() -> None:
    hv = HashVocab(10)
    idx = hv.lookup(pd.Series(["a", None, "b", "a"], dtype="string"))
    assert idx[1] == 0 and idx[0] == idx[3] and all(2 <= i < 12 for i in idx[[0, 2, 3]])
    # ints hash as their decimal string, like Vocab's str(id)
    np.testing.assert_array_equal(hv.lookup(np.array([12, 7])), hv.lookup(["12", "7"]))
    assert len(hv) == 12 and HashVocab.from_dict(hv.to_dict()) == hv
    assert not np.array_equal(
        HashVocab(1000, seed=1).lookup(["a", "b", "c"]), HashVocab(1000).lookup(["a", "b", "c"])
    )
    multi = hv.lookup_multi(["a", "b"], num_hashes=3)
    assert multi.shape == (2, 3) and multi[0, 0] == hv.lookup(["a"])[0]
    with pytest.raises(ValueError, match="hash vocabulary"):
        HashVocab.from_dict({"kind": "hash", "hash": "md5", "num_buckets": 3})


def test_hash_is_stable_across_processes() -> None:
    """Not Python's salted hash(): two interpreters with different hash seeds agree."""
    code = (
        "from twotower.ids import hash_buckets;"
        "print(hash_buckets(['track_1', 'ä€😀', '42'], 1000003).tolist())"
    )
    outs = set()
    for salt in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=salt)
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(res.stdout.strip())
    assert outs == {str(hash_buckets(["track_1", "ä€😀", "42"], 1000003).tolist())}


def test_collision_rate_matches_uniform_hashing() -> None:
    ids = [f"spotify:track:{i:07d}" for i in range(50_000)]
    stats = HashVocab(500_000).collisions(ids)
    # uniform: 1 - (1 - 1/m)^(n-1) = 9.5% of ids share a bucket; occupied m(1 - (1-1/m)^n)
    assert stats["expected_colliding_share"] == pytest.approx(0.0952, abs=2e-4)
    assert abs(stats["colliding_share"] - stats["expected_colliding_share"]) < 0.006
    assert abs(stats["occupied"] - stats["expected_occupied"]) < 150  # ~3 standard deviations
    # goodness of fit on few buckets: chi-square with 63 dof stays well below 110 (p ~ 2e-4)
    counts = np.bincount(hash_buckets(ids, 64), minlength=64)
    chi2 = float(((counts - len(ids) / 64) ** 2 / (len(ids) / 64)).sum())
    assert chi2 < 110, chi2
    assert expected_collision_rate(1, 10) == 0.0
    assert expected_occupied(2, 1) == pytest.approx(1.0)
