"""``twotower compare``: is the new model better than the old one? Same queries for both.

Both models score the **same** queries (the test split of one data config) against their own
full catalogue, exactly (item vectors, no ANN). Everything goes through raw track ids, so models
with different catalogues compare fairly: a target that is not in a model's catalogue is a miss
for that model, and the report says how many such targets each side has. Cold targets of the
split itself (never seen in its training data; their raw id is not kept) are misses for both.

Per metric the report gives both values with 95% bootstrap intervals (the same resampled queries
for both), the paired difference B - A with its interval (:func:`twotower.metrics.paired_diff`),
how many queries get better / worse / the same under B, the overlap@K of the two top-K lists
(share of B's top-K also in A's), and Recall@K curves for K = 1..100.

A RUN is a pipeline run folder (its ``artifacts/``), an artifact folder or a Lightning
checkpoint. The queries come from ``--data-config`` when given, else from RUN_A's data.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from twotower.metrics import bootstrap_cis, paired_diff, per_query_metrics
from twotower.query import QueryBatch, QuerySpec

log = logging.getLogger("twotower")

#: Markers of the reserved indices in raw-id arrays (0 pad, 1 out of vocabulary).
PAD_ID = "\x00pad"
OOV_ID = "\x00oov"
CURVE_MAX_K = 100

QueryEncoder = Callable[[QueryBatch], Tensor]  # a query tower: QueryBatch -> [Q, d]


# ------------------------------------------------------------------------------ queries
@dataclass
class RawQueries:
    """Next-item queries in raw ids, so that any model can map them to its own vocabulary.

    Attributes:
        history: CSR values: raw track id of every history event (oldest first), ``OOV_ID``
            for tracks the split's vocabulary does not know.
        offsets: ``[Q + 1]``.
        targets: Raw target id per query, ``OOV_ID`` for a cold target (a miss for everyone).
        users: Raw listener id, ``PAD_ID`` (no listener) or ``OOV_ID`` (unknown).
        hours: Hour of day of the target, -1 unknown, ``[Q]``.
        contexts: Raw context type, ``PAD_ID`` or ``OOV_ID`` when unknown.
        seen: CSR raw ids already heard before the target (for seen filtering).
        seen_offsets: ``[Q + 1]``.
        filter_seen: Whether the data's protocol removes seen items from the rankings.
        label: Where the queries come from (for the report).
    """

    history: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray
    users: np.ndarray
    hours: np.ndarray
    contexts: np.ndarray
    seen: np.ndarray
    seen_offsets: np.ndarray
    filter_seen: bool = False
    label: str = ""

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def from_prepared(cls, data: Any, split: str = "test", label: str = "") -> RawQueries:
        """The ``valid`` or ``test`` queries of a :class:`~twotower.data.prepared.PreparedData`."""
        ev = getattr(data, split)
        items = np.asarray([PAD_ID, OOV_ID, *data.item_vocab.ids], dtype=object)
        users = np.asarray([PAD_ID, OOV_ID, *data.user_vocab.ids], dtype=object)
        contexts = np.asarray([PAD_ID, OOV_ID, *data.context_vocab.ids], dtype=object)
        return cls(
            history=items[ev.history],
            offsets=np.asarray(ev.offsets, dtype=np.int64),
            targets=np.where(np.isin(ev.targets, (0, 1)), OOV_ID, items[ev.targets]),
            users=users[ev.users],
            hours=np.asarray(ev.hours, dtype=np.int64),
            contexts=contexts[ev.contexts],
            seen=items[ev.seen],
            seen_offsets=np.asarray(ev.seen_offsets, dtype=np.int64),
            filter_seen=bool(data.params.get("filter_seen", False)),
            label=label or f"{split} split of {data.report.source or 'the data'}",
        )

    def take(self, rows: np.ndarray) -> RawQueries:
        """The queries ``rows`` (in that order)."""

        def csr(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = offsets[rows], offsets[rows + 1]
            lens = hi - lo
            idx = (
                np.repeat(lo, lens)
                + np.arange(int(lens.sum()))
                - np.repeat(np.cumsum(lens) - lens, lens)
            )
            return values[idx], np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)

        hist, off = csr(self.history, self.offsets)
        seen, soff = csr(self.seen, self.seen_offsets)
        return RawQueries(
            hist,
            off,
            self.targets[rows],
            self.users[rows],
            self.hours[rows],
            self.contexts[rows],
            seen,
            soff,
            self.filter_seen,
            self.label,
        )


def index_of(raw: np.ndarray, ids: pd.Index) -> np.ndarray:
    """Vocabulary index (row + 2) of raw ids; ``OOV_ID`` and unknown ids -> 1, ``PAD_ID`` -> 0."""
    raw = np.asarray(raw, dtype=object)
    if len(raw) == 0:
        return np.zeros(0, dtype=np.int64)
    pos = ids.get_indexer(raw.astype(str))
    out = np.where(pos < 0, 1, pos + 2).astype(np.int64)
    out[raw == PAD_ID] = 0
    return out


# ------------------------------------------------------------------------------ model sides
@dataclass
class ModelSide:
    """One model, as compare needs it: a query encoder and the vectors of its catalogue.

    Attributes:
        name: Label in the report.
        source: The path it was loaded from.
        track_ids: Raw track id per catalogue row ``[N]`` (row i = vocabulary index i + 2).
        item_emb: Item vectors ``[N, d]``.
        tower: The query tower, ``tower(QueryBatch) -> [Q, d]`` on vocabulary indices.
        spec: What the tower reads (history length, context fields): the query contract.
        user_ids: Raw listener ids in vocabulary order (index i + 2).
        context_ids: Raw context types in vocabulary order.
        data_config: The data configuration it was trained on (DataConfig fields), if known.
        fingerprint: Fingerprint of its training data, if known.
        rows_of: Raw track ids -> catalogue rows (-1 unknown), where the model's vocabulary
            is more than the list of ``track_ids`` (an artifact's hashed vocabulary).
        searchable: Rows that may be recommended ``[N]`` (None: all); a hashed artifact's
            buckets that no training track hashed into are never results, as in the service.
    """

    name: str
    source: str
    track_ids: np.ndarray
    item_emb: Tensor
    tower: QueryEncoder
    spec: QuerySpec
    user_ids: list[str] = field(default_factory=list)
    context_ids: list[str] = field(default_factory=list)
    data_config: dict[str, Any] | None = None
    fingerprint: str | None = None
    rows_of: Callable[[list[str]], np.ndarray] | None = None
    searchable: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.track_index = pd.Index(np.asarray(self.track_ids, dtype=object).astype(str))
        self.user_index = pd.Index([str(u) for u in self.user_ids])
        self.context_index = pd.Index([str(c) for c in self.context_ids])

    @property
    def num_tracks(self) -> int:
        """Catalogue size."""
        return len(self.track_ids)

    def track_indices(self, raw: np.ndarray) -> np.ndarray:
        """Vocabulary indices (row + 2) of raw track ids; unknown -> OOV, ``PAD_ID`` -> pad."""
        if self.rows_of is None:
            return index_of(raw, self.track_index)
        raw = np.asarray(raw, dtype=object)
        rows = self.rows_of([str(r) for r in raw]) if len(raw) else np.zeros(0, np.int64)
        out = np.where(rows < 0, 1, rows + 2).astype(np.int64)
        out[raw == PAD_ID] = 0
        out[raw == OOV_ID] = 1
        return out


def _eval_tower(tower: torch.nn.Module) -> QueryEncoder:
    tower.eval()

    @torch.no_grad()
    def encode(query: QueryBatch) -> Tensor:
        return tower(query).float()  # [Q, d]

    return encode


def side_from_artifact(path: str | Path, name: str | None = None) -> ModelSide:
    """A :class:`ModelSide` from an artifact folder, read by the :class:`Retriever`.

    Checksums are verified, and raw ids map to rows as the service maps them (hashed
    vocabularies included).
    """
    from twotower.retrieve import Retriever

    path = Path(path)
    r = Retriever.load(path, mmap=False)

    def ordered(d: dict[str, int]) -> list[str]:
        return sorted(d, key=d.__getitem__)

    data = r.manifest.get("data") or {}
    return ModelSide(
        name=name or _default_name(path),
        source=str(path),
        track_ids=r.ids,
        item_emb=torch.from_numpy(np.asarray(r.item_emb, dtype=np.float32)),
        tower=_eval_tower(r.query_tower),
        spec=r.spec,
        user_ids=ordered(r.user_index),
        context_ids=ordered(r.context_index),
        data_config=data.get("datamodule"),
        fingerprint=data.get("fingerprint"),
        rows_of=r.rows_of,
        searchable=r.searchable,
    )


def side_from_checkpoint(path: str | Path, name: str | None = None) -> ModelSide:
    """A :class:`ModelSide` from a Lightning checkpoint (read with ``weights_only=True``)."""
    from twotower.export import load_checkpoint_dict
    from twotower.model.module import TwoTowerModule

    path = Path(path)
    ckpt = load_checkpoint_dict(path)
    info = ckpt.get("twotower") or {}
    if "item_vocab" not in info:
        raise ValueError(f"{path}: no vocabularies in the checkpoint (not a twotower checkpoint)")
    hp = {k: v for k, v in dict(ckpt["hyper_parameters"]).items() if not k.startswith("_")}
    module = TwoTowerModule(**hp)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    with torch.no_grad():
        item_emb = module.item_embeddings()[2:].float()  # [N, d]
    dm = {
        k: v
        for k, v in dict(ckpt.get("datamodule_hyper_parameters") or {}).items()
        if not k.startswith("_")
    }
    return ModelSide(
        name=name or _default_name(path),
        source=str(path),
        track_ids=np.asarray(info["item_vocab"], dtype=object),
        item_emb=item_emb,
        tower=_eval_tower(module.query_tower),
        spec=QuerySpec.from_config(
            module.query_tower.config, dm.get("window", module.query_tower.max_len)
        ),
        user_ids=list(info.get("user_vocab", [])),
        context_ids=list(info.get("context_vocab", [])),
        data_config=dm or None,
        fingerprint=info.get("fingerprint"),
    )


def _default_name(path: Path) -> str:
    """``runs/x/artifacts`` -> ``x``; ``runs/x/checkpoints/best.ckpt`` -> ``x/best``."""
    if path.name == "artifacts":
        return path.parent.name
    if path.suffix == ".ckpt" and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.stem}"
    return path.name


def load_side(path: str | Path, name: str | None = None) -> ModelSide:
    """A run folder, an artifact folder or a checkpoint as a :class:`ModelSide`.

    Raises:
        FileNotFoundError: Nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_file():
        return side_from_checkpoint(path, name)
    if (path / "manifest.json").is_file():
        return side_from_artifact(path, name)
    if (path / "artifacts" / "manifest.json").is_file():
        return side_from_artifact(path / "artifacts", name or path.name)
    if (path / "lineage.json").is_file():
        ckpt = json.loads((path / "lineage.json").read_text()).get("checkpoint") or {}
        if ckpt.get("path") and (path / ckpt["path"]).is_file():
            return side_from_checkpoint(path / ckpt["path"], name or path.name)
    raise FileNotFoundError(
        f"{path}: not a run folder (artifacts/ or a checkpoint), an artifact folder "
        "(manifest.json) or a checkpoint file"
    )


# ------------------------------------------------------------------------------ scoring
@dataclass
class SideResult:
    """Ranks and top lists of one model on a set of queries.

    Attributes:
        ranks: 0-based target rank ``[Q]`` (:data:`~twotower.metrics.MISS_RANK` = miss).
        topk: Raw ids of the top-``k`` per query ``[Q, k]`` (None where the list is short).
        missing_targets: Queries whose target is not in this model's catalogue.
    """

    ranks: np.ndarray
    topk: np.ndarray
    missing_targets: int


def score_queries(
    side: ModelSide, queries: RawQueries, k: int = CURVE_MAX_K, chunk_size: int = 1024
) -> SideResult:
    """Rank every target against the side's whole catalogue and keep its top-``k`` raw ids.

    Histories, listeners and contexts are mapped to the side's vocabulary (unknown -> OOV);
    seen items are removed when ``queries.filter_seen`` (the target itself stays ranked).
    """
    from twotower.metrics import rank_and_topk_from_scores

    n = len(queries)
    query = side.spec.build(
        side.track_indices(queries.history),
        queries.offsets,
        users=index_of(queries.users, side.user_index),
        hours=np.asarray(queries.hours, dtype=np.int64),
        contexts=index_of(queries.contexts, side.context_index),
    )  # the query contract: left-padded history + context, in the side's vocabulary
    targets = side.track_indices(queries.targets)  # [Q]
    exclude = None
    if queries.filter_seen:
        seen = side.track_indices(queries.seen)
        q_of = np.repeat(np.arange(n), np.diff(queries.seen_offsets))
        keep = seen >= 2
        exclude = (
            seen[keep],
            np.concatenate([[0], np.cumsum(np.bincount(q_of[keep], minlength=n))]),
        )
    item_t = torch.cat([side.item_emb.new_zeros(2, side.item_emb.shape[1]), side.item_emb]).T
    blocked = None  # columns the model never recommends (empty hashed buckets)
    if side.searchable is not None and not side.searchable.all():
        blocked = torch.from_numpy(np.concatenate([[False, False], ~side.searchable]))

    def score_fn(rows: slice) -> Tensor:
        scores = side.tower(query[rows]) @ item_t  # [b, N + 2]
        return scores if blocked is None else scores.masked_fill(blocked, float("-inf"))

    kk = min(k, side.num_tracks)
    ranks, top = rank_and_topk_from_scores(
        score_fn,
        targets,
        exclude=exclude,
        k=kk,
        chunk_size=chunk_size,
        num_items=side.num_tracks + 2,
    )
    assert top is not None
    table = np.asarray([PAD_ID, OOV_ID, *side.track_index], dtype=object)
    return SideResult(
        ranks=ranks.numpy().astype(np.int64),
        topk=table[top.numpy()],
        missing_targets=int((targets < 2).sum()),
    )


def recall_curve(ranks: np.ndarray, max_k: int = CURVE_MAX_K) -> np.ndarray:
    """Recall@K for K = 1..``max_k`` from 0-based ranks, ``[max_k]``."""
    r = np.asarray(ranks, dtype=np.int64)
    if len(r) == 0:
        return np.full(max_k, np.nan)
    hits = np.bincount(np.minimum(r, max_k), minlength=max_k + 1)[:max_k]
    return np.cumsum(hits) / len(r)


def overlap_at_k(top_a: np.ndarray, top_b: np.ndarray, k: int) -> float:
    """Mean share of B's top-``k`` that is also in A's top-``k`` (1 = the same lists)."""
    if len(top_a) == 0:
        return float("nan")
    a, b = top_a[:, :k], top_b[:, :k]
    shared = [len((set(x) & set(y)) - {PAD_ID}) for x, y in zip(a, b, strict=True)]
    return float(np.mean(shared) / k)


# ------------------------------------------------------------------------------ the report
@dataclass
class MetricComparison:
    """One metric for both models.

    Attributes:
        a: ``(mean, lo, hi)`` of model A.
        b: ``(mean, lo, hi)`` of model B.
        diff: ``(B - A, lo, hi)``, paired bootstrap over the same queries.
        better: Queries where B scores higher than A.
        worse: Queries where B scores lower.
        same: Queries with equal values (e.g. both miss).
    """

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    diff: tuple[float, float, float]
    better: int
    worse: int
    same: int


@dataclass
class CompareReport:
    """Model A (old) vs model B (new) on the same queries; differences are B - A.

    Attributes:
        a: Name of A.
        b: Name of B.
        a_source: Where A was loaded from.
        b_source: Where B was loaded from.
        queries: Label of the queries (split and dataset).
        split: ``"valid"`` or ``"test"``.
        num_queries: Queries compared.
        ks: Cut-offs.
        filter_seen: Whether seen items were removed from the rankings.
        bootstrap: Resamples of the intervals.
        cold_targets: Queries whose target is cold in the split (a miss for both).
        missing_targets: Per side, queries whose target is not in its catalogue (cold included).
        catalogue: Tracks of A, of B, and in both.
        metrics: Metric name -> :class:`MetricComparison`.
        overlap: K -> mean overlap@K of the two top-K lists.
        curve: ``{"a": [...], "b": [...]}``, Recall@K for K = 1..100.
        notes: Remarks (e.g. models trained on different data).
    """

    a: str
    b: str
    a_source: str
    b_source: str
    queries: str
    split: str
    num_queries: int
    ks: tuple[int, ...]
    filter_seen: bool
    bootstrap: int
    cold_targets: int
    missing_targets: dict[str, int]
    catalogue: dict[str, int]
    metrics: dict[str, MetricComparison]
    overlap: dict[int, float]
    curve: dict[str, list[float]]
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """The report as Markdown: the metric table, overlap, catalogue coverage, notes."""
        lines = [
            f"**A** = `{self.a}` ({self.a_source})  \n**B** = `{self.b}` ({self.b_source})",
            "",
            f"Queries: {self.queries}, {self.num_queries:,} queries scored by both models "
            f"against their full catalogues "
            f"({'seen items filtered' if self.filter_seen else 'seen items kept'}); "
            f"95% bootstrap intervals ({self.bootstrap} resamples); B - A is paired over "
            f"the same queries; better/worse/same count queries.",
            "",
            "| metric | A | B | B - A | B better | B worse | same |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, c in self.metrics.items():
            lines.append(
                f"| {m} | {_ci(c.a)} | {_ci(c.b)} | {_ci(c.diff, signed=True)} | "
                f"{c.better:,} | {c.worse:,} | {c.same:,} |"
            )
        lines += [
            "",
            "| overlap@K | " + " | ".join(str(k) for k in self.overlap) + " |",
            "|---|" + "---|" * len(self.overlap),
            "| share of B's top-K also in A's | "
            + " | ".join(f"{v:.3f}" for v in self.overlap.values())
            + " |",
            "",
            f"Catalogues: A {self.catalogue['a']:,} tracks, B {self.catalogue['b']:,}, "
            f"{self.catalogue['shared']:,} in both. Targets outside a model's catalogue count "
            f"as misses for it: A {self.missing_targets['a']:,}, B "
            f"{self.missing_targets['b']:,} of {self.num_queries:,} (including "
            f"{self.cold_targets:,} cold targets of the split, misses for both).",
        ]
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""

        def trip(t: tuple[float, float, float]) -> dict[str, float | None]:
            return {k: _num(v) for k, v in zip(("mean", "lo", "hi"), t, strict=True)}

        return {
            "a": {"name": self.a, "source": self.a_source},
            "b": {"name": self.b, "source": self.b_source},
            "queries": self.queries,
            "split": self.split,
            "num_queries": self.num_queries,
            "ks": list(self.ks),
            "filter_seen": self.filter_seen,
            "bootstrap": self.bootstrap,
            "cold_targets": self.cold_targets,
            "missing_targets": self.missing_targets,
            "catalogue": self.catalogue,
            "metrics": {
                m: {
                    "a": trip(c.a),
                    "b": trip(c.b),
                    "diff": trip(c.diff),
                    "better": c.better,
                    "worse": c.worse,
                    "same": c.same,
                }
                for m, c in self.metrics.items()
            },
            "overlap": {str(k): _num(v) for k, v in self.overlap.items()},
            "recall_curve": {
                "k": list(range(1, len(self.curve["a"]) + 1)),
                "a": [_num(v) for v in self.curve["a"]],
                "b": [_num(v) for v in self.curve["b"]],
            },
            "notes": self.notes,
        }

    def to_json(self) -> str:
        """Pretty JSON (NaN as null)."""
        return json.dumps(self.to_dict(), indent=2)

    def save_png(self, path: str | Path) -> Path:
        """Recall@K curves of both models (K = 1..100) as a PNG (matplotlib, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = np.arange(1, len(self.curve["a"]) + 1)
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        ax.plot(ks, self.curve["a"], label=f"A: {self.a}")
        ax.plot(ks, self.curve["b"], label=f"B: {self.b}", linestyle="--")
        for k in self.ks:
            if k <= len(ks):
                ax.axvline(k, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("K (log scale)")
        ax.set_ylabel("Recall@K")
        ax.set_ylim(0, 1)
        ax.set_title(f"Recall@K on {self.num_queries:,} queries ({self.split})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _ci(t: tuple[float, float, float], signed: bool = False) -> str:
    mean, lo, hi = t
    f = "{:+.4f}" if signed else "{:.4f}"
    if not np.isfinite(lo):
        return f.format(mean)
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def compare_sides(
    side_a: ModelSide,
    side_b: ModelSide,
    queries: RawQueries,
    ks: Sequence[int] = (10, 20, 50),
    bootstrap: int = 1000,
    seed: int = 0,
    split: str = "test",
    notes: Sequence[str] = (),
) -> CompareReport:
    """Score both models on ``queries`` and build the report (see the module docstring)."""
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs must be positive integers, got {ks}")
    if len(queries) == 0:
        raise ValueError(f"no queries to compare on ({queries.label})")
    top_k = max(CURVE_MAX_K, ks[-1])
    ra = score_queries(side_a, queries, k=top_k)
    rb = score_queries(side_b, queries, k=top_k)
    pa, pb = per_query_metrics(ra.ranks, ks), per_query_metrics(rb.ranks, ks)
    names = [m for k in ks for m in (f"recall@{k}", f"ndcg@{k}")] + [f"mrr@{ks[-1]}"]
    cis_a = bootstrap_cis({m: pa[m] for m in names}, n=bootstrap, seed=seed)
    cis_b = bootstrap_cis({m: pb[m] for m in names}, n=bootstrap, seed=seed)
    metrics = {}
    for m in names:
        d = pb[m] - pa[m]
        metrics[m] = MetricComparison(
            a=cis_a[m],
            b=cis_b[m],
            diff=paired_diff(pb[m], pa[m], n=bootstrap, seed=seed),
            better=int((d > 0).sum()),
            worse=int((d < 0).sum()),
            same=int((d == 0).sum()),
        )
    shared = int(side_a.track_index.isin(side_b.track_index).sum())
    return CompareReport(
        a=side_a.name,
        b=side_b.name,
        a_source=side_a.source,
        b_source=side_b.source,
        queries=queries.label,
        split=split,
        num_queries=len(queries),
        ks=ks,
        filter_seen=queries.filter_seen,
        bootstrap=bootstrap,
        cold_targets=int((queries.targets == OOV_ID).sum()),
        missing_targets={"a": ra.missing_targets, "b": rb.missing_targets},
        catalogue={"a": side_a.num_tracks, "b": side_b.num_tracks, "shared": shared},
        metrics=metrics,
        overlap={k: overlap_at_k(ra.topk, rb.topk, k) for k in ks},
        curve={
            "a": recall_curve(ra.ranks).tolist(),
            "b": recall_curve(rb.ranks).tolist(),
        },
        notes=list(notes),
    )


def data_config_of(side: ModelSide) -> Any:
    """The :class:`~twotower.data.pipeline.DataConfig` a side was trained on.

    Raises:
        ValueError: The side does not record its data configuration.
    """
    from twotower.data.pipeline import DataConfig

    if not side.data_config:
        raise ValueError(f"{side.source}: records no data configuration; pass --data-config")
    if side.data_config.get("prepared"):
        raise ValueError(
            f"{side.source}: trained from a prepared folder (data.prepared="
            f"{side.data_config['prepared']}), whose raw logs are not known here; pass "
            "--data-config with a config whose data section reads those logs"
        )
    fields = DataConfig.__dataclass_fields__
    return DataConfig(**{k: v for k, v in side.data_config.items() if k in fields})


def compare_runs(
    a: str | Path,
    b: str | Path,
    split: str = "test",
    ks: Sequence[int] = (10, 20, 50),
    bootstrap: int = 1000,
    data_config: Sequence[str | Path] | None = None,
    overrides: Mapping[str, str] | None = None,
    seed: int = 0,
) -> CompareReport:
    """Compare two models (run folders, artifact folders or checkpoints) on the same queries.

    Args:
        a: The old model (A).
        b: The new model (B).
        split: ``"valid"`` or ``"test"``.
        ks: Cut-offs.
        bootstrap: Resamples of the 95% intervals.
        data_config: Configs whose data section gives the queries (default: A's data).
        overrides: Data option overrides for ``data_config``.
        seed: Bootstrap seed.

    Raises:
        FileNotFoundError: A or B is not a run, artifact or checkpoint.
        ValueError: No data configuration, or an empty split.
    """
    from twotower.config import data_config_with, load_data_config
    from twotower.data.pipeline import prepare_data

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    side_a, side_b = load_side(a), load_side(b)
    if side_a.name == side_b.name:
        side_a.name, side_b.name = f"A:{side_a.name}", f"B:{side_b.name}"
    notes = []
    if not data_config and not overrides and (side_a.data_config or {}).get("prepared"):
        from twotower.data.datamodule import datamodule_from_hparams

        # a prepared folder (another engine's, say): its evaluation cases, plays left on disk
        data = datamodule_from_hparams({**(side_a.data_config or {}), "streaming": True}).data
    else:
        if data_config:
            cfg = load_data_config([str(p) for p in data_config], overrides)
        else:
            cfg = data_config_of(side_a)
            if overrides:
                cfg = data_config_with(cfg, overrides)
                notes.append(f"queries from A's data with {', '.join(overrides)}")
        data = prepare_data(cfg, in_memory=cfg.cache_dir is None)  # the cases, not the plays
    if data_config:
        notes.append(f"queries from --data-config {', '.join(str(p) for p in data_config)}")
    elif side_b.fingerprint and side_b.fingerprint != side_a.fingerprint:
        notes.append("A and B were trained on different data; the queries are A's")
    for side in (side_a, side_b):
        if side.fingerprint and side.fingerprint != data.fingerprint:
            notes.append(f"{side.name} was trained on other data than these queries")
    queries = RawQueries.from_prepared(data, split)
    log.info("compare: %d %s queries, A=%s, B=%s", len(queries), split, side_a.name, side_b.name)
    return compare_sides(side_a, side_b, queries, ks, bootstrap, seed, split, notes)


def compare_main(args: argparse.Namespace) -> int:
    """What ``twotower compare`` runs: print Markdown, optionally write JSON and a PNG."""
    from twotower.config import ConfigArgs, warn_unused
    from twotower.evaluate import parse_ks

    config_args = getattr(args, "config_args", None) or ConfigArgs()
    warn_unused(config_args, "compare")
    report = compare_runs(
        args.run_a,
        args.run_b,
        split=args.split,
        ks=parse_ks(args.ks),
        bootstrap=int(args.bootstrap),
        data_config=config_args.files or None,
        overrides=config_args.overrides,
    )
    text = report.to_markdown()
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    if args.png:
        report.save_png(args.png)
    return 0
