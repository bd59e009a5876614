"""Hashed vocabularies: the stable id hash and its bucket statistics."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.ids import (
    HashVocab,
    expected_collision_rate,
    expected_occupied,
    fmix64,
    fnv1a64,
    hash_buckets,
)


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
