"""Vocabularies: raw ids -> dense indices. Index 0 is padding, 1 is out-of-vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

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
