"""Baselines scored by the same full-catalogue metric code on the same split as the model.

Every baseline is fitted on :attr:`PreparedData.train` only (positive events; skipped plays are
not positives) and scores the histories of an :class:`~twotower.data.prepared.EvalSet`:

* :class:`MostPopular`: training play counts, the same list for everyone.
* :class:`ItemCooccurrence`: next-track transitions and within-window co-occurrence counts of the
  training sequences (sparse ``[V, V]`` matrices in numpy CSR form, no scipy), row-normalised;
  a query's score is the recency-weighted sum of the rows of its last ``n_last`` history items,
  with a tiny popularity term that only breaks ties.
* :class:`ALS`: implicit-feedback matrix factorisation from the optional ``implicit`` package
  (imported lazily); a query's factor is solved from its items with the fitted item factors
  (the same least-squares step as ``implicit``'s ``recalculate_user``), so it works for
  sessions without users and sees the validation item at test time like every other model.

Hyper-parameters are tuned lightly on the *validation* split by :func:`tune` (NDCG@10, seen
filtering as configured); the test split is never looked at while tuning.

Common interface: ``fit(data) -> self``, ``score(eval_set, rows) -> Tensor [b, V]``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from twotower.data.prepared import EvalSet, PreparedData
from twotower.metrics import NUM_RESERVED, metrics_from_ranks, rank_from_scores

log = logging.getLogger("twotower")

#: Names accepted by :func:`make_baseline` and :func:`fit_baselines`, in table order.
BASELINES: tuple[str, ...] = ("popular", "transitions", "cooccurrence", "als")


def positive_counts(data: PreparedData) -> np.ndarray:
    """Training count of positive events per item index, ``[V]`` float64."""
    tr = data.train
    return np.bincount(tr.items[tr.positive], minlength=data.num_items).astype(np.float64)


def positive_sequences(data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """Training sequences restricted to positive events, as CSR ``(items, offsets)``."""
    tr = data.train
    keep = tr.positive.astype(bool)
    seq = np.repeat(np.arange(len(tr), dtype=np.int64), tr.lengths)
    items = tr.items[keep]
    offsets = np.zeros(len(tr) + 1, dtype=np.int64)
    np.cumsum(np.bincount(seq[keep], minlength=len(tr)), out=offsets[1:])
    return items, offsets


class Baseline:
    """Base class: a name, the wall time of the last :meth:`fit`, and the scoring interface."""

    name: str = "baseline"

    def __init__(self) -> None:
        self.fit_seconds: float = 0.0
        self.num_items: int = 0

    def fit(self, data: PreparedData) -> Baseline:
        """Fit on ``data.train`` only; returns ``self``."""
        start = time.perf_counter()
        self.num_items = data.num_items
        self._fit(data)
        self.fit_seconds = time.perf_counter() - start
        return self

    def _fit(self, data: PreparedData) -> None:
        raise NotImplementedError

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        """Scores of every catalogue item for queries ``rows`` of ``eval_set``, ``[b, V]``."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Hyper-parameters (for the table and the JSON)."""
        return {}


class MostPopular(Baseline):
    """Most played tracks in training, the same ranking for every query."""

    name = "popular"

    def _fit(self, data: PreparedData) -> None:
        self.counts = torch.from_numpy(positive_counts(data)).float()  # [V]

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        """Training counts, repeated for each query."""
        b = rows.stop - rows.start
        return self.counts.repeat(b, 1)  # [b, V]


