"""Evaluation query batches of an EvalSet, shared by the in-memory and streaming DataModules.

The last ``window`` items of each validation/test history, left-padded, with the target and,
when the data's ``filter_seen`` is on, the already-seen items as a CSR slice.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from twotower.data.prepared import EvalSet
from twotower.query import CLOCK_FIELDS, PLAY_FIELDS, QuerySpec

Batch = dict[str, Tensor]


class EvalDataset(Dataset):
    """Next-item queries of an :class:`EvalSet`, as batches.

    A batch holds ``history [b, L]`` (left-padded), ``users``, ``hours``, ``contexts``,
    ``targets``, ``rows`` (query index) and, with ``filter_seen``, the seen items of the batch
    in CSR form: ``seen_values [n]`` and ``seen_offsets [b + 1]``.

    Args:
        eval_set: Validation or test examples.
        window: History length ``L``.
        filter_seen: Include the seen-items CSR.
        play_signals: Histories of every play with ``skips``, ``gaps`` and ``request_gaps``.
        play_clock: Also ``play_hours`` and ``play_weekdays`` of every play.
    """

    def __init__(
        self,
        eval_set: EvalSet,
        window: int,
        filter_seen: bool,
        play_signals: bool = False,
        play_clock: bool = False,
    ) -> None:
        self.eval_set = eval_set
        self.filter_seen = filter_seen
        # the query contract's builder, with every context field (towers ignore unused ones)
        spec = QuerySpec(
            window,
            users=True,
            hours=True,
            contexts=True,
            play_signals=play_signals,
            play_clock=play_clock,
        )
        self.queries = spec.build_from(eval_set)
        self.targets = torch.from_numpy(eval_set.targets.astype(np.int64))

    def __len__(self) -> int:
        return len(self.eval_set)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> Batch:
        rows = np.asarray(indices, dtype=np.int64)
        idx = torch.from_numpy(rows)
        q = self.queries[idx]
        batch = {
            "history": q.history,
            "users": q.users,
            "hours": q.hours,
            "contexts": q.contexts,
            **{k: getattr(q, k) for k in PLAY_FIELDS + CLOCK_FIELDS if getattr(q, k) is not None},
            "targets": self.targets[idx],
            "rows": idx,
        }
        if self.filter_seen:
            off = self.eval_set.seen_offsets
            lo, hi = off[rows], off[rows + 1]
            lens = hi - lo
            within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            values = self.eval_set.seen[np.repeat(lo, lens) + within]
            batch["seen_values"] = torch.from_numpy(values.astype(np.int64))
            batch["seen_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]))
        return batch
