"""Ids and vocabularies, shared by training and serving: raw ids -> dense indices.

Index 0 is padding, 1 is out-of-vocabulary. :class:`Vocab` is an exact table; :class:`HashVocab`
hashes ids into a fixed number of buckets, for catalogues too large for a table.

A :class:`Vocab` stores every distinct id (a 100M-listener table of strings alone is several GB,
and it must be built before training). A :class:`HashVocab` stores nothing:
index = ``2 + fmix64(fnv1a64(utf8(id))) % num_buckets`` (0 stays padding, 1 stays OOV, which a
hashed vocabulary never produces). Ids that share a bucket share an embedding row; the expected
share of colliding ids is ``1 - (1 - 1/m) ** (n - 1)`` for ``n`` distinct ids and ``m``
buckets (see :func:`expected_collision_rate`).

The hash is stable across processes, machines and Python versions (it does not use Python's
salted ``hash``): 64-bit FNV-1a over the UTF-8 bytes of ``str(id)``, followed by the 64-bit
MurmurHash3 finaliser so that the low bits used by the modulo are well mixed. It is vectorised
over the bytes of a whole column with numpy (about ``max(len(id))`` array passes), via Arrow's
UTF-8 buffers: no Python loop per id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

PAD = 0
OOV = 1
PAD_TOKEN = "<pad>"
OOV_TOKEN = "<oov>"


class Vocab:
    """A frozen mapping from raw string ids to indices ``2..n-1`` (0 pad, 1 OOV).

    Args:
        ids: Raw ids in index order, *without* the two reserved entries.
    """

    def __init__(self, ids: list[str] | np.ndarray | pd.Index) -> None:
        self.ids: list[str] = [str(x) for x in ids]
        self._index = pd.Index(self.ids)
        if not self._index.is_unique:
            dup = self._index[self._index.duplicated()][:5].tolist()
            raise ValueError(f"vocabulary ids must be unique; duplicates: {dup}")

    @classmethod
    def build(cls, raw: pd.Series | np.ndarray, min_count: int = 1) -> Vocab:
        """Vocabulary of the distinct values of ``raw`` (most frequent first, ties by id).

        Args:
            raw: Raw ids, missing values ignored.
            min_count: Ids seen fewer times map to OOV.
        """
        s = pd.Series(raw).dropna().astype(str)
        counts = s.value_counts()
        counts = counts[counts >= min_count]
        order = pd.DataFrame({"id": counts.index.astype(str), "n": counts.to_numpy()})
        order = order.sort_values(["n", "id"], ascending=[False, True], kind="stable")
        return cls(order["id"].tolist())

    def __len__(self) -> int:
        """Size including the two reserved indices."""
        return len(self.ids) + 2

    def lookup(self, raw: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        """Indices of ``raw`` ids (OOV for unknown, PAD for missing), int64."""
        # each distinct id is looked up once (contexts: a handful of values per million rows)
        codes, uniques = pd.factorize(pd.Series(raw), use_na_sentinel=True)  # -1: missing
        pos = self._index.get_indexer(pd.Series(uniques, dtype=object).astype(str).to_numpy())
        per_unique = np.append(np.where(pos < 0, OOV, pos + 2), PAD).astype(np.int64)
        return per_unique[codes]  # code -1 (missing) picks the appended PAD

    def id_of(self, index: np.ndarray | list[int]) -> list[str]:
        """Raw ids of indices (reserved indices give their tokens)."""
        table = [PAD_TOKEN, OOV_TOKEN, *self.ids]
        return [table[int(i)] for i in np.asarray(index).ravel()]

    def to_dict(self) -> dict[str, int]:
        """Raw id -> index (what ``vocab.json`` stores)."""
        return {rid: i + 2 for i, rid in enumerate(self.ids)}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Vocab:
        """Inverse of :meth:`to_dict`; checks that indices are ``2..n-1`` without gaps."""
        items = sorted(d.items(), key=lambda kv: kv[1])
        idx = [i for _, i in items]
        if idx != list(range(2, len(items) + 2)):
            raise ValueError("vocabulary indices must run 2..n-1 without gaps (0 pad, 1 OOV)")
        return cls([k for k, _ in items])

    def save(self, path: str | Path) -> None:
        """Write as JSON (raw id -> index)."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocabulary written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.ids == other.ids

    def __repr__(self) -> str:
        return f"Vocab({len(self.ids)} ids + pad/oov)"