class ItemCooccurrence(Baseline):
    """Item-to-item transitions and co-occurrences from training sequences.

    Args:
        n_last: History items used per query (the most recent ones).
        decay: Weight ``decay ** age`` of a history item, age 0 for the most recent.
        mix: Weight of the next-track transition matrix; ``1 - mix`` goes to the symmetric
            co-occurrence matrix within ``window`` positions.
        window: Co-occurrence window (positions apart, both directions).
    """

    name = "cooccurrence"

    def __init__(
        self, n_last: int = 20, decay: float = 0.8, mix: float = 0.5, window: int = 10
    ) -> None:
        super().__init__()
        self.n_last = n_last
        self.decay = decay
        self.mix = mix
        self.window = window

    def params(self) -> dict[str, Any]:
        """Hyper-parameters."""
        return {"n_last": self.n_last, "decay": self.decay, "mix": self.mix, "window": self.window}

    def _fit(self, data: PreparedData) -> None:
        items, offsets = positive_sequences(data)
        v = data.num_items
        seq = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        src_t, dst_t = _pairs(items, seq, 1)
        self.transitions = _row_normalised(src_t, dst_t, v)  # [V, V] CSR
        srcs, dsts = [], []
        for d in range(1, self.window + 1):
            a, b = _pairs(items, seq, d)
            srcs += [a, b]
            dsts += [b, a]
        src_c = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
        dst_c = np.concatenate(dsts) if dsts else np.zeros(0, np.int64)
        keep = src_c != dst_c
        self.cooc = _row_normalised(src_c[keep], dst_c[keep], v)  # [V, V] CSR
        pop = torch.from_numpy(positive_counts(data)).float()  # [V]
        # tiny popularity term: breaks ties; empty or cold histories fall back to popularity
        self.tiebreak = 1e-6 * pop / pop.max().clamp(min=1.0)  # [V]

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        """Recency-weighted sum of the item rows of each query's last ``n_last`` items.

        Only the matrix rows of the history items are touched (cost ~ history x row length,
        not the number of non-zeros of the whole matrix).
        """
        b = rows.stop - rows.start
        v = self.num_items
        q_idx, item_idx, weight = _recent_items(eval_set, rows, self.n_last, self.decay)
        real = item_idx >= NUM_RESERVED  # pad/OOV history items carry no information
        q_idx, item_idx, weight = q_idx[real], item_idx[real], weight[real]
        scores = self.tiebreak.repeat(b, 1)  # [b, V]
        flat = scores.view(-1)  # [b * V]
        for matrix, share in ((self.transitions, self.mix), (self.cooc, 1.0 - self.mix)):
            if share == 0.0:
                continue
            pos, cols, vals = _gather_rows(matrix, item_idx, weight * share)
            flat.index_add_(0, torch.from_numpy(q_idx[pos] * v + cols), torch.from_numpy(vals))
        return scores  # [b, V]


class ALS(Baseline):
    """Implicit-feedback ALS (Hu, Koren, Volinsky 2008) via the optional ``implicit`` package.

    Args:
        factors: Latent dimension.
        regularization: L2 weight.
        alpha: Confidence scale of the counts.
        iterations: ALS sweeps.
        seed: Random state of the initialisation.
        num_threads: Threads for ``implicit`` (0 = all cores). 1 by default: on small data
            (ML-100K) its thread pool was ~10x slower than one thread on a busy 2-core CPU.
    """

    name = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.1,
        alpha: float = 1.0,
        iterations: int = 15,
        seed: int = 0,
        num_threads: int = 1,
    ) -> None:
        super().__init__()
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.seed = seed
        self.num_threads = num_threads

    def params(self) -> dict[str, Any]:
        """Hyper-parameters."""
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
        }

    def _fit(self, data: PreparedData) -> None:
        implicit_als, sparse = _import_implicit()
        items, offsets = positive_sequences(data)
        rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        user_items = sparse.csr_matrix(
            (np.ones(len(items), dtype=np.float32), (rows, items)),
            shape=(len(offsets) - 1, data.num_items),
        )
        user_items.sum_duplicates()  # repeated plays add up to a count
        with _blas_single_thread():  # implicit's advice: BLAS threads fight its own
            self.model = implicit_als.AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
                num_threads=self.num_threads,
            )
            self.model.fit(user_items, show_progress=False)
        self.item_factors = torch.from_numpy(np.asarray(self.model.item_factors)).float()  # [V, f]
        self._sparse = sparse

    def score(self, eval_set: EvalSet, rows: slice) -> Tensor:
        """Dot products of the solved query factors with the item factors."""
        b = rows.stop - rows.start
        q_idx, item_idx = _query_items(eval_set, rows)
        user_items = self._sparse.csr_matrix(
            (np.ones(len(item_idx), dtype=np.float32), (q_idx, item_idx)),
            shape=(b, self.num_items),
        )
        user_items.sum_duplicates()
        with _blas_single_thread():
            query_factors = self.model.recalculate_user(np.arange(b), user_items)  # [b, f]
        return torch.from_numpy(np.asarray(query_factors)).float() @ self.item_factors.T


def _import_implicit() -> tuple[Any, Any]:
    try:
        from implicit.cpu import als as implicit_als
        from scipy import sparse
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the ALS baseline needs the optional package 'implicit' "
            "(pip install 'twotower[als]' or pip install implicit); "
            "run without it, e.g. evaluate only the other baselines"
        ) from e
    return implicit_als, sparse


def _blas_single_thread() -> Any:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(1, "blas")


# -------------------------------------------------------------------------- sparse helpers
def _pairs(items: np.ndarray, seq: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) item pairs ``d`` positions apart within the same sequence."""
    if len(items) <= d:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    same = seq[:-d] == seq[d:]
    return items[:-d][same], items[d:][same]


#: A sparse ``[V, V]`` matrix in CSR form: ``(indptr [V + 1], indices [nnz], data [nnz])``.
CSR = tuple[np.ndarray, np.ndarray, np.ndarray]


def _row_normalised(src: np.ndarray, dst: np.ndarray, v: int) -> CSR:
    """CSR ``[V, V]`` of pair counts, each row divided by its sum."""
    key, counts = np.unique(src.astype(np.int64) * v + dst, return_counts=True)
    rows, cols = key // v, key % v
    row_sum = np.bincount(rows, weights=counts, minlength=v)
    indptr = np.zeros(v + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=v), out=indptr[1:])
    data = (counts / row_sum[rows]).astype(np.float32)
    return indptr, cols.astype(np.int64), data


def _gather_rows(
    matrix: CSR, item_idx: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of rows ``item_idx`` scaled by ``weight``: (which request, column, value)."""
    indptr, indices, data = matrix
    starts = indptr[item_idx]
    lengths = indptr[item_idx + 1] - starts
    which = np.repeat(np.arange(len(item_idx)), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    src = np.repeat(starts, lengths) + within
    vals = (data[src] * weight[which]).astype(np.float32)
    return which, indices[src], vals


def _recent_items(
    eval_set: EvalSet, rows: slice, n_last: int, decay: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query-in-chunk, item, weight) of the last ``n_last`` history items of each query."""
    off = eval_set.offsets[rows.start : rows.stop + 1].astype(np.int64)
    lengths = np.diff(off)
    take = np.minimum(lengths, n_last)
    q_idx = np.repeat(np.arange(len(lengths), dtype=np.int64), take)
    starts = np.cumsum(take) - take
    age = np.arange(len(q_idx), dtype=np.int64) - np.repeat(starts, take)  # 0..take-1
    age = np.repeat(take, take) - 1 - age  # 0 = most recent
    pos = np.repeat(off[1:], take) - 1 - age
    item_idx = eval_set.history[pos].astype(np.int64)
    return q_idx, item_idx, decay ** age.astype(np.float64)


def _query_items(eval_set: EvalSet, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """(query-in-chunk, item) of each query's known items: ``seen`` plus ``history``."""
    parts_q, parts_i = [], []
    for values, offsets in (
        (eval_set.seen, eval_set.seen_offsets),
        (eval_set.history, eval_set.offsets),
    ):
        off = offsets[rows.start : rows.stop + 1].astype(np.int64)
        parts_q.append(np.repeat(np.arange(len(off) - 1, dtype=np.int64), np.diff(off)))
        parts_i.append(values[off[0] : off[-1]].astype(np.int64))
    q_idx = np.concatenate(parts_q)
    item_idx = np.concatenate(parts_i)
    # distinct (query, item) pairs, reserved indices dropped
    key = np.unique(q_idx * (1 << 40) + item_idx)
    q_idx, item_idx = key >> 40, key & ((1 << 40) - 1)
    keep = item_idx >= NUM_RESERVED
    return q_idx[keep], item_idx[keep]


# --------------------------------------------------------------------------------- tuning
@dataclass
class TuneResult:
    """Outcome of :func:`tune`: the best parameters, their score, and every trial."""

    params: dict[str, Any]
    score: float
    trials: list[tuple[dict[str, Any], float]] = field(default_factory=list)


def eval_exclude(eval_set: EvalSet, filter_seen: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The seen-items CSR when filtering, else None."""
    return (eval_set.seen, eval_set.seen_offsets) if filter_seen else None


def baseline_ranks(
    baseline: Baseline, eval_set: EvalSet, filter_seen: bool, chunk_size: int = 1024
) -> Tensor:
    """Full-catalogue target ranks of ``baseline`` on ``eval_set``."""

    def score_fn(rows: slice) -> Tensor:
        return baseline.score(eval_set, rows)

    return rank_from_scores(
        score_fn,
        eval_set.targets,
        exclude=eval_exclude(eval_set, filter_seen),
        chunk_size=chunk_size,
        num_items=baseline.num_items,
    )


def subsample(eval_set: EvalSet, max_queries: int, seed: int = 0) -> EvalSet:
    """At most ``max_queries`` queries of ``eval_set`` drawn without replacement (for tuning)."""
    q = len(eval_set)
    if q <= max_queries:
        return eval_set
    idx = np.sort(np.random.default_rng(seed).choice(q, max_queries, replace=False))

    def take(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.diff(offsets)[idx]
        new_off = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_off[1:])
        starts = np.repeat(offsets[idx], lengths)
        within = np.arange(new_off[-1]) - np.repeat(new_off[:-1], lengths)
        return values[starts + within], new_off

    history, offsets = take(eval_set.history, eval_set.offsets)
    seen, seen_offsets = take(eval_set.seen, eval_set.seen_offsets)
    return EvalSet(
        history=history,
        offsets=offsets,
        targets=eval_set.targets[idx],
        users=eval_set.users[idx],
        hours=eval_set.hours[idx],
        contexts=eval_set.contexts[idx],
        seen=seen,
        seen_offsets=seen_offsets,
    )


def tune(
    factory: Callable[..., Baseline],
    grid: dict[str, Sequence[Any]],
    data: PreparedData,
    filter_seen: bool,
    metric: str = "ndcg@10",
    max_queries: int = 5000,
    refit: Iterable[str] | None = None,
) -> TuneResult:
    """Grid search on the validation split (never the test split).

    Args:
        factory: Baseline constructor taking the grid's keys as keyword arguments.
        grid: Parameter name -> values to try.
        data: Prepared data (fit on ``train``, scored on ``valid``).
        filter_seen: Whether seen items are removed from rankings.
        metric: Key of :func:`metrics_from_ranks` to maximise.
        max_queries: Validation queries used (a seeded subsample beyond this).
        refit: Parameters that need a new fit when changed (default: all); others are set on
            the fitted object (cheap scoring-time parameters such as a recency decay).

    Returns:
        The best parameters (first best in grid order on ties), their score, and all trials.
    """
    k = int(metric.split("@")[1])
    valid = subsample(data.valid, max_queries)
    names = list(grid)
    refit_names = set(names if refit is None else refit)
    trials: list[tuple[dict[str, Any], float]] = []
    fitted: dict[tuple, Baseline] = {}
    for combo in itertools.product(*(grid[n] for n in names)):
        params = dict(zip(names, combo, strict=True))
        fit_key = tuple((n, params[n]) for n in names if n in refit_names)
        if fit_key not in fitted:
            fitted = {fit_key: factory(**{n: params[n] for n in names if n in refit_names})}
            fitted[fit_key].fit(data)
        model = fitted[fit_key]
        for n in names:
            if n not in refit_names:
                setattr(model, n, params[n])
        value = metrics_from_ranks(baseline_ranks(model, valid, filter_seen), [k])[metric]
        trials.append((params, value))
        log.debug("tune %s %s: valid %s = %.4f", model.name, params, metric, value)
    best, best_value = max(trials, key=lambda t: t[1]) if trials else ({}, float("nan"))
    if trials:  # one line per baseline; every trial at DEBUG (-vv)
        log.info(
            "tuned %s on validation: %s (%s %.4f, best of %d)",
            fitted[next(iter(fitted))].name, best, metric, best_value, len(trials),
        )  # fmt: skip
    return TuneResult(params=best, score=best_value, trials=trials)


#: Light validation grids (a few fits each; scoring-only parameters are cheap).
COOC_GRID: dict[str, list[Any]] = {
    "window": [5, 20],
    "mix": [0.0, 0.5, 1.0],
    "n_last": [5, 20],
    "decay": [1.0, 0.8, 0.5],
}
ALS_GRID: dict[str, list[Any]] = {"factors": [32, 64, 128], "regularization": [0.01, 0.1, 1.0]}
#: Next-track transitions alone: co-occurrence with ``mix = 1`` (the window is then unused).
TRANSITIONS_GRID: dict[str, list[Any]] = {"n_last": [1, 5, 20], "decay": [1.0, 0.8, 0.5, 0.2]}


class Transitions(ItemCooccurrence):
    """Next-track transitions only: :class:`ItemCooccurrence` with ``mix = 1``.

    The session-based baseline of published comparisons (a first-order Markov chain over the
    recency-weighted last ``n_last`` plays); listed on its own so that a table shows it even
    where the tuned co-occurrence mixes in the symmetric matrix.
    """

    name = "transitions"

    def __init__(self, n_last: int = 5, decay: float = 0.5) -> None:
        super().__init__(n_last=n_last, decay=decay, mix=1.0, window=1)

    def params(self) -> dict[str, Any]:
        """Hyper-parameters (``mix`` is fixed at 1)."""
        return {"n_last": self.n_last, "decay": self.decay}


def make_baseline(name: str, **params: Any) -> Baseline:
    """A baseline by name (see :data:`BASELINES`)."""
    if name == "popular":
        return MostPopular()
    if name == "cooccurrence":
        return ItemCooccurrence(**params)
    if name == "transitions":
        return Transitions(**params)
    if name == "als":
        return ALS(**params)
    raise ValueError(f"unknown baseline {name!r}; expected one of {list(BASELINES)}")


def fit_baselines(
    data: PreparedData,
    names: Sequence[str] = BASELINES,
    filter_seen: bool = False,
    tune_on_valid: bool = True,
    skip_missing: bool = True,
) -> list[Baseline]:
    """Fit (and lightly tune on validation) the named baselines on ``data.train``.

    Args:
        data: Prepared data.
        names: Baselines to fit, from :data:`BASELINES`.
        filter_seen: Seen filtering used when tuning (same as the final evaluation).
        tune_on_valid: Grid-search :data:`COOC_GRID` / :data:`ALS_GRID` on the validation split;
            False uses the defaults.
        skip_missing: Skip ALS with a logged warning when ``implicit`` is not installed
            (otherwise the ImportError propagates).

    Returns:
        Fitted baselines; ``fit_seconds`` includes the tuning time.
    """
    out: list[Baseline] = []
    for name in names:
        start = time.perf_counter()
        if name == "als":
            try:
                _import_implicit()
            except ImportError as e:
                if not skip_missing:
                    raise
                log.warning("skipping the ALS baseline: %s", e)
                continue
        grid = {"cooccurrence": COOC_GRID, "transitions": TRANSITIONS_GRID, "als": ALS_GRID}.get(
            name
        )
        params: dict[str, Any] = {}
        if tune_on_valid and grid is not None and len(data.valid):
            refit = {"cooccurrence": ["window"], "transitions": [], "als": None}[name]
            params = tune(
                functools.partial(make_baseline, name), grid, data, filter_seen, refit=refit
            ).params
        model = make_baseline(name, **params).fit(data)
        model.fit_seconds = time.perf_counter() - start
        out.append(model)
    return out