# ---------------------------------------------------------------------- hashed vocabularies
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
HASH_NAME = "fnv1a64+fmix64"
_U64 = np.uint64


def _as_utf8(raw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UTF-8 bytes, offsets ``[N + 1]`` and a missing-value mask ``[N]`` of ``str(id)`` values."""
    if isinstance(raw, pa.ChunkedArray):
        raw = raw.combine_chunks()
    if not isinstance(raw, pa.Array):
        s = pd.Series(raw, copy=False)
        if pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_string_dtype(s.dtype):
            raw = pa.array(s, from_pandas=True)  # Arrow's int -> string cast equals str(int)
        else:  # floats, bools, mixed objects: Python's str() of each value
            missing = s.isna().to_numpy()
            text = s.astype(object).where(~missing, None).map(str, na_action="ignore")
            raw = pa.array(text.to_numpy(dtype=object), type=pa.large_string(), from_pandas=True)
    if isinstance(raw, pa.ChunkedArray):  # pandas' Arrow-backed strings convert to chunks
        raw = raw.combine_chunks()
    arr = raw if pa.types.is_large_string(raw.type) else pc.cast(raw, pa.large_string())
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    return (*_buffers(arr), missing)


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Data bytes and offsets of a large_string array (slices handled)."""
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    return data, offsets


def fnv1a64(raw: Any, seed: int = 0) -> np.ndarray:
    """64-bit FNV-1a of the UTF-8 bytes of ``str(id)`` for every id (vectorised).

    Args:
        raw: Ids (list, numpy array, pandas Series, or Arrow array of strings).
        seed: 0 gives standard FNV-1a; another value first feeds its 8 little-endian bytes,
            which gives an independent hash function.

    Returns:
        ``[N]`` uint64 (missing values hash as the empty string; see :meth:`HashVocab.lookup`).
    """
    data, offsets, _ = _as_utf8(raw)
    return _fnv_from_buffers(data, offsets, seed)


def _fnv_from_buffers(data: np.ndarray, offsets: np.ndarray, seed: int) -> np.ndarray:
    n = len(offsets) - 1
    start = FNV_OFFSET
    if seed:
        for byte in int(seed).to_bytes(8, "little", signed=False):
            start = ((start ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    prime = _U64(FNV_PRIME)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first: active rows are a prefix
    sorted_len = lengths[order]
    starts = offsets[:-1][order]
    h = np.full(n, start, dtype=_U64)
    max_len = int(sorted_len[0]) if n else 0
    with np.errstate(over="ignore"):
        for j in range(max_len):
            active = int(np.searchsorted(-sorted_len, -j, side="left"))  # rows with len > j
            h[:active] = (h[:active] ^ data[starts[:active] + j].astype(_U64)) * prime
    out = np.empty(n, dtype=_U64)
    out[order] = h
    return out


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that mixes every bit into the low bits)."""
    h = np.asarray(h, dtype=_U64).copy()
    with np.errstate(over="ignore"):
        h ^= h >> _U64(33)
        h *= _U64(0xFF51AFD7ED558CCD)
        h ^= h >> _U64(33)
        h *= _U64(0xC4CEB9FE1A85EC53)
        h ^= h >> _U64(33)
    return h


def hash_buckets(raw: Any, num_buckets: int, seed: int = 0) -> np.ndarray:
    """Bucket ``0..num_buckets-1`` of every id (``fmix64(fnv1a64(id)) % num_buckets``), int64."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    data, offsets, _ = _as_utf8(raw)
    h = fmix64(_fnv_from_buffers(data, offsets, seed))
    return (h % _U64(num_buckets)).astype(np.int64)


def expected_collision_rate(num_ids: int, num_buckets: int) -> float:
    """Expected share of ``num_ids`` distinct ids whose bucket holds at least one other id."""
    if num_ids <= 1:
        return 0.0
    if num_buckets == 1:
        return 1.0
    return float(-np.expm1((num_ids - 1) * np.log1p(-1.0 / num_buckets)))


def expected_occupied(num_ids: int, num_buckets: int) -> float:
    """Expected number of non-empty buckets after hashing ``num_ids`` distinct ids."""
    if num_buckets == 1:
        return float(min(num_ids, 1))
    return float(-num_buckets * np.expm1(num_ids * np.log1p(-1.0 / num_buckets)))


class HashVocab:
    """A vocabulary of ``num_buckets`` hashed rows plus pad (0) and OOV (1).

    Drop-in for :class:`~twotower.ids.Vocab` where the model only needs indices
    (``len``, ``lookup``); it has no list of ids (``ids`` is absent on purpose), so displays and
    exports that need raw ids keep a side table of the ids actually seen.

    Args:
        num_buckets: Embedding rows for real ids (the table has ``num_buckets + 2`` rows).
        seed: Selects an independent hash function (0 = plain FNV-1a).
    """

    kind = "hash"

    def __init__(self, num_buckets: int, seed: int = 0) -> None:
        if int(num_buckets) < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.num_buckets = int(num_buckets)
        self.seed = int(seed)

    def __len__(self) -> int:
        """Table size including the two reserved indices."""
        return self.num_buckets + 2

    def lookup(self, raw: Any) -> np.ndarray:
        """Indices ``2..num_buckets+1`` of ``raw`` ids (PAD for missing values), int64."""
        data, offsets, missing = _as_utf8(raw)
        h = fmix64(_fnv_from_buffers(data, offsets, self.seed))
        out = (h % _U64(self.num_buckets)).astype(np.int64) + 2
        out[missing] = PAD
        return out

    def lookup_multi(self, raw: Any, num_hashes: int = 2) -> np.ndarray:
        """``[N, num_hashes]`` indices from independent hash functions (seeds ``seed..``).

        Summing the rows of two or more hashes ("hash embeddings") makes two ids share *all*
        their rows with probability ``1 / m ** num_hashes`` instead of ``1 / m``.
        """
        return np.stack(
            [HashVocab(self.num_buckets, self.seed + k).lookup(raw) for k in range(num_hashes)],
            axis=1,
        )

    def collisions(self, raw: Any) -> dict[str, float]:
        """Collision statistics of the distinct ids in ``raw`` against the uniform expectation.

        Returns:
            ``ids`` (distinct), ``buckets`` (``num_buckets``), ``occupied``, ``colliding_share``
            (share of ids whose bucket holds another id), and the expected values
            ``expected_occupied`` / ``expected_colliding_share`` of a uniform hash.
        """
        distinct = pd.unique(pd.Series(raw).dropna().astype(str))
        idx = self.lookup(distinct)
        per_bucket = np.bincount(idx, minlength=len(self))
        n = len(distinct)
        colliding = int((per_bucket[idx] > 1).sum())
        return {
            "ids": n,
            "buckets": self.num_buckets,
            "occupied": int((per_bucket > 0).sum()),
            "colliding_share": colliding / n if n else 0.0,
            "expected_occupied": expected_occupied(n, self.num_buckets),
            "expected_colliding_share": expected_collision_rate(n, self.num_buckets),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what a checkpoint or ``vocab.json`` would store instead of the id table)."""
        return {
            "kind": self.kind,
            "hash": HASH_NAME,
            "num_buckets": self.num_buckets,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HashVocab:
        """Inverse of :meth:`to_dict` (refuses another hash function)."""
        if d.get("kind") != cls.kind or d.get("hash") != HASH_NAME:
            raise ValueError(f"not a {HASH_NAME} hash vocabulary: {d!r}")
        return cls(int(d["num_buckets"]), int(d.get("seed", 0)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashVocab) and (self.num_buckets, self.seed) == (
            other.num_buckets,
            other.seed,
        )

    def __hash__(self) -> int:
        return hash((self.num_buckets, self.seed))

    def __repr__(self) -> str:
        return f"HashVocab({self.num_buckets} buckets + pad/oov, seed={self.seed})"


class BucketIds:
    """A :class:`HashVocab` seen as a :class:`Vocab`: ``ids`` are the labels ``bucket#i``.

    What the training data hands the model when track ids are hashed (checkpoints keep the
    labels; exports name each bucket by its most played raw id, see the prepared catalogue).

    Args:
        vocab: The hash function and bucket count.
        prefix: Label prefix.
    """

    def __init__(self, vocab: HashVocab, prefix: str = "bucket") -> None:
        self.vocab = vocab
        self.ids = [f"{prefix}#{i}" for i in range(vocab.num_buckets)]

    def __len__(self) -> int:
        return len(self.vocab)

    def lookup(self, raw: Any) -> np.ndarray:
        """Bucket indices of ``raw`` ids (PAD for missing)."""
        return self.vocab.lookup(raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BucketIds) and other.vocab == self.vocab
